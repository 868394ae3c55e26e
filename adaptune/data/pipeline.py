"""From a split's images to normalised batches: resize, cache, deterministic order and flips, batched normalisation.

Per sample the pipeline only indexes: a dataset's ``__getitems__`` returns a whole uint8 batch (from the in-memory
cache, filled on first use, or decoded on the spot), and the collate function flips and normalises it in one
vectorised pass. Shuffling and flips are pure functions of ``(seed, epoch, sample index)``, so a run resumed
mid-epoch with `EpochSampler.set_start` sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from adaptune.batch import Batch
from adaptune.data.sources.registry import SplitData

RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_MASK64 = (1 << 64) - 1
_FLIP_STREAM = 0x5F11


def mix_seed(*values: int) -> int:
    """A 63-bit generator seed from integers (splitmix64 steps), so ``(seed, epoch)`` pairs never collide like
    ``seed + epoch`` would."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1


def decode(split: SplitData, index: int, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Image ``index`` of ``split`` as uint8 (C, H, W) for ``size = (H, W)``; C is 1 for grayscale sources, else 3."""
    img = split.images.read(index)
    h, w = size
    if img.size != (w, h):  # PIL sizes are (width, height)
        img = img.resize((w, h), RESAMPLE[interpolation])
    arr = torch.from_numpy(np.array(img, dtype=np.uint8))  # (S, S) or (S, S, 3)
    return arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1).contiguous()


class ImageSplit(Dataset):
    """A split as uint8 images of one size ``(H, W)``, optionally cached in memory.

    With ``cache``, a (N, C, H, W) uint8 tensor is filled as images are first requested (in shared memory when
    ``shared``, so DataLoader workers fill one cache for every process); later epochs only index it. Without, each
    batch is decoded on the spot. ``__getitems__`` returns ``(images uint8 (B, C, H, W), labels (B,), indices (B,),
    task ids (B,) or None)``.
    """

    def __init__(
        self, split: SplitData, size: tuple[int, int], interpolation: str, cache: bool = True, shared: bool = False
    ):
        self.split = split
        self.size = size
        self.interpolation = interpolation
        self.labels = torch.from_numpy(np.array(split.labels, dtype=np.int64))
        self.task_ids = None if split.task_ids is None else torch.from_numpy(np.array(split.task_ids, dtype=np.int64))
        self.channels = split.images.channels
        self.store: torch.Tensor | None = None
        self.filled: torch.Tensor | None = None
        if cache:
            self.store = torch.empty((len(self.labels), self.channels, *size), dtype=torch.uint8)
            self.filled = torch.zeros(len(self.labels), dtype=torch.bool)
            if shared:
                self.store.share_memory_()
                self.filled.share_memory_()

    @staticmethod
    def nbytes(split: SplitData, size: tuple[int, int]) -> int:
        """Memory a cache of ``split`` at ``size`` would take."""
        return len(split.labels) * split.images.channels * size[0] * size[1]

    def __len__(self) -> int:
        return len(self.labels)

    def _decode(self, index: int) -> torch.Tensor:
        return decode(self.split, index, self.size, self.interpolation)

    def prefill(self, chunk: int = 256) -> None:
        """Decode every image now: into the cache when there is one, else only far enough to know it opens.

        Raises:
            DataError: A missing, truncated or unreadable image (naming the file and the recipe key).
        """
        n = len(self.labels)
        if self.store is not None:
            for lo in range(0, n, chunk):
                self.__getitems__(list(range(lo, min(lo + chunk, n))))
            return
        verify = getattr(self.split.images, "verify", None)
        for i in range(n):
            verify(i) if verify is not None else self.split.images.read(i)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels, _, _ = self.__getitems__([index])
        return images[0], int(labels[0])

    def __getitems__(
        self, indices: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if self.store is None or self.filled is None:
            images = torch.stack([self._decode(i) for i in indices])  # (B, C, H, W)
        else:
            for i in torch.unique(idx[~self.filled[idx]]).tolist():
                self.store[i] = self._decode(i)
                self.filled[i] = True
            images = torch.stack([self.store[i] for i in indices])  # (B, C, H, W), a copy; uint8 index_select is slow
        task_ids = None if self.task_ids is None else self.task_ids[idx]
        return images, self.labels[idx], idx, task_ids


def _shard(order: list[int], rank: int, world_size: int, pad: bool) -> list[int]:
    """Rank ``rank``'s strided share of ``order``; with ``pad``, the order is first padded by wrapping around to a
    multiple of ``world_size`` so every rank gets the same count (as `DistributedSampler` does)."""
    if pad and world_size > 1 and order:
        total = math.ceil(len(order) / world_size) * world_size
        order = (order * math.ceil(total / len(order)))[:total]
    return order[rank::world_size]


class EpochSampler(Sampler[int]):
    """Deterministic training order: epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, sharded over ranks.

    Each rank takes every ``world_size``-th index of the padded permutation (padding repeats the first indices so all
    ranks get the same count). `set_start` skips the first ``k`` batches of the current epoch, so a run resumed after
    ``k`` steps continues with exactly the batches the uninterrupted run would have drawn.

    Args:
        size: Number of samples in the dataset.
        batch_size: Samples per batch on this rank (what `set_start` counts in).
        seed: Base seed; the order of epoch ``e`` depends on ``(seed, e)`` only.
        shuffle: Permute each epoch; False keeps the dataset order.
        rank: This process's rank.
        world_size: Number of processes sharing the data.
    """

    def __init__(
        self, size: int, *, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    @property
    def num_samples(self) -> int:
        """Samples this rank sees in a whole epoch (before any `set_start` skip)."""
        return math.ceil(self.size / self.world_size) if self.size else 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; moving to another epoch clears a `set_start` skip."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def set_start(self, batches: int) -> None:
        """Skip the first ``batches`` batches (``batches * batch_size`` samples) of the current epoch."""
        if batches < 0:
            raise ValueError(f"set_start needs a batch count >= 0, got {batches}")
        self.start = batches

    def epoch_order(self) -> list[int]:
        """This rank's full index order for the current epoch, skip not applied."""
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        return _shard(order, self.rank, self.world_size, pad=True)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.start * self.batch_size :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start * self.batch_size)


