"""The ``synthetic`` source: procedural classes for tests and smoke runs, sized by ``data.synthetic``."""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from adaptune.config import opt
from adaptune.data.sources.builtin import ArraySplits
from adaptune.data.sources.registry import SourceSpec, register

if TYPE_CHECKING:
    from adaptune.recipe import DataConfig


@dataclass(frozen=True)
class SyntheticConfig:
    num_classes: int = opt(4, "number of classes", ge=2)
    train_per_class: int = opt(16, "training images per class", ge=1)
    val_per_class: int = opt(4, "validation images per class", ge=1)
    test_per_class: int = opt(8, "test images per class", ge=1)
    image_size: int = opt(32, "side of the generated square images", ge=8)
    seed: int = opt(0, "generator seed")


def open_synthetic(cfg: SyntheticConfig, data: DataConfig | None = None) -> ArraySplits:
    """Procedural classes: each class a colour, a stripe orientation and a blob position, plus noise.

    Class ``c`` of ``K`` gets hue ``c / K``, stripes at angle ``pi * frac(c * 0.382)`` and a bright blob at one of
    nine grid positions; each image draws its own stripe phase, blob jitter, colour jitter, and pixel noise. Splits
    come from independent streams of ``synthetic.seed``; image ``i`` has label ``i % K``. Note that horizontal flips
    mirror the stripes and the blob, so leave ``data.hflip`` off with this dataset.
    """
    per_class = {"train": cfg.train_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class}
    return ArraySplits(
        "synthetic",
        tuple(f"class_{c}" for c in range(cfg.num_classes)),
        lambda split: synthetic_split(cfg, split),
        {split: n * cfg.num_classes for split, n in per_class.items()},
    )


@functools.lru_cache(maxsize=32)
def synthetic_split(cfg: SyntheticConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, S, S, 3) and labels int64 (N,) of one synthetic split (train, val or test)."""
    k, s = cfg.num_classes, cfg.image_size
    per_class = {"train": cfg.train_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class}[split]
    n = per_class * k
    rng = np.random.default_rng([cfg.seed, ("train", "val", "test").index(split)])
    labels = np.arange(n, dtype=np.int64) % k

    classes = np.arange(k)
    colours = np.array([colorsys.hsv_to_rgb(c / k, 0.8, 0.9) for c in classes], dtype=np.float32)  # (K, 3)
    angles = np.pi * ((classes * 0.381966) % 1.0)
    cells = (classes * 4) % 9  # distinct grid cells for neighbouring classes
    centres = np.stack([0.25 + 0.25 * (cells % 3), 0.25 + 0.25 * (cells // 3)], axis=1)  # (K, 2) as (x, y)

    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    jitter = rng.normal(0, 0.04, (n, 2)).astype(np.float32)
    tint = rng.normal(0, 0.05, (n, 3)).astype(np.float32)
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    grid = (np.arange(s, dtype=np.float32) + 0.5) / s
    y, x = np.meshgrid(grid, grid, indexing="ij")  # (S, S)
    for lo in range(0, n, 256):  # chunks keep float memory small for large image sizes
        sl = slice(lo, min(lo + 256, n))
        lab = labels[sl]
        theta = angles[lab][:, None, None]
        wave = np.sin(2 * np.pi * 3 * (x * np.cos(theta) + y * np.sin(theta)) + phase[sl, None, None])  # (b, S, S)
        stripes = (0.35 + 0.325 * (1 + wave))[..., None]  # (b, S, S, 1) in [0.35, 1]
        img = stripes * (colours[lab] + tint[sl])[:, None, None, :]  # (b, S, S, 3)
        cx, cy = (centres[lab] + jitter[sl]).T
        blob = np.exp(-((x - cx[:, None, None]) ** 2 + (y - cy[:, None, None]) ** 2) / (2 * 0.1**2))[..., None]
        img = img * (1 - blob) + blob  # a white blob
        img += rng.normal(0, 0.06, img.shape).astype(np.float32)
        images[sl] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


register(
    SourceSpec(
        name="synthetic",
        summary="procedural colour/stripe/blob classes, sized by data.synthetic (tests, smoke runs)",
        config_cls=SyntheticConfig,
        open=open_synthetic,
    )
)
