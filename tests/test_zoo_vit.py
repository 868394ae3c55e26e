"""The VTAB zoo methods VPT, BitFit, SSF and RepAdapter: their math against reference formulations written here, fold
parity into plain timm, exports, targets and errors, and a tiny training run that shows each method's own parameters
matter. The shared contract (conformance, merge, export) runs in test_conformance.py and test_merge_export.py."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_backbone, tiny_recipe
from torch import nn

from adaptune.errors import RecipeError, TargetError
from adaptune.loading import count_method_parameters, inject_method
from adaptune.methods import MethodSpec, bitfit, get_method, registered, repadapter, ssf, vpt
from adaptune.methods.common import adapter_modules
from adaptune.recipe import method_config

VIT_B = "vit_base_patch16_224"


class _Recipe:
    """The two recipe fields `inject_method` reads."""

    def __init__(self, name, **options):
        self.method_name, self.method = name, method_config(name, **options)


def injected(name, model=None, **options):
    model = model if model is not None else tiny_backbone()
    inject_method(model, _Recipe(name, **options))
    return model


def perturb(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def vit(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, depth=3, num_classes=5, **kwargs)
    return model.eval().requires_grad_(False)


def spec_ssf_list(depth):
    """The SSF paper's placement on a timm ViT (spec methods-others 7.6)."""
    per_block = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    return ["patch_embed.proj", *(f"blocks.{i}.{m}" for i in range(depth) for m in per_block), "norm"]


# ----------------------------------------------------------------------------------------------------------------
# VPT


def vpt_reference(plain, prompts, deep, x):
    """VPT written out on a plain timm ViT: insert after the prefix, replace per layer (deep), drop before the norm."""
    p, n = plain.num_prefix_tokens, prompts[0].shape[0]
    t = plain.norm_pre(plain.patch_drop(plain._pos_embed(plain.patch_embed(x))))
    for i, block in enumerate(plain.blocks):
        if i == 0 or deep:
            tail = t[:, p:] if i == 0 else t[:, p + n :]
            t = torch.cat([t[:, :p], prompts[i].expand(x.shape[0], -1, -1), tail], dim=1)
        t = block(t)
    t = plain.norm(torch.cat([t[:, :p], t[:, p + n :]], dim=1))
    return plain.forward_head(t)


VIT_VARIANTS = {
    "cls": {},
    "avg_registers": {"global_pool": "avg", "reg_tokens": 2},
    "no_embed_class": {"no_embed_class": True, "reg_tokens": 1},
    "map_pool": {"global_pool": "map"},
}


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("variant", VIT_VARIANTS)
def test_vpt_matches_the_reference_and_pools_as_before(variant, deep, images):
    plain = vit(**VIT_VARIANTS[variant])
    model = vit(**VIT_VARIANTS[variant])
    touched = vpt.inject(model, method_config("vpt", num_prompts=3, deep=deep))
    assert touched == ([f"blocks.{i}" for i in range(3)] if deep else ["blocks.0"]) + ["norm"]
    perturb(model, scale=0.5)
    model.eval()
    prompts = [model.blocks[i].prompts for i in range(3 if deep else 1)]
    with torch.no_grad():
        torch.testing.assert_close(model(images), vpt_reference(plain, prompts, deep, images))
        # the head sees exactly the tokens it sees without VPT: prompts are gone before the norm
        assert model.forward_features(images).shape == plain.forward_features(images).shape
        assert (model(images) - plain(images)).abs().max() > 1e-5, "the prompts change the output"


