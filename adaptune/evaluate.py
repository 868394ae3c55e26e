"""One evaluation function for training and ``adaptune eval``, and the eval report (tables, CSV, PNG).

`evaluate` runs a model over a loader; `evaluate_artifact` rebuilds any artifact (run directory, merged file,
exported timm directory; see `loading.load_artifact`), evaluates it on a split of its recipe's data and writes
``metrics.csv``, ``per_class.csv``, ``confusion.csv``, ``results.json`` and, with the ``[plot]`` extra,
``confusion.png``.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from adaptune.batch import Batch
    from adaptune.methods.registry import MethodSpec
    from adaptune.recipe import Recipe

MAX_TABLE_ROWS = 40  # per-class rows shown on the terminal; the CSV has all
MAX_TERMINAL_CONFUSION = 12  # classes up to which the confusion matrix is also printed


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (fp32: none)."""
    import torch

    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_forward(spec: MethodSpec | None, cfg: Any) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """``forward(model, batch) -> logits``: the method's own forward (task ids), else ``model(batch.inputs)``."""
    if spec is None or spec.forward is None:
        return lambda model, batch: model(batch.inputs)
    method_forward = spec.forward
    return lambda model, batch: method_forward(model, cfg, batch)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    precision: str = "fp32",
    confusion: bool = True,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    method: MethodSpec | None = None,
    method_cfg: Any = None,
) -> dict[str, Any]:
    """Loss, top-1, top-5 (in %), per-class and macro accuracy, confusion matrix, throughput.

    The model is put in eval mode for the pass (consolidated adapters: MoSA evaluates its merged expert) and its mode
    is restored afterwards. Under DDP each process sees a shard of the split; ``reduce`` (a sum over processes) turns
    the shards' counts into the metrics of the whole split. With ``method``, its ``forward`` computes the logits and
    its ``diagnostics`` (this process's shard) go into ``result["diagnostics"]``.

    Returns:
        ``{"loss", "top1", "top5", "macro_top1", "per_class_top1" (list), "per_class_support" (list), "confusion"
        (list of lists, rows = true class), "samples", "images_per_s" (model forward only, after a first warm-up
        batch), "eval_seconds" (the whole pass, data included), "peak_memory_mb" (CUDA; None on the CPU)}``, plus
        ``"diagnostics"`` when the method reports any.
    """
    import torch

    forward = model_forward(method, method_cfg)
    watch = method.diagnostics(model, method_cfg) if method is not None and method.diagnostics else nullcontext({})
    was_training = model.training
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    sums = {"loss": 0.0, "top5": 0, "seen": 0, "forward_s": 0.0, "timed": 0}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.inference_mode(), watch as diagnostics:
        for batch in loader:
            _eval_batch(
                model, forward, batch.to(device, non_blocking=True), device, precision, matrix, sums, len(loader)
            )
    elapsed = time.perf_counter() - start
    model.train(was_training)
    loss_sum, top5_hits, seen = sums["loss"], sums["top5"], sums["seen"]
    if reduce is not None:
        totals = reduce(torch.tensor([loss_sum, top5_hits, seen], dtype=torch.float64, device=device)).tolist()
        loss_sum, top5_hits, seen = totals[0], int(totals[1]), int(totals[2])
        matrix = reduce(matrix.to(device)).cpu()
    if seen == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    correct = matrix.diag()
    per_class_total = matrix.sum(dim=1)
    per_class = torch.where(per_class_total > 0, correct.double() / per_class_total.clamp(min=1), torch.nan)
    present = per_class_total > 0
    result: dict[str, Any] = {
        "loss": loss_sum / seen,
        "top1": 100.0 * correct.sum().item() / seen,
        "top5": 100.0 * top5_hits / seen,
        "macro_top1": 100.0 * per_class[present].mean().item(),
        "per_class_top1": [None if torch.isnan(v) else 100.0 * v.item() for v in per_class],
        "per_class_support": per_class_total.tolist(),
        "samples": seen,
        "images_per_s": sums["timed"] / sums["forward_s"] if sums["forward_s"] > 0 else None,
        "eval_seconds": elapsed,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
    }
    if confusion:
        result["confusion"] = matrix.tolist()
    if diagnostics:
        result["diagnostics"] = diagnostics
    return result


