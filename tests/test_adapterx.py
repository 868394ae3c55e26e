"""`adapterx` and `adaptformerx`: shared expert storage, routing and its gradients, gate scaling, the balance loss,
prompts growing the sequence, resume, merge, ONNX / torch.export parity, expert-use diagnostics, CNN blocks, errors."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import interrupted_and_resumed, last_weights, tiny_recipe
from typer.testing import CliRunner

import adaptune.methods.adapterx as adapterx
from adaptune.artifacts import load_safetensors
from adaptune.batch import Batch, InputSpec
from adaptune.cli import app
from adaptune.errors import RecipeError, TargetError
from adaptune.evaluate import evaluate_artifact
from adaptune.export import export
from adaptune.loading import inject_method, load_artifact
from adaptune.merge import logits, merge
from adaptune.methods.adapterx import AdapterXBlock, AdapterXHeadPool, recording
from adaptune.methods.adapterx_routing import ExpertPool, Routing, balance_loss, dispatch, route
from adaptune.methods.registry import get_method
from adaptune.recipe import method_config
from adaptune.train import train

EXPERT_KEYS = [f"adaptune_shared.adapterx_experts.{p}.{t}" for p in ("down", "up") for t in ("weight", "bias")]
runner = CliRunner()


@dataclass(frozen=True)
class _Recipe:
    method_name: str
    method: Any


def vit(depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, depth=depth, num_classes=5)
    return model.requires_grad_(False).eval()


def injected(name: str = "adapterx", depth: int = 2, **options: Any):
    model, cfg = vit(depth), method_config(name, **options)
    inject_method(model, _Recipe(name, cfg))
    return model, cfg


def perturb(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero ``up`` weights (zero at init), so gradients and outputs are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def dense_reference(v: torch.Tensor, routing: Routing, pool: ExpertPool) -> torch.Tensor:
    """Every expert on every sub-token, then the chosen ones weighted by their gates: what dispatch must equal."""
    every = torch.stack([pool.expert(j, v) for j in range(pool.num_experts)], dim=1)  # (M, N, w)
    chosen = every.gather(1, routing.expert.unsqueeze(-1).expand(-1, -1, v.shape[1]))  # (M, k, w)
    return (chosen * routing.gate.unsqueeze(-1)).sum(1)


# ----------------------------------------------------------------------------------------------------------------
# storage, routing, gradients


def test_one_storage_for_the_experts_across_blocks():
    model, _ = injected(depth=3)
    pool, emb = model.adaptune_shared.adapterx_experts, model.adaptune_shared.adapterx_embeddings
    assert all(b.pool() is pool and b.embeddings() is emb for b in model.blocks)
    state = model.state_dict()
    assert sorted(k for k in state if "adapterx_experts" in k) == sorted(EXPERT_KEYS), "stored once, at the root"
    assert [k for k in state if "adapterx_embeddings" in k] == ["adaptune_shared.adapterx_embeddings.weight"]
    assert pool.down.weight.shape == (28, 64, 32) and pool.up.weight.shape == (28, 32, 64)
    twin = copy.deepcopy(model)
    assert all(b.pool() is twin.adaptune_shared.adapterx_experts for b in twin.blocks), "deep copies keep sharing"


MODES = ["padded", "sliced", "masked"]


@pytest.mark.parametrize("mode", MODES)
def test_only_routed_experts_get_gradient(mode):
    torch.manual_seed(0)
    pool = ExpertPool(4, 8, 4)
    perturb(pool)
    v = torch.randn(10, 8, requires_grad=True)
    expert = torch.tensor([0, 2, 0, 2, 2, 0, 0, 2, 0, 0]).unsqueeze(1)  # experts 1 and 3 get no sub-token
    probs = torch.randn(10, 4, requires_grad=True).softmax(-1)
    out = dispatch(v, Routing(probs, probs.gather(1, expert), expert), pool, mode=mode)
    out.square().sum().backward()
    for p in (pool.down.weight, pool.down.bias, pool.up.weight, pool.up.bias):
        assert p.grad is not None, "every expert is in the graph: DDP sees no unused parameter"
        assert p.grad[[1, 3]].abs().max() == 0 and p.grad[0].abs().max() > 0 and p.grad[2].abs().max() > 0


def test_in_the_model_only_chosen_experts_train_and_nothing_is_unused():
    model, cfg = injected(depth=2, num_experts=28)
    perturb(model)
    model.train()
    with recording(model) as records:
        loss = get_method("adapterx").training_loss(
            model, cfg, Batch(images(), torch.tensor([0, 1, 2])), F.cross_entropy
        )
    loss.total.backward()
    (_, first), (_, last) = records  # block 0: every token reaches the head; block 1: only CLS does (rows 0, 6, 12)
    chosen = torch.zeros(28, dtype=torch.bool)
    chosen[torch.cat([first.expert, last.expert]).unique()] = True
    useful = torch.zeros(28, dtype=torch.bool)
    useful[torch.cat([first.expert.flatten(), last.expert[[0, 6, 12]].flatten()]).unique()] = True
    assert 0 < chosen.sum() < 28, "the check below needs both kinds of expert"
    grad = model.adaptune_shared.adapterx_experts.down.weight.grad
    assert grad[~chosen].abs().max() == 0 and (grad[useful].flatten(1).abs().amax(1) > 0).all()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused and not get_method("adapterx").find_unused_parameters


@pytest.mark.parametrize("k", [1, 2])
def test_gate_scaling_equals_the_dense_reference(k):
    torch.manual_seed(0)
    pool = ExpertPool(5, 8, 4)
    perturb(pool)
    v = torch.randn(40, 8)
    routing = route(v, torch.randn(6, 8), torch.randn(5, 6), temperature=0.5, top_k=k)
    assert torch.equal(routing.gate[:, 0], routing.probs.max(-1).values), "the gate is the chosen probability"
    expected = dense_reference(v, routing, pool)
    for mode in [*MODES, "auto"]:
        torch.testing.assert_close(dispatch(v, routing, pool, mode=mode), expected, atol=1e-6, rtol=1e-6)
    collapsed = Routing(routing.probs, routing.gate, torch.zeros_like(routing.expert))  # auto: too unbalanced to pad
    torch.testing.assert_close(dispatch(v, collapsed, pool), dense_reference(v, collapsed, pool), atol=1e-6, rtol=1e-6)
    if k == 1:  # out(v) = p_{j*} · A_{j*}(v)
        j = routing.expert[:, 0]
        manual = torch.stack([routing.gate[i, 0] * pool.expert(int(j[i]), v[i : i + 1])[0] for i in range(40)])
        torch.testing.assert_close(dispatch(v, routing, pool), manual, atol=1e-6, rtol=1e-6)


def test_balance_loss_on_hand_made_routings():
    n, m = 4, 12
    uniform = Routing(torch.full((m, n), 1 / n), torch.full((m, 1), 1 / n), (torch.arange(m) % n).unsqueeze(1))
    assert balance_loss(uniform).item() == pytest.approx(1.0)
    one_hot = F.one_hot(torch.zeros(m, dtype=torch.long), n).float()
    collapsed = Routing(one_hot, torch.ones(m, 1), torch.zeros(m, 1, dtype=torch.long))
    assert balance_loss(collapsed).item() == pytest.approx(n)
    probs = torch.randn(m, n, generator=torch.Generator().manual_seed(0)).softmax(-1)
    gate, expert = probs.topk(1, dim=-1)
    f = [sum(int(e) == j for e in expert[:, 0]) / m for j in range(n)]
    P = [sum(float(probs[i, j]) for i in range(m)) / m for j in range(n)]
    assert balance_loss(Routing(probs, gate, expert)).item() == pytest.approx(n * sum(a * b for a, b in zip(f, P)))


def test_training_loss_terms_are_ce_plus_mean_block_balance():
    model, cfg = injected(depth=3, balance_weight=0.5)
    perturb(model)
    x, y = images(), torch.tensor([0, 1, 2])
    with recording(model) as records:
        expected_logits = model(x)
    assert [p for p, _ in records] == ["blocks.0", "blocks.1", "blocks.2"]
    expected = 0.5 * sum(balance_loss(r) for _, r in records) / 3
    loss = get_method("adapterx").training_loss(model, cfg, Batch(x, y), F.cross_entropy)
    assert set(loss.terms) == {"ce", "balance"} and torch.equal(loss.logits, expected_logits)
    torch.testing.assert_close(loss.terms["balance"], expected)
    torch.testing.assert_close(loss.total, loss.terms["ce"] + loss.terms["balance"])
    off = get_method("adapterx").training_loss(
        model, method_config("adapterx", balance_weight=0.0), Batch(x, y), F.cross_entropy
    )
    assert set(off.terms) == {"ce"}


# ----------------------------------------------------------------------------------------------------------------
# prompts and the head


@pytest.mark.parametrize("position", ["after_cls", "after_prompts", "end"])
@pytest.mark.parametrize("pool", ["all", "patches"])
def test_sequence_grows_by_one_prompt_per_block(position, pool):
    model, _ = injected(depth=3, prompt_position=position, prompt_pool=pool, sub_token_dim=16)
    perturb(model)
    outputs = []
    for b in model.blocks:
        b.register_forward_hook(lambda m, a, o: outputs.append((a[0], o)))
    model(images(2))
    for i, (block, (x, y)) in enumerate(zip(model.blocks, outputs, strict=True)):
        assert x.shape[1] == 5 + i and y.shape[1] == 5 + i + 1, "4 patches + CLS, then one prompt per block"
        at = {"after_cls": 1, "after_prompts": 1 + i, "end": y.shape[1] - 1}[position]
        rest = torch.cat([y[:, :at], y[:, at + 1 :]], dim=1)  # the block output without its new prompt
        patches = rest[:, 1 + i :] if position != "end" else rest[:, 1 : rest.shape[1] - i]
        pooled = rest.mean(1) if pool == "all" else patches.mean(1)
        expected = block.adapterx_prompt_scale * pooled + block.adapterx_prompt_shift
        torch.testing.assert_close(y[:, at], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(y[:, 0], rest[:, 0])  # CLS stays first


def test_head_reads_cls_and_prompts_when_asked():
    model, _ = injected(depth=2, head="cls_prompts")
    perturb(model)
    assert isinstance(model.norm, AdapterXHeadPool)
    seen = {}
    model.blocks[-1].register_forward_hook(lambda m, a, o: seen.setdefault("tokens", o))
    feats = model.forward_features(images(2))
    normed = model.norm.base(seen["tokens"])  # (B, 5 + 2, C): CLS, P_2, P_1, patches
    torch.testing.assert_close(feats[:, 0], normed[:, :3].mean(1))
    with pytest.raises(RecipeError, match=r"head: 'cls_prompts' needs prompts: true"):
        method_config("adapterx", head="cls_prompts", prompts=False)


def test_trainable_backbone_parts_are_norm2_and_cls():
    model, cfg = injected(depth=2)
    names = get_method("adapterx").trainable_backbone(model, cfg)
    assert names == [f"blocks.{i}.base.norm2.{p}" for i in range(2) for p in ("weight", "bias")] + ["cls_token"]
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in names) and not params["pos_embed"].requires_grad
    assert not params["blocks.0.base.norm1.weight"].requires_grad


# ----------------------------------------------------------------------------------------------------------------
# the whole path: train, resume, merge, export, eval


def test_train_resume_merge_export_and_expert_use(tmp_path):
    recipe = tiny_recipe(
        "adaptformerx",  # dropout 0.1 in the experts: the RNG must resume too
        backbone={"model_kwargs": {"depth": 2}},
        method={"num_experts": 4, "sub_token_dim": 16},
        train={"epochs": 2, "lr": 2e-2, "warmup_epochs": 0.0, "log_every": 1},
    )
    straight = train(recipe, out_dir=tmp_path / "straight")
    resumed = interrupted_and_resumed(recipe, tmp_path / "resumed", at_step=5)
    a, b = last_weights(straight.run_dir), last_weights(resumed.run_dir)
    assert a.keys() == b.keys() and set(EXPERT_KEYS) <= set(a) and {"cls_token", "blocks.0.base.norm2.weight"} <= set(a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)

    records = [json.loads(line) for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("balance" in r for r in records if "loss" in r)
    use = [r["val_diagnostics"]["expert_use"] for r in records if "val_diagnostics" in r]
    assert len(use) == 2 and set(use[0]) == {"blocks.0", "blocks.1"}
    assert all(len(f) == 4 and sum(f) == pytest.approx(1.0, abs=1e-3) for f in use[0].values())

    merged = tmp_path / "merged.safetensors"
    report = merge(straight.run_dir, merged)
    assert report["form"] == "merged" and report["max_abs_diff"] <= report["tolerance"]
    state, _ = load_safetensors(merged)
    assert sorted(k for k in state if "adapterx_experts" in k) == sorted(EXPERT_KEYS), "merge writes them once"

    reference = load_artifact(straight.run_dir).model
    x = InputSpec(shape=(3, 32, 32)).example(5, seed=3)
    result = runner.invoke(
        app, ["export", str(straight.run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == 0, result.output
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"inputs": x.numpy()})[0])
    torch.testing.assert_close(got, logits(reference, x), atol=1e-4, rtol=1e-4)
    program = export(merged, "exported-program", tmp_path / "m.pt2")
    assert program["max_abs_diff"] <= program["tolerance"]

    evaluated = evaluate_artifact(straight.run_dir, out=tmp_path / "eval")
    assert set(evaluated["diagnostics"]["expert_use"]) == {"blocks.0", "blocks.1"}
    shown = runner.invoke(app, ["eval", str(merged), "--out", str(tmp_path / "eval2")])
    assert shown.exit_code == 0 and "method diagnostics: expert_use" in shown.stdout


def test_collapsed_router_is_a_warning(monkeypatch):
    model, cfg = injected(depth=2, num_experts=4)
    real = adapterx.smoa

    def collapsed(*args, **kwargs):
        out, routing = real(*args, **kwargs)
        return out, Routing(routing.probs, routing.gate, torch.zeros_like(routing.expert))

    with adapterx.expert_use(model, cfg) as report:
        model(images())
    assert all(sum(f) == pytest.approx(1.0, abs=1e-3) for f in report["expert_use"].values())
    monkeypatch.setattr(adapterx, "smoa", collapsed)
    with adapterx.expert_use(model, cfg) as report:
        model(images())
    assert report["expert_use"]["blocks.0"] == [1.0, 0.0, 0.0, 0.0]
    assert [w.split(":")[0] for w in report["warnings"]] == ["blocks.0", "blocks.1"]
    assert "expert 0 takes 100.0% of the sub-tokens (router collapse)" in report["warnings"][0]


# ----------------------------------------------------------------------------------------------------------------
# CNN blocks, errors


def small(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    overlay = dict(input_size=(3, 64, 64))
    model = timm.create_model(name, pretrained=False, num_classes=10, pretrained_cfg_overlay=overlay)
    return model.requires_grad_(False).eval()


CNN = {"block_norm": False, "prompts": False, "train_cls": False, "sub_token_dim": 8}


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "convnext_atto"])
def test_cnn_blocks_route_spatial_positions(name):
    model = small(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = model(x)
    paths = inject_method(model, _Recipe("adapterx", method_config("adapterx", **CNN)))[0]
    assert paths and all(isinstance(model.get_submodule(p), AdapterXBlock) for p in paths)
    if name == "tf_efficientnet_lite0":  # only the blocks that keep their shape: not the first of each stage
        assert "blocks.1.0" not in paths and "blocks.1.1" in paths
    torch.testing.assert_close(model(x), plain, atol=0, rtol=0)  # up = 0 and no prompts: identity at init
    perturb(model)
    with recording(model) as records:
        out = model(x)
    assert (out - plain).abs().max() > 1e-3
    if name == "tf_efficientnet_lite0":  # blocks.1.1: 24 channels at 16x16; one sub-token per 8 channels and position
        assert records[0][0] == "blocks.1.1" and records[0][1].expert.shape == (2 * 16 * 16 * 24 // 8, 1)


def test_cnn_errors_name_every_option_to_change():
    with pytest.raises(TargetError) as e:
        inject_method(small("tf_efficientnet_lite0"), _Recipe("adapterx", method_config("adapterx")))
    message = str(e.value)
    assert "set method.block_norm: false, method.prompts: false, method.train_cls: false" in message
    assert "method.sub_token_dim: 64 does not divide every adapted block's channels (24, 40, 80, 112, 192)" in message
    assert "use a divisor of 8" in message
    cfg = method_config("adapterx", **{**CNN, "targets": ["blocks.1.0"]})
    with pytest.raises(TargetError, match=r"blocks.1.0 \(InvertedResidual\) maps .* needs one that keeps its shape"):
        inject_method(small("tf_efficientnet_lite0"), _Recipe("adapterx", cfg))
    with pytest.raises(RecipeError, match=r"top_k: 30 is more than num_experts \(28\)"):
        method_config("adapterx", top_k=30)
    model, cfg = injected(depth=2)
    with pytest.raises(TargetError, match=r"blocks.0.base is already adapted or lies inside another target"):
        adapterx.inject(model, cfg)
