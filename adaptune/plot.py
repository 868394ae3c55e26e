"""Training curves of one or several runs, overlaid, from their ``metrics.jsonl``: ``adaptune plot RUN ... --out``.

One panel per quantity, stacked over a shared x axis (the global optimizer step; epoch records sit at the step that
closed their epoch), one colour per run (labelled with its directory name), one line style per series::

    ┌ loss ────────────────────────┐   series: per-step training loss (thin), epoch-mean training loss (dashed, o),
    │ ~~~~~~~--o--o--o  ■──■──■     │           validation loss (solid, ■)
    ├ top-1 (%) ───────────────────┤   series: training top-1 (dashed, o), validation top-1 (solid, ■)
    ├ learning rate ───────────────┤   series: the learning rate of every logged step
    └──────────────────────────── step

``metrics`` picks the panels: the names of `PANELS` (``loss``, ``accuracy``, ``lr``) or any key the runs logged
(``val_top5``, a loss term such as ``kl`` or ``train_kl``), one panel each. By default the three panels, less those no
run has data for (a run whose ``train.log_every`` exceeds its steps has no step records, hence no learning rate).

A resumed run may hold a step (or epoch) twice in ``metrics.jsonl``: the later record wins, as in the resumed run. A
torn last line (a crash while appending) is skipped. The figure is written atomically (PNG by default; ``.svg`` and
``.pdf`` work too). matplotlib is an optional extra (``pip install 'adaptune[plot]'``); the Agg canvas is used
directly, so no GUI backend and no pyplot state are touched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune.errors import ArtifactError, did_you_mean
from adaptune.files import atomic_write_bytes
from adaptune.tracking import is_epoch_record

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
FORMATS = ("png", "svg", "pdf")
PANEL_WIDTH, PANEL_HEIGHT, DPI = 8.0, 2.8, 100  # inches; the PNG is 800 x (280 * panels) pixels


@dataclass(frozen=True)
class Series:
    """One line of a panel: a record key, the records it comes from (step or epoch) and its style."""

    key: str
    epoch: bool
    label: str
    style: dict[str, Any]


_STEP = {"linestyle": "-", "linewidth": 0.8, "alpha": 0.45}
_TRAIN = {"linestyle": "--", "marker": "o", "markersize": 3, "linewidth": 1.2}
_VAL = {"linestyle": "-", "marker": "s", "markersize": 3, "linewidth": 1.5}

PANELS: dict[str, tuple[str, tuple[Series, ...]]] = {
    "loss": (
        "loss",
        (
            Series("loss", False, "train (step)", _STEP),
            Series("train_loss", True, "train (epoch)", _TRAIN),
            Series("val_loss", True, "val", _VAL),
        ),
    ),
    "accuracy": (
        "top-1 (%)",
        (Series("train_top1", True, "train", _TRAIN), Series("val_top1", True, "val", _VAL)),
    ),
    "lr": ("learning rate", (Series("lr", False, "lr", {"linestyle": "-", "linewidth": 1.2}),)),
}


@dataclass
class RunCurves:
    """The records of one run: step records by step, epoch records by epoch (later records win)."""

    label: str
    steps: list[dict[str, Any]]
    epochs: list[dict[str, Any]]

    def points(self, key: str, epoch: bool) -> tuple[list[float], list[float]]:
        """(steps, values) of ``key``; a null value (a non-finite number) leaves a gap."""
        xs, ys = [], []
        for r in self.epochs if epoch else self.steps:
            if key in r and isinstance(r.get("step"), int | float):
                v = r[key]
                xs.append(float(r["step"]))
                ys.append(float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan)
        return xs, ys

    def keys(self) -> set[str]:
        """The keys that hold numbers (or null) in some record."""
        number = lambda v: v is None or (isinstance(v, int | float) and not isinstance(v, bool))  # noqa: E731
        return {k for r in self.steps + self.epochs for k, v in r.items() if number(v)}


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, in file order.

    Raises:
        ArtifactError: No such directory, no metrics file, no records, or a damaged line (other than a torn last one).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ArtifactError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: not a directory; give a run directory (the one holding {METRICS_FILE})")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{run_dir}: no {METRICS_FILE}; not a run directory, or a run that has not logged yet (adaptune train)"
        )
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break  # torn by a crash while appending; the loop writes it again on resume
            raise ArtifactError(f"{path}:{i}: not a JSON record ({e.msg}); the file is damaged") from None
        if isinstance(record, dict):
            records.append(record)
    if not records:
        raise ArtifactError(
            f"{path}: no records yet; plot again once the run has logged a step (train.log_every) or ended an epoch"
        )
    return records


def load_curves(run_dir: str | Path, label: str) -> RunCurves:
    """`read_metrics` split into step and epoch records; a step or epoch logged twice keeps its later record."""
    steps: dict[Any, dict[str, Any]] = {}
    epochs: dict[Any, dict[str, Any]] = {}
    for r in read_metrics(run_dir):
        if is_epoch_record(r):
            epochs[r.get("epoch")] = r
        else:
            steps[r.get("step")] = r
    by_step = lambda r: r.get("step") if isinstance(r.get("step"), int | float) else -1  # noqa: E731
    return RunCurves(label, sorted(steps.values(), key=by_step), sorted(epochs.values(), key=by_step))


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name, with as many parent names as it takes to tell runs of the same name apart."""
    parts = [Path(p).resolve().parts for p in run_dirs]
    labels = []
    for i, p in enumerate(parts):
        n = 1
        while n < len(p) and any(q[-n:] == p[-n:] for j, q in enumerate(parts) if j != i and q != p):
            n += 1
        labels.append("/".join(p[-n:]))
    return labels