class ShardSampler(Sampler[int]):
    """Evaluation order: the dataset in order, strided over ranks without padding (every sample counted once)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = _shard(list(range(size)), rank, world_size, pad=False)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def flip_decisions(seed: int, epoch: int, size: int) -> torch.Tensor:
    """Bool (size,): whether sample ``i`` is flipped in ``epoch``; a function of ``(seed, epoch, i)`` only."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, _FLIP_STREAM))
    return torch.rand(size, generator=g) < 0.5


def center_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The centre ``(H, W)`` of ``(B, C, H', W')`` images."""
    h, w = images.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return images[..., top : top + size[0], left : left + size[1]]


class Collate:
    """Turns a uint8 batch into a `Batch` of float32 ``(B, C, H, W)`` inputs: flip, match channels, normalise.

    ``x = (pixel / 255 - mean) / std``, computed as ``pixel * scale - shift`` per channel. Grayscale images are expanded
    to a 3-channel model's input by broadcasting; RGB images feed a 1-channel model as their luma (ITU-R BT.601). With
    ``flip_sampler`` set, horizontal flips follow `flip_decisions` for that sampler's epoch, read in the process that
    collates (a worker holds a copy made when the loader's iterator starts, i.e. after `EpochSampler.set_epoch`).

    Args:
        mean: Per-channel mean, one value per model input channel.
        std: Per-channel std, one value per model input channel.
        channels: The model's input channels (1 or 3).
        flip_sampler: The training sampler whose epoch decides the flips; None: no flips.
        augment: Training augmentation (`adaptune.data.augment.TrainAugment`), seeded from ``sampler``'s epoch; it
            replaces ``flip_sampler``'s flips.
        sampler: The training sampler (its seed and epoch) for ``augment``.
        crop: Centre-crop the images to this ``(H, W)`` first (evaluation with a cropping augmentation).
    """

    LUMA = (0.299, 0.587, 0.114)

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        channels: int = 3,
        flip_sampler: EpochSampler | None = None,
        augment: Any = None,
        sampler: EpochSampler | None = None,
        crop: tuple[int, int] | None = None,
    ):
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"Collate: {channels} channels need as many mean/std values, got {len(mean)}/{len(std)}")
        std_t = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)
        self.channels = channels
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1) / std_t
        self.flip_sampler = flip_sampler
        self.augment = augment
        self.sampler = sampler
        self.crop = crop
        self._flips: tuple[int, torch.Tensor] | None = None

    def _flip_mask(self, sampler: EpochSampler, idx: torch.Tensor) -> torch.Tensor:
        if self._flips is None or self._flips[0] != sampler.epoch:
            self._flips = (sampler.epoch, flip_decisions(sampler.seed, sampler.epoch, sampler.size))
        return self._flips[1][idx]

    def __call__(self, batch: Sequence[Any]) -> Batch:
        images, labels, idx, task_ids = batch  # from `ImageSplit.__getitems__`: (B, C, H, W) uint8, (B,), (B,), (B,)
        if self.crop is not None:
            images = center_crop(images, self.crop)
        if self.augment is not None and self.sampler is not None:
            images = self.augment.images(images, idx, self.sampler.seed, self.sampler.epoch)
        elif self.flip_sampler is not None:
            for i in self._flip_mask(self.flip_sampler, idx).nonzero().flatten().tolist():
                images[i] = images[i].flip(-1)  # in place: `ImageSplit` returns a fresh batch
        x = images.to(torch.float32)
        if self.channels == 1 and x.shape[1] == 3:
            x = torch.einsum("bchw,c->bhw", x, torch.tensor(self.LUMA)).unsqueeze(1)  # (B, 1, H, W)
        if x.shape[1] == self.channels:
            x = x.mul_(self.scale)
        else:
            x = x * self.scale  # gray (B, 1, H, W) broadcasts to (B, 3, H, W)
        out = Batch(inputs=x.sub_(self.shift), targets=labels, task_ids=task_ids, extras={"index": idx})
        if self.augment is not None and self.sampler is not None:
            out = self.augment.erase_and_mix(out, idx, self.sampler.seed, self.sampler.epoch)
        return out
