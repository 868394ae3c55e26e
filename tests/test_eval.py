"""``adaptune eval``: the same numbers from a run directory, its merged file and its timm export; the report files."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import tiny_recipe
from typer.testing import CliRunner

from adaptune.cli import app
from adaptune.errors import DataError
from adaptune.evaluate import evaluate_artifact
from adaptune.merge import merge

NUM_CLASSES = 3
TEST_PER_CLASS = 5
METRICS = ("loss", "top1", "top5", "macro_top1", "per_class_top1", "per_class_support", "confusion", "samples")
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A foldable method (LoRA) and one with split training structure (MoSA), trained, then merged."""
    from adaptune.train import train

    root = tmp_path_factory.mktemp("eval")
    out = {}
    for method in ("lora", "mosa"):
        recipe = tiny_recipe(
            method,
            backbone={"model_kwargs": {"depth": 2}},
            train={"epochs": 1, "lr": 2e-2, "warmup_epochs": 0.0},
            data={
                "synthetic": {
                    "num_classes": NUM_CLASSES,
                    "train_per_class": 4,
                    "val_per_class": 2,
                    "test_per_class": TEST_PER_CLASS,
                }
            },
        )
        run = train(recipe, out_dir=root / method)
        merged = root / f"{method}.safetensors"
        merge(run.run_dir, merged)
        out[method] = (run.run_dir, merged, run.summary)
    return out


@pytest.mark.parametrize("method", ["lora", "mosa"])
def test_run_dir_and_merged_file_give_the_same_numbers(method, runs, tmp_path):
    run_dir, merged, summary = runs[method]
    from_run = evaluate_artifact(run_dir, out=tmp_path / "a")
    from_file = evaluate_artifact(merged, out=tmp_path / "b")
    for key in METRICS:
        if key == "loss":
            assert from_file[key] == pytest.approx(from_run[key], abs=1e-5)
        else:
            assert from_file[key] == from_run[key], key
    # and the rebuilt run is the model training tested: the frozen random-init backbone is reproduced exactly
    assert from_run["top1"] == summary["test_top1_best"]
    assert from_run["form"] == "run" and from_file["form"] in ("folded", "merged")
    assert from_run["samples"] == NUM_CLASSES * TEST_PER_CLASS == sum(map(sum, from_run["confusion"]))


def test_timm_export_gives_the_same_numbers(runs, tmp_path):
    from adaptune.export import export

    run_dir, merged, _ = runs["lora"]
    export(merged, "timm", tmp_path / "exported")
    from_export = evaluate_artifact(tmp_path / "exported", write=False)
    from_run = evaluate_artifact(run_dir, write=False)
    assert from_export["top1"] == from_run["top1"] and from_export["confusion"] == from_run["confusion"]
    assert from_export["loss"] == pytest.approx(from_run["loss"], abs=1e-5)


def test_report_files(runs):
    run_dir, merged, _ = runs["lora"]
    result = evaluate_artifact(merged, split="val")
    out = merged.with_name("lora-eval") / "val"  # beside the artifact by default
    assert result["files"]["metrics"] == str(out / "metrics.csv")
    metrics = dict(csv.reader((out / "metrics.csv").open()))
    assert float(metrics["top1"]) == result["top1"] and float(metrics["images_per_s"]) > 0
    per_class = list(csv.DictReader((out / "per_class.csv").open()))
    assert [row["name"] for row in per_class] == [f"class_{i}" for i in range(NUM_CLASSES)]
    assert [int(row["images"]) for row in per_class] == [2] * NUM_CLASSES
    confusion = list(csv.reader((out / "confusion.csv").open()))
    assert confusion[0][1:] == [row["name"] for row in per_class]
    assert [[int(v) for v in row[1:]] for row in confusion[1:]] == result["confusion"]
    assert json.loads((out / "results.json").read_text())["top1"] == result["top1"]
    assert result["weights_mb"] > 0 and result["images_per_s"] > 0 and result["peak_rss_mb"] > 0
    # a run directory keeps its reports under eval/<split>-<checkpoint>
    evaluate_artifact(run_dir, split="val", checkpoint="last")
    assert (run_dir / "eval" / "val-last" / "per_class.csv").is_file()


def test_confusion_png(runs, tmp_path):
    pytest.importorskip("matplotlib")
    result = evaluate_artifact(runs["mosa"][1], out=tmp_path / "eval")
    png = tmp_path / "eval" / "confusion.png"
    assert result["files"]["confusion_png"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table_and_json(runs, tmp_path):
    run_dir, merged, _ = runs["mosa"]
    result = runner.invoke(app, ["eval", str(merged), "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    for text in ("top1", "macro_top1", "images_per_s", "per-class top-1", "confusion matrix", "class_2"):
        assert text in result.stdout, text
    result = runner.invoke(app, ["eval", str(run_dir), "--split", "val", "--json", "--out", str(tmp_path / "j")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["split"] == "val" and report["checkpoint"] == "best" and report["method"] == "mosa"


def test_data_root_override_reaches_the_loader(runs, tmp_path, monkeypatch):
    import shutil

    import yaml

    from adaptune import data

    run = tmp_path / "run"
    shutil.copytree(runs["lora"][0], run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["data"] = {**{k: v for k, v in recipe["data"].items() if k != "synthetic"}, "source": "folder"}
    recipe["data"]["folder"] = {"root": "/moved/away"}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    seen = {}

    def spy(cfg, split, **kwargs):
        seen["root"] = cfg.options.root
        raise DataError("stop here")

    monkeypatch.setattr(data, "build_eval_loader", spy)
    with pytest.raises(DataError, match="stop here"):
        evaluate_artifact(run, data_root=str(tmp_path), write=False)
    assert seen["root"] == str(tmp_path)


def test_data_root_for_builtin_data_is_refused(runs):
    """Built-in data reads no files: a --data-root would be silently ignored, so it is an error."""
    with pytest.raises(DataError, match=r"--data-root: the run's data source 'synthetic' reads no files"):
        evaluate_artifact(runs["lora"][1], data_root="/somewhere", write=False)


def test_unknown_split_is_a_one_line_error(runs, tmp_path):
    with pytest.raises(DataError, match="--split"):
        evaluate_artifact(runs["lora"][1], split="nope", write=False)
    result = runner.invoke(app, ["eval", str(runs["lora"][1]), "--split", "nope", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and result.stderr.startswith("adaptune: error: --split")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "e").exists()
