"""Experiment tracking: the records of ``metrics.jsonl`` sent on to CSV files, TensorBoard or Weights & Biases.

``output.report_to: [csv, tensorboard, wandb]`` names backends from the one table `BACKENDS`; `open_trackers` opens
them for a run and returns a `Tracker` whose ``log(record)`` hands every record (the same dicts the loop writes to
``metrics.jsonl``) to each backend::

    metrics.jsonl record ──► Tracker.log ──┬─► csv          metrics.csv (step records), epochs.csv (epoch records)
                                           ├─► tensorboard  run_dir/tensorboard/events.out.tfevents.*
                                           └─► wandb        run_dir/wandb/<offline-|>run-*/ (id in wandb_run_id.txt)

Two kinds of record reach a tracker (`is_epoch_record` tells them apart):

- step records ``{"step", "epoch", "loss", <terms: "ce", "kl", ...>, "lr"}``, every ``train.log_every`` steps;
- epoch records ``{"epoch", "step", "train_loss", "train_top1", "train_<term>", "val_loss", "val_top1", "val_top5",
  "best", "val_diagnostics"}``.

Scalar names in TensorBoard and W&B (`scalars`), all indexed by the global optimizer step (epoch records at the step
that closed the epoch): step records give ``step/loss``, ``step/<term>`` and ``lr``; epoch records give
``train/loss``, ``train/top1``, ``train/<term>``, ``val/loss``, ``val/top1``, ``val/top5`` and the method's
diagnostics as ``val/diagnostics/<key>/.../<index>``. The per-step loss and the epoch mean stay on separate curves.
The CSV files keep the records' own keys as columns (nested values as JSON in one cell).

Resuming: a run resumed from a checkpoint at step ``S`` (``resume_step``) logs again what it had logged after ``S``
before it stopped; the CSV files drop their rows after ``S`` and TensorBoard purges its events after ``S`` (its
``purge_step``), so no curve holds a step twice. W&B resumes the run with the id stored in the run directory; it has
no purge (rewinding a run is a server-side feature), but the resumed loop is exact, so a re-logged step repeats the
same values. A fresh run (not resumed) in a directory left by an attempt that never saved a checkpoint replaces that
attempt's CSV files and TensorBoard events, as the loop replaces its ``metrics.jsonl``.

Failures: an unknown name or a backend whose package is missing is an error at open (`check`), before training;
an error inside a backend while logging never stops training: the tracker says one warning line and turns that
backend off for the rest of the run.

Deviations: W&B's console capture is off (``console="off"``): adaptune's own lines go to the terminal unchanged;
TensorBoard's hyperparameters are written into the run's own event file (``add_hparams`` would open a second run
directory per call), with the resolved recipe as text beside them.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from adaptune.errors import RecipeError, did_you_mean
from adaptune.files import atomic_write_text, finite, to_json

WANDB_ID_FILE = "wandb_run_id.txt"
TENSORBOARD_DIR = "tensorboard"
STEP_CSV, EPOCH_CSV = "metrics.csv", "epochs.csv"
_HPARAM_METRICS = ("val/top1", "val/loss", "train/loss")  # the scalars TensorBoard's HParams tab shows per run


class Sink(Protocol):
    """One open backend."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Backend:
    """A tracking backend: its recipe name, what it writes, the package it needs and how to open it.

    ``open(run_dir, recipe_dict, resume, resume_step)`` returns a `Sink`.
    """

    name: str
    summary: str
    open: Callable[[Path, dict[str, Any], bool, int | None], Sink]
    module: str | None = None  # the top-level package it imports; None: nothing beyond adaptune
    extra: str | None = None  # the adaptune extra that installs it


