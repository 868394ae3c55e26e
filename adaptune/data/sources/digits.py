"""The built-in ``digits-1k`` task: real handwritten digits, VTAB-1k-sized, shipped with adaptune (53 kB).

The 1,797 8x8 grayscale digits of the UCI "Optical Recognition of Handwritten Digits" test set (E. Alpaydin and
C. Kaynak, 1998, CC BY 4.0), from the copy scikit-learn ships: 800 train and 200 val images (80 + 20 per class) and
the remaining 797 as test (74 to 83 per class), pixels rescaled from 0..16 to 0..255. Built by
``scripts/build_digits_1k.py``; licence in ``adaptune/datasets/DIGITS_LICENSE.txt``. Deviation from VTAB-1k: the
test split is everything that is left (VTAB uses each dataset's official test split), and the images are tiny
(8 px; the pipeline upsamples them to ``data.img_size``).
"""

from __future__ import annotations

from adaptune.data.sources.builtin import ArraySplits, BuiltinConfig, BuiltinDataset, register_dataset, shipped_splits


def digits_1k(options: BuiltinConfig) -> ArraySplits:
    """The shipped split arrays (``options.seed`` is ignored: the split is fixed)."""
    return shipped_splits("digits-1k", "digits_1k.npz")


register_dataset(
    BuiltinDataset(
        name="digits-1k",
        summary="handwritten digits (UCI via scikit-learn), VTAB-1k-sized: 800 train / 200 val / 797 test, 8 px gray",
        make=digits_1k,
    )
)