def test_vpt_prompt_init_bound_and_counts():
    assert vpt.prompt_init_bound(3, (16, 16), 768) == pytest.approx(0.0625)  # spec 7.4
    torch.manual_seed(0)
    model = tiny_backbone()  # patch 16, dim 64: v = sqrt(6 / 832)
    vpt.inject(model, method_config("vpt", num_prompts=50))
    v = math.sqrt(6 / (3 * 16 * 16 + 64))
    prompts = torch.cat([b.prompts for b in model.blocks])
    assert prompts.shape == (6 * 50, 64) and prompts.abs().max() <= v
    assert prompts.std().item() == pytest.approx(v / math.sqrt(3), rel=0.05)  # U(-v, v)
    assert count_method_parameters(VIT_B, "vpt", num_prompts=100)["method"] == 921_600  # spec 7.4: 12 · N · 768
    assert count_method_parameters(VIT_B, "vpt_shallow", num_prompts=10)["method"] == 7_680


def test_vpt_prompt_dropout_only_while_training(images):
    model = injected("vpt", dropout=0.5)
    perturb(model, scale=0.5)
    model.train()
    torch.manual_seed(1)
    a = model(images)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(images)), "dropout draws differ in training"
    model.eval()
    torch.testing.assert_close(model(images), model(images), atol=0, rtol=0)


def test_vpt_rejects_other_backbones_and_masks(images):
    torch.manual_seed(0)
    with pytest.raises(TargetError, match=r"vpt prompts timm VisionTransformer models .* ResNet is not one"):
        vpt.inject(tiny_backbone(model="test_resnet"), method_config("vpt"))
    model = injected("vpt")
    with pytest.raises(TargetError, match="already carries adapter modules; inject once"):
        vpt.inject(model, method_config("vpt"))
    with pytest.raises(ValueError, match="attention masks are not supported"):
        model.forward_features(images, attn_mask=torch.zeros(5, 5, dtype=torch.bool))


def test_vpt_onnx_and_torch_export_are_exact(tmp_path):
    import onnxruntime as ort

    model = vit(global_pool="avg", reg_tokens=2)
    vpt.inject(model, method_config("vpt", num_prompts=4, dropout=0.1))
    perturb(model, scale=0.5)
    model.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
        torch.onnx.export(
            model, (x[:2],), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17,
            input_names=["inputs"], output_names=["logits"], dynamic_axes={"inputs": {0: "b"}, "logits": {0: "b"}},
        )  # fmt: skip
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"inputs": x.numpy()})[0])  # batch 3: not the traced batch
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# BitFit


def test_bitfit_trains_exactly_the_backbone_biases():
    model = injected("bitfit")
    plain = tiny_backbone()
    biases = {n for n, _ in plain.named_parameters() if n.endswith(".bias") and not n.startswith("head.")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == biases | {"head.weight", "head.bias"}
    assert list(adapter_modules(model)) == [], "BitFit adds no module"
    assert list(model.state_dict()) == list(plain.state_dict())


def test_bitfit_targets_and_exclude():
    cfg = method_config("bitfit", targets=["blocks.*.attn.*"], exclude=["blocks.0.*"])
    names = bitfit.trainable_backbone(tiny_backbone(), cfg)
    assert names == [f"blocks.{i}.attn.{m}.bias" for i in range(1, 6) for m in ("qkv", "proj")]
    with pytest.raises(TargetError, match=r"'blocks\.\*\.atn\.qkv' matched no module .*did you mean"):
        bitfit.trainable_backbone(tiny_backbone(), method_config("bitfit", targets=["blocks.*.atn.qkv"]))
    with pytest.raises(TargetError, match=r"holds no module with a bias; widen the targets"):
        bitfit.trainable_backbone(tiny_backbone(), method_config("bitfit", targets=["blocks.*.attn.q_norm"]))


def test_bitfit_on_a_cnn_keeps_batchnorm_statistics(images):
    model = injected("bitfit", model=tiny_backbone(model="test_resnet"))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.bias.requires_grad and not m.weight.requires_grad for m in bns)
    before = [m.running_mean.clone() for m in bns]
    from adaptune.train import set_train_mode

    set_train_mode(model, backbone_train=True)  # as the trainer does: BatchNorm stays in eval
    assert not any(m.training for m in bns)
    model(torch.randn(4, 3, 64, 64))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True)), "statistics must not drift"
    with pytest.raises(TargetError, match="holds no module with a bias"):  # ResNet: BatchNorm biases and the head only
        injected("bitfit", model=tiny_backbone(model="test_resnet"), batchnorm=False)