def is_epoch_record(record: dict[str, Any]) -> bool:
    """True for an epoch record (training means, validation), False for a step record (loss, lr)."""
    return any(k.startswith(("train_", "val_")) for k in record)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers under TensorBoard/W&B names (see the module docstring); None, bools and text left out."""
    out: dict[str, float] = {}
    epoch = is_epoch_record(record)
    for key, value in record.items():
        if key in ("step", "epoch", "best"):
            continue
        if not epoch:
            name = "lr" if key == "lr" else f"step/{key}"
        elif key.startswith("train_"):
            name = "train/" + key.removeprefix("train_")
        elif key == "val_diagnostics":
            name = "val/diagnostics"
        elif key.startswith("val_"):
            name = "val/" + key.removeprefix("val_")
        else:
            name = key
        _leaves(name, value, out)
    return out


def _leaves(name: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        if math.isfinite(value):
            out[name] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _leaves(f"{name}/{k}", v, out)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _leaves(f"{name}/{i}", v, out)


# ----------------------------------------------------------------------------------------------------------------
# the tracker


class Tracker:
    """The open backends of one run. ``log`` never raises: a failing backend is reported once and turned off."""

    def __init__(self, sinks: dict[str, Sink], say: Callable[[str], None]):
        self.sinks = dict(sinks)
        self.say = say

    @property
    def names(self) -> list[str]:
        """The backends still on."""
        return list(self.sinks)

    def log(self, record: dict[str, Any]) -> None:
        """Hand one ``metrics.jsonl`` record (step or epoch) to every backend still on."""
        record = finite(record)  # NaN/inf as None, as in metrics.jsonl
        for name, sink in list(self.sinks.items()):
            try:
                sink.log(record)
            except Exception as e:
                self._drop(name, f"failed at step {record.get('step')}", e)

    def close(self) -> None:
        """Flush and close every backend (errors reported, never raised)."""
        for name, sink in list(self.sinks.items()):
            try:
                sink.close()
            except Exception as e:
                self._drop(name, "failed to close", e)
        self.sinks.clear()

    def _drop(self, name: str, what: str, e: Exception) -> None:
        self.sinks.pop(name, None)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        self.say(
            f"warning: {name} tracking {what} ({type(e).__name__}: {first}); {name} logging is off for the rest "
            "of the run (metrics.jsonl has every record)"
        )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def problems(names: Sequence[str], installed: bool = True) -> list[str]:
    """One line per unknown backend name in ``names`` (``output.report_to``) and, with ``installed``, per backend
    whose package is missing; imports nothing (the recipe validator can call it with ``installed=False``)."""
    found = []
    for i, name in enumerate(names):
        if name not in BACKENDS:
            found.append(
                f"output.report_to[{i}]: unknown tracker {name!r}; available: {', '.join(BACKENDS)}"
                f"{did_you_mean(str(name), BACKENDS)}"
            )
        elif installed and (b := BACKENDS[name]).module and importlib.util.find_spec(b.module) is None:
            found.append(
                f"output.report_to[{i}]: {name!r} needs the {b.module} package; run: pip install 'adaptune[{b.extra}]'"
            )
    return found


def check(names: Sequence[str]) -> None:
    """Raise `problems` (unknown names, missing packages) as one `RecipeError`; call it before training starts.

    Raises:
        RecipeError: ``output.report_to`` names an unknown backend or one whose package is not installed.
    """
    found = problems(names)
    if found:
        raise RecipeError(found)


def open_trackers(
    names: Sequence[str],
    run_dir: str | Path,
    recipe_dict: dict[str, Any],
    resume: bool,
    *,
    resume_step: int | None = None,
    say: Callable[[str], None] | None = None,
) -> Tracker:
    """Open the backends ``names`` (``output.report_to``) for the run in ``run_dir``.

    Args:
        names: Backend names from `BACKENDS`; duplicates count once; empty gives a tracker that does nothing.
        run_dir: The run directory (it must exist).
        recipe_dict: The resolved recipe (``Recipe.to_dict()``): W&B's config, TensorBoard's hyperparameters.
        resume: The run continues an earlier one: files are continued and the W&B run is resumed.
        resume_step: The step of the checkpoint the run resumes from: what was logged after it is dropped.
        say: Where warning lines go (default: stderr).

    Raises:
        RecipeError: Unknown backend or missing package (`check`).
        AdaptuneError: A backend that cannot start (W&B without login and not offline); nothing is left open.
    """
    check(names)
    unique = list(dict.fromkeys(names))
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    sinks: dict[str, Sink] = {}
    try:
        for name in unique:
            sinks[name] = BACKENDS[name].open(Path(run_dir), recipe_dict, resume, resume_step)
    except BaseException:
        Tracker(sinks, say).close()
        raise
    return Tracker(sinks, say)


# ----------------------------------------------------------------------------------------------------------------
# csv


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, dict | list | tuple):
        return to_json(value)
    return str(value)


def _after(row: list[str], col: int, step: int) -> bool:
    """Whether the row's step is past ``step`` (a row with no readable step stays)."""
    try:
        return float(row[col]) > step
    except (IndexError, ValueError):
        return False


