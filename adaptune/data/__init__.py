"""Data: datasets from the recipe's ``data`` section, turned into deterministic, normalised DataLoaders.

Sources (``data.source``):

- ``builtin``: ``fashion-mnist-1k`` (a VTAB-1k-style task shipped with adaptune: 800 train, 200 val, 2,000 test
  images of 10 classes) or ``synthetic`` (procedural classes for tests, sized by ``data.synthetic``);
- ``vtab``: NOAH's VTAB-1k layout ``root/<task>/{train800,val200,train800val200,test}.txt``;
- ``folder``: ``root/{train,val,test}/<class>/<image>``.

Every loader yields ``(images float32 (B, 3, S, S), labels int64 (B,))``. Images are resized to ``img_size`` (no
crop), kept in memory as uint8 when they fit (``data.cache``), and normalised per batch. Training order and flips
depend only on ``(seed, epoch, sample index)``: see `EpochSampler`.

Example::

    loaders = build_loaders(recipe.data, img_size=224, mean=mean, std=std, batch_size=64, eval_batch_size=128, seed=0)
    for epoch in range(epochs):
        loaders.train_sampler.set_epoch(epoch)
        for images, labels in loaders.train:
            ...
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from adaptune.data.pipeline import Collate, EpochSampler, ImageSplit, ShardSampler
from adaptune.data.sources import Source, SplitData, open_source
from adaptune.errors import DataError
from adaptune.recipe import DataConfig

__all__ = ["DatasetInfo", "EpochSampler", "Loaders", "build_eval_loader", "build_loaders", "describe", "normalization"]

log = logging.getLogger(__name__)

CACHE_BUDGET_BYTES = 4 << 30  # cache decoded uint8 images while all cached splits together stay under this
NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
Triple = tuple[float, float, float]


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the manifest need to know about a dataset.

    Attributes:
        num_classes: Number of classes (the head's output size).
        class_names: One name per class (``"0"``, ``"1"``, ... where the source has none).
        split_sizes: Images per configured split, keyed by role: ``{"train": 800, "val": 200, "test": 2000}``;
            a split set to null in the recipe is absent.
    """

    num_classes: int
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]


@dataclass
class Loaders:
    """The loaders of one training run. ``val`` / ``test`` are None when the recipe sets that split to null.

    Call ``train_sampler.set_epoch(e)`` before iterating ``train`` for epoch ``e``, and ``train_sampler.set_start(k)``
    after it to resume that epoch after ``k`` batches.
    """

    info: DatasetInfo
    train: DataLoader
    val: DataLoader | None
    test: DataLoader | None
    train_sampler: EpochSampler


def _roles(cfg: DataConfig) -> list[tuple[str, str, str]]:
    """(role, split name, recipe key) of each configured split."""
    roles = [("train", cfg.train_split, "data.train_split")]
    if cfg.val_split is not None:
        roles.append(("val", cfg.val_split, "data.val_split"))
    if cfg.test_split is not None:
        roles.append(("test", cfg.test_split, "data.test_split"))
    return roles


def _info(cfg: DataConfig, source: Source) -> DatasetInfo:
    sizes: dict[str, int] = {}
    for role, split, key in _roles(cfg):
        sizes[role] = source.size(split, key)
        if sizes[role] == 0:
            raise DataError(f"{key}: split {split!r} holds no images; point {key} at a split with images")
    return DatasetInfo(num_classes=len(source.class_names), class_names=source.class_names, split_sizes=sizes)


def describe(cfg: DataConfig) -> DatasetInfo:
    """Class count, class names and split sizes of the configured dataset, without decoding any image.

    Raises:
        DataError: Missing root, task folder, list file or split folder, unknown built-in name or split name; the
            message names the recipe key and the fix.
    """
    return _info(cfg, open_source(cfg))


def normalization(normalize: str, mean: Triple, std: Triple) -> tuple[Triple, Triple]:
    """The (mean, std) for ``data.normalize``: ``model`` returns the given backbone values, the others are fixed."""
    if normalize == "model":
        return mean, std
    if normalize not in NORMALIZATIONS:
        raise DataError(f"data.normalize: unknown {normalize!r}; use model, imagenet, inception or none")
    return NORMALIZATIONS[normalize]


def _loader(
    dataset: ImageSplit,
    sampler: Sampler[int],
    batch_size: int,
    collate: Collate,
    cfg: DataConfig,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.workers,
        persistent_workers=False,  # workers must copy the sampler's epoch at each `iter()` (flip decisions)
        # Its own generator: without one, every `iter()` draws a worker seed from torch's global RNG, so where an
        # epoch starts would shift the dropout/method randomness, and a resumed run would differ from an uninterrupted
        # one. (Nothing in this pipeline uses the worker seed itself.)
        generator=torch.Generator().manual_seed(0),
        pin_memory=pin_memory,
        drop_last=drop_last,
    )


