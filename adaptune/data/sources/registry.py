"""The data-source registry, and what every source returns.

A data source is one file under ``adaptune/data/sources/`` that registers a `SourceSpec` (plus one import line in
``adaptune/data/sources/__init__.py``). Its options are a config dataclass validated with the recipe, in a section of
``data`` named after the source::

    data:
      source: vtab
      vtab: {root: /data/vtab-1k, task: cifar}
      train_split: trainval

Every source answers three questions without decoding an image: its class names, which split names it accepts, and
how many images a split holds. `Source.load` then returns a `SplitData`: the labels (and task ids, for multi-task
data) plus an image reader (in-memory arrays or files on disk). Decoding, resizing and caching happen in
`adaptune.data.pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from adaptune.errors import DataError, did_you_mean

if TYPE_CHECKING:
    from adaptune.recipe import DataConfig

SPLIT_ROLES = ("train", "val", "test", "trainval")  # the recipe's portable split names


class ImageReader(Protocol):
    """Random access to a split's images as PIL images; picklable, so DataLoader workers can hold it."""

    @property
    def channels(self) -> int: ...

    def __len__(self) -> int: ...

    def read(self, index: int) -> Image.Image: ...


@dataclass(frozen=True)
class ArrayImages:
    """Images held in memory: uint8 (N, h, w) grayscale or (N, h, w, 3) RGB."""

    images: np.ndarray

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else 3

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


@dataclass(frozen=True)
class FileImages:
    """Image files, decoded with PIL and converted to RGB."""

    paths: tuple[str, ...]
    key: str  # the recipe key to name when a file cannot be read
    channels: int = 3

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as e:  # missing, truncated or not an image (PIL raises OSError subclasses)
            raise DataError(f"{self.key}: cannot read image {path!r} ({e}); fix or remove the file") from None

    def verify(self, index: int) -> None:
        """Check that image ``index`` exists and is an image file PIL can parse, without decoding its pixels."""
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img.verify()
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{self.key}: cannot read image {path!r} ({e}); fix or remove the file") from None


@dataclass(frozen=True)
class SplitData:
    """One split: labels (N,) int64, the reader of its N images, and optional task ids (N,) int64."""

    labels: np.ndarray
    images: ImageReader
    task_ids: np.ndarray | None = None


class Source(Protocol):
    """A dataset: class names, accepted split names, cheap split sizes, and `load` for the images."""

    class_names: tuple[str, ...]

    def size(self, split: str, key: str) -> int: ...

    def load(self, split: str, key: str) -> SplitData: ...


@dataclass(frozen=True)
class SourceSpec:
    """One data source.

    Attributes:
        name: Registry key: the value of ``data.source`` and the name of its options section ``data.<name>``.
        summary: One line for the docs.
        config_cls: Frozen dataclass of the source's options (all fields need defaults or the section is required).
        open: ``open(options, data_cfg) -> Source``: check the options (paths exist, names known) without decoding
            images. Raises `DataError` naming the recipe key and the fix.
    """

    name: str
    summary: str
    config_cls: type
    open: Callable[[Any, DataConfig], Source]


_REGISTRY: dict[str, SourceSpec] = {}


def register(spec: SourceSpec) -> SourceSpec:
    """Add a data source; each name once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"data source {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_source(name: str) -> SourceSpec:
    """Look a source up by name.

    Raises:
        DataError: Unknown name, with a did-you-mean and the available sources.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DataError(
            f"data.source: unknown data source {name!r}{did_you_mean(name, _REGISTRY)} "
            f"(available: {', '.join(sorted(_REGISTRY))})"
        ) from None


def list_sources() -> list[str]:
    return sorted(_REGISTRY)


def option_owners(key: str) -> list[str]:
    """Sources whose options include ``key`` (for "unknown key" messages)."""
    import dataclasses

    return [n for n, s in sorted(_REGISTRY.items()) if key in {f.name for f in dataclasses.fields(s.config_cls)}]


def open_source(cfg: DataConfig) -> Source:
    """The source ``cfg.source`` with its options ``cfg.options``, checked but not loaded.

    Raises:
        DataError: Unknown source, missing root or task folder, unknown dataset name.
    """
    spec = get_source(cfg.source)
    options = cfg.options if cfg.options is not None else spec.config_cls()
    return spec.open(options, cfg)


def bad_split(split: str, key: str, what: str, accepted: tuple[str, ...] | list[str]) -> DataError:
    return DataError(
        f"{key}: {split!r} is not a split of {what}{did_you_mean(split, accepted)}; "
        f"use one of {', '.join(accepted)}{skip_hint(key)}"
    )


def skip_hint(key: str) -> str:
    """Validation and test splits are optional: say how to skip them."""
    return f", or set {key}: null to skip it" if key in ("data.val_split", "data.test_split") else ""