def _eval_batch(
    model: nn.Module,
    forward: Callable[[nn.Module, Batch], torch.Tensor],
    batch: Batch,
    device: torch.device,
    precision: str,
    matrix: torch.Tensor,
    sums: dict[str, Any],
    num_batches: int,
) -> None:
    """One evaluation batch: forward (timed after the first of several batches), loss, top-k and confusion counts."""
    import torch
    import torch.nn.functional as F

    num_classes = matrix.shape[0]
    labels = batch.labels
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with autocast(device, precision):
        logits = forward(model, batch).float()
    if cuda:
        torch.cuda.synchronize(device)
    if sums["seen"] or num_batches == 1:  # the first of several batches is warm-up (allocator, kernel selection)
        sums["forward_s"] += time.perf_counter() - t0
        sums["timed"] += labels.numel()
    sums["loss"] += F.cross_entropy(logits, labels, reduction="sum").item()
    topk = logits.topk(min(5, num_classes), dim=1).indices  # (B, k)
    sums["top5"] += (topk == labels[:, None]).any(dim=1).sum().item()
    pred = topk[:, 0]
    counts = torch.bincount((labels * num_classes + pred).cpu(), minlength=num_classes * num_classes)
    matrix += counts.view(num_classes, num_classes)
    sums["seen"] += labels.numel()


def evaluate_artifact(
    path: str | Path,
    split: str = "test",
    checkpoint: str = "best",
    data_root: str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    write: bool = True,
    img_size: int | None = None,
) -> dict[str, Any]:
    """Evaluate a run directory, merged file or exported timm directory on a split of its recipe's data.

    Args:
        path: The artifact (see `loading.load_artifact`).
        split: Split name as in the recipe (``train``, ``val``, ``test``, a VTAB list name).
        checkpoint: For a run directory: ``best``, ``last`` or ``final``.
        data_root: Replaces the data source's ``root`` (data moved to another machine).
        out: Directory for the CSV/JSON/PNG files; default `default_eval_dir`.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: Images per batch; default the recipe's evaluation batch size.
        write: Write the files (False: only return the numbers).
        img_size: Evaluate at this input size instead of the trained one (models that accept other sizes).

    Returns:
        `evaluate`'s numbers plus ``path``, ``form``, ``method``, ``backbone``, ``checkpoint``, ``split``,
        ``class_names``, ``weights_mb``, ``peak_rss_mb`` (CPU: the process's peak resident memory) and ``files``.

    Raises:
        ArtifactError: The artifact cannot be loaded; ``out`` is in a missing directory.
        DataError: The data or split cannot be found (``--data-root`` / ``--split`` name the fix).
    """
    import torch

    from adaptune import data
    from adaptune.errors import ArtifactError
    from adaptune.loading import load_artifact
    from adaptune.methods import get_method

    if out is not None and not Path(out).parent.is_dir():
        raise ArtifactError(f"--out: directory {str(Path(out).parent)!r} does not exist; create it first")
    out_dir = Path(out) if out is not None else default_eval_dir(Path(path), split, checkpoint)
    art = load_artifact(path, checkpoint)
    recipe = _with_data_root(art.recipe, data_root)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    spec = art.input
    if img_size is not None:
        spec = replace(spec, shape=(spec.channels, img_size, img_size))
    loader = data.build_eval_loader(
        recipe.data,
        split,
        spec=spec,
        batch_size=batch_size or recipe.train.eval_batch_size or 2 * recipe.train.batch_size,
    )
    method = get_method(recipe.method_name) if art.manifest["form"] != "folded" else None
    num_classes = art.manifest["num_classes"]
    result = evaluate(
        art.model.to(dev), loader, dev, num_classes, recipe.train.precision, method=method, method_cfg=recipe.method
    )
    weights = sum(t.numel() * t.element_size() for t in art.model.state_dict().values())
    result.update(
        path=str(path),
        form=art.manifest["form"],
        method=recipe.method_name,
        backbone=recipe.backbone.model,
        checkpoint=checkpoint if art.manifest["form"] == "run" else None,
        split=split,
        img_size=list(spec.size),
        device=str(dev),
        class_names=list(art.manifest.get("class_names") or [str(i) for i in range(num_classes)]),
        weights_mb=weights / 2**20,
        peak_rss_mb=None if dev.type == "cuda" else _peak_rss_mb(),
    )
    result["files"] = write_eval_files(result, out_dir) if write else {}
    return result


def _with_data_root(recipe: Recipe, data_root: str | None) -> Recipe:
    """``recipe`` with its data source's ``root`` replaced.

    Raises:
        DataError: The recipe's data source has no ``root`` (built-in data): ``--data-root`` would be ignored.
    """
    if data_root is None:
        return recipe
    from adaptune.errors import DataError

    options = recipe.data.options
    if options is None or not hasattr(options, "root"):
        raise DataError(
            f"--data-root: the run's data source {recipe.data.source!r} reads no files from a root; leave --data-root "
            "out"
        )
    return recipe.replace(data=replace(recipe.data, options=replace(options, root=data_root)))


def default_eval_dir(path: Path, split: str, checkpoint: str) -> Path:
    """``RUN/eval/<split>-<checkpoint>`` for a run directory, ``<name>-eval/<split>`` beside any other artifact."""
    from adaptune.artifacts import is_run_dir

    if is_run_dir(path):
        return path / "eval" / f"{split}-{checkpoint}"
    return path.with_name(f"{path.stem}-eval") / split


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------------
# files and terminal report