# ----------------------------------------------------------------------------------------------------------------
# SSF


def test_ssf_auto_targets_are_the_papers_list():
    model = injected("ssf")
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ssf.SSF)]
    assert wrapped == spec_ssf_list(6)
    with torch.device("meta"):
        big = timm.create_model(VIT_B, num_classes=10)
        paths = ssf.resolve_targets(big.requires_grad_(False), method_config("ssf"))
    assert paths == spec_ssf_list(12)


def test_ssf_scales_and_shifts_each_layout():
    torch.manual_seed(0)
    from timm.layers import LayerNorm2d

    cases = [
        (nn.Linear(6, 5), torch.randn(2, 7, 6), (5,)),
        (nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 8, 8), (4, 1, 1)),
        (nn.LayerNorm(5), torch.randn(2, 7, 5), (5,)),
        (LayerNorm2d(4), torch.randn(2, 4, 3, 3), (4, 1, 1)),
        (nn.BatchNorm2d(4).eval(), torch.randn(2, 4, 3, 3), (4, 1, 1)),
    ]
    for base, x, shape in cases:
        child, channels, dim = ssf.placement(base)
        assert child == "" and channels == shape[0]
        wrapper = ssf.SSF(base, channels, dim, 0.3, like=base.weight)
        torch.testing.assert_close(wrapper(x), wrapper.gamma.view(shape) * base(x) + wrapper.beta.view(shape))


def test_ssf_sits_between_a_fused_norm_and_its_activation():
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    holder = nn.Sequential(BatchNormAct2d(4, act_layer=nn.SiLU)).eval().requires_grad_(False)
    bn = holder[0]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    assert ssf.placement(bn) == ("drop", 4, 1)
    wrapper = ssf.SSF(bn.drop, 4, 1, 0.3, like=bn.weight)
    bn.drop = wrapper
    y = torch.randn(2, 4, 5, 5)
    normed = (y - bn.running_mean.view(4, 1, 1)) / torch.sqrt(bn.running_var.view(4, 1, 1) + bn.eps)
    affine = normed * bn.weight.view(4, 1, 1) + bn.bias.view(4, 1, 1)
    expected = F.silu(wrapper.gamma.view(4, 1, 1) * affine + wrapper.beta.view(4, 1, 1))
    torch.testing.assert_close(holder(y), expected)
    ssf.fold(holder)
    assert isinstance(bn.drop, nn.Identity) and list(holder.state_dict()) == list(nn.Sequential(
        BatchNormAct2d(4, act_layer=nn.SiLU)).state_dict())  # fmt: skip
    torch.testing.assert_close(holder(y), expected, atol=1e-5, rtol=1e-5)


def test_ssf_fold_math_and_init():
    torch.manual_seed(0)
    w, b, g, beta = torch.randn(5, 3, 2, 2), torch.randn(5), torch.randn(5), torch.randn(5)
    w2, b2 = ssf.fold_into_layer(w, b, g, beta)
    torch.testing.assert_close(w2.flatten(1), torch.diag(g) @ w.flatten(1))
    torch.testing.assert_close(b2, g * b + beta)
    model = injected("ssf")
    gammas = torch.cat([m.gamma for m in model.modules() if isinstance(m, ssf.SSF)])
    betas = torch.cat([m.beta for m in model.modules() if isinstance(m, ssf.SSF)])
    assert gammas.mean().item() == pytest.approx(1.0, abs=0.005) and gammas.std().item() == pytest.approx(0.02, rel=0.1)
    assert betas.mean().item() == pytest.approx(0.0, abs=0.005) and betas.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_convnext"])
