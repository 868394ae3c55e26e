"""Where images come from: built-in datasets, VTAB-1k list files, image folders.

Every source answers three questions without decoding an image: its class names, which split names it accepts, and
how many images a split holds. `Source.load` then returns a `SplitData`: the labels plus an image reader (in-memory
arrays or files on disk). Decoding, resizing and caching happen in `adaptune.data.pipeline`.
"""

from __future__ import annotations

import colorsys
import functools
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from adaptune.errors import DataError, did_you_mean
from adaptune.recipe import DataConfig, SyntheticConfig

BUILTIN = ("fashion-mnist-1k", "synthetic")
BUILTIN_SPLITS = ("train", "val", "test", "trainval")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

# VTAB-1k (spec: methods-others §9.2): folder name -> class count, and the names other repositories use.
VTAB_CLASSES = {
    "cifar": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}
VTAB_ALIASES = {
    "cifar100": "cifar",
    "cifar_100": "cifar",
    "oxford_pet": "oxford_iiit_pet",
    "pets": "oxford_iiit_pet",
    "flowers102": "oxford_flowers102",
}
VTAB_SPLITS = {"train": "train800", "val": "val200", "trainval": "train800val200", "test": "test"}


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


@dataclass(frozen=True)
class SplitData:
    """One split: labels (N,) int64 and the reader of its N images."""

    labels: np.ndarray
    images: ImageReader


class Source(Protocol):
    """A dataset: class names, accepted split names, cheap split sizes, and `load` for the images."""

    class_names: tuple[str, ...]

    def size(self, split: str, key: str) -> int: ...

    def load(self, split: str, key: str) -> SplitData: ...


def open_source(cfg: DataConfig) -> Source:
    """The source named by ``cfg.source`` (and ``cfg.name`` / ``cfg.root`` / ``cfg.task``), checked but not loaded.

    Raises:
        DataError: Unknown built-in name, missing root or task folder.
    """
    if cfg.source == "builtin":
        if cfg.name == "fashion-mnist-1k":
            return FashionMnist1k()
        if cfg.name == "synthetic":
            return Synthetic(cfg.synthetic)
        raise DataError(
            f"data.name: unknown built-in dataset {cfg.name!r}{did_you_mean(cfg.name, BUILTIN)}; "
            f"available: {', '.join(BUILTIN)}"
        )
    if cfg.source == "vtab":
        return VtabTask(cfg.root, cfg.task)
    if cfg.source == "folder":
        return ImageFolder(cfg.root, cfg.train_split)
    raise DataError(f"data.source: unknown source {cfg.source!r}; use builtin, vtab or folder")


def _bad_split(split: str, key: str, what: str, accepted: tuple[str, ...] | list[str]) -> DataError:
    return DataError(
        f"{key}: {split!r} is not a split of {what}{did_you_mean(split, accepted)}; "
        f"use one of {', '.join(accepted)}{_skip_hint(key)}"
    )


def _skip_hint(key: str) -> str:
    """Validation and test splits are optional: say how to skip them."""
    return f", or set {key}: null to skip it" if key in ("data.val_split", "data.test_split") else ""


# ----------------------------------------------------------------------------------------------------------------
# built-in: fashion-mnist-1k


@functools.cache
def _fashion_arrays(name: str) -> np.ndarray:
    ref = resources.files("adaptune").joinpath("datasets/fashion_mnist_1k.npz")
    with ref.open("rb") as f, np.load(f) as npz:
        array = npz[name]
    array.setflags(write=False)
    return array


