"""The ``vtab`` source: one VTAB-1k task in NOAH's layout, ``root/<task>/{train800,val200,train800val200,test}.txt``.

Each list file holds one ``relative/path label`` per line (spec: methods-others §9.1). Recipe split names map
``train -> train800``, ``val -> val200``, ``trainval -> train800val200``; a list-file name (``train800``,
``test.txt``, or any other ``<name>.txt`` in the task folder) is accepted as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from adaptune.config import opt
from adaptune.data.sources.registry import FileImages, SourceSpec, SplitData, register, skip_hint
from adaptune.errors import DataError, did_you_mean

if TYPE_CHECKING:
    from adaptune.recipe import DataConfig

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


@dataclass(frozen=True)
class VtabConfig:
    root: str | None = opt(None, "the VTAB-1k folder that holds <task>/train800.txt (NOAH layout)")
    task: str | None = opt(None, "task folder under root, e.g. `cifar`, `eurosat` (aliases: cifar100, pets, ...)")


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
    """One VTAB-1k task. Class counts of the 19 tasks come from the spec table; an unknown task has
    ``max label + 1`` classes over its list files."""

    def __init__(self, root: str | None, task: str | None):
        if root is None:
            raise DataError(
                "data.vtab.root: not set; set data.vtab.root to the VTAB-1k folder that holds <task>/train800.txt"
            )
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(
                f"data.vtab.root: directory {str(self.root)!r} does not exist; set data.vtab.root to the VTAB-1k folder"
            )
        if not task:
            raise DataError(
                f"data.vtab.task: not set; set data.vtab.task to a task folder under {str(self.root)!r}, e.g. cifar"
            )
        key = task.lower().replace("-", "_")
        self.task = VTAB_ALIASES.get(key, key)
        candidates = [task, key, self.task, *(a for a, t in VTAB_ALIASES.items() if t == self.task)]
        found = next((self.root / c for c in dict.fromkeys(candidates) if (self.root / c).is_dir()), None)
        if found is None:
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir() and any(p.glob("*.txt")))
            hint = did_you_mean(task, present) or (f"; tasks found: {', '.join(present)}" if present else "")
            raise DataError(f"data.vtab.task: no folder {task!r} under {str(self.root)!r}{hint}")
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
                f"recipe names: {', '.join(VTAB_SPLITS)}{skip_hint(key)}"
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
            raise DataError(f"data.vtab.task: {str(self.dir)!r} holds none of {', '.join(VTAB_SPLITS.values())} (.txt)")
        return max(int(self._list(f.stem, "data.vtab.task")[1].max(initial=0)) for f in files)

    def size(self, split: str, key: str) -> int:
        return len(self._list(split, key)[0])

    def load(self, split: str, key: str) -> SplitData:
        rel, labels = self._list(split, key)
        if len(labels) and labels.max() >= self.num_classes:
            raise DataError(
                f"{key}: {self._list_file(split, key)} has label {int(labels.max())} but task {self.task!r} has "
                f"{self.num_classes} classes; check data.vtab.task"
            )
        return SplitData(labels=labels, images=FileImages(tuple(str(self.dir / p) for p in rel), key="data.vtab.root"))


def _open(options: VtabConfig, data: DataConfig) -> VtabTask:
    return VtabTask(options.root, options.task)


register(
    SourceSpec(
        name="vtab",
        summary="one VTAB-1k task in NOAH's list-file layout (root/<task>/train800.txt ...)",
        config_cls=VtabConfig,
        open=_open,
    )
)
