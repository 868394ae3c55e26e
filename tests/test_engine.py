"""The engine's extension points, exercised by test-only methods and a test-only data source registered here.

Each behaviour a later method relies on is shown end to end (train -> files -> resume/merge/export), with nothing in
the engine knowing about these methods: named loss terms, task ids in every batch, trainable backbone parts, a module
shared by every block, and inputs that are not 3-channel squares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import timm
import torch
from conftest import interrupted_and_resumed, tiny_recipe
from torch import nn

from adaptune.artifacts import load_safetensors
from adaptune.batch import Batch, InputSpec, Loss
from adaptune.config import opt
from adaptune.data.sources import SourceSpec, SplitData
from adaptune.data.sources import registry as source_registry
from adaptune.data.sources.synthetic import SyntheticConfig, open_synthetic
from adaptune.export import export
from adaptune.loading import load_artifact
from adaptune.merge import logits, merge
from adaptune.methods import MethodSpec, registered
from adaptune.methods.common import SharedRef, match_targets, replace_module, share
from adaptune.train import train


@dataclass(frozen=True)
class NoOptions:
    pass


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# a method with an extra loss term


@dataclass(frozen=True)
class PenaltyConfig:
    weight: float = opt(0.5, "weight of the L2 penalty on the head", ge=0.0)


def penalty_loss(model, cfg: PenaltyConfig, batch: Batch, loss_fn) -> Loss:
    logits = model(batch.inputs)
    ce = loss_fn(logits, batch.targets)
    l2 = cfg.weight * sum(p.pow(2).sum() for p in model.get_classifier().parameters())
    return Loss(ce + l2, logits, {"ce": ce, "l2": l2})


PENALTY = MethodSpec(
    name="test_penalty",
    summary="head + an L2 penalty term",
    config_cls=PenaltyConfig,
    inject=lambda model, cfg: [],
    training_loss=penalty_loss,
)


def test_extra_loss_terms_are_logged_everywhere(tmp_path):
    with registered(PENALTY):
        recipe = tiny_recipe("test_penalty", tmp_path, train={"epochs": 2, "log_every": 1})
        lines = []
        result = train(recipe, log=lines.append)
    metrics = read_metrics(result.run_dir)
    steps = [m for m in metrics if "loss" in m]
    epochs = [m for m in metrics if "train_loss" in m]
    assert steps and all({"ce", "l2"} <= set(m) for m in steps)
    for m in steps:
        assert m["loss"] == pytest.approx(m["ce"] + m["l2"], rel=1e-5)
    assert all(m["train_l2"] > 0 and m["train_loss"] == pytest.approx(m["train_ce"] + m["train_l2"]) for m in epochs)
    assert set(result.summary["train_loss_terms"]) == {"ce", "l2"}
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["train_loss_terms"] == pytest.approx(result.summary["train_loss_terms"])
    assert any("(ce " in line and ", l2 " in line for line in lines), "progress lines show each term"


# ----------------------------------------------------------------------------------------------------------------
# a data source with task ids, and a method that reads them


def open_tasked(cfg: SyntheticConfig, data) -> object:
    """Synthetic images; task id = label % 2."""
    inner = open_synthetic(cfg)

    class Tasked:
        class_names = inner.class_names

        def size(self, split, key):
            return inner.size(split, key)

        def load(self, split, key):
            d = inner.load(split, key)
            return SplitData(labels=d.labels, images=d.images, task_ids=d.labels % 2)

    return Tasked()


SEEN_TASKS: list[int] = []


class TaskBias(nn.Module):
    """One learned logit offset per task."""

    def __init__(self, tasks: int, classes: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(tasks, classes))

    def adapter_param_names(self):
        return ("bias",)


def task_forward(model, cfg, batch: Batch) -> torch.Tensor:
    assert batch.task_ids is not None, "the data source's task ids reach the method"
    SEEN_TASKS.extend(batch.task_ids.tolist())
    return model(batch.inputs) + model.task_bias.bias[batch.task_ids]


TASK_METHOD = MethodSpec(
    name="test_task_bias",
    summary="a per-task logit offset",
    config_cls=NoOptions,
    inject=lambda model, cfg: [model.add_module("task_bias", TaskBias(2, model.num_classes)) or "task_bias"],
    forward=task_forward,
)


def test_task_ids_flow_from_the_source_to_the_method(tmp_path):
    source = SourceSpec("test_tasked", "synthetic with task ids", SyntheticConfig, open_tasked)
    source_registry.register(source)
    try:
        with registered(TASK_METHOD):
            SEEN_TASKS.clear()
            recipe = tiny_recipe(
                "test_task_bias",
                tmp_path,
                data={"source": "test_tasked", "synthetic": None, "test_tasked": {"num_classes": 4}},
                train={"epochs": 2, "lr": 5e-2},
            )
            result = train(recipe)
    finally:
        source_registry._REGISTRY.pop("test_tasked")
    assert set(SEEN_TASKS) == {0, 1}
    train_n, val_n, test_n = 16 * 4, 4 * 4, 8 * 4  # SyntheticConfig's per-class defaults, 4 classes
    assert len(SEEN_TASKS) >= 2 * train_n + 2 * val_n + test_n, "training, validation and test all used the method"
    tensors, _ = load_safetensors(result.run_dir / "adapter_model.safetensors")
    bias = tensors["task_bias.bias"]
    assert not torch.equal(bias[0], bias[1]), "each task learned its own offset"


# ----------------------------------------------------------------------------------------------------------------
# a method that trains backbone parameters (BitFit-like)


def bias_names(model, cfg) -> list[str]:
    from adaptune.backbone import head_path

    head = head_path(model) + "."
    return [n for n, _ in model.named_parameters() if n.endswith(".bias") and not n.startswith(head)]


BIASES = MethodSpec(
    name="test_biases",
    summary="backbone biases",
    config_cls=NoOptions,
    inject=lambda model, cfg: [],
    trainable_backbone=bias_names,
    fold=lambda model: None,
)


def test_declared_backbone_parameters_train_and_are_saved(tmp_path):
    with registered(BIASES):
        recipe = tiny_recipe("test_biases", tmp_path, train={"epochs": 1, "lr": 1e-2})
        result = train(recipe)
        tensors, _ = load_safetensors(result.run_dir / "adapter_model.safetensors")
        plain = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=4)
        biases = {n for n, _ in plain.named_parameters() if n.endswith(".bias") and not n.startswith("head.")}
        assert set(tensors) == biases | {"head.weight", "head.bias"}
        torch.manual_seed(0)
        untrained = tiny_recipe("test_biases", tmp_path).train.seed  # the run's backbone init seed
        torch.manual_seed(untrained)
        init = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=4).state_dict()
        assert not torch.equal(tensors["blocks.0.mlp.fc1.bias"], init["blocks.0.mlp.fc1.bias"]), "biases trained"
        assert result.summary["trainable_params"] == sum(t.numel() for t in tensors.values())
        merged = tmp_path / "merged.safetensors"
        report = merge(result.run_dir, merged)
        assert report["form"] == "folded"
        state, _ = load_safetensors(merged)
        plain.load_state_dict(state, strict=True)  # plain timm weights
        art = load_artifact(result.run_dir)
        images = art.input.example(3)
        torch.testing.assert_close(logits(plain, images), logits(art.model, images))


# ----------------------------------------------------------------------------------------------------------------
# a module shared by every block


class SharedDownAdapter(nn.Module):
    """``x + up_l(gelu(pool(x)))`` after each block; ``pool`` (C -> 4) is one module shared by every block."""

    def __init__(self, base: nn.Module, pool: nn.Module, dim: int):
        super().__init__()
        self.base = base
        self.pool = SharedRef(pool)
        self.up = nn.Linear(4, dim)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        y = self.base(x)
        return y + self.up(torch.nn.functional.gelu(self.pool()(y)))

    def adapter_param_names(self):
        return ("up.weight", "up.bias")


def inject_shared(model, cfg) -> list[str]:
    dim = model.embed_dim
    pool = share(model, "pool", nn.Linear(dim, 4)).requires_grad_(True)
    paths = match_targets(model, ["blocks.*"], kinds=(timm.models.vision_transformer.Block,))
    for path in paths:
        replace_module(model, path, SharedDownAdapter(model.get_submodule(path), pool, dim).requires_grad_(True))
    for path in paths:
        model.get_submodule(path).base.requires_grad_(False)
    return paths


SHARED = MethodSpec(name="test_shared", summary="a shared down projection", config_cls=NoOptions, inject=inject_shared)


def test_shared_module_is_stored_once_resumes_and_merges(tmp_path):
    with registered(SHARED):
        recipe = tiny_recipe("test_shared", train={"epochs": 2, "lr": 2e-2, "warmup_epochs": 0.0})
        straight = train(recipe, out_dir=tmp_path / "straight")
        tensors, _ = load_safetensors(straight.run_dir / "adapter_model.safetensors")
        pool_keys = sorted(k for k in tensors if "pool" in k)
        assert pool_keys == ["adaptune_shared.pool.bias", "adaptune_shared.pool.weight"], "stored once"
        assert straight.summary["trainable_params"] == sum(t.numel() for t in tensors.values())
        resumed = interrupted_and_resumed(recipe, tmp_path / "resumed", at_step=5)
        again, _ = load_safetensors(resumed.run_dir / "adapter_model.safetensors")
        for key in tensors:
            torch.testing.assert_close(again[key], tensors[key], atol=0, rtol=0, msg=key)

        report = merge(straight.run_dir, tmp_path / "merged.safetensors")
        assert report["form"] == "merged" and report["max_abs_diff"] <= report["tolerance"]
        art = load_artifact(tmp_path / "merged.safetensors")
        pool = art.model.adaptune_shared.pool
        assert all(b.pool() is pool for b in art.model.blocks), "every block uses the one loaded pool"
        torch.testing.assert_close(pool.weight, tensors["adaptune_shared.pool.weight"])


# ----------------------------------------------------------------------------------------------------------------
# inputs that are not 3-channel squares


def test_one_channel_non_square_backbone_trains_merges_and_exports(tmp_path):
    recipe = tiny_recipe(
        "lora",
        tmp_path,
        backbone={"img_size": [32, 48], "model_kwargs": {"in_chans": 1, "depth": 2}},
        train={"epochs": 1, "lr": 2e-2},
    )
    result = train(recipe)
    art = load_artifact(result.run_dir)
    assert art.input == InputSpec(shape=(1, 32, 48), mean=(0.5,), std=(0.5,), interpolation=recipe.data.interpolation)
    manifest = json.loads((result.run_dir / "adaptune_config.json").read_text())
    assert manifest["input"]["shape"] == [1, 32, 48]
    report = merge(result.run_dir, tmp_path / "merged.safetensors")
    assert report["form"] == "folded" and report["max_abs_diff"] <= report["tolerance"]
    out = export(tmp_path / "merged.safetensors", "onnx", tmp_path / "model.onnx")
    assert out["max_abs_diff"] is not None and out["max_abs_diff"] <= out["tolerance"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (shape,) = [i.shape for i in session.get_inputs()]
    assert shape[1:] == [1, 32, 48]
    x = InputSpec(shape=(1, 32, 48)).example(2, seed=7)
    got = torch.from_numpy(session.run(None, {"inputs": x.numpy()})[0])
    torch.testing.assert_close(got, logits(art.model, x), atol=1e-4, rtol=1e-4)
