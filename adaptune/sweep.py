"""Multi-task sweeps: one recipe trained on several VTAB-1k tasks, resumable, with one results table.

```
runs/<recipe name>-sweep/
  <task>/            an ordinary run directory per task (``adaptune eval``, ``merge`` and ``export`` read it)
  results.json       one row per task, group means, and both VTAB means (rewritten after every task)
  results.csv        the same rows for a spreadsheet
```
Re-running the same sweep reuses every task whose run directory holds ``summary.json``, resumes a task that has a
``checkpoints/last`` but no summary, and trains the rest. A task's run is reused or resumed only if its stored
``recipe.yaml`` equals the sweep's recipe for that task.

VTAB-1k reports two different "means" (ecosystem §0, finding 3): V-PETL Bench averages the 19 tasks, NOAH averages
the three group means (Natural, Specialized, Structured). Both are written, each with its label.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from adaptune import artifacts
from adaptune.errors import ArtifactError, RecipeError, did_you_mean

# spec methods-others §9.2: the 19 VTAB-1k task folders (NOAH/FacT names) by group, in the spec's order
VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    "Natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "Specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "Structured": (
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ),
}
PRESETS: dict[str, tuple[str, ...]] = {
    "vtab-1k": tuple(t for tasks in VTAB_GROUPS.values() for t in tasks),
    **{f"vtab-{group.lower()}": tasks for group, tasks in VTAB_GROUPS.items()},
}
METRICS = ("test_top1_best", "test_top1_last", "best_val_top1")
COLUMNS = ("task", "group", *METRICS, "trainable_params", "wall_time_s")
TASK_MEAN_LABEL = "mean over tasks (V-PETL Bench)"
GROUP_MEAN_LABEL = "mean of the group means (NOAH)"


def expand_tasks(tasks: Sequence[str]) -> list[str]:
    """Task folder names from ``--tasks`` items: comma-separated names and presets; aliases resolved, no duplicates.

    Args:
        tasks: Items such as ``["cifar,eurosat"]`` or ``["vtab-1k"]``. A name starting with ``vtab`` is a preset.

    Raises:
        RecipeError: An unknown preset, or no task at all.
    """
    from adaptune.data.sources.vtab import VTAB_ALIASES

    out: list[str] = []
    for item in tasks:
        for name in (t.strip() for t in item.split(",")):
            if not name:
                continue
            if name.lower() in PRESETS:
                out += PRESETS[name.lower()]
            elif name.lower().startswith("vtab"):
                hint = did_you_mean(name.lower(), PRESETS)
                raise RecipeError([f"--tasks: unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}"])
            else:
                key = name.lower().replace("-", "_")
                out.append(VTAB_ALIASES.get(key, key))
    if not out:
        raise RecipeError(["--tasks: no task given; name task folders (--tasks cifar,eurosat) or a preset (vtab-1k)"])
    return list(dict.fromkeys(out))


def group_of(task: str) -> str | None:
    """The VTAB-1k group of a task folder name, or None for a task outside VTAB-1k."""
    return next((group for group, tasks in VTAB_GROUPS.items() if task in tasks), None)


def sweep(
    recipe_path: str | Path,
    tasks: Sequence[str],
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``recipe_path`` once per task (``data.vtab.task=<task>``) into ``out_dir/<task>/``; write and return
    results.

    Args:
        recipe_path: Recipe YAML with ``data.source: vtab``; its ``output.dir`` is not used.
        tasks: ``--tasks`` items (see `expand_tasks`).
        overrides: ``key=value`` recipe overrides, applied to every task.
        out_dir: Sweep directory (default: ``runs/<recipe name>-sweep``).
        log: Where progress lines go (None: silent).
        progress: Show the training progress bars (on a TTY).

    Returns:
        The contents of ``results.json`` (see `summarize`) plus ``out_dir`` and ``selection``.

    Raises:
        RecipeError: Bad recipe or overrides, a source other than ``vtab``, an unknown preset, no tasks.
        DataError: A task folder or list file that is missing (checked for every task before any training).
        ArtifactError: A task directory trained with another recipe.
        Interrupted: Ctrl-C or SIGTERM; re-running the same sweep continues.
    """
    from adaptune import data
    from adaptune.recipe import load_recipe
    from adaptune.train import Interrupted, train

    say = log or (lambda _msg: None)
    names = expand_tasks(tasks)
    base = load_recipe(recipe_path, list(overrides))
    if base.data.source != "vtab":
        got = base.data.source
        raise RecipeError([f"{recipe_path}: data.source: a sweep runs VTAB-1k tasks; set it to vtab (got {got!r})"])
    out = Path(out_dir) if out_dir else Path("runs") / f"{base.name}-sweep"
    recipes = {
        t: base.replace(data=dataclasses.replace(base.data, options=dataclasses.replace(base.data.options, task=t)))
        for t in names
    }
    for r in recipes.values():
        data.describe(r.data)  # a missing task folder or list file fails now, not after hours of other tasks
    out.mkdir(parents=True, exist_ok=True)
    selection = (
        f"best weights by validation top-1 on data.val_split={base.data.val_split!r}; test top-1 on "
        f"data.test_split={base.data.test_split!r}"
        if base.data.val_split
        else "no validation split: the last weights are tested"
    )

    rows: list[dict[str, Any]] = []
    for i, (task, recipe) in enumerate(recipes.items(), 1):
        run_dir = out / task
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            _check_same_recipe(run_dir, recipe, task)
            say(f"[{i}/{len(names)}] {task}: finished earlier, reusing {summary_path}")
            summary = _read_json(summary_path)
        else:
            resume = _can_resume(run_dir, recipe, task)
            say(f"[{i}/{len(names)}] {task}: {'resuming' if resume else 'training'} in {run_dir}")
            try:
                result = train(recipe, out_dir=run_dir, resume=resume, log=_prefixed(log, task), progress=progress)
            except Interrupted:
                raise Interrupted(
                    f"sweep interrupted in task {task!r}; its last checkpoint is saved; run the same sweep command "
                    "again to continue"
                ) from None
            summary = result.summary
        rows.append(_row(task, summary))
        results = {"out_dir": str(out), "selection": selection, **summarize(rows)}
        artifacts.write_json(out / "results.json", results)
        artifacts.atomic_write_text(out / "results.csv", to_csv(results))
    return results