def _panels(metrics: Sequence[str] | None, runs: list[RunCurves]) -> list[tuple[str, tuple[Series, ...]]]:
    """The (y label, series) of each panel to draw.

    Raises:
        ArtifactError: A name that is neither a panel nor a key any run logged.
    """
    logged = set().union(*(r.keys() for r in runs)) - {"step", "epoch"}
    has = lambda s: any(r.points(s.key, s.epoch)[0] for r in runs)  # noqa: E731
    if not metrics:
        return [(y, series) for y, series in PANELS.values() if any(has(s) for s in series)]
    panels = []
    for name in metrics:
        if name in PANELS:
            panels.append(PANELS[name])
        elif name in logged:
            epoch = any(r.points(name, True)[0] for r in runs)
            panels.append((name, (Series(name, epoch, name, _VAL if epoch else _STEP | {"alpha": 0.8}),)))
        else:
            choices = [*PANELS, *sorted(logged)]
            raise ArtifactError(
                f"--metric: no run logged {name!r}; choose from {', '.join(choices)}{did_you_mean(name, choices)}"
            )
    return panels


def figure(run_dirs: Sequence[str | Path], metrics: Sequence[str] | None = None) -> Figure:
    """The curves of ``run_dirs`` as a matplotlib `Figure` (no pyplot): one axes per panel, one colour per run.

    Raises:
        ArtifactError: A run directory without records, an unknown metric, or matplotlib missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise ArtifactError("adaptune plot needs matplotlib; run: pip install 'adaptune[plot]'") from None
    if not run_dirs:
        raise ArtifactError("adaptune plot: give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    runs = [load_curves(p, label) for p, label in zip(paths, run_labels(paths), strict=True)]
    panels = _panels(metrics, runs)
    fig = Figure(figsize=(PANEL_WIDTH, PANEL_HEIGHT * len(panels)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (ylabel, series) in zip(axes, panels, strict=True):
        for run, colour in zip(runs, colours, strict=True):
            for s in series:
                xs, ys = run.points(s.key, s.epoch)
                if xs:
                    ax.plot(xs, ys, color=colour, **s.style)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:  # which line style is which series
            ax.legend(handles=[Line2D([], [], color="0.3", label=s.label, **s.style) for s in series], fontsize=8)
    axes[-1].set_xlabel("step")
    run_handles = [Line2D([], [], color=c, linewidth=2, label=r.label) for r, c in zip(runs, colours, strict=True)]
    fig.legend(handles=run_handles, loc="outside upper center", ncols=min(len(runs), 3), fontsize=9, frameon=False)
    return fig


def plot(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    metrics: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Draw the loss, accuracy and learning-rate curves of ``run_dirs`` overlaid into the image ``out``.

    Args:
        run_dirs: Run directories (each with a ``metrics.jsonl``).
        out: The image to write (``.png``; ``.svg`` and ``.pdf`` work too); its directory must exist.
        metrics: Panels (``loss``, ``accuracy``, ``lr``) or logged keys (``val_top5``, ``kl``); default: the three.
        overwrite: Replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        ArtifactError: Bad run directory, unknown metric, ``out`` exists (without ``overwrite``), its directory is
            missing, an unsupported suffix, or matplotlib missing.
    """
    import io

    out = Path(out)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ArtifactError(
            f"--out: {str(out)!r}: expected an image name ending in {', '.join('.' + f for f in FORMATS)}"
        )
    if out.is_dir():
        raise ArtifactError(f"--out: {str(out)!r} is a directory; give an image file name such as {out / 'curves.png'}")
    if out.exists() and not overwrite:
        raise ArtifactError(
            f"--out: {str(out)!r} already exists; pass --overwrite to replace it, or choose another name"
        )
    if not out.parent.is_dir():
        raise ArtifactError(f"--out: directory {str(out.parent)!r} does not exist; create it first")
    fig = figure(run_dirs, metrics)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI)
    atomic_write_bytes(out, buf.getvalue())
    return out
