"""Multi-task sweeps: per-task runs, reuse and resume, results files, and the two VTAB means."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from adaptune.cli import app
from adaptune.errors import ArtifactError, DataError, RecipeError
from adaptune.sweep import (
    GROUP_MEAN_LABEL,
    PRESETS,
    TASK_MEAN_LABEL,
    VTAB_GROUPS,
    expand_tasks,
    format_table,
    summarize,
    sweep,
    to_csv,
)
from adaptune.train import Interrupted

runner = CliRunner()
TASKS = ("eurosat", "shapes")  # a VTAB-1k task (Specialized, 10 classes from the spec) and a task outside VTAB-1k


def make_vtab_root(root: Path) -> Path:
    """NOAH layout: root/<task>/{train800,val200,test}.txt with `relative/path label` lines, 2 classes of 8x8 PNGs."""
    rng = np.random.default_rng(0)
    for task in TASKS:
        lists: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
        for label in range(2):
            for split, n in (("train800", 2), ("val200", 1), ("test", 1)):
                for i in range(n):
                    rel = f"images/{split}_{label}_{i}.png"
                    (root / task / "images").mkdir(parents=True, exist_ok=True)
                    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) // (label + 1)
                    Image.fromarray(pixels).save(root / task / rel)
                    lists[split].append(f"{rel} {label}")
        for split, lines in lists.items():
            (root / task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def recipe_path(tmp_path: Path) -> Path:
    raw = {
        "name": "tiny",
        "backbone": {"model": "test_vit", "img_size": 32},
        "method": {"name": "lora", "rank": 2},
        "data": {
            "source": "vtab",
            "vtab": {"root": str(make_vtab_root(tmp_path / "vtab"))},
            "val_split": "val",
            "cache": True,
        },
        "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.0, "log_every": 1000},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def summary_mtimes(out: Path) -> dict[str, int]:
    return {t: (out / t / "summary.json").stat().st_mtime_ns for t in TASKS}


def test_sweep_engine_runs_reuses_and_resumes(recipe_path: Path, tmp_path: Path):
    out = tmp_path / "sweep"
    lines: list[str] = []
    results = sweep(recipe_path, ["eurosat, shapes"], [], out, log=lines.append)

    assert [r["task"] for r in results["tasks"]] == list(TASKS)
    assert [r["group"] for r in results["tasks"]] == ["Specialized", None]
    for row, task in zip(results["tasks"], TASKS):
        summary = json.loads((out / task / "summary.json").read_text())
        assert row["test_top1_best"] == summary["test_top1_best"] and row["trainable_params"] > 0
        assert yaml.safe_load((out / task / "recipe.yaml").read_text())["data"]["vtab"]["task"] == task
    assert json.loads((out / "results.json").read_text()) == results
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == [*TASKS, "mean over 2 tasks"]  # no group complete: no group or NOAH mean
    assert results["groups"] == {} and set(results["means"]) == {"task_mean"}
    assert "val_split='val'" in results["selection"]
    assert any("[eurosat] " in line for line in lines)  # train's own lines, prefixed with the task

    before = summary_mtimes(out)
    lines.clear()
    again = sweep(recipe_path, ["eurosat,shapes"], [], out, log=lines.append)
    assert summary_mtimes(out) == before and again["tasks"] == results["tasks"]
    assert sum("finished earlier, reusing" in line for line in lines) == 2

    (out / "shapes" / "summary.json").unlink()  # interrupted after its last checkpoint
    lines.clear()
    sweep(recipe_path, ["eurosat,shapes"], [], out, log=lines.append)
    assert any("shapes: resuming" in line for line in lines)
    assert (out / "shapes" / "summary.json").is_file()
    assert summary_mtimes(out)["eurosat"] == before["eurosat"]


def test_sweep_refuses_foreign_task_dirs_and_restarts_dead_ends(recipe_path: Path, tmp_path: Path):
    out = tmp_path / "sweep"
    sweep(recipe_path, ["shapes"], [], out)
    with pytest.raises(ArtifactError, match=r"different recipe \(train\.lr differ\)"):
        sweep(recipe_path, ["shapes"], ["train.lr=0.5"], out)

    (out / "shapes" / "summary.json").unlink()
    shutil.rmtree(out / "shapes" / "checkpoints")  # stopped before its first checkpoint: started again
    lines: list[str] = []
    sweep(recipe_path, ["shapes"], [], out, log=lines.append)
    assert any("stopped before its first checkpoint; starting it again" in line for line in lines)
    assert (out / "shapes" / "summary.json").is_file()


def test_sweep_checks_every_task_before_training(recipe_path: Path, tmp_path: Path):
    with pytest.raises(DataError, match="data.vtab.task: no folder 'cifar'"):
        sweep(recipe_path, ["shapes,cifar"], [], tmp_path / "sweep")
    assert not (tmp_path / "sweep" / "shapes").exists()
    with pytest.raises(RecipeError, match="a sweep runs VTAB-1k tasks; set it to vtab"):
        sweep(recipe_path, ["shapes"], ["data.source=folder", "data.vtab=null"], tmp_path / "sweep")


def test_interrupt_propagates_with_a_sweep_hint(recipe_path: Path, tmp_path: Path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise Interrupted("interrupted at step 1")

    monkeypatch.setattr("adaptune.train.train", interrupted)
    with pytest.raises(Interrupted, match="in task 'eurosat'.*run the same sweep command again"):
        sweep(recipe_path, ["eurosat"], [], tmp_path / "sweep")
    result = runner.invoke(app, ["sweep", str(recipe_path), "--tasks", "eurosat", "--out", str(tmp_path / "s2")])
    assert result.exit_code == 130 and "run the same sweep command again" in result.stderr


def test_cli_sweep_json_table_and_reuse(recipe_path: Path, tmp_path: Path):
    out = tmp_path / "cli"
    args = ["sweep", str(recipe_path), "--tasks", "eurosat,shapes", "--out", str(out)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    results = json.loads(result.stdout)
    assert [r["task"] for r in results["tasks"]] == list(TASKS)
    assert (out / "results.json").is_file() and (out / "results.csv").is_file()

    before = summary_mtimes(out)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert summary_mtimes(out) == before and result.stderr.count("finished earlier, reusing") == 2
    table = result.stdout.splitlines()
    assert table[0].split()[:2] == ["task", "group"]
    assert any(line.startswith("eurosat") and "Specialized" in line for line in table)
    assert any(line.startswith("mean over 2 tasks") for line in table)

    quiet = runner.invoke(app, [*args, "--quiet"])
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (["vtab-1"], r"--tasks: unknown preset 'vtab-1'; did you mean 'vtab-1k'.*presets: vtab-1k, vtab-natural"),
        ([" , "], r"--tasks: no task given; name task folders \(--tasks cifar,eurosat\) or a preset \(vtab-1k\)"),
    ],
)
def test_tasks_errors(tasks: list[str], message: str, recipe_path: Path, tmp_path: Path):
    with pytest.raises(RecipeError, match=message):
        expand_tasks(tasks)
    result = runner.invoke(app, ["sweep", str(recipe_path), "--tasks", tasks[0], "--out", str(tmp_path / "s")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("adaptune: error: --tasks:")


def test_expand_tasks_presets_aliases_and_order():
    assert len(PRESETS["vtab-1k"]) == 19 and PRESETS["vtab-1k"][:2] == ("cifar", "caltech101")
    assert PRESETS["vtab-1k"][-1] == "smallnorb_ele" and PRESETS["vtab-specialized"][1] == "eurosat"
    assert expand_tasks(["cifar100,eurosat", "pets", "cifar", "VTAB-Specialized"]) == [
        "cifar",
        "eurosat",
        "oxford_iiit_pet",
        "patch_camelyon",
        "resisc45",
        "diabetic_retinopathy",
    ]


def full_rows(natural: float, specialized: float, structured: float) -> list[dict]:
    values = {"Natural": natural, "Specialized": specialized, "Structured": structured}
    return [
        {"task": t, "group": g, "test_top1_best": values[g], "test_top1_last": values[g] - 1.0, "best_val_top1": 99.0}
        for g, tasks in VTAB_GROUPS.items()
        for t in tasks
    ]


def test_means_plain_over_tasks_vs_mean_of_group_means():
    results = summarize(full_rows(90.0, 80.0, 50.0))
    assert {g: v["test_top1_best"] for g, v in results["groups"].items()} == {
        "Natural": 90.0,
        "Specialized": 80.0,
        "Structured": 50.0,
    }
    task_mean, group_mean = results["means"]["task_mean"], results["means"]["group_mean"]
    assert task_mean["label"] == TASK_MEAN_LABEL and group_mean["label"] == GROUP_MEAN_LABEL
    assert task_mean["test_top1_best"] == pytest.approx((7 * 90 + 4 * 80 + 8 * 50) / 19)  # 71.05: V-PETL Bench
    assert group_mean["test_top1_best"] == pytest.approx((90 + 80 + 50) / 3)  # 73.33: NOAH
    assert group_mean["test_top1_last"] == pytest.approx((89 + 79 + 49) / 3)
    text = format_table({"out_dir": "x", "selection": "s", **results, "tasks": []})
    assert "mean over tasks (V-PETL Bench)" in text and "mean of the group means (NOAH)" in text
    assert "73.33" in text and "71.05" in text
    csv_rows = list(csv.reader(to_csv(results).splitlines()))
    assert len(csv_rows) == 1 + 19 + 3 + 2 and csv_rows[-1][:3] == [GROUP_MEAN_LABEL, "", "73.33333333333333"]


def test_means_partial_groups_and_missing_values():
    rows = [r for r in full_rows(90.0, 80.0, 50.0) if r["group"] != "Structured"]
    rows[0]["test_top1_best"] = None  # e.g. a run with test_split: null
    results = summarize(rows)
    assert set(results["groups"]) == {"Natural", "Specialized"}
    assert results["groups"]["Natural"]["test_top1_best"] is None
    assert results["groups"]["Natural"]["test_top1_last"] == pytest.approx(89.0)
    assert set(results["means"]) == {"task_mean"} and results["means"]["task_mean"]["label"] == "mean over 11 tasks"
    assert summarize([]) == {"tasks": [], "groups": {}, "means": {}}
