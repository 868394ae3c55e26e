"""FacT-TT/TK, Convpass, Compacter, norm tuning and ResAdapter: math against dense/reference formulations written
here, sharing, folding into plain timm (ViT and EfficientNet-Lite0), exports, errors, and tiny training runs."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_backbone, tiny_recipe
from torch import nn

from adaptune.artifacts import adapter_state_dict, load_safetensors
from adaptune.errors import TargetError
from adaptune.loading import build, count_method_parameters
from adaptune.merge import logits
from adaptune.methods import get_method
from adaptune.methods.common import adapter_modules
from adaptune.recipe import method_config
from adaptune.train import set_train_mode, train

ZOO = ["fact_tt", "fact_tk", "convpass", "compacter", "norm_tuning", "resadapter"]


def injected(name: str, model: nn.Module | None = None, **options):
    """``model`` (default: the tiny ViT) with method ``name`` injected as the engine does it."""
    from adaptune.loading import inject_method

    model = model if model is not None else tiny_backbone()
    recipe = type("R", (), {"method_name": name, "method": method_config(name, **options)})()
    inject_method(model, recipe)
    return model


def perturb(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))


def lite0(**kwargs) -> nn.Module:
    """tf_efficientnet_lite0 (random init) through adaptune's factory, 5 classes."""
    torch.manual_seed(0)
    return tiny_backbone(model="tf_efficientnet_lite0", **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# FacT


def reference_fact_block(block, factors, cores, scale, x):
    """The spec's (§7.7) per-block FacT forward of one ViT block, written out slice by slice (dropout off).

    ``cores[name]`` are r×r matrices applied as ``Σ u``: q, k, v, o, fc1_i (output slice i), fc2_j (input slice j).
    """
    u_fn, v_fn = factors.fact_u, factors.fact_v
    attn, mlp = block.attn, block.mlp  # their Linear layers are wrapped: use the frozen bases
    qkv, proj, fc1, fc2 = (getattr(m, "base", m) for m in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2))
    h = block.norm1(x)
    u = u_fn(h)  # (B, N, r)
    out = qkv(h)
    out = out + scale * torch.cat([v_fn(u @ cores[k].T) for k in "qkv"], dim=-1)
    B, N, C = h.shape
    q, k, v = out.reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
    x = x + proj(a) + scale * v_fn(u_fn(a) @ cores["o"].T)
    h = block.norm2(x)
    n = fc1.out_features // C
    f = fc1(h) + scale * torch.cat([v_fn(u_fn(h) @ cores[f"fc1_{i}"].T) for i in range(n)], dim=-1)
    f = mlp.act(f)
    chunks = f.reshape(B, N, n, C)
    code = sum(u_fn(chunks[:, :, j]) @ cores[f"fc2_{j}"].T for j in range(n))
    return x + fc2(f) + scale * v_fn(code)


def named_cores(block):
    """The block's cores by the reference's names, read from the wrappers."""
    out = {}
    qkv = block.attn.qkv.cores()  # (3, 1, r, r)
    out.update(q=qkv[0, 0], k=qkv[1, 0], v=qkv[2, 0], o=block.attn.proj.cores()[0, 0])
    fc1, fc2 = block.mlp.fc1.cores(), block.mlp.fc2.cores()  # (n, 1, r, r), (1, n, r, r)
    out.update({f"fc1_{i}": fc1[i, 0] for i in range(fc1.shape[0])})
    out.update({f"fc2_{j}": fc2[0, j] for j in range(fc2.shape[1])})
    return out


