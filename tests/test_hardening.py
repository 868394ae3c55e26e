"""Runs survive what users do to them: two writers, failures before the first checkpoint, divergence, signals at any
time, broken data, resumes of something else. (Bad inputs with their messages: test_bad_inputs.py; crashes in the
middle of writes: test_faults.py.)"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_recipe
from PIL import Image

from adaptune import artifacts
from adaptune.errors import ArtifactError, DataError, DivergenceError
from adaptune.files import DirectoryLock
from adaptune.methods import MethodSpec, registered
from adaptune.train import Interrupted, train


def test_a_second_writer_is_refused(tmp_path):
    recipe = tiny_recipe("linear", tmp_path, train={"epochs": 1})
    refused = pytest.raises(
        ArtifactError, match=r"another adaptune process \(pid \d+\) is training into this directory"
    )
    with DirectoryLock(tmp_path / "run"), refused:  # another process is training there
        train(recipe)
    assert train(recipe).summary["steps"] == 4  # once it is gone, the directory is usable


def test_a_run_that_diverges_before_its_first_checkpoint_can_be_started_again(tmp_path):
    bad = tiny_recipe("lora", tmp_path, train={"optimizer": "sgd", "lr": 1e30, "warmup_epochs": 0})
    with pytest.raises(DivergenceError, match="no checkpoint was saved yet"):
        train(bad)
    run = tmp_path / "run"
    assert (run / "recipe.yaml").is_file() and not (run / "checkpoints").exists()
    lines: list[str] = []
    good = tiny_recipe("lora", tmp_path, train={"epochs": 1})
    assert train(good, log=lines.append).summary["steps"] == 4  # the same --out: started again
    assert any("stopped before its first checkpoint; starting it again" in line for line in lines)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["step"] <= 4 for m in metrics), "the failed attempt's metrics are gone"


def test_resume_of_a_run_without_checkpoint_starts_it_again(tmp_path):
    bad = tiny_recipe("lora", tmp_path, train={"optimizer": "sgd", "lr": 1e30, "warmup_epochs": 0})
    with pytest.raises(DivergenceError):
        train(bad)
    recipe = artifacts.read_manifest(tmp_path / "run")  # the run directory stays a valid (restartable) run
    assert recipe["method"]["name"] == "lora"
    good = tiny_recipe("lora", tmp_path, train={"epochs": 1})
    assert train(good, out_dir=tmp_path / "run", resume=True).summary["steps"] == 4


@dataclass(frozen=True)
class NoOptions:
    pass


def nan_when_evaluating(model, cfg, batch):
    logits = model(batch.inputs)
    return logits if model.training else logits * float("nan")


NAN_EVAL = MethodSpec(
    name="test_nan_eval",
    summary="NaN logits in eval mode",
    config_cls=NoOptions,
    inject=lambda m, c: [],
    forward=nan_when_evaluating,
)


def test_a_nan_validation_loss_is_divergence_and_keeps_the_last_finite_checkpoint(tmp_path):
    with registered(NAN_EVAL):
        recipe = tiny_recipe("test_nan_eval", tmp_path, train={"epochs": 2})
        with pytest.raises(DivergenceError, match=r"the validation loss is nan .* no checkpoint was saved yet"):
            train(recipe)
    assert not (tmp_path / "run" / "checkpoints").exists(), "diverged weights are never saved"
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # valid JSON: no bare NaN
        assert "NaN" not in line


def test_divergence_after_a_checkpoint_names_it(tmp_path):
    calls = {"n": 0}

    def nan_after_epoch_1(model, cfg, batch):
        logits = model(batch.inputs)
        if model.training:
            calls["n"] += 1
        return logits * float("nan") if calls["n"] > 4 else logits

    spec = MethodSpec(
        name="test_nan_late", summary="", config_cls=NoOptions, inject=lambda m, c: [], forward=nan_after_epoch_1
    )
    with registered(spec), pytest.raises(DivergenceError, match=r"the last checkpoint \(epoch 1, step 4\) is kept"):
        train(tiny_recipe("test_nan_late", tmp_path, train={"epochs": 2}))
    loop = artifacts.load_trainer_state(tmp_path / "run" / "checkpoints" / "last")["loop"]
    assert (loop["epoch"], loop["step"]) == (1, 4)


def test_a_signal_during_start_up_says_nothing_was_saved(tmp_path, monkeypatch):
    from adaptune import data

    build = data.build_loaders

    def slow_start(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return build(*args, **kwargs)

    monkeypatch.setattr(data, "build_loaders", slow_start)
    with pytest.raises(Interrupted, match="interrupted during start-up; nothing was saved"):
        train(tiny_recipe("linear", tmp_path, train={"epochs": 1}))
    assert not (tmp_path / "run").exists()


def test_a_signal_while_testing_is_not_swallowed(tmp_path, monkeypatch):
    import adaptune.train as train_module

    finish = train_module._finish

    def interrupted_finish(run):
        summary = finish(run)
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the final weights are tested
        return summary

    monkeypatch.setattr(train_module, "_finish", interrupted_finish)
    recipe = tiny_recipe("linear", tmp_path, train={"epochs": 1})
    with pytest.raises(Interrupted, match="while testing the final weights; the last checkpoint is saved; finish"):
        train(recipe)
    assert not (tmp_path / "run" / "summary.json").exists()
    monkeypatch.undo()
    assert train(recipe, resume=True).summary["test_top1_last"] is not None  # --resume finishes it


def test_a_broken_image_fails_before_anything_is_written(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / cls / f"{i}.png")
    (root / "train" / "b" / "2.png").write_bytes(b"\x89PNG truncated")
    recipe = tiny_recipe(
        "linear",
        tmp_path,
        data={"source": "folder", "synthetic": None, "folder": {"root": str(root)}, "test_split": None},
    )
    with pytest.raises(DataError, match=r"data\.folder\.root: cannot read image '.*2\.png'"):
        train(recipe)
    assert not (tmp_path / "run").exists(), "no dead-end run directory"


def test_an_empty_class_folder_is_an_error(tmp_path):
    from adaptune.data import describe
    from adaptune.data.sources.folder import FolderConfig
    from adaptune.recipe import DataConfig

    for cls, n in (("a", 2), ("b", 0)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4)).save(tmp_path / "train" / cls / f"{i}.png")
    cfg = DataConfig(source="folder", options=FolderConfig(root=str(tmp_path)), val_split=None, test_split=None)
    with pytest.raises(DataError, match=r"data\.train_split: class folder 'b' of split 'train' holds no images"):
        describe(cfg)


def test_resume_stores_and_checks_the_recipe(tmp_path):
    recipe = tiny_recipe("lora", tmp_path, train={"epochs": 2})

    def interrupt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(recipe, on_step=interrupt)
    state = artifacts.load_trainer_state(tmp_path / "run" / "checkpoints" / "last")
    assert state["recipe"] == recipe.to_dict()
    other = tiny_recipe("lora", tmp_path, train={"epochs": 2, "seed": 5})
    with pytest.raises(ArtifactError, match=r"differs from the recipe the checkpoint was trained with \(train\.seed\)"):
        train(other, resume=True)
    done = train(recipe, resume=True)
    with pytest.raises(ArtifactError, match="the run has finished"):
        train(recipe, resume=True)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == done.summary["steps"] == 8


def test_leftovers_of_a_crash_are_cleaned_at_the_next_start(tmp_path):
    recipe = tiny_recipe("lora", tmp_path, train={"epochs": 2})

    def interrupt(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(recipe, on_step=interrupt)
    ckpts = tmp_path / "run" / "checkpoints"
    os.replace(ckpts / "last", ckpts / ".last.old")  # as a crash between the two renames of a swap leaves it
    (tmp_path / "run" / ".summary.json.abc123.tmp").write_text("{")
    lines: list[str] = []
    train(recipe, resume=True, log=lines.append)
    assert any("recovered checkpoints/last from .last.old" in line for line in lines)
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "last"]
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_json_output_has_no_nan(tmp_path, capsys):
    from adaptune.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(tiny_recipe("linear", train={"epochs": 1}).to_yaml())
    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            main(["train", str(path), "--out", str(tmp_path / "run"), "--json", "--quiet"])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and torch.isfinite(torch.tensor(summary["wall_time_s"]))


def test_a_run_stuck_at_chance_is_said_in_the_log_and_the_summary(tmp_path):
    flat = MethodSpec(
        name="test_flat",
        summary="",
        config_cls=NoOptions,
        inject=lambda m, c: [],
        forward=lambda model, cfg, batch: model(batch.inputs) * 0.0,  # logits never move: loss log(4), chance
    )
    lines: list[str] = []
    with registered(flat):
        result = train(tiny_recipe("test_flat", tmp_path, train={"epochs": 3, "warmup_epochs": 1}), log=lines.append)
    (warning,) = result.summary["warnings"]
    assert warning.startswith("stuck at chance after epoch 2:") and "lower train.lr (now 0.001)" in warning
    assert sum("stuck at chance" in line for line in lines) == 1, "said once"
    healthy = train(tiny_recipe("lora", tmp_path / "h", train={"epochs": 3}))
    assert healthy.summary["warnings"] == []


def _train_flat_for(tmp_path, flat_steps: int, epochs: int, **kwargs):
    """Train a trainval run (6 steps per epoch, one warm-up epoch) whose logits stay 0, at chance, for its first
    ``flat_steps`` training steps and then learn."""
    calls = {"train": 0}

    def forward(model, cfg, batch):
        calls["train"] += model.training
        return model(batch.inputs) * (0.0 if calls["train"] <= flat_steps else 1.0)

    spec = MethodSpec(name="test_flat_for", summary="", config_cls=NoOptions, inject=lambda m, c: [], forward=forward)
    with registered(spec):
        recipe = tiny_recipe(
            "test_flat_for",
            tmp_path,
            data={"train_split": "trainval", "val_split": None},
            train={"epochs": epochs, "warmup_epochs": 1, "lr": 3e-2},
        )
        return train(recipe, **kwargs)


def test_a_run_at_chance_only_during_warm_up_is_not_called_stuck(tmp_path):
    """An epoch's mean training loss includes its warm-up steps; a run that learns once warm-up is over is healthy
    (a trainval run, judged on training metrics, was flagged after its one warm-up epoch and ended at 90% top-1)."""
    result = _train_flat_for(tmp_path, flat_steps=6, epochs=3)  # 6 steps per epoch: epoch 1 is flat
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_top1 = [r["train_top1"] for r in records if "train_top1" in r]
    assert train_top1[0] <= 1.5 * 25.0 < train_top1[-1], train_top1  # at chance in warm-up, learning after
    assert result.summary["warnings"] == []


def test_a_run_that_leaves_chance_after_the_warning_says_so(tmp_path):
    """MoSA on count-1k sat at chance for two epochs after warm-up, then learned (59% training top-1): the summary
    must not leave the user with "stuck" alone."""
    lines: list[str] = []
    result = _train_flat_for(tmp_path, flat_steps=12, epochs=4, log=lines.append)  # epochs 1-2 flat
    (warning,) = result.summary["warnings"]
    assert warning.startswith("stuck at chance after epoch 2:")
    assert "; left chance at epoch 3 (training top-1" in warning
    assert sum(line.startswith("note: left chance level at epoch 3") for line in lines) == 1