def test_ssf_on_cnns_folds_into_plain_timm(name):
    torch.manual_seed(0)
    model = injected("ssf", model=tiny_backbone(model=name))
    norms = [m for m in model.modules() if isinstance(m, ssf.SSF) and not isinstance(m.base, nn.Linear | nn.Conv2d)]
    assert norms, "auto puts SSF after the CNN's norms"
    perturb(model, scale=0.2)
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        ssf.fold(model)
        plain = timm.create_model(name, pretrained=False, num_classes=5).eval()
        assert list(model.state_dict()) == list(plain.state_dict())
        plain.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(plain(x), expected, atol=1e-4, rtol=1e-4)


def test_ssf_unfolded_exports_on_fused_norm_act(tmp_path):
    import onnxruntime as ort

    model = injected("ssf", model=tiny_backbone(model="test_efficientnet"))
    perturb(model, scale=0.2)
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17, input_names=["x"])
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got[0]), expected, atol=1e-4, rtol=1e-4)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)


def test_ssf_target_errors():
    with pytest.raises(TargetError, match=r"layer1\.0\.conv1 has no bias to fold the shift β into; target the norm"):
        injected("ssf", model=tiny_backbone(model="test_resnet"), targets=["layer1.0.conv1"])
    with pytest.raises(TargetError, match=r"'blocks\.\*\.mlp\.fc9' matched no Linear or Conv2d"):
        injected("ssf", targets=["blocks.*.mlp.fc9"])
    with pytest.raises(TargetError, match="leaves no layer for SSF"):
        injected("ssf", exclude=["*"])
    with pytest.raises(RecipeError, match="'auto' cannot be combined with globs"):
        method_config("ssf", targets=["auto", "blocks.*"])
    model = injected("ssf", targets=["blocks.*.attn.qkv", "blocks.*.norm1"])
    norms = [n for n, m in model.named_modules() if isinstance(m, ssf.SSF) and isinstance(m.base, nn.LayerNorm)]
    assert norms == [f"blocks.{i}.norm1" for i in range(6)]
    assert count_method_parameters(VIT_B, "ssf", targets=["blocks.*.attn.qkv"])["method"] == 12 * 2 * 2304


# ----------------------------------------------------------------------------------------------------------------
# RepAdapter


def test_grouped_linear_is_a_grouped_conv1d():
    torch.manual_seed(0)
    up = repadapter.GroupedLinear(8, 12, groups=4)
    with torch.no_grad():
        up.weight.normal_()
        up.bias.normal_()
    conv = nn.Conv1d(8, 12, 1, groups=4)  # the reference's W_B
    with torch.no_grad():
        conv.weight.copy_(up.weight.unsqueeze(-1))
        conv.bias.copy_(up.bias)
    h = torch.randn(2, 5, 8)
    torch.testing.assert_close(up(h), conv(h.transpose(1, 2)).transpose(1, 2))
    dense = repadapter.grouped_dense(up.weight, 4)
    assert dense.shape == (12, 8) and (dense[:3, 2:] == 0).all()  # block-diagonal: outputs 0-2 read units 0-1 only
    torch.testing.assert_close(up(h), h @ dense.T + up.bias)


def test_repadapter_matches_the_reference_and_its_affine_form():
    torch.manual_seed(0)
    adapter = repadapter.RepAdapter(12, bottleneck=4, groups=2, scale=0.7, dropout=0.1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    adapter.eval()
    down = nn.Conv1d(12, 4, 1)
    up = nn.Conv1d(4, 12, 1, groups=2)
    with torch.no_grad():
        down.weight.copy_(adapter.down.weight.unsqueeze(-1))
        down.bias.copy_(adapter.down.bias)
        up.weight.copy_(adapter.up.weight.unsqueeze(-1))
        up.bias.copy_(adapter.up.bias)
    u = torch.randn(3, 7, 12)
    reference = u + 0.7 * up(down(u.transpose(1, 2))).transpose(1, 2)  # the reference: conv1d over (B, C, N)
    torch.testing.assert_close(adapter(u), reference)
    m, c = adapter.affine()
    torch.testing.assert_close(u @ m.T + c, reference)


@pytest.mark.parametrize("options", [{}, {"groups": 4, "scale": 0.5, "bias": False}], ids=["default", "g4_nobias"])
def test_repadapter_folds_into_qkv_and_fc1(options, images):
    qkv_bias = bool(options.get("bias", True))
    torch.manual_seed(0)
    model = injected("repadapter", model=tiny_backbone(model_kwargs={"qkv_bias": qkv_bias}), **options)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, repadapter.RepAdapterLinear)]
    assert wrapped == [f"blocks.{i}.{m}" for i in range(6) for m in ("attn.qkv", "mlp.fc1")]
    perturb(model, scale=0.2)
    model.eval()
    with torch.no_grad():
        expected = model(images)
        repadapter.fold(model)
    plain = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5, qkv_bias=qkv_bias).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), expected, atol=1e-5, rtol=1e-5)