@pytest.mark.parametrize("name", ["fact_tt", "fact_tk"])
def test_fact_matches_the_per_slice_reference(name):
    model = injected(name, scale=0.7).eval()
    perturb(model, std=0.2)
    factors = model.adaptune_shared.fact
    x = torch.randn(2, 5, 64)
    block = model.blocks[1]
    with torch.no_grad():
        got = block(x)
        want = reference_fact_block(block, factors, named_cores(block), 0.7, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fact_dense_delta_and_tucker_cores():
    model = injected("fact_tk", rank=4).eval()
    perturb(model, std=0.3)
    f = model.adaptune_shared.fact
    fc2 = model.blocks[0].mlp.fc2  # 192 -> 64: a = 3 input slices, b = 1
    assert (fc2.a, fc2.b) == (3, 1)
    x = torch.randn(7, 192)
    with torch.no_grad():
        dense = x @ (fc2.base.weight + fc2.delta_weight()).T + fc2.base.bias
        torch.testing.assert_close(fc2(x), dense, atol=1e-5, rtol=1e-5)
        for j in range(3):  # block (0, j) of ΔW is s · V Σ_0j U, Σ_m = Σ_k C[:, :, k] P[k, m]
            m = fc2.first_core + j
            core = sum(f.fact_c[:, :, k] * f.fact_p[k, m] for k in range(4))
            block = fc2.scale * f.fact_v.weight @ core @ f.fact_u.weight
            torch.testing.assert_close(fc2.delta_weight()[:, 64 * j : 64 * (j + 1)], block, atol=1e-6, rtol=1e-5)
    # consecutive columns of P per wrapper: 3 + 1 + 3 + 3 cores per test_vit block (MLP ratio 3), 6 blocks
    wrappers = [m for _, m in adapter_modules(model) if hasattr(m, "first_core")]
    starts = [w.first_core for w in wrappers]
    sizes = [w.a * w.b for w in wrappers]
    assert starts == [sum(sizes[:i]) for i in range(len(sizes))] and sum(sizes) == f.fact_p.shape[1] == 6 * 10


def test_fact_factors_are_shared_and_stored_once():
    model = injected("fact_tt")
    state = adapter_state_dict(model)
    shared = sorted(k for k in state if "fact_u" in k or "fact_v" in k)
    assert shared == ["adaptune_shared.fact.fact_u.weight", "adaptune_shared.fact.fact_v.weight"]
    wrappers = [m for _, m in adapter_modules(model) if hasattr(m, "factors")]
    assert len(wrappers) == 4 * 6 and all(w.factors() is model.adaptune_shared.fact for w in wrappers)
    torch.testing.assert_close(model.adaptune_shared.fact.fact_v.weight, torch.zeros(64, 8))  # V = 0: identity


def test_fact_dropout_acts_on_the_code_only_in_training():
    model = injected("fact_tt", dropout=0.5)
    perturb(model)
    x = torch.randn(2, 5, 64)
    qkv = model.blocks[0].attn.qkv
    qkv.eval()
    with torch.no_grad():
        a, b = qkv(x), qkv(x)
        qkv.train()
        c = qkv(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_fact_width_mismatch_is_a_target_error():
    model = nn.Sequential(nn.Linear(8, 24), nn.Linear(12, 8))
    with pytest.raises(TargetError, match=r"1 maps 12 -> 8, but FacT shares one U, V of width 8"):
        get_method("fact_tt").inject(model, method_config("fact_tt", targets=["0", "1"]))
    assert isinstance(model[0], nn.Linear), "nothing was wrapped"


# ----------------------------------------------------------------------------------------------------------------
# Convpass


def reference_convpass(adapter, u):
    """The spec's bypass (§7.9): the CLS token goes through the 3×3 conv as a 1×1 map (padding 1)."""
    b, n, _ = u.shape
    (h, w), r = adapter.grid, adapter.down.out_features
    z = adapter.down(u)
    z = z * torch.sigmoid(1.702 * z)
    patches = adapter.conv(z[:, 1:].reshape(b, h, w, r).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, h * w, r)
    cls = adapter.conv(z[:, :1].reshape(b, 1, 1, r).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, 1, r)
    z = torch.cat([cls, patches], dim=1)
    return adapter.up(z * torch.sigmoid(1.702 * z))


@pytest.mark.parametrize("conv_init", ["identity", "xavier"])
def test_convpass_matches_the_reference_block(conv_init):
    torch.manual_seed(0)
    model = injected("convpass", model=tiny_backbone(img_size=64), conv_init=conv_init, scale=3.0).eval()
    block = model.blocks[2]
    conv = block.adapter_attn.conv.weight
    if conv_init == "identity":
        want = torch.zeros_like(conv)
        want[:, :, 1, 1] = torch.eye(8)
        torch.testing.assert_close(conv, want)
    perturb(model, std=0.3)
    x = torch.randn(2, 1 + 16, 64)  # CLS + a 4x4 patch grid
    with torch.no_grad():
        plain = block.base
        x1 = x + plain.attn(plain.norm1(x)) + 3.0 * reference_convpass(block.adapter_attn, plain.norm1(x))
        want = x1 + plain.mlp(plain.norm2(x1)) + 3.0 * reference_convpass(block.adapter_mlp, plain.norm2(x1))
        torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)


def test_convpass_attn_placement_and_counts():
    model = injected("convpass", placement="attn")
    assert all(b.adapter_mlp is None for b in model.blocks)
    per_bypass = (64 * 8 + 8) + (8 * 8 * 9 + 8) + (8 * 64 + 64)
    assert (
        count_method_parameters("test_vit", "convpass", placement="attn")["method"] == 6 * per_bypass
    )  # test_vit: 6 blocks
    assert count_method_parameters("test_vit", "convpass")["method"] == 2 * 6 * per_bypass


def test_convpass_errors():
    with pytest.raises(TargetError, match=r"convpass needs pre-norm ViT blocks .* EfficientNet has none"):
        injected("convpass", model=lite0())
    with pytest.raises(TargetError, match=r"blocks.0.attn \(Attention\) is not a pre-norm ViT block"):
        injected("convpass", targets=["blocks.0.attn"])
    model = injected("convpass").eval()
    with pytest.raises(ValueError, match=r"10 tokens do not form 1 prefix tokens \+ the 2x2 patch grid"):
        model.blocks[0](torch.randn(1, 10, 64))


# ----------------------------------------------------------------------------------------------------------------
# Compacter


def test_phm_layer_is_a_sum_of_kronecker_products():
    from adaptune.methods.compacter import PHMLinear, PHMRule

    rule = PHMRule(4, std=0.5)
    layer = PHMLinear(16, 8, 4, rank=2, rule=rule)
    with torch.no_grad():
        layer.bias.normal_()
    dense = sum(torch.kron(rule.phm_rule[i], layer.phm_s[i] @ layer.phm_t[i]) for i in range(4))
    assert dense.shape == (16, 8)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), x @ dense + layer.bias, atol=1e-6, rtol=1e-5)
    full = PHMLinear(16, 8, 2, factorized=False)
    dense = sum(torch.kron(full.phm_rule[i], full.phm_w[i]) for i in range(2))
    torch.testing.assert_close(full(x), x @ dense + full.bias, atol=1e-6, rtol=1e-5)


