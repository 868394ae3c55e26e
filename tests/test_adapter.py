"""`adapter` and `adapter_plus`: placement formulas, identity at init, CNN/Swin layouts, errors, parameter counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch import nn

from adaptune.errors import RecipeError, TargetError
from adaptune.methods.adapter import (
    AdapterBlock,
    AdapterConfig,
    AdapterPlusConfig,
    BottleneckAdapter,
    inject,
)
from adaptune.methods.adapter_blocks import resolve_targets
from adaptune.methods.common import adapter_modules, own_state_keys
from adaptune.methods.registry import get_method
from adaptune.recipe import load_recipe, method_config

STYLES = ("adaptformer", "pfeiffer", "houlsby", "post", "parallel")
ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),
    "identity": lambda z: z,
}
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "adapterplus_vtab.yaml"


def vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, depth=2, num_classes=10, **kw)
    return model.requires_grad_(False).eval()


def small(name: str, **kw) -> nn.Module:
    """A CNN/Swin at 64 px; the overlay makes inject's probe forward run at 64 px too."""
    torch.manual_seed(0)
    overlay = dict(input_size=(3, 64, 64))
    model = timm.create_model(name, pretrained=False, num_classes=10, pretrained_cfg_overlay=overlay, **kw)
    return model.requires_grad_(False).eval()


def tiny_swin() -> nn.Module:
    shape = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2))
    return small("swin_tiny_patch4_window7_224", img_size=64, window_size=4, **shape)


def perturb(model: nn.Module) -> None:
    """Non-zero adapter weights, so formula checks are not trivially 0 == 0."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, module in adapter_modules(model):
            for name, p in module.named_parameters():
                if not name.startswith("base."):
                    noise = torch.randn(p.shape, generator=gen) * 0.2
                    p.copy_(1 + noise if name.endswith("scale") else noise)


def hand_adapter(ad: BottleneckAdapter, z: torch.Tensor, act: str) -> torch.Tensor:
    h = z
    if isinstance(ad.norm, nn.LayerNorm):
        h = F.layer_norm(h, (h.shape[-1],), ad.norm.weight, ad.norm.bias, eps=1e-6)
    h = ACTS[act](F.linear(h, ad.down.weight, ad.down.bias))
    return F.linear(h, ad.up.weight, ad.up.bias) * ad.scale


def adapter_grads_only(model: nn.Module, x: torch.Tensor) -> None:
    """Backward reaches every adapter parameter's .grad and nothing else."""
    model(x).square().sum().backward()
    owned = {f"{path}.{n}" for path, m in adapter_modules(model) for n in m.adapter_param_names()}
    assert owned
    for name, p in model.named_parameters():
        if name in owned:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    ups = [p.grad for n, p in model.named_parameters() if n.endswith("up.weight")]
    assert all(g.abs().sum() > 0 for g in ups)


# ----------------------------------------------------------------------------------------------------------------
# formulas


