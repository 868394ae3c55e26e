"""Trackers wired into training: every record reaches them live, and `adaptune plot` reads runs."""

from __future__ import annotations

import csv

import pytest
from conftest import tiny_recipe
from typer.testing import CliRunner

from adaptune.cli import app
from adaptune.errors import RecipeError
from adaptune.recipe import recipe_from_dict
from adaptune.train import train


def test_training_logs_to_csv_and_tensorboard_as_it_goes(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(
        "lora", tmp_path, train={"epochs": 2, "log_every": 1}, output={"report_to": ["csv", "tensorboard"]}
    )
    result = train(recipe)
    epochs = list(csv.DictReader((result.run_dir / "epochs.csv").open()))
    assert [int(e["epoch"]) for e in epochs] == [1, 2] and float(epochs[-1]["val_top1"]) >= 0
    steps = list(csv.DictReader((result.run_dir / "metrics.csv").open()))
    assert len(steps) == result.summary["steps"]
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("val/top1")) == 2 and len(events.Scalars("step/loss")) == result.summary["steps"]
    png = tmp_path / "curves.png"
    out = CliRunner().invoke(app, ["plot", str(result.run_dir), "--out", str(png)])
    assert out.exit_code == 0, out.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unknown_tracker_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"output: report_to\[0\]: unknown tracker 'tensorbord'.*did you mean"):
        recipe_from_dict({"method": {"name": "linear"}, "output": {"report_to": ["tensorbord"]}})


def test_data_layer_warnings_reach_the_terminal(tmp_path, monkeypatch, capsys):
    import signal

    from adaptune import data
    from adaptune.cli import main

    monkeypatch.setattr(data, "CACHE_BUDGET_BYTES", 1)
    path = tmp_path / "r.yaml"
    path.write_text(tiny_recipe("linear", train={"epochs": 1}).to_yaml())
    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            main(["train", str(path), "--out", str(tmp_path / "run")])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.code == 0
    assert "warning: data: the train split" in capsys.readouterr().err