def test_repadapter_errors_and_variants():
    with pytest.raises(RecipeError, match="bottleneck 8 is not divisible by groups 3"):
        method_config("repadapter", groups=3)
    with pytest.raises(TargetError, match=r"has 64 input channels, not divisible by groups 3"):
        injected("repadapter", groups=3, bottleneck=6)
    with pytest.raises(TargetError, match=r"blocks\.0\.attn\.qkv has no bias .*set method\.bias: false"):
        injected("repadapter", model=tiny_backbone(model_kwargs={"qkv_bias": False}))
    with pytest.raises(TargetError, match=r"'\*\.attn\.qkvv' matched no Linear"):
        injected("repadapter", targets=["*.attn.qkvv"])
    assert count_method_parameters(VIT_B, "repadapter", targets=["*.attn.qkv"])["method"] == 239_808 // 2  # repattn


# ----------------------------------------------------------------------------------------------------------------
# training: the method's own parameters make the difference


def frozen_variant(name: str) -> MethodSpec:
    """``name`` with everything it would train frozen at its init: same model, same draws, only the head learns."""
    spec = get_method(name)

    def inject(model, cfg):
        touched = spec.inject(model, cfg)
        for _, module in adapter_modules(model):
            module.requires_grad_(False)
        return touched

    return dataclasses.replace(spec, name=f"{name}_frozen_test", inject=inject, trainable_backbone=None)


def final_train_loss(run_dir) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "train_loss" in m][-1]["train_loss"]


# prompts: 2, not the ViT-B defaults (10 and 100), for a 32-pixel ViT with 4 patch tokens
TRAIN_OPTIONS = {
    "bitfit": {},
    "ssf": {},
    "repadapter": {},
    "vpt": {"num_prompts": 2},
    "vpt_shallow": {"num_prompts": 2},
}


@pytest.mark.parametrize("name", sorted(TRAIN_OPTIONS))
def test_tiny_training_run_learns_through_the_method(name, tmp_path):
    from adaptune.train import train

    def run(method: str):
        recipe = tiny_recipe(
            method,
            backbone={"model_kwargs": {"depth": 2}},
            method=TRAIN_OPTIONS[name],
            data={"synthetic": {"num_classes": 8, "train_per_class": 8, "val_per_class": 2, "test_per_class": 4}},
            train={"epochs": 4, "lr": 1e-2, "batch_size": 16, "warmup_epochs": 0.5},
        )
        return train(recipe, out_dir=tmp_path / method, log=lambda line: None)

    trained = run(name)
    with registered(frozen_variant(name)) as frozen_spec:
        frozen = run(frozen_spec.name)
    loss, frozen_loss = final_train_loss(trained.run_dir), final_train_loss(frozen.run_dir)
    assert loss < math.log(8) / 2, f"{name} did not fit the training set (loss {loss:.3f})"
    assert loss < frozen_loss - 0.1, f"{name}: {loss:.3f} vs {frozen_loss:.3f} with the method frozen at init"
    assert trained.summary["test_top1_last"] > 50.0  # 8 classes: chance is 12.5
