"""Build adaptune's built-in `fashion-mnist-1k` task from the official Fashion-MNIST IDX files.

A VTAB-1k-style subset: 800 train + 200 val images drawn from the official train split (80 + 20 per class) and 2,000
test images from the official test split (200 per class). The choice is fixed: within each class, candidates are
ranked by a SHA-256 of ``"<seed>:<split>:<index>"``, so the subset depends on nothing but the seed and the source files
(no random number generator whose stream could change between numpy versions). Each split keeps the official order.

Usage::

    python scripts/build_fashion_mnist_1k.py [--src /usr/share/datasets/fashion-mnist] [--out adaptune/datasets/...]

The IDX files come from Debian's ``dataset-fashion-mnist`` package or https://github.com/zalandoresearch/fashion-mnist
(MIT licence, (c) 2017 Zalando SE).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
from pathlib import Path

import numpy as np

DEFAULT_SRC = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "adaptune" / "datasets" / "fashion_mnist_1k.npz"
SEED = 0
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
TRAIN_PER_CLASS, VAL_PER_CLASS, TEST_PER_CLASS = 80, 20, 200


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: ``idx3`` images as (N, 28, 28) uint8, ``idx1`` labels as (N,) uint8."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # element type byte 0x08: unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, found {data.size}")
    return data.reshape(shape)


def _ranked(candidates: np.ndarray, split: str, seed: int) -> np.ndarray:
    """Candidates ordered by a keyed hash: a fixed pseudo-random order independent of any RNG implementation."""
    keys = [hashlib.sha256(f"{seed}:{split}:{int(i)}".encode()).digest() for i in candidates]
    return candidates[np.argsort(np.array(keys, dtype="S32"), kind="stable")]


def select(train_labels: np.ndarray, test_labels: np.ndarray, seed: int = SEED) -> dict[str, np.ndarray]:
    """Source indices of each split (sorted ascending): 80/20 per class from train, 200 per class from test."""
    picks: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(len(CLASS_NAMES)):
        ranked = _ranked(np.flatnonzero(train_labels == c), "trainval", seed)
        picks["train"].append(ranked[:TRAIN_PER_CLASS])
        picks["val"].append(ranked[TRAIN_PER_CLASS : TRAIN_PER_CLASS + VAL_PER_CLASS])
        picks["test"].append(_ranked(np.flatnonzero(test_labels == c), "test", seed)[:TEST_PER_CLASS])
    return {split: np.sort(np.concatenate(parts)) for split, parts in picks.items()}


def build(src: Path = DEFAULT_SRC, seed: int = SEED) -> dict[str, np.ndarray]:
    """The arrays stored in the npz: ``<split>_images`` (N, 28, 28) uint8, ``<split>_labels`` (N,) int64,
    ``<split>_source_index`` (N,) int64 (row in the official split), and ``class_names``."""
    train_x = read_idx(src / "train-images-idx3-ubyte.gz")
    train_y = read_idx(src / "train-labels-idx1-ubyte.gz")
    test_x = read_idx(src / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(src / "t10k-labels-idx1-ubyte.gz")
    arrays: dict[str, np.ndarray] = {"class_names": np.array(CLASS_NAMES)}
    for split, index in select(train_y, test_y, seed).items():
        images, labels = (test_x, test_y) if split == "test" else (train_x, train_y)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[index])
        arrays[f"{split}_labels"] = labels[index].astype(np.int64)
        arrays[f"{split}_source_index"] = index.astype(np.int64)
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="folder with the four *-ubyte.gz files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="npz file to write")
    parser.add_argument("--seed", type=int, default=SEED, help="selection seed (the shipped file uses 0)")
    args = parser.parse_args()
    arrays = build(args.src, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)  # type: ignore[arg-type]
    sizes = ", ".join(f"{s}={len(arrays[f'{s}_labels'])}" for s in ("train", "val", "test"))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {sizes}")


if __name__ == "__main__":
    main()
