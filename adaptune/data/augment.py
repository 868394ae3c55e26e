"""Training augmentation with timm's pieces, deterministic per sample and exactly resumable.

``data.augment`` (off by default: the VTAB-1k protocol has none) turns on, per training image:

    crop (random_resized: timm's RandomResizedCrop; random: a random crop from the stored size, the VPT/FGVC protocol)
    -> horizontal flip (data.hflip) -> timm's auto_augment / RandAugment string, or color jitter
    -> normalisation -> timm's RandomErasing
and per batch timm's ``Mixup`` (mixup and/or cutmix, soft targets with ``train.label_smoothing`` folded in).

Images stay cached as uint8 at the *stored size* (`stored_size`: the crop's source size, e.g. 256 for a 224 crop),
so the fast path of the cache is kept: only the crops and colour operations run per step. Evaluation centre-crops
the stored images to the model's size, as timm's and VPT's evaluation transforms do.

Randomness: timm's transforms draw from Python's ``random`` and torch's global generator, Mixup from numpy's. Each
sample's transforms run with all three seeded from ``(seed, epoch, sample index)`` (Mixup: from the batch's first
index), with the caller's generator states restored afterwards, so an epoch's augmentations do not depend on the
worker count or on where a run was resumed, and never shift the model's own randomness.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from adaptune.batch import Batch, InputSpec
    from adaptune.recipe import AugmentConfig


def stored_size(cfg: AugmentConfig, size: tuple[int, int]) -> tuple[int, int]:
    """The size images are cached at: the model's, or the crop's source size."""
    if cfg.crop == "none":
        return size
    if cfg.resize is not None:
        return cfg.resize, cfg.resize
    return round(size[0] / 0.875), round(size[1] / 0.875)


class TrainAugment:
    """The per-image and per-batch training transforms (module docstring), picklable for DataLoader workers.

    Args:
        cfg: The recipe's ``data.augment``.
        spec: The model's input (size, normalisation).
        hflip: Random horizontal flips (``data.hflip``).
        interpolation: Resize interpolation of the random-resized crop.
        num_classes: For Mixup's soft targets.
        label_smoothing: ``train.label_smoothing``, folded into Mixup's targets.
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        spec: InputSpec,
        hflip: bool,
        interpolation: str,
        num_classes: int,
        label_smoothing: float,
    ):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms_factory import transforms_imagenet_train

        self.cfg = cfg
        self.size = spec.size
        primary, secondary, _ = transforms_imagenet_train(
            img_size=spec.size,
            scale=cfg.scale,
            ratio=cfg.ratio,
            hflip=0.5 if hflip else 0.0,
            color_jitter=cfg.color_jitter if cfg.color_jitter else None,
            auto_augment=cfg.auto_augment,
            interpolation=interpolation,
            mean=spec.mean if len(spec.mean) == 3 else (0.5, 0.5, 0.5),
            std=spec.std if len(spec.std) == 3 else (0.5, 0.5, 0.5),
            separate=True,
        )
        self.primary = primary if cfg.crop == "random_resized" else _CropAndFlip(cfg, spec.size, hflip)
        self.secondary = secondary
        self.erase = RandomErasing(cfg.re_prob, mode=cfg.re_mode, device="cpu") if cfg.re_prob > 0 else None
        self.mixup = (
            Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mix_prob,
                switch_prob=cfg.switch_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            if cfg.mixing
            else None
        )

    def images(self, images: torch.Tensor, idx: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        """uint8 ``(B, C, H', W')`` stored images -> uint8 ``(B, C, H, W)`` augmented ones (before normalisation)."""
        from PIL import Image

        out = []
        for image, i in zip(images, idx.tolist(), strict=True):
            with _Seeded(seed, epoch, i):
                pil = Image.fromarray(image.permute(1, 2, 0).squeeze(-1).numpy())
                pil = self.secondary(self.primary(pil))
                arr = torch.from_numpy(np.array(pil, dtype=np.uint8))
            out.append(arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1))
        return torch.stack(out)

    def erase_and_mix(self, batch: Batch, idx: torch.Tensor, seed: int, epoch: int) -> Batch:
        """Random erasing per normalised image, then Mixup over the batch (soft targets)."""
        if self.erase is not None:
            for j, i in enumerate(idx.tolist()):
                with _Seeded(seed, epoch, i, stream=1):
                    batch.inputs[j] = self.erase(batch.inputs[j])
        if self.mixup is not None and len(batch) % 2 == 0:
            with _Seeded(seed, epoch, int(idx[0]), stream=2):
                batch.inputs, batch.targets = self.mixup(batch.inputs, batch.targets)
        return batch


class _CropAndFlip:
    """``random``: a random crop of the model's size from the stored image; ``none``: as stored; then the flip."""

    def __init__(self, cfg: AugmentConfig, size: tuple[int, int], hflip: bool):
        from torchvision import transforms

        steps: list[Any] = [transforms.RandomCrop(size)] if cfg.crop == "random" else []
        if hflip:
            steps.append(transforms.RandomHorizontalFlip(0.5))
        self.transform = transforms.Compose(steps)

    def __call__(self, image: Any) -> Any:
        return self.transform(image)


class _Seeded:
    """Python's, numpy's and torch's global generators seeded from ``(seed, epoch, index, stream)``; restored after."""

    def __init__(self, seed: int, epoch: int, index: int, stream: int = 0):
        from adaptune.data.pipeline import mix_seed

        self.value = mix_seed(seed, epoch, index, 0xA06 + stream)

    def __enter__(self) -> None:
        self.state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(self.value)
        np.random.seed(self.value % 2**32)
        torch.manual_seed(self.value)

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.state[0])
        np.random.set_state(self.state[1])
        torch.set_rng_state(self.state[2])