def write_eval_files(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write ``metrics.csv``, ``per_class.csv``, ``confusion.csv``, ``results.json`` and (with matplotlib)
    ``confusion.png`` into ``out_dir`` (created), each atomically; returns ``{kind: path}``."""
    from adaptune.artifacts import atomic_write_text, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    names = result["class_names"]
    files = {
        "metrics": out_dir / "metrics.csv",
        "per_class": out_dir / "per_class.csv",
        "confusion": out_dir / "confusion.csv",
        "results": out_dir / "results.json",
    }
    atomic_write_text(files["metrics"], _csv([("metric", "value"), *_metric_rows(result)]))
    rows: list[tuple[Any, ...]] = [("class", "name", "images", "correct", "top1")]
    for i, (name, acc, n) in enumerate(zip(names, result["per_class_top1"], result["per_class_support"], strict=True)):
        rows.append((i, name, n, result["confusion"][i][i], "" if acc is None else f"{acc:.4f}"))
    atomic_write_text(files["per_class"], _csv(rows))
    matrix = result["confusion"]
    header = ("true \\ predicted", *names)
    atomic_write_text(files["confusion"], _csv([header, *[(n, *row) for n, row in zip(names, matrix, strict=True)]]))
    write_json(files["results"], {k: v for k, v in result.items() if k != "files"})
    png = out_dir / "confusion.png"
    if _plot_confusion(matrix, names, png):
        files["confusion_png"] = png
    return {k: str(v) for k, v in files.items()}


def _metric_rows(result: dict[str, Any]) -> list[tuple[str, Any]]:
    keys = (
        "samples",
        "loss",
        "top1",
        "top5",
        "macro_top1",
        "images_per_s",
        "peak_memory_mb",
        "peak_rss_mb",
        "weights_mb",
        "eval_seconds",
    )
    return [(k, result[k]) for k in keys if result.get(k) is not None]


def _csv(rows: list[tuple[Any, ...]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _plot_confusion(matrix: list[list[int]], names: list[str], path: Path) -> bool:
    """Row-normalised confusion matrix as a PNG; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    from adaptune.artifacts import atomic_write_bytes

    counts = np.asarray(matrix, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(names)
    side = min(4 + 0.35 * n, 24)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 40:
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    int(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def print_report(result: dict[str, Any]) -> None:
    """The terminal report of ``adaptune eval``: summary, per-class accuracy and (small) confusion matrix."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    where = f"{result['path']} [{result['checkpoint']}]" if result["checkpoint"] else result["path"]
    summary = Table(title=f"{where}: {result['method']} on {result['backbone']}, split {result['split']}")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    fmt = {
        "loss": "{:.4f}",
        "top1": "{:.2f}%",
        "top5": "{:.2f}%",
        "macro_top1": "{:.2f}%",
        "samples": "{:,}",
        "images_per_s": "{:,.1f}",
        "peak_memory_mb": "{:,.1f} MiB",
        "peak_rss_mb": "{:,.1f} MiB (process)",
        "weights_mb": "{:,.1f} MiB",
        "eval_seconds": "{:.2f} s",
    }
    for key, value in _metric_rows(result):
        summary.add_row(key, fmt[key].format(value))
    console.print(summary)

    names = result["class_names"]
    per_class = Table(title="per-class top-1")
    for col in ("class", "name", "images", "top1"):
        per_class.add_column(col, justify="left" if col == "name" else "right")
    for i, (name, acc, n) in enumerate(zip(names, result["per_class_top1"], result["per_class_support"], strict=True)):
        if i == MAX_TABLE_ROWS:
            per_class.add_row("...", f"{len(names) - i} more in per_class.csv", "", "")
            break
        per_class.add_row(str(i), name, str(n), "-" if acc is None else f"{acc:.2f}%")
    console.print(per_class)

    if len(names) <= MAX_TERMINAL_CONFUSION:
        confusion = Table(title="confusion matrix (rows: true, columns: predicted)")
        confusion.add_column("")
        for name in names:
            confusion.add_column(name, justify="right")
        for name, row in zip(names, result["confusion"], strict=True):
            confusion.add_row(name, *map(str, row))
        console.print(confusion)
    diagnostics = result.get("diagnostics") or {}  # the method's own observations: one table per mapping
    for key, value in diagnostics.items():
        if key == "warnings":
            continue
        if not isinstance(value, dict):
            console.print(f"{key}: {value}", highlight=False)
            continue
        table = Table(title=f"method diagnostics: {key}")
        table.add_column("name")
        table.add_column("values")
        for name, v in value.items():
            items = v if isinstance(v, list | tuple) else [v]
            table.add_row(str(name), " ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in items))
        console.print(table)
    for warning in diagnostics.get("warnings", []):
        console.print(f"warning: {warning}", style="yellow", highlight=False)
    for kind, path in result["files"].items():
        console.print(f"{kind}: {path}", highlight=False)
