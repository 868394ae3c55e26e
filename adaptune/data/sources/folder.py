"""The ``folder`` source: ``root/<split>/<class>/<image>``, classes from the training split's folders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from adaptune.config import opt
from adaptune.data.sources.registry import FileImages, SourceSpec, SplitData, register, skip_hint
from adaptune.errors import DataError, did_you_mean

if TYPE_CHECKING:
    from adaptune.recipe import DataConfig

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


@dataclass(frozen=True)
class FolderConfig:
    root: str | None = opt(None, "folder with <split>/<class>/<image> inside (splits named by data.*_split)")


def _class_dirs(split_dir: Path) -> list[str]:
    """Class folder names of a split folder; hidden ones (``.ipynb_checkpoints``) are not classes."""
    return [p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]


class ImageFolder:
    """``root/<split>/<class>/<image>``; classes are the sorted folders of the training split.

    ``trainval`` reads ``root/trainval`` when it exists, else ``root/train`` and ``root/val`` together. A split folder
    that is missing is an error only when that split is requested.
    """

    def __init__(self, root: str | None, train_split: str):
        if root is None:
            raise DataError(
                "data.folder.root: not set; set data.folder.root to a folder with train/<class>/<image> inside"
            )
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(
                f"data.folder.root: directory {str(self.root)!r} does not exist; set data.folder.root to the image "
                "folder"
            )
        self._files: dict[str, tuple[list[str], np.ndarray]] = {}
        self._class_splits = {train_split}  # an empty class folder there would train a class with no images
        classes: set[str] = set()
        for d in self._dirs(train_split, "data.train_split"):
            classes.update(_class_dirs(d))
        if not classes:
            raise DataError(
                f"data.folder.root: {str(self._dirs(train_split, 'data.train_split')[0])!r} has no class folders"
            )
        self.class_names = tuple(sorted(classes))

    def _dirs(self, split: str, key: str) -> list[Path]:
        if (self.root / split).is_dir():
            return [self.root / split]
        if split == "trainval" and (self.root / "train").is_dir() and (self.root / "val").is_dir():
            return [self.root / "train", self.root / "val"]
        present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        raise DataError(
            f"{key}: no folder {split!r} under {str(self.root)!r}{did_you_mean(split, present)}; "
            f"found: {', '.join(present) or 'nothing'}{skip_hint(key)}"
        )

    def _scan(self, split: str, key: str) -> tuple[list[str], np.ndarray]:
        if split not in self._files:
            index = {name: i for i, name in enumerate(self.class_names)}
            paths: list[str] = []
            labels: list[int] = []
            for d in self._dirs(split, key):
                for cls in sorted(_class_dirs(d)):
                    if cls not in index:
                        raise DataError(
                            f"{key}: class folder {str(d / cls)!r} is not a class of the training split; "
                            f"classes: {', '.join(self.class_names)}"
                        )
                    files = sorted(e.path for e in os.scandir(d / cls) if Path(e.name).suffix.lower() in IMAGE_SUFFIXES)
                    paths += files
                    labels += [index[cls]] * len(files)
            if not paths:
                raise DataError(f"{key}: split {split!r} under {str(self.root)!r} holds no images")
            empty = [c for i, c in enumerate(self.class_names) if i not in set(labels)]
            if empty and split in self._class_splits:
                raise DataError(
                    f"{key}: class folder {empty[0]!r} of split {split!r} holds no images "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder"
                )
            self._files[split] = (paths, np.array(labels, dtype=np.int64))
        return self._files[split]

    def size(self, split: str, key: str) -> int:
        return len(self._scan(split, key)[0])

    def load(self, split: str, key: str) -> SplitData:
        paths, labels = self._scan(split, key)
        return SplitData(labels=labels, images=FileImages(tuple(paths), key="data.folder.root"))


def _open(options: FolderConfig, data: DataConfig) -> ImageFolder:
    return ImageFolder(options.root, data.train_split)


register(
    SourceSpec(
        name="folder",
        summary="an image folder: root/{train,val,test}/<class>/<image>",
        config_cls=FolderConfig,
        open=_open,
    )
)