class FashionMnist1k:
    """A VTAB-1k-style task from Fashion-MNIST (MIT, (c) Zalando SE): 800 train, 200 val, 2,000 test, balanced.

    28x28 grayscale images, built by ``scripts/build_fashion_mnist_1k.py``; ``trainval`` is train + val.
    """

    def __init__(self) -> None:
        self.class_names = tuple(str(c) for c in _fashion_arrays("class_names"))

    def _parts(self, split: str, key: str) -> tuple[str, ...]:
        if split not in BUILTIN_SPLITS:
            raise _bad_split(split, key, "fashion-mnist-1k", BUILTIN_SPLITS)
        return ("train", "val") if split == "trainval" else (split,)

    def size(self, split: str, key: str) -> int:
        return sum(len(_fashion_arrays(f"{p}_labels")) for p in self._parts(split, key))

    def load(self, split: str, key: str) -> SplitData:
        parts = self._parts(split, key)
        images = np.concatenate([_fashion_arrays(f"{p}_images") for p in parts])
        labels = np.concatenate([_fashion_arrays(f"{p}_labels") for p in parts])
        return SplitData(labels=labels, images=ArrayImages(images))


# ----------------------------------------------------------------------------------------------------------------
# built-in: synthetic


class Synthetic:
    """Procedural classes for tests: each class a colour, a stripe orientation and a blob position, plus noise.

    Class ``c`` of ``K`` gets hue ``c / K``, stripes at angle ``pi * frac(c * 0.382)`` and a bright blob at one of
    nine grid positions; each image draws its own stripe phase, blob jitter, colour jitter, and pixel noise. Splits
    come from independent streams of ``synthetic.seed``; image ``i`` has label ``i % K``. Note that horizontal flips
    mirror the stripes and the blob, so leave ``data.hflip`` off with this dataset.
    """

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        self.class_names = tuple(f"class_{c}" for c in range(cfg.num_classes))

    def _per_class(self, split: str, key: str) -> int:
        per_class = {"train": self.cfg.train_per_class, "val": self.cfg.val_per_class, "test": self.cfg.test_per_class}
        if split == "trainval":
            return per_class["train"] + per_class["val"]
        if split not in per_class:
            raise _bad_split(split, key, "synthetic", BUILTIN_SPLITS)
        return per_class[split]

    def size(self, split: str, key: str) -> int:
        return self._per_class(split, key) * self.cfg.num_classes

    def load(self, split: str, key: str) -> SplitData:
        self._per_class(split, key)
        parts = ("train", "val") if split == "trainval" else (split,)
        made = [synthetic_split(self.cfg, p) for p in parts]
        images = np.concatenate([m[0] for m in made])
        labels = np.concatenate([m[1] for m in made])
        return SplitData(labels=labels, images=ArrayImages(images))


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


# ----------------------------------------------------------------------------------------------------------------
# VTAB-1k list files


def _read_list(path: Path, key: str) -> tuple[list[str], np.ndarray]:
    """(relative paths, labels) of a NOAH list file: one ``relative/path label`` per line."""
    paths: list[str] = []
    labels: list[int] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rel, _, label = line.strip().rpartition(" ")
            if not rel or not label.lstrip("-").isdigit() or int(label) < 0:
                raise DataError(
                    f"{key}: {path}:{lineno}: expected `relative/path label` with a label >= 0, got {line.strip()!r}"
                )
            paths.append(rel.strip())
            labels.append(int(label))
    return paths, np.array(labels, dtype=np.int64)


