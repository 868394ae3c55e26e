"""The ``csv`` source: one CSV file per split, ``path,label`` rows, image paths relative to the CSV file.

The layout (the most common one after image folders; Kaggle-style lists)::

    data/train.csv          path,label            <- a header row naming the two columns (others are ignored)
    data/images/cat/1.jpg   images/cat/1.jpg,cat  <- a path relative to the CSV file's folder (or absolute),
                            images/dog/7.jpg,dog     and a class name or an integer 0..K-1

    data:
      source: csv
      csv: {train: data/train.csv, val: data/val.csv, test: data/test.csv}

The recipe's split names pick the files: ``train``, ``val`` and ``test`` read ``data.csv.<split>``; ``trainval`` reads
the train and val files together. CSV paths are relative to ``data.csv.root`` (default: the working directory), so
``adaptune eval --data-root`` finds data that moved.

Classes: ``data.csv.classes`` when set (labels are its names, or integer indices into it); else integer labels
``0..max`` when every training label is an integer; else the sorted names in the training file(s). Every class must
have a training image. Files are read as UTF-8 (a byte-order mark is fine); blank lines are skipped; every image must
exist when a split is opened (no pixels are decoded until the pipeline needs them).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from adaptune.config import opt
from adaptune.data.sources.registry import FileImages, SourceSpec, SplitData, bad_split, register, skip_hint
from adaptune.errors import DataError, did_you_mean

if TYPE_CHECKING:
    from adaptune.recipe import DataConfig

FILE_SPLITS = ("train", "val", "test")  # the splits with a file option
SPLITS = (*FILE_SPLITS, "trainval")


@dataclass(frozen=True)
class CsvConfig:
    train: str | None = opt(None, "CSV of the training images: a header row, then `path,label` rows")
    val: str | None = opt(None, "CSV of the validation images (data.val_split: val); same layout")
    test: str | None = opt(None, "CSV of the test images (data.test_split: test); same layout")
    root: str | None = opt(None, "folder the CSV paths above are relative to; default: the working directory")
    path_column: str = opt("path", "header of the column with image paths (relative to the CSV file's folder)")
    label_column: str = opt("label", "header of the column with labels: class names, or integers 0..K-1")
    classes: tuple[str, ...] | None = opt(
        None, "class names in label order; default: 0..max for integer labels, else the sorted training names"
    )


@dataclass(frozen=True)
class _Rows:
    """One CSV file's rows: absolute image paths, raw labels, and each row's line number."""

    file: Path
    key: str  # the recipe key that names the file
    paths: list[str]
    labels: list[str]
    lines: list[int]


def _column(header: list[str], name: str, option: str, file: Path) -> int:
    if name in header:
        return header.index(name)
    if header and Path(header[0]).suffix:
        raise DataError(
            f"data.csv.{option}: {file}:1: no header row (the first row looks like data: {','.join(header)!r}); "
            f"add a first line naming the columns, e.g. `path,label`"
        )
    raise DataError(
        f"data.csv.{option}: {file}:1: no column {name!r} in the header (columns: {', '.join(header) or 'none'})"
        f"{did_you_mean(name, header)}; rename the column or set data.csv.{option}"
    )


def read_rows(file: Path, key: str, path_column: str, label_column: str) -> _Rows:
    """Parse one CSV file and check that every row's image exists.

    Raises:
        DataError: Missing file, no header or column, a short row, an empty path or label, a missing image.
    """
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{key}: file {str(file)!r} does not exist; set {key} to a CSV of path,label rows") from None
    except (IsADirectoryError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{key}: cannot read {str(file)!r} as UTF-8 text ({e}); give a CSV file") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next((row for row in reader if any(c.strip() for c in row)), None)
    if header is None:
        raise DataError(f"{key}: {file} is empty; write a header row `path,label` and one row per image")
    header = [c.strip() for c in header]
    p = _column(header, path_column, "path_column", file)
    lab = _column(header, label_column, "label_column", file)
    rows = _Rows(file, key, [], [], [])
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        where = f"{key}: {file}:{reader.line_num}"
        if len(row) <= max(p, lab):
            raise DataError(f"{where}: expected {len(header)} columns ({','.join(header)}), got {row!r}; fix the row")
        path, label = row[p].strip(), row[lab].strip()
        if not path or not label:
            raise DataError(f"{where}: empty {path_column if not path else label_column}; fix or remove the row")
        rows.paths.append(os.path.join(os.path.abspath(file.parent), path))  # an absolute path stays as it is
        rows.labels.append(label)
        rows.lines.append(reader.line_num)
    if not rows.paths:
        raise DataError(f"{key}: {file} has a header but no rows; add one `path,label` row per image")
    _check_images(rows)
    return rows


def _check_images(rows: _Rows) -> None:
    missing = [i for i, path in enumerate(rows.paths) if not os.path.isfile(path)]
    if missing:
        i = missing[0]
        raise DataError(
            f"{rows.key}: {rows.file}:{rows.lines[i]}: image {rows.paths[i]!r} not found ({len(missing)} of "
            f"{len(rows.paths)} rows miss their image); paths are relative to the CSV file's folder"
        )


def _is_index(label: str) -> bool:
    return label.isascii() and label.isdigit()  # 0-9 only: a non-negative integer


class CsvSplits:
    """The splits of ``data.csv``; the classes come from ``data.classes`` or the training split's file(s)."""

    def __init__(self, options: CsvConfig, train_split: str):
        self.options = options
        self.root = Path(options.root).expanduser() if options.root else Path()
        if options.root and not self.root.is_dir():
            raise DataError(
                f"data.csv.root: directory {str(self.root)!r} does not exist; set data.csv.root to the folder the "
                "CSV files are in (or leave it unset)"
            )
        self._rows: dict[str, _Rows] = {}  # by file option: train, val, test
        self._splits: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
        train = self._files(train_split, "data.train_split")
        labels = [label for rows in train for label in rows.labels]
        if options.classes is not None:
            if len(set(options.classes)) != len(options.classes) or not options.classes:
                raise DataError("data.csv.classes: needs at least one class and each name once")
            self.class_names = tuple(options.classes)
            self._integers = False
        else:
            self._integers = all(_is_index(label) for label in labels)
            if self._integers:
                self.class_names = tuple(str(c) for c in range(max(int(label) for label in labels) + 1))
            else:
                self.class_names = tuple(sorted(set(labels)))
        self._index = {name: i for i, name in enumerate(self.class_names)}
        self._check_every_class(train)

    def _files(self, split: str, key: str) -> list[_Rows]:
        """The parsed CSV file(s) of a recipe split name (images checked, labels not yet); each file read once."""
        if split not in SPLITS:
            raise bad_split(split, key, "the csv source (files data.csv.train, .val, .test)", SPLITS)
        out = []
        for name in ("train", "val") if split == "trainval" else (split,):
            file = getattr(self.options, name)
            if file is None:
                raise DataError(
                    f"{key}: split {split!r} needs data.csv.{name}; set it to a CSV of path,label rows{skip_hint(key)}"
                )
            if name not in self._rows:
                columns = self.options.path_column, self.options.label_column
                self._rows[name] = read_rows(self.root / Path(file).expanduser(), f"data.csv.{name}", *columns)
            out.append(self._rows[name])
        return out

    def _split(self, split: str, key: str) -> tuple[tuple[str, ...], np.ndarray]:
        """(image paths, labels) of a split, every label checked against the classes."""
        if split not in self._splits:
            parts = self._files(split, key)
            labels = np.concatenate([self._labels(rows) for rows in parts])
            self._splits[split] = tuple(path for rows in parts for path in rows.paths), labels
        return self._splits[split]

    def _label(self, rows: _Rows, i: int) -> int:
        label = rows.labels[i]
        if label in self._index and not self._integers:
            return self._index[label]
        indexed = self._integers or self.options.classes is not None
        if indexed and _is_index(label) and int(label) < len(self.class_names):
            return int(label)
        known = (
            f"labels 0..{len(self.class_names) - 1} (integers in the training file)"
            if self._integers
            else f"classes: {', '.join(self.class_names[:20])}{' ...' if len(self.class_names) > 20 else ''}"
        )
        fix = "add it to data.csv.classes" if self.options.classes is not None else "fix the label"
        raise DataError(
            f"{rows.key}: {rows.file}:{rows.lines[i]}: unknown label {label!r}{did_you_mean(label, self._index)} "
            f"({known}); {fix}"
        )

    def _labels(self, rows: _Rows) -> np.ndarray:
        return np.array([self._label(rows, i) for i in range(len(rows.labels))], dtype=np.int64)

    def _check_every_class(self, train: list[_Rows]) -> None:
        seen = set(np.concatenate([self._labels(rows) for rows in train]).tolist())
        empty = [name for i, name in enumerate(self.class_names) if i not in seen]
        if empty:
            files = " + ".join(str(rows.file) for rows in train)
            fix = (
                "add images of it or remove it from data.csv.classes"
                if self.options.classes is not None
                else "integer labels must cover 0..K-1: renumber them, or name the classes in data.csv.classes"
            )
            raise DataError(f"{train[0].key}: class {empty[0]!r} has no rows in {files} ({len(empty)} empty); {fix}")

    def size(self, split: str, key: str) -> int:
        return len(self._split(split, key)[0])

    def load(self, split: str, key: str) -> SplitData:
        paths, labels = self._split(split, key)
        return SplitData(labels=labels, images=FileImages(paths, key=self._files(split, key)[0].key))


def _open(options: CsvConfig, data: DataConfig) -> CsvSplits:
    if options.train is None:
        raise DataError("data.csv.train: not set; set data.csv.train to a CSV file of `path,label` rows")
    return CsvSplits(options, data.train_split)


register(
    SourceSpec(
        name="csv",
        summary="CSV files of path,label rows, one per split (data.csv.train/val/test), paths relative to the file",
        config_cls=CsvConfig,
        open=_open,
    )
)
