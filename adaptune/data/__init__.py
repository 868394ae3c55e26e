"""Data: datasets from the recipe's ``data`` section, turned into deterministic, normalised DataLoaders of `Batch`es.

Where the images come from is a registered data source (``data.source``; `adaptune.data.sources`): ``builtin``
(datasets that need no download), ``synthetic`` (procedural classes for tests), ``vtab`` (NOAH's VTAB-1k list files),
``folder`` (``root/{train,val,test}/<class>/<image>``).

Every loader yields a `Batch` whose ``inputs`` match the model's `InputSpec` (``input_spec``): images resized to
``(H, W)`` (no crop), matched to the model's channels, normalised per batch. Decoded images are kept in memory as
uint8 when they fit (``data.cache``). Training order and flips depend only on ``(seed, epoch, sample index)``: see
`EpochSampler`.

Example::

    spec = input_spec(model, recipe)
    loaders = build_loaders(recipe.data, spec=spec, batch_size=64, eval_batch_size=128, seed=0)
    for epoch in range(epochs):
        loaders.train_sampler.set_epoch(epoch)
        for batch in loaders.train:
            ...
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Sampler

from adaptune.batch import InputSpec
from adaptune.data.pipeline import Collate, EpochSampler, ImageSplit, ShardSampler
from adaptune.data.sources import Source, SplitData, open_source
from adaptune.errors import DataError, RecipeError

if TYPE_CHECKING:
    from torch import nn

    from adaptune.recipe import DataConfig, Recipe

__all__ = [
    "DatasetInfo",
    "EpochSampler",
    "Loaders",
    "build_eval_loader",
    "build_loaders",
    "describe",
    "input_spec",
    "normalization",
]

log = logging.getLogger(__name__)

CACHE_BUDGET_BYTES = 4 << 30  # cache decoded uint8 images while all cached splits together stay under this
NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
Floats = tuple[float, ...]


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

    def prefill(self) -> None:
        """Decode every split now (`ImageSplit.prefill`), so that a broken image fails before a run writes anything,
        and the first epoch is as fast as the others.

        Raises:
            DataError: A missing, truncated or unreadable image.
        """
        for loader in (self.train, self.val, self.test):
            if loader is not None:
                loader.dataset.prefill()  # type: ignore[attr-defined]


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


def normalization(normalize: str, mean: Floats, std: Floats, channels: int = 3) -> tuple[Floats, Floats]:
    """The (mean, std) for ``data.normalize``, one value per input channel.

    ``model`` returns the backbone's own values, the others are fixed RGB triples. For a 1-channel model the three
    values are averaged (the luma of a gray image sees all three).
    """
    if normalize != "model":
        if normalize not in NORMALIZATIONS:
            raise DataError(f"data.normalize: unknown {normalize!r}; use model, imagenet, inception or none")
        mean, std = NORMALIZATIONS[normalize]
    if len(mean) != channels:
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return tuple(mean), tuple(std)


def input_spec(model: nn.Module, recipe: Recipe) -> InputSpec:
    """What the model takes and the data must deliver: ``(C, H, W)``, the normalisation and the interpolation.

    The size is ``data.img_size``, else ``backbone.img_size``, else the model's own; the channels and normalisation come
    from the model (``data.normalize: model``) or the recipe.

    Raises:
        RecipeError: ``data.img_size`` does not fit a model built for a fixed size (ViT without dynamic size), or is
            smaller than its patch size.
    """
    from adaptune.backbone import model_input

    own = model_input(model)
    size = _pair(recipe.data.img_size or recipe.backbone.img_size) or own.size
    if own.fixed and size != own.size:
        raise RecipeError(
            [
                f"{recipe.source}: data.img_size: {_show(size)} does not fit {recipe.backbone.model}, built for "
                f"{_show(own.size)}; set backbone.img_size to the same size (or leave data.img_size unset)"
            ]
        )
    if own.patch is not None and (size[0] < own.patch[0] or size[1] < own.patch[1]):
        raise RecipeError(
            [
                f"{recipe.source}: data.img_size: {_show(size)} is smaller than {recipe.backbone.model}'s patch size "
                f"{_show(own.patch)}; use at least {max(own.patch)}"
            ]
        )
    mean, std = normalization(recipe.data.normalize, own.mean, own.std, own.channels)
    return InputSpec(shape=(own.channels, *size), mean=mean, std=std, interpolation=recipe.data.interpolation)


def _pair(size: int | tuple[int, ...] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _show(size: tuple[int, int]) -> str:
    return str(size[0]) if size[0] == size[1] else f"[{size[0]}, {size[1]}]"


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


def _datasets(cfg: DataConfig, splits: dict[str, SplitData], size: tuple[int, int]) -> dict[str, ImageSplit]:
    """One `ImageSplit` per role; cached (train first) while the running total fits `CACHE_BUDGET_BYTES`."""
    used = 0
    out: dict[str, ImageSplit] = {}
    for role, split in splits.items():
        need = ImageSplit.nbytes(split, size)
        cache = cfg.cache and used + need <= CACHE_BUDGET_BYTES
        if cfg.cache and not cache:
            log.warning(
                "data: the %s split (%.1f GiB at %dx%d px) exceeds the cache budget; decoding per batch",
                role,
                need / 2**30,
                *size,
            )
        used += need if cache else 0
        out[role] = ImageSplit(split, size, cfg.interpolation, cache=cache, shared=cfg.workers > 0)
    return out


def build_loaders(
    cfg: DataConfig,
    *,
    spec: InputSpec,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
) -> Loaders:
    """Training, validation and test loaders for the configured splits.

    The training loader shuffles with `EpochSampler` (sharded over ``world_size`` ranks, padded to equal length) and
    flips when ``data.hflip``; validation and test run in dataset order, strided over ranks without padding so that
    summing counts over ranks counts every image once.

    Args:
        cfg: The recipe's ``data`` section.
        spec: The model's input (`input_spec`): size, channels, normalisation.
        batch_size: Training images per batch on this rank.
        eval_batch_size: Images per validation / test batch.
        seed: Seed of the training order and flips.
        pin_memory: Pin batches for faster host-to-GPU copies.
        rank: This process's rank.
        world_size: Number of processes.
        drop_last: Drop the last incomplete training batch.
        num_classes: Classes, for Mixup's soft targets (``data.augment``); default: the dataset's.
        label_smoothing: ``train.label_smoothing``, folded into Mixup's soft targets.

    Raises:
        DataError: As `describe`, and when ``drop_last`` leaves no training batch.
    """
    from adaptune.data.augment import TrainAugment, stored_size

    source = open_source(cfg)
    info = _info(cfg, source)
    splits = {role: source.load(split, key) for role, split, key in _roles(cfg)}
    stored = stored_size(cfg.augment, spec.size)
    datasets = _datasets(cfg, splits, stored)

    sampler = EpochSampler(len(datasets["train"]), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    if drop_last and sampler.num_samples < batch_size:
        raise DataError(
            f"train.batch_size: {batch_size} is larger than the {sampler.num_samples} training images per process "
            f"({cfg.train_split!r}); lower train.batch_size"
        )
    augment = None
    if cfg.augment.active:
        n = num_classes or info.num_classes
        augment = TrainAugment(cfg.augment, spec, cfg.hflip, cfg.interpolation, n, label_smoothing)
    collate = Collate(
        spec.mean,
        spec.std,
        spec.channels,
        flip_sampler=sampler if cfg.hflip and augment is None else None,
        augment=augment,
        sampler=sampler,
    )
    train = _loader(datasets["train"], sampler, batch_size, collate, cfg, pin_memory=pin_memory, drop_last=drop_last)
    evals: dict[str, DataLoader | None] = {"val": None, "test": None}
    eval_collate = Collate(spec.mean, spec.std, spec.channels, crop=_eval_crop(cfg, stored, spec.size))
    for role in ("val", "test"):
        if role in datasets:
            shard = ShardSampler(len(datasets[role]), rank, world_size)
            evals[role] = _loader(datasets[role], shard, eval_batch_size, eval_collate, cfg, pin_memory)
    return Loaders(info=info, train=train, val=evals["val"], test=evals["test"], train_sampler=sampler)


def _eval_crop(cfg: DataConfig, stored: tuple[int, int], size: tuple[int, int]) -> tuple[int, int] | None:
    """Evaluation with a cropping augmentation: the centre crop of the stored images (None: stored at model size)."""
    del cfg
    return size if stored != size else None


def build_eval_loader(cfg: DataConfig, split: str, *, spec: InputSpec, batch_size: int) -> DataLoader:
    """A loader over one whole split in dataset order, no flips (``adaptune eval --split``).

    Args:
        cfg: The recipe's ``data`` section.
        split: A split name as in the recipe (``train``, ``val``, ``test``, ``trainval``, or a VTAB list name).
        spec: The model's input (`input_spec`).
        batch_size: Images per batch.

    Raises:
        DataError: As `describe`, naming ``--split`` for an unknown or missing split.
    """
    source = open_source(cfg)
    data = source.load(split, "--split")
    if len(data.labels) == 0:
        raise DataError(f"--split: split {split!r} holds no images; choose another split")
    from adaptune.data.augment import stored_size

    stored = stored_size(cfg.augment, spec.size)
    dataset = _datasets(cfg, {"eval": data}, stored)["eval"]
    collate = Collate(spec.mean, spec.std, spec.channels, crop=_eval_crop(cfg, stored, spec.size))
    return _loader(dataset, ShardSampler(len(dataset)), batch_size, collate, cfg)
