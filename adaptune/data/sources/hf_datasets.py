"""The ``hf`` source: a Hugging Face `datasets` data set on disk (``save_to_disk``) or an image folder it reads.

Needs the optional ``datasets`` package (``pip install 'adaptune[hf]'``), imported only when this source is opened::

    data:
      source: hf
      hf: {root: data/flowers}           # a DatasetDict (or Dataset) written by `save_to_disk`
      val_split: validation              # the data set's own split names; `val` finds validation/valid/dev

``data.hf.format: imagefolder`` (or ``auto`` on a folder that is no saved data set) reads ``root`` with
``datasets.load_dataset("imagefolder", data_dir=root)``: ``root/<split>/<class>/<image>`` or ``root/<class>/<image>``
(one ``train`` split), classes from the folder names; datasets keeps the Arrow copy in its cache
(``HF_DATASETS_CACHE``). Nothing is downloaded: Hub data sets are first saved with ``save_to_disk``.

Split names are the data set's own. The recipe's ``val`` also finds ``validation``, ``valid`` or ``dev``, and
``trainval`` is ``train`` + that split when the data set has no ``trainval``; a single saved `Dataset` is the split
``train``. Labels: a ``ClassLabel`` column gives the class names; integer columns are classes ``0..max`` (or
``data.hf.classes``), string columns are class names (sorted, or in the order of ``data.hf.classes``). A row without a
label (``-1``, as in many unlabelled test splits) is an error naming the split. Every class must have a training
image. Images are decoded by datasets' ``Image`` feature and converted to RGB; `HfImages` pickles as the folder's
path and reopens the data set (memory-mapped Arrow files) in each DataLoader worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from adaptune.config import opt
from adaptune.data.sources.registry import SourceSpec, SplitData, bad_split, register
from adaptune.errors import DataError, did_you_mean

if TYPE_CHECKING:
    from adaptune.recipe import DataConfig

INSTALL = "data.source: hf needs the `datasets` package; run: pip install 'adaptune[hf]'"
VAL_ALIASES = ("val", "validation", "valid", "dev")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (DatasetDict, Dataset)


@dataclass(frozen=True)
class HfConfig:
    root: str | None = opt(None, "a folder written by datasets' `save_to_disk`, or an image folder (format)")
    format: Literal["auto", "disk", "imagefolder"] = opt(
        "auto", "`disk` (load_from_disk), `imagefolder` (load_dataset('imagefolder')), `auto`: disk if saved there"
    )
    image_column: str = opt("image", "column holding the images (an `Image` feature)")
    label_column: str = opt("label", "column holding the labels: a `ClassLabel`, integers 0..K-1 or class names")
    classes: tuple[str, ...] | None = opt(None, "class names in label order, for a label column that is no ClassLabel")
    hub_id: str | None = opt(
        None, "the data set's Hub id (e.g. `uoft-cs/cifar10`), named in exported model cards; nothing is downloaded"
    )


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(INSTALL) from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """datasets' progress bars off while a split is opened (they would cut across adaptune's log lines)."""
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def resolve_format(root: Path, fmt: str) -> str:
    """``disk`` or ``imagefolder`` for ``data.hf.format`` (``auto``: disk where ``save_to_disk`` wrote ``root``)."""
    if fmt != "auto":
        return fmt
    return "disk" if any((root / m).is_file() for m in SAVED_MARKERS) else "imagefolder"


def open_dataset(root: str, fmt: str) -> dict[str, Any]:
    """The splits of the data set at ``root``: ``{name: datasets.Dataset}``.

    Raises:
        DataError: ``datasets`` is missing, or ``root`` is not what ``fmt`` reads.
    """
    datasets = _datasets()
    path = Path(root)
    with _quiet(datasets):
        try:
            if fmt == "disk":
                loaded = datasets.load_from_disk(str(path))
            else:
                loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        except FileNotFoundError as e:
            what = "no data set written by save_to_disk" if fmt == "disk" else "no images datasets' imagefolder reads"
            raise DataError(
                f"data.hf.root: {str(path)!r} holds {what} ({str(e).splitlines()[0][:160]}); check data.hf.root and "
                "data.hf.format"
            ) from None
        except (ValueError, OSError) as e:  # a damaged Arrow file, a folder imagefolder cannot parse
            raise DataError(
                f"data.hf.root: cannot read {str(path)!r} as {fmt} ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            ) from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _concat(parts: list[Any]) -> Any:
    return parts[0] if len(parts) == 1 else _datasets().concatenate_datasets(parts)


class HfImages:
    """The images of one split (one or more data-set splits, concatenated) as PIL RGB images.

    Pickles as the folder, format, split names and column; a worker reopens the memory-mapped data set on first read.
    """

    channels = 3

    def __init__(self, root: str, fmt: str, splits: tuple[str, ...], column: str, length: int, rows: Any = None):
        self.root, self.fmt, self.splits, self.column, self.length = root, fmt, splits, column, length
        self._rows = rows  # the open data set, only the image column; None after unpickling

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rows": None}

    def _dataset(self) -> Any:
        if self._rows is None:
            found = open_dataset(self.root, self.fmt)
            self._rows = _concat([found[s] for s in self.splits]).select_columns([self.column])
        return self._rows

    def __len__(self) -> int:
        return self.length

    def read(self, index: int) -> Image.Image:
        where = f"data.hf.root: {self.root} split {'+'.join(self.splits)} row {index}"
        try:
            value = self._dataset()[index][self.column]
        except (OSError, ValueError, SyntaxError) as e:  # bytes PIL cannot parse, a missing file of a path image
            raise DataError(f"{where}: cannot decode the image ({e}); fix or remove the row") from None
        if not isinstance(value, Image.Image):
            raise DataError(f"{where}: column {self.column!r} holds {type(value).__name__}, not an image")
        return value.convert("RGB")

    def verify(self, index: int) -> None:
        """Decode image ``index`` (datasets stores encoded bytes: no cheaper check exists)."""
        self.read(index)


class HfDataset:
    """A `datasets` data set: split names, class names and labels from its features, images read lazily."""

    def __init__(self, options: HfConfig, train_split: str):
        if options.root is None:
            raise DataError("data.hf.root: not set; set data.hf.root to a folder written by datasets' save_to_disk")
        path = Path(options.root).expanduser()
        if not path.is_dir():
            raise DataError(f"data.hf.root: directory {str(path)!r} does not exist; set data.hf.root to the data set")
        self.options = options
        self.root = str(path)
        self.fmt = resolve_format(path, options.format)
        self.splits = open_dataset(self.root, self.fmt)
        self._label_cache: dict[tuple[str, ...], np.ndarray] = {}
        train = self._parts(train_split, "data.train_split")
        self._check_columns(train[0], "data.train_split")
        self.label_kind, self.class_names = self._classes(train)
        self._index = {name: i for i, name in enumerate(self.class_names)}
        labels = self._labels(train_split, "data.train_split")
        empty = [name for i, name in enumerate(self.class_names) if i not in set(labels.tolist())]
        if empty:
            raise DataError(
                f"data.train_split: class {empty[0]!r} has no image in split {train_split!r} of {self.root} "
                f"({len(empty)} empty); train on a split with every class, or drop the class from the data set"
            )

    def _names(self, split: str, key: str) -> tuple[str, ...]:
        """The data set's split(s) for a recipe split name: itself, a validation alias, or train + validation."""
        val = next((a for a in VAL_ALIASES if a in self.splits), None)
        if split in self.splits:
            return (split,)
        if split in VAL_ALIASES and val is not None:
            return (val,)
        if split == "trainval" and "train" in self.splits and val is not None:
            return ("train", val)
        raise bad_split(split, key, f"the data set {self.root}", list(self.splits))

    def _parts(self, split: str, key: str) -> list[Any]:
        return [self.splits[name] for name in self._names(split, key)]

    def _check_columns(self, ds: Any, key: str) -> None:
        datasets = _datasets()
        columns = list(ds.features)
        wanted = (("image_column", self.options.image_column), ("label_column", self.options.label_column))
        for option, column in wanted:
            if column not in columns:
                raise DataError(
                    f"data.hf.{option}: no column {column!r} in {self.root} (columns: {', '.join(columns)})"
                    f"{did_you_mean(column, columns)}; set data.hf.{option}"
                )
        image = ds.features[self.options.image_column]
        if not isinstance(image, datasets.Image):
            col = self.options.image_column
            raise DataError(
                f"data.hf.image_column: column {col!r} is {image!r}, not an Image feature; cast it before "
                f"save_to_disk: ds = ds.cast_column({col!r}, datasets.Image())"
            )

    def _classes(self, train: list[Any]) -> tuple[str, tuple[str, ...]]:
        """(label kind: ``classlabel`` / ``int`` / ``str``, class names) from the training split's label column."""
        datasets = _datasets()
        col, classes = self.options.label_column, self.options.classes
        feature = train[0].features[col]
        if isinstance(feature, datasets.ClassLabel):
            if classes is not None:
                names = ", ".join(feature.names[:8]) + (" ..." if len(feature.names) > 8 else "")
                raise DataError(
                    f"data.hf.classes: column {col!r} is a ClassLabel with its own names ({names}); "
                    "remove data.hf.classes"
                )
            return "classlabel", tuple(feature.names)
        dtype = getattr(feature, "dtype", None)
        if classes is not None and len(set(classes)) != len(classes):
            raise DataError("data.hf.classes: each class name once")
        if isinstance(dtype, str) and dtype.startswith(("int", "uint")):
            if classes is not None:
                return "int", tuple(classes)
            top = max(int(np.max(np.asarray(ds[col]), initial=-1)) for ds in train)
            return "int", tuple(str(c) for c in range(top + 1))
        if dtype in ("string", "large_string"):
            if classes is not None:
                return "str", tuple(classes)
            return "str", tuple(sorted({str(v) for ds in train for v in ds[col]}))
        raise DataError(
            f"data.hf.label_column: column {col!r} is {feature!r}; labels must be a ClassLabel, integers or strings"
        )

    def _labels(self, split: str, key: str) -> np.ndarray:
        """The labels of a recipe split (cached), each checked against the classes."""
        names = self._names(split, key)
        if names not in self._label_cache:
            self._label_cache[names] = np.concatenate([self._split_labels(name, key) for name in names])
        return self._label_cache[names]

    def _split_labels(self, name: str, key: str) -> np.ndarray:
        col = self.options.label_column
        ds = self.splits[name]
        if col not in ds.features:
            raise DataError(f"{key}: split {name!r} of {self.root} has no column {col!r}; set data.hf.label_column")
        names = getattr(ds.features[col], "names", None)
        if self.label_kind == "classlabel" and names is not None and tuple(names) != self.class_names:
            raise DataError(
                f"{key}: split {name!r} of {self.root} names its classes differently from the training split "
                f"({', '.join(names[:8])} vs {', '.join(self.class_names[:8])}); save the splits with one ClassLabel"
            )
        values = ds[col]
        if self.label_kind == "str":
            unknown = next((v for v in values if v not in self._index), None)
            if unknown is not None:
                raise DataError(
                    f"{key}: split {name!r} of {self.root} has label {unknown!r}, not a class "
                    f"({', '.join(self.class_names[:20])}); fix the label or list it in data.hf.classes"
                )
            labels = np.array([self._index[v] for v in values], dtype=np.int64)
        else:
            labels = np.asarray(values, dtype=np.int64)
        bad = labels[(labels < 0) | (labels >= len(self.class_names))]
        if len(bad):
            what = "rows without a label (-1)" if bad.min() < 0 else f"label {int(bad.max())}"
            raise DataError(
                f"{key}: split {name!r} of {self.root} has {what}, outside 0..{len(self.class_names) - 1}; use a "
                "labelled split, or list every class in data.hf.classes"
            )
        return labels

    def size(self, split: str, key: str) -> int:
        return len(self._labels(split, key))  # labels checked here already: errors before any image is decoded

    def load(self, split: str, key: str) -> SplitData:
        names = self._names(split, key)
        parts = self._parts(split, key)
        for ds in parts[1:]:
            self._check_columns(ds, key)
        labels = self._labels(split, key)
        rows = _concat(parts).select_columns([self.options.image_column])
        images = HfImages(self.root, self.fmt, names, self.options.image_column, len(labels), rows)
        return SplitData(labels=labels, images=images)


def _open(options: HfConfig, data: DataConfig) -> HfDataset:
    return HfDataset(options, data.train_split)


register(
    SourceSpec(
        name="hf",
        summary="a Hugging Face `datasets` data set: a save_to_disk folder or an imagefolder ([hf] extra)",
        config_cls=HfConfig,
        open=_open,
    )
)
