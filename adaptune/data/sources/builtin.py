"""The ``builtin`` source: datasets that need no download, picked by ``data.builtin.name``.

Each built-in dataset registers a factory with `register_dataset` (one file plus one import line in
``adaptune/data/sources/__init__.py``). Shipped here: ``fashion-mnist-1k``, a VTAB-1k-style task from Fashion-MNIST
(MIT, (c) Zalando SE): 800 train, 200 val, 2,000 test images of 10 classes, 28x28 grayscale, built by
``scripts/build_fashion_mnist_1k.py``. Every built-in dataset accepts the split names ``train``, ``val``, ``test`` and
``trainval`` (train + val).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np

from adaptune.config import opt
from adaptune.data.sources.registry import (
    SPLIT_ROLES,
    ArrayImages,
    Source,
    SourceSpec,
    SplitData,
    bad_split,
    register,
)
from adaptune.errors import DataError, did_you_mean

if TYPE_CHECKING:
    from adaptune.recipe import DataConfig


@dataclass(frozen=True)
class BuiltinConfig:
    name: str = opt("fashion-mnist-1k", "built-in dataset (`adaptune datasets` lists them)")
    seed: int = opt(0, "generator seed of procedurally generated datasets (ignored by fixed ones)")


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    summary: str
    make: Callable[[BuiltinConfig], Source]


_DATASETS: dict[str, BuiltinDataset] = {}


def register_dataset(dataset: BuiltinDataset) -> BuiltinDataset:
    """Add a built-in dataset; each name once."""
    if dataset.name in _DATASETS:
        raise ValueError(f"built-in dataset {dataset.name!r} registered twice")
    _DATASETS[dataset.name] = dataset
    return dataset


def list_datasets() -> list[BuiltinDataset]:
    return [_DATASETS[k] for k in sorted(_DATASETS)]


def _open(options: BuiltinConfig, data: DataConfig) -> Source:
    dataset = _DATASETS.get(options.name)
    if dataset is None:
        raise DataError(
            f"data.builtin.name: unknown built-in dataset {options.name!r}{did_you_mean(options.name, _DATASETS)}; "
            f"available: {', '.join(sorted(_DATASETS))}"
        )
    return dataset.make(options)


class ArraySplits:
    """A built-in dataset held as uint8 arrays per split (``train``, ``val``, ``test``); ``trainval`` joins two.

    Args:
        name: The dataset's name, for messages.
        class_names: One name per class.
        splits: ``split -> (images (N, h, w) or (N, h, w, 3) uint8, labels (N,) int64)``, or a function returning
            that for one split (generated on first use).
    """

    def __init__(
        self,
        name: str,
        class_names: tuple[str, ...],
        splits: Callable[[str], tuple[np.ndarray, np.ndarray]],
        sizes: dict[str, int],
    ):
        self.name = name
        self.class_names = class_names
        self._splits = splits
        self._sizes = sizes

    def _parts(self, split: str, key: str) -> tuple[str, ...]:
        if split not in SPLIT_ROLES:
            raise bad_split(split, key, self.name, SPLIT_ROLES)
        return ("train", "val") if split == "trainval" else (split,)

    def size(self, split: str, key: str) -> int:
        return sum(self._sizes[p] for p in self._parts(split, key))

    def load(self, split: str, key: str) -> SplitData:
        made = [self._splits(p) for p in self._parts(split, key)]
        images = np.concatenate([m[0] for m in made])
        labels = np.concatenate([m[1] for m in made])
        return SplitData(labels=labels, images=ArrayImages(images))


@functools.cache
def _shipped_array(npz_file: str, key: str) -> np.ndarray:
    """One read-only array of a ``.npz`` shipped in ``adaptune/datasets/`` (each read once per process)."""
    ref = resources.files("adaptune").joinpath("datasets", npz_file)
    with ref.open("rb") as f, np.load(f) as npz:
        array = npz[key]
    array.setflags(write=False)
    return array


def shipped_splits(name: str, npz_file: str) -> ArraySplits:
    """A task shipped as ``{train,val,test}_{images,labels}`` and ``class_names`` arrays in one ``.npz``."""
    return ArraySplits(
        name,
        tuple(str(c) for c in _shipped_array(npz_file, "class_names")),
        lambda split: (_shipped_array(npz_file, f"{split}_images"), _shipped_array(npz_file, f"{split}_labels")),
        {split: len(_shipped_array(npz_file, f"{split}_labels")) for split in ("train", "val", "test")},
    )


def fashion_mnist_1k(options: BuiltinConfig) -> ArraySplits:
    return shipped_splits("fashion-mnist-1k", "fashion_mnist_1k.npz")


register(
    SourceSpec(
        name="builtin",
        summary="datasets shipped with adaptune or generated on the spot (no download)",
        config_cls=BuiltinConfig,
        open=_open,
    )
)

register_dataset(
    BuiltinDataset(
        name="fashion-mnist-1k",
        summary="Fashion-MNIST, VTAB-1k-sized: 800 train / 200 val / 2,000 test, 10 classes, 28 px gray",
        make=fashion_mnist_1k,
    )
)