def _prefixed(log: Callable[[str], None] | None, task: str) -> Callable[[str], None] | None:
    if log is None:
        return None
    return lambda msg: log(f"[{task}] {msg}")


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON (line {e.lineno}); delete it to re-run this task") from None


def _check_same_recipe(run_dir: Path, recipe: Any, task: str) -> None:
    """Raise unless ``run_dir/recipe.yaml`` is ``recipe``: results of another recipe must not be mixed in."""
    path = run_dir / artifacts.RECIPE_FILE
    if not path.is_file():
        raise ArtifactError(f"{run_dir}: not a run directory (no {artifacts.RECIPE_FILE}); move it away to run {task}")
    stored = _flatten(yaml.safe_load(path.read_text()) or {})
    wanted = _flatten(yaml.safe_load(recipe.to_yaml()))
    changed = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
    if changed:
        raise ArtifactError(
            f"{run_dir}: trained with a different recipe ({', '.join(changed)} differ); use another --out, or move "
            f"{run_dir} away to retrain {task}"
        )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _can_resume(run_dir: Path, recipe: Any, task: str) -> bool:
    """True for a task whose run was started (resumed from its ``last`` checkpoint, or started again when it stopped
    before the first one); False for a task not started yet."""
    if not artifacts.is_run_dir(run_dir):
        return False  # nothing of a run here (absent or empty directory): train from scratch
    _check_same_recipe(run_dir, recipe, task)
    return True


def _row(task: str, summary: dict[str, Any]) -> dict[str, Any]:
    return {"task": task, "group": group_of(task), **{k: summary.get(k) for k in COLUMNS[2:]}}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-task rows plus means of ``METRICS`` (None where any value is None).

    Returns:
        ``{"tasks": rows, "groups": {group: {"tasks": n, metric: mean}}, "means": {...}}``. A group appears once all its
        VTAB-1k tasks are present. ``means["task_mean"]`` (the plain mean over the swept tasks) is always there;
        ``means["group_mean"]`` (the mean of the three group means, NOAH's number) only when every group is complete.
        Each mean carries a ``label``.
    """
    by_task = {r["task"]: r for r in rows}
    groups = {
        group: {"tasks": len(tasks), **_means([by_task[t] for t in tasks])}
        for group, tasks in VTAB_GROUPS.items()
        if all(t in by_task for t in tasks)
    }
    means: dict[str, Any] = {}
    if rows:
        label = TASK_MEAN_LABEL if len(groups) == len(VTAB_GROUPS) else f"mean over {len(rows)} tasks"
        means["task_mean"] = {"label": label, "tasks": len(rows), **_means(rows)}
    if len(groups) == len(VTAB_GROUPS):
        means["group_mean"] = {"label": GROUP_MEAN_LABEL, "tasks": len(rows), **_means(list(groups.values()))}
    return {"tasks": list(rows), "groups": groups, "means": means}


def _means(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for m in METRICS:
        values = [r.get(m) for r in rows]
        out[m] = math.fsum(values) / len(values) if values and None not in values else None
    return out


def _summary_lines(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, group, metrics) for each group mean and VTAB mean, in table order."""
    lines = [(f"{group} (group mean)", group, g) for group, g in results["groups"].items()]
    lines += [(m["label"], "", m) for m in results["means"].values()]
    return lines


def to_csv(results: dict[str, Any]) -> str:
    """``results.csv``: one row per task, then one per group mean and VTAB mean (task column = its label)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in results["tasks"]:
        writer.writerow(["" if r.get(c) is None else r[c] for c in COLUMNS])
    for label, group, m in _summary_lines(results):
        writer.writerow([label, group, *("" if m[k] is None else m[k] for k in METRICS), "", ""])
    return buf.getvalue()


def format_table(results: dict[str, Any]) -> str:
    """The results as a plain-text table, means labelled, with the selection rule underneath."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    def secs(r: dict[str, Any]) -> str:
        return "-" if r["wall_time_s"] is None else f"{r['wall_time_s']:.0f}"

    header = ("task", "group", "test best", "test last", "val best", "trainable", "time s")
    body = [
        (r["task"], r["group"] or "-", *map(pct, (r[m] for m in METRICS)), f"{r['trainable_params']:,}", secs(r))
        for r in results["tasks"]
    ]
    extra = [(label, g or "-", *(pct(m[k]) for k in METRICS), "", "") for label, g, m in _summary_lines(results)]
    widths = [max(len(row[i]) for row in (header, *body, *extra)) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "-" * len(fmt(header))
    lines = [fmt(header), rule, *map(fmt, body)]
    if extra:
        lines += [rule, *map(fmt, extra)]
    lines += [f"top-1 in %; {results['selection']}", f"results: {results['out_dir']}/results.json, results.csv"]
    return "\n".join(lines)