def _datasets(cfg: DataConfig, splits: dict[str, SplitData], img_size: int) -> dict[str, ImageSplit]:
    """One `ImageSplit` per role; cached (train first) while the running total fits `CACHE_BUDGET_BYTES`."""
    used = 0
    out: dict[str, ImageSplit] = {}
    for role, split in splits.items():
        need = ImageSplit.nbytes(split, img_size)
        cache = cfg.cache and used + need <= CACHE_BUDGET_BYTES
        if cfg.cache and not cache:
            log.info(
                "data: %s split (%.1f GiB at %d px) exceeds the cache budget; decoding per batch",
                role,
                need / 2**30,
                img_size,
            )
        used += need if cache else 0
        out[role] = ImageSplit(split, img_size, cfg.interpolation, cache=cache, shared=cfg.workers > 0)
    return out


def build_loaders(
    cfg: DataConfig,
    *,
    img_size: int,
    mean: Triple,
    std: Triple,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Loaders:
    """Training, validation and test loaders for the configured splits.

    The training loader shuffles with `EpochSampler` (sharded over ``world_size`` ranks, padded to equal length) and
    flips when ``data.hflip``; validation and test run in dataset order, strided over ranks without padding so that
    summing counts over ranks counts every image once.

    Args:
        cfg: The recipe's ``data`` section.
        img_size: Square size every image is resized to.
        mean: The backbone's per-channel mean, used when ``data.normalize`` is ``model``.
        std: The backbone's per-channel std, used when ``data.normalize`` is ``model``.
        batch_size: Training images per batch on this rank.
        eval_batch_size: Images per validation / test batch.
        seed: Seed of the training order and flips.
        pin_memory: Pin batches for faster host-to-GPU copies.
        rank: This process's rank.
        world_size: Number of processes.
        drop_last: Drop the last incomplete training batch.

    Raises:
        DataError: As `describe`, and when ``drop_last`` leaves no training batch.
    """
    source = open_source(cfg)
    info = _info(cfg, source)
    splits = {role: source.load(split, key) for role, split, key in _roles(cfg)}
    datasets = _datasets(cfg, splits, img_size)
    mean, std = normalization(cfg.normalize, mean, std)

    sampler = EpochSampler(len(datasets["train"]), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    if drop_last and sampler.num_samples < batch_size:
        raise DataError(
            f"train.batch_size: {batch_size} is larger than the {sampler.num_samples} training images per process "
            f"({cfg.train_split!r}); lower train.batch_size"
        )
    collate = Collate(mean, std, flip_sampler=sampler if cfg.hflip else None)
    train = _loader(datasets["train"], sampler, batch_size, collate, cfg, pin_memory=pin_memory, drop_last=drop_last)
    evals: dict[str, DataLoader | None] = {"val": None, "test": None}
    for role in ("val", "test"):
        if role in datasets:
            shard = ShardSampler(len(datasets[role]), rank, world_size)
            evals[role] = _loader(
                datasets[role], shard, eval_batch_size, Collate(mean, std), cfg, pin_memory=pin_memory
            )
    return Loaders(info=info, train=train, val=evals["val"], test=evals["test"], train_sampler=sampler)


def build_eval_loader(
    cfg: DataConfig, split: str, *, img_size: int, mean: Triple, std: Triple, batch_size: int
) -> DataLoader:
    """A loader over one whole split in dataset order, no flips (``adaptune eval --split``).

    Args:
        cfg: The recipe's ``data`` section.
        split: A split name as in the recipe (``train``, ``val``, ``test``, ``trainval``, or a VTAB list name).
        img_size: Square size every image is resized to.
        mean: The backbone's mean, used when ``data.normalize`` is ``model``.
        std: The backbone's std, used when ``data.normalize`` is ``model``.
        batch_size: Images per batch.

    Raises:
        DataError: As `describe`, naming ``--split`` for an unknown or missing split.
    """
    source = open_source(cfg)
    data = source.load(split, "--split")
    if len(data.labels) == 0:
        raise DataError(f"--split: split {split!r} holds no images; choose another split")
    dataset = _datasets(cfg, {"eval": data}, img_size)["eval"]
    mean, std = normalization(cfg.normalize, mean, std)
    return _loader(dataset, ShardSampler(len(dataset)), batch_size, Collate(mean, std), cfg)