class _CsvFile:
    """One CSV file whose header is the union of the keys seen, in first-seen order.

    A row with known keys is appended; a row with a new key rewrites the file atomically under the wider header.
    """

    def __init__(self, path: Path, resume: bool, resume_step: int | None):
        self.path = path
        self.header: list[str] = []
        if not resume:
            path.unlink(missing_ok=True)
        elif path.exists():
            self._continue(resume_step)

    def _continue(self, resume_step: int | None) -> None:
        text = self.path.read_text()
        complete = text if text.endswith("\n") or not text else text[: text.rfind("\n") + 1]  # a torn last row
        rows = list(csv.reader(io.StringIO(complete)))
        if not rows:
            self.path.unlink()
            return
        self.header, body = rows[0], rows[1:]
        kept = body
        if resume_step is not None and "step" in self.header:
            col = self.header.index("step")
            kept = [r for r in body if not _after(r, col, resume_step)]
        if kept != body or complete != text:
            self._write_all(self.header, kept)

    def _write_all(self, header: list[str], rows: list[list[str]]) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())

    def append(self, record: dict[str, Any]) -> None:
        new = [k for k in record if k not in self.header]
        if new or not self.path.exists():
            old = self.header
            rows = list(csv.reader(io.StringIO(self.path.read_text())))[1:] if old and self.path.exists() else []
            self.header = old + new
            pad = [""] * len(new)
            self._write_all(self.header, [r + pad for r in rows] + [self._row(record)])
            return
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(self._row(record))
        with open(self.path, "a") as f:
            f.write(buf.getvalue())

    def _row(self, record: dict[str, Any]) -> list[str]:
        return [_cell(record.get(k)) for k in self.header]


class _CsvSink:
    def __init__(self, run_dir: Path, resume: bool, resume_step: int | None):
        self.steps = _CsvFile(run_dir / STEP_CSV, resume, resume_step)
        self.epochs = _CsvFile(run_dir / EPOCH_CSV, resume, resume_step)

    def log(self, record: dict[str, Any]) -> None:
        (self.epochs if is_epoch_record(record) else self.steps).append(record)

    def close(self) -> None:
        pass  # every row is on disk when log returns


def _open_csv(run_dir: Path, recipe_dict: dict[str, Any], resume: bool, resume_step: int | None) -> Sink:
    return _CsvSink(run_dir, resume, resume_step)


# ----------------------------------------------------------------------------------------------------------------
# tensorboard


def _flat_hparams(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys; values TensorBoard's HParams plugin takes (numbers, strings, bools; others as text)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_hparams(v, key + "."))
        elif isinstance(v, bool | str) or (isinstance(v, int | float) and math.isfinite(v)):
            out[key] = v
        else:
            out[key] = json.dumps(v)
    return out


class _TensorBoardSink:
    def __init__(self, run_dir: Path, recipe_dict: dict[str, Any], resume: bool, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = run_dir / TENSORBOARD_DIR
        if not resume and log_dir.is_dir():  # an attempt that never saved a checkpoint: its events go
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        purge = resume_step + 1 if resume and resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=30)
        if not resume:
            import yaml

            text = yaml.safe_dump(recipe_dict, sort_keys=False)
            self.writer.add_text("recipe", "".join(f"    {line}\n" for line in text.splitlines()), 0)
            for summary in hparams(_flat_hparams(recipe_dict), dict.fromkeys(_HPARAM_METRICS, 0.0)):
                self.writer.file_writer.add_summary(summary)

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


def _open_tensorboard(run_dir: Path, recipe_dict: dict[str, Any], resume: bool, resume_step: int | None) -> Sink:
    return _TensorBoardSink(run_dir, recipe_dict, resume, resume_step)


# ----------------------------------------------------------------------------------------------------------------
# wandb


class _WandbSink:
    def __init__(self, run: Any):
        self.run = run

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=record.get("step"))

    def close(self) -> None:
        self.run.finish()


def _open_wandb(run_dir: Path, recipe_dict: dict[str, Any], resume: bool, resume_step: int | None) -> Sink:
    """``wandb.init`` in the run directory; the run id is kept in ``wandb_run_id.txt`` so a resume continues it.

    The mode is W&B's own (``WANDB_MODE``: online by default, ``offline`` logs locally for ``wandb sync``).
    """
    import wandb

    from adaptune.errors import AdaptuneError

    id_file = run_dir / WANDB_ID_FILE
    run_id = (id_file.read_text().strip() or None) if resume and id_file.exists() else None
    output = recipe_dict.get("output") or {}
    project = output.get("wandb_project") or os.environ.get("WANDB_PROJECT") or "adaptune"
    try:
        run = wandb.init(
            dir=str(run_dir),
            project=project,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            config=recipe_dict,
            settings=wandb.Settings(console="off"),
        )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise AdaptuneError(
            f"output.report_to: wandb could not start ({first}); log in with `wandb login`, or set WANDB_MODE=offline "
            "to log locally and upload later with `wandb sync`"
        ) from None
    if run.id != run_id:
        atomic_write_text(id_file, run.id + "\n")
    return _WandbSink(run)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("csv", "metrics.csv (steps) and epochs.csv in the run directory", _open_csv),
        Backend(
            "tensorboard",
            "TensorBoard event files in <run>/tensorboard/ (tensorboard --logdir runs)",
            _open_tensorboard,
            module="tensorboard",
            extra="tensorboard",
        ),
        Backend(
            "wandb",
            "Weights & Biases run (WANDB_MODE=offline: local, for wandb sync)",
            _open_wandb,
            module="wandb",
            extra="wandb",
        ),
    )
}
