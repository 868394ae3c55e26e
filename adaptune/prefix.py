"""Frozen-prefix cache: compute the frozen layers before the first trainable module once per image, not every epoch.

```
images ──[ stem, blocks 0..k-1: frozen, deterministic ]──► features ──[ blocks k.. (adapted), head ]──► logits
          computed once (and once more flipped, with data.hflip)    every step, from the cached features
```

The cache is on (``train.prefix_cache: auto``) when it cannot change a result:

- the model's trunk is known (`TRUNKS`: timm ViT, EfficientNet/MobileNet, ResNet) and at least one of its units
  (blocks) comes before the first one holding anything trainable or a method's module;
- nothing in the prefix trains (its modules, and the model's own tokens and position embeddings);
- the prefix is deterministic in training mode and computes the same as in eval mode (checked by running it: dropout,
  drop-path, or BatchNorm updating its statistics there turn the cache off);
- the data pipeline only flips (flipped images get their own cached features).

Every plan is verified before use: the model run from cached features must give exactly the logits of the full
forward on a test batch. Features are stored in fp32 (identical results: batches of the training batch size give
bitwise the same prefix outputs; a last, smaller batch may differ at the 1e-6 level, because CPU kernels choose their
blocking by batch size), or in bf16/fp16 (``train.prefix_cache_dtype``) with the largest difference reported. They stay
in memory within ``train.prefix_cache_gb``, else in a memory-mapped temporary file in the run directory.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adaptune.batch import Batch

if TYPE_CHECKING:
    from adaptune.data import Loaders
    from adaptune.data.pipeline import EpochSampler, ImageSplit


@dataclass(frozen=True)
class Trunk:
    """How a timm model's ``forward_features`` starts: stem modules (and methods) in order, then ordered units."""

    stem: tuple[str, ...]
    stem_methods: tuple[str, ...]
    stages: tuple[str, ...]  # Sequential(s) of units; a unit that is itself a Sequential is split into its children


# class name -> trunk, matched on the exact class (timm 1.0's forward_features of each)
TRUNKS: dict[str, Trunk] = {
    "VisionTransformer": Trunk(("patch_embed", "patch_drop", "norm_pre"), ("_pos_embed",), ("blocks",)),
    "EfficientNet": Trunk(("conv_stem", "bn1"), (), ("blocks",)),
    "MobileNetV3": Trunk(("conv_stem", "bn1"), (), ("blocks",)),
    "ResNet": Trunk(("conv1", "bn1", "act1", "maxpool"), (), ("layer1", "layer2", "layer3", "layer4")),
}
STORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Plan:
    """Which modules the cache replaces: ``skip`` (stem and units before ``boundary``) and ``stem_methods``."""

    skip: list[str]
    stem_methods: list[str]
    boundary: str


def _units(model: nn.Module, trunk: Trunk) -> list[str]:
    units: list[str] = []
    for stage in trunk.stages:
        seq = model.get_submodule(stage)
        for name, child in seq.named_children():
            if isinstance(child, nn.Sequential):
                units += [f"{stage}.{name}.{n}" for n, _ in child.named_children()]
            else:
                units.append(f"{stage}.{name}")
    return units


def _trains(module: nn.Module) -> bool:
    if any(p.requires_grad for p in module.parameters()):
        return True
    return any(callable(getattr(m, "adapter_param_names", None)) for m in module.modules())


def plan(model: nn.Module) -> tuple[Plan | None, str]:
    """The prefix the cache can replace, or (None, why not)."""
    trunk = TRUNKS.get(type(model).__name__)
    if trunk is None:
        return None, f"no known trunk for {type(model).__name__}"
    if any(p.requires_grad for p in model.parameters(recurse=False)):
        return None, "the model's own tokens or position embeddings train"
    if any(_trains(model.get_submodule(s)) for s in trunk.stem):
        return None, "the stem trains"
    units = _units(model, trunk)
    first = next((i for i, u in enumerate(units) if _trains(model.get_submodule(u))), len(units))
    if first == 0 or first == len(units):
        return None, "the first block already trains" if first == 0 else "no block trains"
    return Plan(skip=[*trunk.stem, *units[:first]], stem_methods=list(trunk.stem_methods), boundary=units[first]), ""


def _identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