@pytest.mark.parametrize("style", STYLES)
def test_vit_formula(style):
    model = vit(init_values=0.3)  # LayerScale != Identity, so ls1/ls2 take part
    cfg = AdapterConfig(style=style, norm=True, scale="channel", activation="relu")
    assert inject(model, cfg) == ["blocks.0", "blocks.1"]
    perturb(model)
    block = model.blocks[0]
    b = block.base
    x = torch.randn(2, 5, 64)
    a = lambda t: b.ls1(b.attn(b.norm1(t)))
    m = lambda t: b.ls2(b.mlp(b.norm2(t)))
    with torch.no_grad():
        if style == "houlsby":
            y = a(x)
            h = x + y + hand_adapter(block.adapter_attn, y, "relu")
            z = m(h)
            expected = h + z + hand_adapter(block.adapter_mlp, z, "relu")
        elif style == "post":
            o = b(x)
            expected = o + hand_adapter(block.adapter, o, "relu")
        elif style == "parallel":
            expected = b(x) + hand_adapter(block.adapter, x, "relu")
        else:
            x1 = x + a(x)
            f = m(x1)
            expected = x1 + f + hand_adapter(block.adapter, x1 if style == "adaptformer" else f, "relu")
        got = block(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert (got - b(x)).abs().max() > 1e-3  # the adapter does contribute


@pytest.mark.parametrize("act", sorted(ACTS))
def test_activations_and_learned_scale(act):
    model = vit()
    inject(model, AdapterConfig(activation=act, scale="learned", dropout=0.5))
    perturb(model)
    block = model.blocks[1]
    assert block.adapter.scale.shape == (1,)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        o = block.base(x)
        torch.testing.assert_close(block(x), o + hand_adapter(block.adapter, o, act), rtol=1e-5, atol=1e-6)


def test_respostblock_adaptformer_formula():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, block_fn=ResPostBlock)
    model.requires_grad_(False).eval()
    inject(model, AdapterConfig(style="adaptformer", scale=0.1))
    perturb(model)
    block = model.blocks[0]
    b = block.base
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        x1 = x + b.norm1(b.attn(x))
        expected = x1 + b.norm2(b.mlp(x1)) + hand_adapter(block.adapter, x1, "gelu")
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["houlsby", "post"])
def test_swin_formula_channels_last(style):
    model = tiny_swin()
    inject(model, AdapterConfig(style=style, scale="channel"))
    perturb(model)
    block = model.get_submodule("layers.2.blocks.1")  # a shifted-window block
    assert isinstance(block, AdapterBlock) and not block.channels_first
    b = block.base
    x = torch.randn(2, 4, 4, 64)  # (B, H, W, C)
    with torch.no_grad():
        if style == "houlsby":
            y = b._attn(b.norm1(x))
            h = x + y + hand_adapter(block.adapter_attn, y, "gelu")
            z = b.mlp(b.norm2(h))
            expected = h + z + hand_adapter(block.adapter_mlp, z, "gelu")
        else:
            o = b(x)
            expected = o + hand_adapter(block.adapter, o, "gelu")
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_nchw_post_is_a_1x1_conv():
    model = small("convnext_atto")
    inject(model, AdapterConfig(style="post", scale="channel"))
    perturb(model)
    block = model.stages[0].blocks[0]
    ad = block.adapter
    assert block.channels_first
    x = torch.randn(2, 40, 8, 8)  # (B, C, H, W)
    with torch.no_grad():
        o = block.base(x)
        h = F.gelu(F.conv2d(o, ad.down.weight[:, :, None, None], ad.down.bias))
        h = F.conv2d(h, ad.up.weight[:, :, None, None], ad.up.bias) * ad.scale[:, None, None]
        torch.testing.assert_close(block(x), o + h, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# identity at init, gradients, structure


@pytest.mark.parametrize("style", STYLES)
def test_vit_identity_at_init(style):
    model = vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    inject(model, AdapterConfig(style=style, norm=True, scale="channel"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    adapter_grads_only(model, x)


def test_houlsby_creates_two_adapters():
    model = vit()
    inject(model, AdapterConfig(style="houlsby"))
    block = model.blocks[0]
    children = dict(block.named_children())
    assert set(children) == {"base", "adapter_attn", "adapter_mlp"}
    assert isinstance(children["adapter_attn"], BottleneckAdapter) and children["adapter_attn"] is not block.adapter_mlp
    assert sorted(block.adapter_param_names()) == sorted(
        f"adapter_{s}.{p}.{w}" for s in ("attn", "mlp") for p in ("down", "up") for w in ("weight", "bias")
    )


@pytest.mark.parametrize("name", ["resnet10t", "tf_efficientnet_lite0", "convnext_atto", "swin"])
@pytest.mark.parametrize("style", ["post", "parallel"])
def test_any_block_styles_on_cnns_and_swin(name, style):
    model = tiny_swin() if name == "swin" else small(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    paths = inject(model, AdapterConfig(style=style))
    assert paths and all(isinstance(model.get_submodule(p), AdapterBlock) for p in paths)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    adapter_grads_only(model, x)


def test_parallel_auto_skips_blocks_that_change_shape():
    model = small("resnet10t")
    post = [t.path for t in resolve_targets(model, ("auto",), "post")]
    parallel = inject(model, AdapterConfig(style="parallel"))
    assert post == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert parallel == ["layer1.0"]  # layer2-4 open with stride 2 and a channel change


def test_channel_and_layout_detection():
    def layout(model):
        return {t.path: (t.channels, t.channels_first) for t in resolve_targets(model, ("auto",), "post")}

    assert layout(vit()) == {"blocks.0": (64, False), "blocks.1": (64, False)}
    assert layout(small("resnet10t"))["layer3.0"] == (256, True)
    convnext = layout(small("convnext_atto"))
    assert convnext["stages.0.blocks.0"] == (40, True) and convnext["stages.3.blocks.0"] == (320, True)
    swin = layout(tiny_swin())
    assert swin["layers.0.blocks.0"] == (16, False) and swin["layers.3.blocks.0"] == (128, False)


def test_probe_restores_each_module_mode():
    model = small("resnet10t").train()
    model.bn1.eval()  # frozen BatchNorm kept in eval inside a training model
    inject(model, AdapterConfig())
    assert model.training and model.layer1.training and not model.bn1.training


def test_adapters_follow_the_block_dtype():
    model = vit().to(torch.bfloat16)
    inject(model, AdapterConfig(style="adaptformer"))
    assert model.blocks[0].adapter.down.weight.dtype == torch.bfloat16
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_adapter_state_round_trip():
    model = vit()
    inject(model, AdapterPlusConfig(style="houlsby"))
    perturb(model)
    state = {f"{p}.{k}": m.state_dict()[k] for p, m in adapter_modules(model) for k in own_state_keys(m)}
    fresh = vit()
    inject(fresh, AdapterPlusConfig(style="houlsby"))
    missing = fresh.load_state_dict(state, strict=False).missing_keys
    assert not any("adapter" in k for k in missing) and all(k in fresh.state_dict() for k in state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_down_and_up_are_called_as_modules():
    """MoSA swaps ``down``/``up`` for its own modules and reuses `inject` with its own config class."""

    @dataclasses.dataclass(frozen=True)
    class OtherConfig(AdapterConfig):
        num_experts: int = 4

    class Recorder(nn.Module):
        def __init__(self, inner: nn.Linear):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, h):
            self.calls += 1
            return self.inner(h)

    model = small("convnext_atto")
    built = []

    def make(dim, cfg):
        built.append(cfg)
        return BottleneckAdapter.from_config(dim, cfg)

    inject(model, OtherConfig(), make_adapter=make)
    assert built and all(isinstance(c, OtherConfig) for c in built)
    ad = model.stages[0].blocks[0].adapter
    ad.down, ad.up = Recorder(ad.down), Recorder(ad.up)
    model(torch.randn(1, 3, 64, 64))
    assert ad.down.calls == 1 and ad.up.calls == 1


# ----------------------------------------------------------------------------------------------------------------
# inits and Adapter+


def test_inits():
    torch.manual_seed(0)
    lora = BottleneckAdapter(768, 64, init="lora")
    assert lora.up.weight.abs().sum() == 0 and lora.down.weight.abs().max() <= 1 / 768**0.5
    houlsby = BottleneckAdapter(768, 64, init="houlsby")
    bert = BottleneckAdapter(768, 64, init="bert")
    xavier = BottleneckAdapter(768, 64, init="xavier")
    for w in (houlsby.down.weight, houlsby.up.weight):
        assert w.abs().max() <= 0.02 and 0.007 < w.std() < 0.0095  # std 0.01 cut at 2σ: 0.0088
    for w in (bert.down.weight, bert.up.weight):
        assert 0.019 < w.std() < 0.021 and w.abs().max() > 0.04
    assert xavier.up.weight.abs().max() <= (6 / (768 + 64)) ** 0.5
    for ad in (lora, houlsby, bert, xavier):
        assert ad.down.bias.abs().sum() == 0 and ad.up.bias.abs().sum() == 0


def test_adapter_plus_defaults():
    assert get_method("adapter").identity_at_init and not get_method("adapter_plus").identity_at_init
    assert get_method("adapter").fold is None and get_method("adapter").consolidate is None
    model = vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    inject(model, get_method("adapter_plus").config_cls())
    ad = model.blocks[0].adapter
    assert isinstance(ad.scale, nn.Parameter) and ad.scale.shape == (64,) and torch.all(ad.scale == 1)
    t = torch.randn(5)
    assert torch.equal(ad.act(t), F.gelu(t)) and isinstance(ad.norm, nn.Identity)
    assert type(ad.drop_path).__name__ == "DropPath" and ad.drop_path.drop_prob == 0.1
    assert ad.up.weight.abs().max() <= 0.02 and ad.up.weight.abs().sum() > 0
    with torch.no_grad():
        assert (model(x) - ref).abs().max() > 0  # Houlsby init is not identity


def test_vit_b16_parameter_counts():
    """methods-others §10.5: adapter dim 8 with biases on ViT-B/16 = 156,768; Adapter+ adds a 768 scale per block."""

    def count(cfg):
        with torch.device("meta"):  # shapes only: a meta ViT-B builds and probes in well under a second
            model = timm.create_model("vit_base_patch16_224", pretrained=False)
        model.requires_grad_(False)
        inject(model, cfg)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    assert count(AdapterConfig(style="adaptformer", scale=0.1)) == 12 * (768 * 8 + 8 + 8 * 768 + 768) == 156_768
    assert count(AdapterPlusConfig()) == 156_768 + 12 * 768 == 165_984


def test_recipe_loads():
    recipe = load_recipe(RECIPE)
    assert recipe.method_name == "adapter_plus" and recipe.method == AdapterPlusConfig()
    assert recipe.backbone.model == "vit_base_patch16_224.orig_in21k" and recipe.backbone.drop_path_rate == 0.1
    train = recipe.train
    assert (train.epochs, train.batch_size, train.lr, train.weight_decay) == (100, 64, 1e-3, 1e-4)
    assert (train.warmup_epochs, train.warmup_lr, train.min_lr) == (10, 1e-5, 1e-6)
    data = recipe.data
    assert (data.source, data.train_split, data.val_split, data.test_split) == ("vtab", "trainval", None, "test")
    assert (data.interpolation, data.normalize, train.precision) == ("bilinear", "model", "bf16")


# ----------------------------------------------------------------------------------------------------------------
# errors


def test_unsupported_style_on_cnn_auto():
    with pytest.raises(TargetError, match=r"'houlsby' needs transformer blocks.*BasicBlock.*set method.style: post"):
        inject(small("resnet10t"), AdapterConfig(style="houlsby"))


def test_unsupported_style_on_explicit_target():
    with pytest.raises(TargetError, match=r"cannot adapt stages\.0\.blocks\.0 \(ConvNeXtBlock\).*supports style post"):
        inject(small("convnext_atto"), AdapterConfig(style="adaptformer", targets=("stages.0.blocks.0",)))


def test_glob_that_matches_nothing():
    with pytest.raises(TargetError, match=r"'blocks\.\*\.mlpp' matched no module.*did you mean"):
        inject(vit(), AdapterConfig(targets=("blocks.*.mlpp",)))


def test_parallel_on_explicit_block_that_changes_shape():
    with pytest.raises(TargetError, match=r"layer2\.0 \(BasicBlock\)'s output, but it maps \(1, 64, 16, 16\) to"):
        inject(small("resnet10t"), AdapterConfig(style="parallel", targets=("layer2.0",)))


def test_auto_without_known_blocks():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten())
    with pytest.raises(TargetError, match="'auto' found no known residual block in Sequential"):
        inject(model, AdapterConfig())


def test_overlapping_and_repeated_targets():
    with pytest.raises(TargetError, match=r"blocks\.0\.mlp lies inside another target, blocks\.0"):
        inject(vit(), AdapterConfig(targets=("blocks.0", "blocks.0.mlp")))
    model = vit()
    inject(model, AdapterConfig())
    with pytest.raises(TargetError, match=r"blocks\.0\.base is already part of the adapter module 'blocks\.0'"):
        inject(model, AdapterConfig())


def test_config_errors():
    with pytest.raises(RecipeError, match="'auto' cannot be combined with globs"):
        method_config("adapter", targets=["auto", "blocks.0"])
    with pytest.raises(RecipeError, match=r"method.scale: expected a number or one of 'learned', 'channel'"):
        method_config("adapter_plus", scale="chanel")
    with pytest.raises(RecipeError, match=r"method.style: expected one of .*did you mean 'houlsby'"):
        method_config("adapter", style="housby")