def test_compacter_shares_one_rule_and_counts():
    model = injected("compacter")
    rules = [k for k in adapter_state_dict(model) if "phm_rule" in k]
    assert rules == ["adaptune_shared.phm_rule.phm_rule"], "one rule for every PHM layer, stored once"
    layers = [m for m in model.modules() if type(m).__name__ == "PHMLinear"]
    assert len(layers) == 2 * 2 * 6 and all(m.rule() is model.adaptune_shared.phm_rule.phm_rule for m in layers)
    # k·(in + out) + out per PHM layer (64 -> 8 -> 64), two per adapter, two adapters per block, + n³ once
    per_adapter = (1 * (64 + 8) + 8) + (1 * (8 + 64) + 64)
    assert count_method_parameters("test_vit", "compacter")["method"] == 6 * 2 * per_adapter + 4**3
    # the released scripts' setting: n 2, no sharing, full B: in·out/n + out + n³ per layer
    per_adapter = (64 * 8 // 2 + 8 + 8) + (8 * 64 // 2 + 64 + 8)
    options = {"phm_dim": 2, "shared_rule": False, "factorized": False}
    assert count_method_parameters("test_vit", "compacter", **options)["method"] == 6 * 2 * per_adapter


def test_compacter_bad_phm_dim_leaves_the_model_unchanged():
    model = tiny_backbone()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(TargetError, match=r"method.phm_dim: n = 3 must divide the channels \(64\)"):
        injected("compacter", model=model, phm_dim=3)
    assert [n for n, _ in model.named_modules()] == before


# ----------------------------------------------------------------------------------------------------------------
# norm tuning and ResAdapter on CNNs


def test_norm_tuning_trains_bn_affines_with_frozen_statistics():
    model = injected("norm_tuning", model=lite0())
    spec = get_method("norm_tuning")
    names = spec.trainable_backbone(model, method_config("norm_tuning"))
    plain = timm.create_model("tf_efficientnet_lite0", num_classes=5)
    bns = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(names) == 2 * len(bns)
    assert count_method_parameters("tf_efficientnet_lite0", "norm_tuning")["method"] == sum(
        2 * m.num_features for m in bns
    )
    set_train_mode(model, True)  # what the training loop does
    bn = model.blocks[1][0].bn1
    assert model.training and not bn.training and bn.weight.requires_grad, "the statistics stay frozen"
    stats = bn.running_mean.clone()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        train_out = model(x)
        assert torch.equal(bn.running_mean, stats)
        model.eval()
        torch.testing.assert_close(model(x), train_out)


@pytest.mark.parametrize("name", ["norm_tuning", "resadapter"])
def test_cnn_fold_loads_in_plain_timm(name):
    model = injected(name, model=lite0()).eval()
    x = torch.randn(2, 3, 64, 64)
    before = logits(model, x)
    perturb(model, std=0.1)
    expected = logits(model, x)
    assert (expected - before).abs().max() > 1e-3
    get_method(name).fold(model)
    plain = timm.create_model("tf_efficientnet_lite0", num_classes=5).eval()
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(logits(plain, x), expected, atol=1e-4, rtol=1e-4)


def test_resadapter_auto_targets_and_count():
    from adaptune.methods.resadapter import downsampling_convs

    lite = timm.create_model("tf_efficientnet_lite0")
    expected = ["conv_stem"] + [f"blocks.{b}.0.{c}" for b in (1, 2, 3, 5) for c in ("conv_pw", "conv_pwl")]
    assert downsampling_convs(lite) == expected
    resnet = timm.create_model("resnet18")
    assert downsampling_convs(resnet) == ["conv1"] + [
        f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv1", "downsample.0")
    ]
    assert downsampling_convs(tiny_backbone()) == ["patch_embed.proj"]
    r = 16
    lora = sum(
        r * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
        for m in map(lite.get_submodule, expected)
    )
    norms = sum(2 * m.num_features for m in lite.modules() if isinstance(m, nn.BatchNorm2d))
    assert count_method_parameters("tf_efficientnet_lite0", "resadapter")["method"] == lora + norms
    model = injected("resadapter", model=lite0())
    assert model.conv_stem.scale == 0.5, "α / r = 8 / 16, as the released ResAdapter LoRA"


def test_resadapter_errors_leave_the_model_unchanged():
    model = lite0()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(TargetError, match=r"method.norms: EfficientNet has no group norm layer with affine"):
        injected("resadapter", model=model, norms=["group"])
    assert [n for n, _ in model.named_modules()] == before
    with pytest.raises(TargetError, match=r"grouped/depthwise Conv2d"):
        injected("resadapter", model=model, targets=["blocks.1.0.conv_dw"])


@pytest.mark.slow  # ~45 s on 2 busy cores; the ViT path of the same steps runs in the shared fast suites
def test_resadapter_on_lite0_trains_merges_exports_and_evaluates_at_other_sizes(tmp_path):
    from adaptune.evaluate import evaluate_artifact
    from adaptune.export import export
    from adaptune.merge import merge

    recipe = tiny_recipe(
        "resadapter",
        tmp_path,
        backbone={"model": "tf_efficientnet_lite0", "img_size": None},
        data={"img_size": 32},
        train={"epochs": 1, "lr": 1e-2},
    )
    run = train(recipe).run_dir
    report = merge(run, tmp_path / "merged.safetensors")
    assert report["form"] == "folded" and report["max_abs_diff"] <= report["tolerance"]
    state, _ = load_safetensors(tmp_path / "merged.safetensors")
    timm.create_model("tf_efficientnet_lite0", num_classes=4).load_state_dict(state, strict=True)
    out = export(run, "onnx", tmp_path / "model.onnx")
    assert out["max_abs_diff"] <= out["tolerance"]
    for size in (24, 48):
        result = evaluate_artifact(tmp_path / "merged.safetensors", img_size=size, write=False)
        assert result["img_size"] == [size, size] and result["samples"] == 16


# ----------------------------------------------------------------------------------------------------------------
# every method learns on the synthetic task


@pytest.mark.parametrize("name", ZOO)
def test_tiny_training_run_learns(name, tmp_path):
    recipe = tiny_recipe(
        name,
        tmp_path,
        backbone={"model_kwargs": {"depth": 2}},
        train={"epochs": 4, "lr": 1e-2, "warmup_epochs": 0.0},
        data={"synthetic": {"num_classes": 4, "train_per_class": 8, "val_per_class": 4, "test_per_class": 8}},
    )
    initial = {k: v.clone() for k, v in adapter_state_dict(build(recipe).model).items()}
    result = train(recipe)
    epochs = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["train_loss"] for e in epochs if "train_loss" in e]
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.summary["test_top1_last"] > 25.0, "above chance (4 classes)"
    trained, _ = load_safetensors(result.run_dir / "adapter_model.safetensors")
    own = [k for k in trained if not k.startswith("head.")]
    assert own and all(k in initial for k in own)
    moved = [k for k in own if not torch.equal(trained[k], initial[k])]
    assert len(moved) == len(own), f"{set(own) - set(moved)} never changed"