class VtabTask:
    """One VTAB-1k task in NOAH's layout: ``root/<task>/{train800,val200,train800val200,test}.txt``.

    Recipe split names map ``train -> train800``, ``val -> val200``, ``trainval -> train800val200``; a list-file name
    (``train800``, ``test.txt``, or any other ``<name>.txt`` in the task folder) is accepted as is. Class counts of the
    19 tasks come from the spec table; an unknown task has ``max label + 1`` classes over its list files.
    """

    def __init__(self, root: str | None, task: str | None):
        if root is None:
            raise DataError("data.root: not set; set data.root to the VTAB-1k folder that holds <task>/train800.txt")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(
                f"data.root: directory {str(self.root)!r} does not exist; set data.root to the VTAB-1k folder"
            )
        if not task:
            raise DataError(f"data.task: not set; set data.task to a task folder under {str(self.root)!r}, e.g. cifar")
        key = task.lower().replace("-", "_")
        self.task = VTAB_ALIASES.get(key, key)
        candidates = [task, key, self.task, *(a for a, t in VTAB_ALIASES.items() if t == self.task)]
        found = next((self.root / c for c in dict.fromkeys(candidates) if (self.root / c).is_dir()), None)
        if found is None:
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir() and any(p.glob("*.txt")))
            hint = did_you_mean(task, present) or (f"; tasks found: {', '.join(present)}" if present else "")
            raise DataError(f"data.task: no folder {task!r} under {str(self.root)!r}{hint}")
        self.dir = found
        self._lists: dict[str, tuple[list[str], np.ndarray]] = {}
        known = VTAB_CLASSES.get(self.task)
        self.num_classes = known if known is not None else self._max_label() + 1
        self.class_names = tuple(str(c) for c in range(self.num_classes))

    def _list_file(self, split: str, key: str) -> Path:
        name = VTAB_SPLITS.get(split, split).removesuffix(".txt")
        path = self.dir / f"{name}.txt"
        if not path.is_file():
            available = sorted(p.stem for p in self.dir.glob("*.txt"))
            raise DataError(
                f"{key}: list file {str(path)!r} does not exist (split {split!r}); "
                f"found: {', '.join(available) or 'no .txt files'}; "
                f"recipe names: {', '.join(VTAB_SPLITS)}{_skip_hint(key)}"
            )
        return path

    def _list(self, split: str, key: str) -> tuple[list[str], np.ndarray]:
        path = self._list_file(split, key)
        if path.name not in self._lists:
            self._lists[path.name] = _read_list(path, key)
        return self._lists[path.name]

    def _max_label(self) -> int:
        files = [self.dir / f"{n}.txt" for n in VTAB_SPLITS.values() if (self.dir / f"{n}.txt").is_file()]
        if not files:
            raise DataError(f"data.task: {str(self.dir)!r} holds none of {', '.join(VTAB_SPLITS.values())} (.txt)")
        return max(int(self._list(f.stem, "data.task")[1].max(initial=0)) for f in files)

    def size(self, split: str, key: str) -> int:
        return len(self._list(split, key)[0])

    def load(self, split: str, key: str) -> SplitData:
        rel, labels = self._list(split, key)
        if len(labels) and labels.max() >= self.num_classes:
            raise DataError(
                f"{key}: {self._list_file(split, key)} has label {int(labels.max())} but task {self.task!r} has "
                f"{self.num_classes} classes; check data.task"
            )
        return SplitData(labels=labels, images=FileImages(tuple(str(self.dir / p) for p in rel), key="data.root"))


# ----------------------------------------------------------------------------------------------------------------
# image folders


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
            raise DataError("data.root: not set; set data.root to a folder with train/<class>/<image> inside")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(
                f"data.root: directory {str(self.root)!r} does not exist; set data.root to the image folder"
            )
        self._files: dict[str, tuple[list[str], np.ndarray]] = {}
        classes: set[str] = set()
        for d in self._dirs(train_split, "data.train_split"):
            classes.update(_class_dirs(d))
        if not classes:
            raise DataError(f"data.root: {str(self._dirs(train_split, 'data.train_split')[0])!r} has no class folders")
        self.class_names = tuple(sorted(classes))

    def _dirs(self, split: str, key: str) -> list[Path]:
        if (self.root / split).is_dir():
            return [self.root / split]
        if split == "trainval" and (self.root / "train").is_dir() and (self.root / "val").is_dir():
            return [self.root / "train", self.root / "val"]
        present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        raise DataError(
            f"{key}: no folder {split!r} under {str(self.root)!r}{did_you_mean(split, present)}; "
            f"found: {', '.join(present) or 'nothing'}{_skip_hint(key)}"
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
            self._files[split] = (paths, np.array(labels, dtype=np.int64))
        return self._files[split]

    def size(self, split: str, key: str) -> int:
        return len(self._scan(split, key)[0])

    def load(self, split: str, key: str) -> SplitData:
        paths, labels = self._scan(split, key)
        return SplitData(labels=labels, images=FileImages(tuple(paths), key="data.root"))