@contextlib.contextmanager
def skipping(model: nn.Module, p: Plan) -> Iterator[None]:
    """Inside, ``model(features)`` runs from the boundary: the prefix's modules and methods pass their input on."""
    modules = [model.get_submodule(path) for path in p.skip]
    for m in modules:
        m.forward = _identity  # type: ignore[method-assign]  (an instance attribute shadows the class's forward)
    for name in p.stem_methods:
        setattr(model, name, _identity)
    try:
        yield
    finally:
        for m in modules:
            del m.forward
        for name in p.stem_methods:
            delattr(model, name)


class _Stop(Exception):
    pass


def prefix_features(model: nn.Module, p: Plan, inputs: torch.Tensor) -> torch.Tensor:
    """The input of the boundary module for ``inputs``: the real forward, stopped there (no autograd)."""
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])
        raise _Stop

    handle = model.get_submodule(p.boundary).register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            model(inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def check(model: nn.Module, p: Plan, example: torch.Tensor, train_mode: Any) -> str:
    """Why the plan cannot be used (empty string: it can): the prefix must be deterministic in training mode, equal
    to eval mode, and the model run from its features must give exactly the full forward's logits."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=[]):  # dropout draws here must not shift the run's randomness
            train_mode(model)
            a, b = prefix_features(model, p, example), prefix_features(model, p, example)
            model.eval()
            c = prefix_features(model, p, example)
            with torch.no_grad():
                full = model(example)
                with skipping(model, p):
                    cached = model(c)
    finally:
        for m, training in modes:
            m.training = training
    if not torch.equal(a, b):
        return "the frozen layers before the first adapted block are random in training mode (dropout, drop-path)"
    if not torch.equal(a, c):
        return "the frozen layers before the first adapted block differ in training mode (BatchNorm statistics?)"
    if not torch.equal(full, cached):
        return "the model run from cached features does not reproduce its own output"
    return ""


class FeatureStore:
    """Features of one split, ``(N, *shape)``: a tensor in memory, or a memory-mapped temporary file."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, file: Path | None):
        self.file = file
        if file is None:
            self.data = torch.empty((n, *shape), dtype=dtype)
        else:
            np_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(dtype)
            if np_dtype is None:  # numpy has no bfloat16: store its bits
                np_dtype = np.int16
            self._mm = np.lib.format.open_memmap(file, mode="w+", dtype=np_dtype, shape=(n, *shape))
            self.data = torch.from_numpy(self._mm)
            if dtype == torch.bfloat16:
                self.data = self.data.view(torch.bfloat16)

    def close(self) -> None:
        if self.file is not None:
            del self.data, self._mm
            self.file.unlink(missing_ok=True)


class FeatureSplit(Dataset):
    """A split's cached features (and flipped features), indexed like its `ImageSplit`."""

    def __init__(self, images: ImageSplit, plain: FeatureStore, flipped: FeatureStore | None):
        self.labels = images.labels
        self.task_ids = images.task_ids
        self.plain = plain
        self.flipped = flipped

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return idx, None


class FeatureCollate:
    """A `Batch` of cached features (fp32), flipped where the image pipeline would have flipped the image."""

    def __init__(self, split: FeatureSplit, flip_sampler: EpochSampler | None):
        self.split = split
        self.flip_sampler = flip_sampler

    def __call__(self, items: Any) -> Batch:
        from adaptune.data.pipeline import flip_decisions

        idx, _ = items
        x = self.split.plain.data[idx].float()
        if self.flip_sampler is not None and self.split.flipped is not None:
            s = self.flip_sampler
            mask = flip_decisions(s.seed, s.epoch, s.size)[idx]
            if mask.any():
                x[mask] = self.split.flipped.data[idx[mask]].float()
        task_ids = None if self.split.task_ids is None else self.split.task_ids[idx]
        return Batch(inputs=x, targets=self.split.labels[idx], task_ids=task_ids, extras={"index": idx})


@dataclass
class PrefixCache:
    """The active cache of a run: the plan, its stores, and what it cost and saves (for the log line)."""

    plan: Plan
    stores: list[FeatureStore] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    nbytes: int = 0
    on_disk: bool = False
    drift: float | None = None

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        with skipping(model, self.plan):
            yield

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def describe(self, epochs: int) -> str:
        where = "on disk (memory-mapped)" if self.on_disk else "in memory"
        line = (
            f"prefix cache: on; {len(self.plan.skip)} frozen modules before {self.plan.boundary} run once per image "
            f"({self.images:,} passes in {self.seconds:.1f} s, {self.nbytes / 2**20:,.0f} MiB {where}) instead of in "
            f"each of {epochs} epochs"
        )
        if self.drift is not None:
            line += f"; reduced-precision storage: largest feature difference {self.drift:.3g}"
        return line


def _fill(
    model: nn.Module, p: Plan, images: ImageSplit, collate: Any, batch: int, flip: bool, store: FeatureStore
) -> None:
    """Features of every image of a split, in dataset order and batches of ``batch`` (as the loader would run)."""
    n = len(images)
    for lo in range(0, n, batch):
        idx = list(range(lo, min(lo + batch, n)))
        raw = images.__getitems__(idx)
        if flip:
            raw = (raw[0].flip(-1), *raw[1:])
        x = collate(raw).inputs
        store.data[lo : lo + len(idx)] = prefix_features(model, p, x).to(store.data.dtype)


def build(
    model: nn.Module,
    p: Plan,
    loaders: Loaders,
    *,
    batch_size: int,
    eval_batch_size: int,
    hflip: bool,
    dtype: str,
    budget_bytes: float,
    spill_dir: Path,
) -> tuple[PrefixCache, Loaders]:
    """Compute the features of every split and return loaders that yield them, with the same order, flips and
    shards as ``loaders``."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()  # `check` proved the prefix computes the same in training mode
    try:
        return _build(model, p, loaders, batch_size, eval_batch_size, hflip, dtype, budget_bytes, spill_dir, t0)
    finally:
        model.train(was_training)


def _build(
    model: nn.Module,
    p: Plan,
    loaders: Loaders,
    batch_size: int,
    eval_batch_size: int,
    hflip: bool,
    dtype: str,
    budget_bytes: float,
    spill_dir: Path,
    t0: float,
) -> tuple[PrefixCache, Loaders]:
    from adaptune.data import Loaders as LoadersCls

    cache = PrefixCache(plan=p)
    roles = {"train": loaders.train, "val": loaders.val, "test": loaders.test}
    sample = loaders.train.dataset
    shape = tuple(prefix_features(model, p, loaders.train.collate_fn(sample.__getitems__([0])).inputs).shape[1:])
    per_image = math.prod(shape) * STORE_DTYPES[dtype].itemsize
    total = sum(len(dl.dataset) * (2 if r == "train" and hflip else 1) for r, dl in roles.items() if dl is not None)
    cache.on_disk = total * per_image > budget_bytes
    out: dict[str, DataLoader | None] = {}
    for role, dl in roles.items():
        if dl is None:
            out[role] = None
            continue
        images = dl.dataset
        stores = []
        for flip in (False, True) if role == "train" and hflip else (False,):
            file = spill_dir / f".prefix-cache.{role}{'-flip' if flip else ''}.npy.tmp" if cache.on_disk else None
            store = FeatureStore(len(images), shape, STORE_DTYPES[dtype], file)
            collate = _image_collate(dl)
            _fill(model, p, images, collate, batch_size if role == "train" else eval_batch_size, flip, store)
            stores.append(store)
            cache.images += len(images)
        cache.stores += stores
        split = FeatureSplit(images, stores[0], stores[1] if len(stores) > 1 else None)
        sampler = dl.sampler
        flip_sampler = loaders.train_sampler if role == "train" and hflip else None
        out[role] = DataLoader(
            split,
            batch_size=dl.batch_size,
            sampler=sampler,
            collate_fn=FeatureCollate(split, flip_sampler),
            num_workers=0,
            generator=torch.Generator().manual_seed(0),
            drop_last=dl.drop_last,
        )
    cache.nbytes = total * per_image
    cache.seconds = time.perf_counter() - t0
    if dtype != "fp32":
        cache.drift = _drift(model, p, loaders.train, STORE_DTYPES[dtype])
    new = LoadersCls(
        info=loaders.info,
        train=out["train"],  # type: ignore[arg-type]
        val=out["val"],
        test=out["test"],
        train_sampler=loaders.train_sampler,
    )
    return cache, new


def _image_collate(dl: DataLoader) -> Any:
    """The loader's image collate without flips (flips are applied, and cached, separately)."""
    import copy

    collate = copy.copy(dl.collate_fn)
    collate.flip_sampler = None
    return collate


def _drift(model: nn.Module, p: Plan, train: DataLoader, dtype: torch.dtype) -> float:
    images = train.dataset
    x = _image_collate(train)(images.__getitems__(list(range(min(64, len(images)))))).inputs
    f = prefix_features(model, p, x)
    return (f - f.to(dtype).float()).abs().max().item()
