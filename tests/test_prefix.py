"""The frozen-prefix cache: on where it cannot change a result, off (with the reason) everywhere else, and a run
with it ends with exactly the weights and metrics of a run without it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe

from adaptune import prefix
from adaptune.artifacts import load_safetensors
from adaptune.train import train

EFFNET = {"model": "test_efficientnet", "img_size": None}
ADAPTER_LATE = {"style": "post", "bottleneck": 8, "targets": ["blocks.3.?", "blocks.4.?"]}


def run_twice(tmp_path, method_name, lines=None, **sections):
    """The same recipe with the cache on (auto) and off; returns (on, off) results."""
    out = []
    for mode in ("auto", "off"):
        train_cfg = {"epochs": 2, "lr": 1e-2, "prefix_cache": mode, **sections.pop(f"train_{mode}", {})}
        recipe = tiny_recipe(
            method_name,
            train={**train_cfg, **sections.get("train", {})},
            **{k: v for k, v in sections.items() if k != "train"},
        )
        out.append(
            train(recipe, out_dir=tmp_path / mode, log=(lines.append if lines is not None and mode == "auto" else None))
        )
    return out


def same_weights(a, b) -> None:
    ta, _ = load_safetensors(a.run_dir / "adapter_model.safetensors")
    tb, _ = load_safetensors(b.run_dir / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def test_cnn_with_late_adapters_and_flips_is_identical(tmp_path):
    lines: list[str] = []
    on, off = run_twice(
        tmp_path,
        "adapter",
        lines,
        backbone=EFFNET,
        method=ADAPTER_LATE,
        data={"img_size": 32, "hflip": True},
    )
    assert any(line.startswith("prefix cache: on;") and "before blocks.3.0" in line for line in lines), lines
    same_weights(on, off)
    for key in ("test_top1_last", "test_top1_best", "best_val_top1", "train_loss_terms"):
        assert on.summary[key] == off.summary[key], key


def test_vit_with_lora_on_later_blocks_is_identical(tmp_path):
    lines: list[str] = []
    on, off = run_twice(
        tmp_path,
        "lora",
        lines,
        backbone={"model_kwargs": {"depth": 4}},
        method={"targets": ["blocks.2.attn.qkv", "blocks.3.attn.qkv"]},
    )
    assert any("prefix cache: on;" in line and "before blocks.2" in line for line in lines), lines
    same_weights(on, off)
    assert on.summary["test_top1_last"] == off.summary["test_top1_last"]


@pytest.mark.parametrize(
    ("sections", "reason"),
    [
        ({"method": {"targets": ["*.attn.qkv"]}}, "the first block already trains"),
        (
            {
                "backbone": {"model_kwargs": {"depth": 3, "proj_drop_rate": 0.1}},
                "method": {"targets": ["blocks.2.attn.qkv"]},
            },
            "random in training mode",
        ),
    ],
)
def test_the_cache_stays_off_where_it_could_change_results(tmp_path, sections, reason):
    lines: list[str] = []
    train(tiny_recipe("lora", tmp_path, train={"epochs": 1}, **sections), log=lines.append)
    assert any(line.startswith("prefix cache: off (") and reason in line for line in lines), lines


def test_augmentation_turns_the_cache_off(tmp_path):
    lines: list[str] = []
    recipe = tiny_recipe(
        "adapter",
        tmp_path,
        backbone=EFFNET,
        method=ADAPTER_LATE,
        data={"img_size": 32, "augment": {"crop": "random"}},
        train={"epochs": 1},
    )
    train(recipe, log=lines.append)
    assert "prefix cache: off (data.augment transforms every image before the frozen layers)" in lines


def test_features_spill_to_disk_beyond_the_budget_and_are_removed(tmp_path):
    lines: list[str] = []
    on, off = run_twice(
        tmp_path,
        "adapter",
        lines,
        backbone=EFFNET,
        method=ADAPTER_LATE,
        data={"img_size": 32},
        train_auto={"prefix_cache_gb": 1e-6},
    )
    assert any("on disk (memory-mapped)" in line for line in lines), lines
    same_weights(on, off)
    assert not list(on.run_dir.glob(".prefix-cache*")), "the memory-mapped files are removed at the end"


def test_reduced_precision_storage_reports_its_drift(tmp_path):
    lines: list[str] = []
    recipe = tiny_recipe(
        "adapter",
        tmp_path,
        backbone=EFFNET,
        method=ADAPTER_LATE,
        data={"img_size": 32},
        train={"epochs": 1, "prefix_cache_dtype": "bf16"},
    )
    result = train(recipe, log=lines.append)
    drift = [line for line in lines if "largest feature difference" in line]
    assert drift and float(drift[0].rsplit(" ", 1)[1]) > 0
    assert result.summary["test_top1_last"] is not None


def test_plan_refuses_trainable_tokens():
    import timm

    model = timm.create_model("test_vit", pretrained=False, img_size=32).requires_grad_(False)
    model.blocks[1].requires_grad_(True)
    p, why = prefix.plan(model)
    assert p is not None and p.boundary == "blocks.1" and "blocks.0" in p.skip
    model.cls_token.requires_grad_(True)
    assert prefix.plan(model) == (None, "the model's own tokens or position embeddings train")
