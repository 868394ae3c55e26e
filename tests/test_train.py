"""The training loop: resume equals uninterrupted, divergence is loud, frozen BatchNorm stays frozen."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import interrupted_and_resumed, tiny_backbone, tiny_recipe

from adaptune.artifacts import load_safetensors
from adaptune.errors import ArtifactError, DivergenceError
from adaptune.train import Interrupted, set_train_mode, train


def final_weights(run_dir):
    tensors, manifest = load_safetensors(run_dir / "checkpoints" / "last" / "adapter_model.safetensors")
    return tensors


def test_run_directory_contract(tmp_path):
    result = train(tiny_recipe("lora", tmp_path, train={"epochs": 2}))
    run = result.run_dir
    for name in ("recipe.yaml", "adaptune_config.json", "adapter_model.safetensors", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "last" / "trainer_state.pt").is_file()
    manifest = json.loads((run / "adaptune_config.json").read_text())
    assert manifest["format_version"] == 2 and manifest["method"]["name"] == "lora"
    assert manifest["num_classes"] == 4 and len(manifest["class_names"]) == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["test_top1_last"] is not None
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "train_top1" in line]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert not list(run.rglob(".*tmp*")), "temporary files left behind"


@pytest.mark.parametrize("method", ["lora", "mosa"])
def test_resume_equals_uninterrupted(tmp_path, method):
    """Ctrl-C mid-epoch saves `last`; resuming ends with exactly the weights of a run that was never stopped."""
    extra = {"dropout": 0.1} if method == "lora" else {}
    recipe = tiny_recipe(method, train={"epochs": 3, "batch_size": 8}, method=extra)
    straight = train(recipe, out_dir=tmp_path / "straight")

    def interrupt(step: int) -> None:
        if step == 6:  # mid-epoch 2 (4 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(
        Interrupted, match=r"interrupted at step 6; last checkpoint saved; continue with: adaptune train --resume"
    ):
        train(recipe, out_dir=tmp_path / "resumed", on_step=interrupt)
    resumed = train(recipe, out_dir=tmp_path / "resumed", resume=True)
    a, b = final_weights(straight.run_dir), final_weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    assert resumed.summary["test_top1_last"] == straight.summary["test_top1_last"]


def test_existing_run_directory_is_not_overwritten(tmp_path):
    recipe = tiny_recipe("linear", tmp_path, train={"epochs": 1})
    train(recipe)
    with pytest.raises(ArtifactError, match=r"already holds a run; continue it with --resume"):
        train(recipe)


def test_resume_of_a_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match=r"--resume: no such run directory"):
        train(tiny_recipe("linear", tmp_path), resume=True)
    assert not (tmp_path / "run").exists()


def test_divergence_stops_with_a_message(tmp_path):
    recipe = tiny_recipe("lora", tmp_path, train={"optimizer": "sgd", "lr": 1e30, "warmup_epochs": 0, "epochs": 2})
    with pytest.raises(DivergenceError, match=r"training diverged at step \d+: .* lower train\.lr"):
        train(recipe)


def test_frozen_batchnorm_stays_in_eval_mode():
    model = tiny_backbone(model="resnet10t")
    set_train_mode(model, backbone_train=True)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = bns[0].running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    torch.testing.assert_close(bns[0].running_mean, before)


def test_backbone_eval_mode_keeps_adapters_training():
    from adaptune.methods.registry import get_method
    from adaptune.recipe import method_config

    model = tiny_backbone()
    get_method("lora").inject(model, method_config("lora", dropout=0.5))
    set_train_mode(model, backbone_train=False)
    wrapper = model.blocks[0].attn.qkv
    assert wrapper.training and not wrapper.base.training and not model.blocks[0].mlp.training


def test_ema_weights_are_validated_kept_resumed_and_merged(tmp_path):
    """With train.ema the EMA weights are the run's weights: validated, checkpointed, resumed exactly, merged."""
    from adaptune.loading import load_artifact
    from adaptune.merge import logits, merge

    recipe = tiny_recipe("lora", train={"epochs": 3, "ema": True, "ema_decay": 0.9, "lr": 1e-2})
    straight = train(recipe, out_dir=tmp_path / "straight")
    assert straight.summary["ema_weights"] is True
    epochs = [json.loads(x) for x in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("val_top1_raw" in e for e in epochs if "val_top1" in e), "the raw weights are validated beside"
    saved, _ = load_safetensors(straight.run_dir / "checkpoints" / "last" / "adapter_model.safetensors")
    raw = torch.load(straight.run_dir / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)["raw_weights"]
    key = next(k for k in saved if "lora_b" in k)
    assert not torch.equal(saved[key], raw[key]), "the checkpoint keeps EMA and raw weights apart"
    resumed = interrupted_and_resumed(recipe, tmp_path / "resumed", at_step=6)
    a, b = final_weights(straight.run_dir), final_weights(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "resume equals uninterrupted, EMA included"

    report = merge(straight.run_dir, tmp_path / "m.safetensors")
    art = load_artifact(straight.run_dir)
    x = art.input.example(3)
    assert report["max_abs_diff"] <= report["tolerance"]
    torch.testing.assert_close(logits(load_artifact(tmp_path / "m.safetensors").model, x), logits(art.model, x))
    tensors, _ = load_safetensors(straight.run_dir / "adapter_model.safetensors")
    best_ema, _ = load_safetensors(straight.run_dir / "checkpoints" / "best" / "adapter_model.safetensors")
    assert all(torch.equal(tensors[k], best_ema[k]) for k in tensors), "the run's weights are the best EMA weights"
