"""Build adaptune's built-in `digits-1k` task from the handwritten digits that scikit-learn ships.

scikit-learn carries a copy of the test set of the UCI "Optical Recognition of Handwritten Digits" data (E. Alpaydin
and C. Kaynak, 1998; 1,797 images of 8x8 pixels, values 0..16, 13 writers) as ``sklearn/datasets/data/digits.csv.gz``
(the file behind ``sklearn.datasets.load_digits``). This script reads that file directly (sklearn is not imported,
only located) and writes a VTAB-1k-style task: 800 train + 200 val images (80 + 20 per class) and every remaining
image as the test split (797). Pixels are rescaled to uint8, ``round(v * 255 / 16)`` computed exactly in integers as
``(v * 255 + 8) // 16`` (0 -> 0, 16 -> 255).

The choice is fixed: within each class, rows are ranked by a SHA-256 of ``"<seed>:<row>"`` (no random number generator
whose stream could change between numpy versions); the first 80 are train, the next 20 val, the rest test. Each split
keeps the file's row order.

Usage::

    python scripts/build_digits_1k.py [--src PATH] [--out adaptune/datasets/digits_1k.npz]

``PATH`` is ``digits.csv.gz`` itself or a scikit-learn wheel (``pip download --no-deps scikit-learn``); by default the
file is looked up in an installed scikit-learn (PyPI or Debian's ``python3-sklearn``). Build-time only: adaptune does
not depend on scikit-learn. Licences: scikit-learn BSD-3-Clause; the data CC BY 4.0 (UCI, doi:10.24432/C50P49).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "sklearn/datasets/data/digits.csv.gz"  # inside a scikit-learn installation or wheel
DEBIAN = Path("/usr/lib/python3/dist-packages") / MEMBER
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "adaptune" / "datasets" / "digits_1k.npz"
SEED = 0
CLASS_NAMES = tuple(str(d) for d in range(10))
TRAIN_PER_CLASS, VAL_PER_CLASS = 80, 20


def find_source() -> Path | None:
    """``digits.csv.gz`` of an installed scikit-learn (located without importing it), else Debian's; None if absent."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        spec = None
    roots = (spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        candidate = Path(root).parent / MEMBER
        if candidate.is_file():
            return candidate
    return DEBIAN if DEBIAN.is_file() else None


def read_digits(src: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) uint8 in 0..255, labels (1797,) int64) from ``digits.csv.gz`` or a scikit-learn wheel."""
    if src.suffix == ".whl":
        with zipfile.ZipFile(src) as wheel:
            raw = wheel.read(MEMBER)
    else:
        raw = src.read_bytes()
    table = np.loadtxt(io.StringIO(gzip.decompress(raw).decode("ascii")), delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 65 or table[:, :64].min() < 0 or table[:, :64].max() > 16:
        raise ValueError(f"{src}: expected rows of 64 pixels in 0..16 and a label, got shape {table.shape}")
    images = ((table[:, :64] * 255 + 8) // 16).astype(np.uint8).reshape(-1, 8, 8)
    return images, table[:, 64].astype(np.int64)


def _ranked(candidates: np.ndarray, seed: int) -> np.ndarray:
    """Candidates ordered by a keyed hash: a fixed pseudo-random order independent of any RNG implementation."""
    keys = [hashlib.sha256(f"{seed}:{int(i)}".encode()).digest() for i in candidates]
    return candidates[np.argsort(np.array(keys, dtype="S32"), kind="stable")]


def select(labels: np.ndarray, seed: int = SEED) -> dict[str, np.ndarray]:
    """Row indices of each split (sorted ascending): 80 train and 20 val per class, the rest test."""
    picks: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(len(CLASS_NAMES)):
        ranked = _ranked(np.flatnonzero(labels == c), seed)
        picks["train"].append(ranked[:TRAIN_PER_CLASS])
        picks["val"].append(ranked[TRAIN_PER_CLASS : TRAIN_PER_CLASS + VAL_PER_CLASS])
        picks["test"].append(ranked[TRAIN_PER_CLASS + VAL_PER_CLASS :])
    return {split: np.sort(np.concatenate(parts)) for split, parts in picks.items()}


def build(src: Path, seed: int = SEED) -> dict[str, np.ndarray]:
    """The arrays stored in the npz: ``<split>_images`` (N, 8, 8) uint8, ``<split>_labels`` (N,) int64,
    ``<split>_source_index`` (N,) int64 (row of ``digits.csv.gz``), and ``class_names``."""
    images, labels = read_digits(src)
    arrays: dict[str, np.ndarray] = {"class_names": np.array(CLASS_NAMES)}
    for split, index in select(labels, seed).items():
        arrays[f"{split}_images"] = np.ascontiguousarray(images[index])
        arrays[f"{split}_labels"] = labels[index]
        arrays[f"{split}_source_index"] = index.astype(np.int64)
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=None, help="digits.csv.gz or a scikit-learn wheel")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="npz file to write")
    parser.add_argument("--seed", type=int, default=SEED, help="selection seed (the shipped file uses 0)")
    args = parser.parse_args()
    src = args.src or find_source()
    if src is None:
        parser.error("scikit-learn's digits.csv.gz not found; pip install scikit-learn, or pass --src FILE")
    arrays = build(src, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)  # type: ignore[arg-type]
    sizes = ", ".join(f"{s}={len(arrays[f'{s}_labels'])}" for s in ("train", "val", "test"))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB) from {src}: {sizes}")


if __name__ == "__main__":
    main()
