from __future__ import annotations

import contextlib
import copy
import dataclasses
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from adaptune.errors import RecipeError, TargetError
from adaptune.methods.lora import (  # the fast path's kernels, tested directly
    QKV,
    LoRAConfig,
    LoRAConv2d,
    LoRALinear,
    _LoRAConvFn,
    _LoRALinearFn,
    conv_lora_delta,
    fold,
    inject,
    lora_delta,
)
from adaptune.recipe import method_config

VIT = dict(model_name="test_vit", pretrained=False, img_size=32, depth=2, num_classes=10)


def make_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(**VIT).eval().requires_grad_(False)


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Give every LoRA weight a nonzero value (B starts at zero, which would make parity trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear | LoRAConv2d):
                for p in m.pairs.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def cfg(**kw) -> LoRAConfig:
    return dataclasses.replace(LoRAConfig(), **kw)


# ----------------------------------------------------------------------------------------------------------------
# pure math


def test_lora_delta_matches_dense_reference():
    torch.manual_seed(0)
    r, fan_in, fan_out = 3, 7, 5
    a, b = torch.randn(r, fan_in), torch.randn(fan_out, r)
    reference = sum(torch.outer(b[:, k], a[k]) for k in range(r)) * 0.5
    torch.testing.assert_close(lora_delta(a, b, 0.5), reference)
    x = torch.randn(4, fan_in)
    torch.testing.assert_close(x @ lora_delta(a, b, 0.5).T, 0.5 * ((x @ a.T) @ b.T))


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_conv_lora_delta_equals_running_the_two_convs(stride, padding, dilation):
    torch.manual_seed(0)
    r, cin, cout = 3, 4, 6
    a, b = torch.randn(r, cin, 3, 3), torch.randn(cout, r, 1, 1)
    x = torch.randn(2, cin, 9, 9)
    two_convs = F.conv2d(F.conv2d(x, a, stride=stride, padding=padding, dilation=dilation), b)
    delta = conv_lora_delta(a, b, 2.0)
    assert delta.shape == (cout, cin, 3, 3)
    one_conv = F.conv2d(x, delta, stride=stride, padding=padding, dilation=dilation)
    torch.testing.assert_close(one_conv, 2.0 * two_convs, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# wrappers


def test_fused_qkv_slices_change_only_q_and_v_rows():
    model = make_vit()
    paths = inject(model, LoRAConfig())
    assert paths == [f"blocks.{i}.attn.qkv" for i in range(len(model.blocks))]
    perturb(model)
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and set(qkv.pairs) == {"q", "v"}
    d = qkv.base.out_features // 3
    x = torch.randn(2, 5, qkv.base.in_features)
    y, y0 = qkv(x), qkv.base(x)
    assert torch.equal(y[..., d : 2 * d], y0[..., d : 2 * d])  # k untouched, bit for bit
    assert (y[..., :d] - y0[..., :d]).abs().min() > 0
    assert (y[..., 2 * d :] - y0[..., 2 * d :]).abs().min() > 0
    delta = qkv.delta_weight()
    assert torch.count_nonzero(delta[d : 2 * d]) == 0
    torch.testing.assert_close(y, y0 + x @ delta.T, atol=1e-6, rtol=1e-5)


def test_only_fused_qkv_of_timm_attention_is_sliced():
    model = make_vit()
    inject(model, cfg(targets=("*.attn.qkv", "*.mlp.fc1")))
    fc1 = model.blocks[0].mlp.fc1
    assert fc1.base.out_features == 3 * fc1.base.in_features  # shaped like qkv, but not an attention's qkv
    assert set(fc1.pairs) == {"all"}

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)

        def forward(self, x):
            return self.qkv(x)

    toy = Toy()
    inject(toy, cfg(targets=("qkv",)))
    assert set(toy.qkv.pairs) == {"all"}


def test_empty_qkv_adapts_the_fused_matrix_as_one():
    model = make_vit()
    inject(model, cfg(qkv=()))
    qkv = model.blocks[0].attn.qkv
    assert set(qkv.pairs) == {"all"} and qkv.pairs["all"].lora_b.weight.shape == (qkv.base.out_features, 8)


def test_pairs_are_called_as_modules_so_they_can_be_swapped():
    model = make_vit()
    inject(model, LoRAConfig())
    pair = model.blocks[0].attn.qkv.pairs["q"]
    calls = []
    pair.lora_a.register_forward_hook(lambda *args: calls.append("a"))
    pair.lora_b.register_forward_hook(lambda *args: calls.append("b"))
    model(torch.randn(1, 3, 32, 32))
    assert calls == ["a", "b"]


def test_identity_at_init_and_dropout_only_on_the_lora_path():
    model = make_vit()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    inject(model, cfg(dropout=0.5, targets=("*.qkv", "*.fc2")))
    model.train()  # dropout active, but B = 0 and the base path never drops
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


def test_gaussian_init():
    model = make_vit()
    inject(model, cfg(init="gaussian", rank=4))
    pair = model.blocks[0].attn.qkv.pairs["v"]
    assert torch.count_nonzero(pair.lora_b.weight) == 0
    assert 0.15 < pair.lora_a.weight.std().item() < 0.35  # normal(0, 1/r), r = 4


def test_alpha_scales_the_update():
    model = make_vit()
    inject(model, cfg(rank=4, alpha=16.0))
    assert model.blocks[0].attn.qkv.scale == 4.0
    model = make_vit()
    inject(model, cfg(rank=4))
    assert model.blocks[0].attn.qkv.scale == 1.0


def test_only_lora_params_are_new_and_trainable():
    model = make_vit()
    before = {n for n, _ in model.named_parameters()}
    inject(model, LoRAConfig())
    qkv = model.blocks[0].attn.qkv
    assert qkv.adapter_param_names() == (
        "pairs.q.lora_a.weight",
        "pairs.q.lora_b.weight",
        "pairs.v.lora_a.weight",
        "pairs.v.lora_b.weight",
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = qkv.adapter_param_names()
    assert trainable == {f"blocks.{i}.attn.qkv.{n}" for i in range(len(model.blocks)) for n in names}
    renamed = {n.replace(".base.", ".") for n, _ in model.named_parameters() if ".pairs." not in n}
    assert renamed == before


# ----------------------------------------------------------------------------------------------------------------
# fold


@pytest.mark.parametrize(
    "options",
    [{}, {"qkv": ("q", "k", "v"), "targets": ("*.qkv", "*.proj", "*.fc1", "*.fc2"), "alpha": 4.0}, {"qkv": ()}],
)
def test_fold_parity_and_plain_timm_state_dict(options):
    model = make_vit()
    inject(model, cfg(**options))
    perturb(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        lora_tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
        live = dict(model.named_parameters())
        fold(model)
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for n, p in live.items():  # the run's tensors are untouched by the fold
        assert torch.equal(p, lora_tensors[n]), n
    assert not any(isinstance(m, LoRALinear | LoRAConv2d) for m in model.modules())

    fresh = timm.create_model(**VIT).eval()
    assert list(model.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=0)


def test_fold_uses_current_pair_weights_and_changes_the_base_weight():
    model = make_vit()
    inject(model, LoRAConfig())
    perturb(model)
    qkv = model.blocks[0].attn.qkv
    w0 = qkv.base.weight.detach().clone()
    pair = qkv.pairs["v"]
    d = qkv.base.out_features // 3
    expected_v = w0[2 * d :] + lora_delta(pair.lora_a.weight, pair.lora_b.weight, qkv.scale)
    fold(model)
    folded = model.blocks[0].attn.qkv
    assert type(folded) is nn.Linear
    torch.testing.assert_close(folded.weight[2 * d :], expected_v.detach())
    assert torch.equal(folded.weight[d : 2 * d], w0[d : 2 * d])


@pytest.mark.parametrize(
    "name, size, targets",
    [
        ("resnet10t", 32, ("conv1.0", "layer*.*.conv*")),
        ("tf_efficientnet_lite0", 32, ("conv_stem", "blocks.*.*.conv_pw", "conv_head")),  # TF-"same" padded convs
    ],
)
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_conv_lora_fold_parity(name, size, targets, dtype, rel):
    """Exact in fp64; in fp32 within 1e-5 of the logits' scale (a random deep CNN amplifies rounding)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval().requires_grad_(False).to(dtype)
    paths = inject(model, cfg(targets=targets, rank=4, alpha=8.0))
    assert paths and all(isinstance(model.get_submodule(p), LoRAConv2d) for p in paths)
    perturb(model)
    x = torch.randn(2, 3, size, size, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        fold(model)
        got = model(x)
    assert (got - expected).abs().max() <= rel * expected.abs().max()
    fresh = timm.create_model(name, pretrained=False, num_classes=10)
    fresh.load_state_dict(model.state_dict(), strict=True)


# ----------------------------------------------------------------------------------------------------------------
# parameter count (methods-others §10.5)


@pytest.mark.parametrize("qkv", [("q", "v"), ()])
def test_vit_b16_parameter_count(qkv):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    inject(model, cfg(qkv=qkv))
    lora = sum(p.numel() for m in model.modules() if isinstance(m, LoRALinear) for p in m.pairs.parameters())
    assert lora == 12 * (768 * 8 + 8 * 768) * 2 == 294_912


# ----------------------------------------------------------------------------------------------------------------
# targets and errors


def test_head_is_never_a_target():
    model = make_vit()
    paths = inject(model, cfg(targets=("*",)))
    assert "head" not in paths and type(model.head) is nn.Linear
    assert "blocks.0.mlp.fc2" in paths and "patch_embed.proj" in paths  # the Conv2d patch embedding too


def test_head_only_target_is_an_error():
    with pytest.raises(TargetError, match=r"matched only the classifier head 'head'"):
        inject(make_vit(), cfg(targets=("head",)))


def test_glob_without_match_names_close_modules():
    with pytest.raises(TargetError, match=r"'blocks\.\*\.attn\.qkvv' matched no Linear.*'blocks\.0\.attn\.qkv'"):
        inject(make_vit(), cfg(targets=("blocks.*.attn.qkvv",)))


def test_exclude():
    model = make_vit()
    assert inject(model, cfg(exclude=("blocks.0.*",))) == ["blocks.1.attn.qkv"]  # depth 2
    with pytest.raises(TargetError, match=r"matched no module.*did you mean"):
        inject(make_vit(), cfg(exclude=("blocks.0.atn.qkv",)))
    with pytest.raises(TargetError, match=r"leaves nothing to wrap after method.exclude"):
        inject(make_vit(), cfg(exclude=("*qkv",)))


def test_depthwise_conv_target_is_an_error_suggesting_a_pointwise_conv():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    dw = r"'blocks\.1\.0\.conv_dw' is a grouped/depthwise Conv2d \(groups=96\).*such as 'blocks\.1\.0\.conv_pw'"
    with pytest.raises(TargetError, match=dw):
        inject(model, cfg(targets=("blocks.1.*.conv*",)))
    assert not any(isinstance(m, LoRAConv2d) for m in model.modules())  # checked before anything was wrapped


def test_weight_standardized_conv_is_an_error():
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10)
    with pytest.raises(TargetError, match=r"'stem\.conv' is a StdConv2d, not a plain Conv2d"):
        inject(model, cfg(targets=("stem.conv",)))


def test_invalid_config_through_the_recipe_validator():
    with pytest.raises(RecipeError, match=r"method\.qkv: item 0: expected one of 'q', 'k', 'v', got 'x'"):
        method_config("lora", qkv=("x",))
    with pytest.raises(RecipeError, match=r"qkv: 'v' is listed twice"):
        method_config("lora", qkv=["v", "v"])
    with pytest.raises(RecipeError, match=r"method\.rank: expected a value >= 1, got 0"):
        method_config("lora", rank=0)
    assert method_config("lora", qkv=[]).qkv == ()


# ----------------------------------------------------------------------------------------------------------------
# fast path (merged / stacked kernels) against the straightforward formulation


def straightforward_linear(m: LoRALinear, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``y = W x + b``, then each pair's ``s · B A h`` added to its output part, with plain ops (``h = x · mask``)."""
    y = F.linear(x, m.base.weight, m.base.bias)
    h = x if mask is None else x * mask
    keys = ["all"] if "all" in m.pairs else ["q", "k", "v"]
    parts = list(y.split(m.part_size, dim=-1))
    for i, key in enumerate(keys):
        if key in m.pairs:
            pair = m.pairs[key]
            parts[i] = parts[i] + m.scale * F.linear(F.linear(h, pair.lora_a.weight), pair.lora_b.weight)
    return torch.cat(parts, dim=-1)


def straightforward_conv(m: LoRAConv2d, x: torch.Tensor) -> torch.Tensor:
    base, pair = m.base, m.pairs["all"]
    if type(base) is not nn.Conv2d:  # Conv2dSame pads like TF, then convolves unpadded
        from timm.layers.padding import pad_same

        x = pad_same(x, base.kernel_size, base.stride, base.dilation)
    geo = (base.stride, base.padding, base.dilation)
    y = F.conv2d(x, base.weight, base.bias, *geo)
    return y + m.scale * F.conv2d(F.conv2d(x, pair.lora_a.weight, None, *geo), pair.lora_b.weight)


def randomise(m: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)


def outputs_and_grads(fn, x: torch.Tensor, params: list[torch.Tensor], seed: int = 5):
    torch.manual_seed(seed)  # the same dropout mask in both formulations
    y = fn(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(y.dtype)
    return [y, *torch.autograd.grad(y, [x, *params], gy)]


def assert_all_close(got: list[torch.Tensor], expected: list[torch.Tensor], **tol) -> None:
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, msg=lambda m, i=i: f"tensor {i}: {m}", **tol)


@contextlib.contextmanager
def modules_must_not_run(*classes: type):
    """The fast path computes the base and the pairs without calling any of them."""

    def refuse(self, *args):
        raise AssertionError(f"{type(self).__name__}.forward called on the fast path")

    with contextlib.ExitStack() as stack:
        for cls in classes:
            stack.enter_context(mock.patch.object(cls, "forward", refuse))
        yield


SLICES = [("all",), ("q", "v"), ("q", "k", "v"), ("k",), ("q", "k"), ("v",)]


@pytest.mark.parametrize("slices", SLICES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("base_trains", [False, True])
def test_fast_linear_equals_the_straightforward_formulation(slices, dropout, dtype, base_trains):
    m = LoRALinear(nn.Linear(12, 18, dtype=dtype), rank=3, alpha=7.5, dropout=dropout, slices=slices).train()
    randomise(m)
    m.base.requires_grad_(base_trains)
    params = [p for p in m.parameters() if p.requires_grad]
    x = torch.randn(2, 5, 12, dtype=dtype, requires_grad=True)
    w0 = m.base.weight.detach().clone()
    with modules_must_not_run(nn.Linear):
        got = outputs_and_grads(m, x, params)
    mask = None
    if dropout:
        torch.manual_seed(5)
        mask = F.dropout(torch.ones_like(x), dropout, training=True)  # the very mask nn.Dropout drew
    expected = outputs_and_grads(lambda t: straightforward_linear(m, t, mask), x, params)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    assert_all_close(got, expected, **tol)
    assert torch.equal(m.base.weight, w0)  # the merged weight is a new tensor


def test_fast_linear_without_bias_and_in_eval_and_inference_mode():
    m = LoRALinear(nn.Linear(8, 24, bias=False), rank=2, dropout=0.5, slices=("q", "v"))
    randomise(m)
    x = torch.randn(3, 8)
    m.eval()  # dropout off: the merged path
    with torch.inference_mode(), modules_must_not_run(nn.Linear):
        got = m(x)
    torch.testing.assert_close(got, straightforward_linear(m, x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("merge, separate_input", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("offsets, outs", [((0,), (12,)), ((0, 8), (4, 4)), ((4,), (4,))])
def test_linear_kernel_gradcheck(merge, separate_input, offsets, outs):
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x, w, b = t(2, 3, 5), t(12, 5), t(12)
    d = t(2, 3, 5) if separate_input else None
    factors = [f for o in outs for f in (t(2, 5), t(o, 2))]
    fn = lambda x, d, w, b, *f: _LoRALinearFn.apply(x, d, w, b, 1.7, offsets, merge, *f)
    assert torch.autograd.gradcheck(fn, (x, d, w, b, *factors))


def test_bf16_weights_take_the_unmerged_path_and_match_fp32():
    m = LoRALinear(nn.Linear(16, 48), rank=4, slices=("q", "v"))
    randomise(m)
    m16 = copy.deepcopy(m).to(torch.bfloat16)
    x = torch.randn(4, 16, requires_grad=True)
    x16 = x.detach().to(torch.bfloat16).requires_grad_()
    params, params16 = list(m.pairs.parameters()), list(m16.pairs.parameters())
    with modules_must_not_run(nn.Linear):
        got = outputs_and_grads(m16, x16, params16)
    assert all(t.dtype == torch.bfloat16 for t in got)
    expected = outputs_and_grads(lambda t: straightforward_linear(m16, t), x16, params16)
    assert_all_close(got, expected, atol=5e-2, rtol=2e-2)  # two bf16 roundings apart
    reference = outputs_and_grads(m, x, params)
    assert_all_close([t.float() for t in got], reference, atol=0.1, rtol=5e-2)


def test_autocast_casts_like_f_linear_and_grads_reach_fp32_factors():
    m = LoRALinear(nn.Linear(16, 48), rank=4, slices=("q", "v"))
    randomise(m)
    x = torch.randn(4, 16, requires_grad=True)
    params = list(m.pairs.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = outputs_and_grads(m, x, params)
        expected = outputs_and_grads(lambda t: straightforward_linear(m, t), x, params)
    assert got[0].dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in got[1:])
    assert_all_close(got, expected, atol=5e-2, rtol=2e-2)


def conv_cases():
    from timm.layers import Conv2dSame

    return [
        nn.Conv2d(4, 6, 3, stride=1, padding=1),
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.Conv2d(4, 6, 1),
        Conv2dSame(4, 6, 3, stride=2),
    ]


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_conv_equals_the_straightforward_formulation(case, dtype):
    base = conv_cases()[case].to(dtype)
    m = LoRAConv2d(base, rank=3, alpha=6.0)
    randomise(m)
    m.base.requires_grad_(True)
    params = [p for p in m.parameters() if p.requires_grad]
    x = torch.randn(2, 4, 9, 9, dtype=dtype, requires_grad=True)
    with modules_must_not_run(nn.Conv2d, type(base)):
        got = outputs_and_grads(m, x, params)
    expected = outputs_and_grads(lambda t: straightforward_conv(m, t), x, params)
    tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-11, "rtol": 1e-11}
    assert_all_close(got, expected, **tol)


def test_conv_kernel_gradcheck():
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x, w, b, a, bb = t(2, 3, 6, 6), t(5, 3, 3, 3), t(5), t(2, 3, 3, 3), t(5, 2, 1, 1)
    fn = lambda x, w, b, a, bb: _LoRAConvFn.apply(x, w, b, 0.6, ((2, 1), (1, 0), (1, 2)), a, bb)
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))


def test_conv_with_dropout_calls_the_modules():
    m = LoRAConv2d(nn.Conv2d(4, 6, 3, padding=1), rank=2, dropout=0.5).train()
    randomise(m)
    calls = []
    m.pairs["all"].lora_a.register_forward_hook(lambda *args: calls.append("a"))
    m(torch.randn(1, 4, 5, 5))
    assert calls == ["a"]


def test_replaced_pair_modules_are_called():
    class Counting(nn.Linear):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return super().forward(x)

    m = LoRALinear(nn.Linear(8, 24), rank=2, slices=("q", "v"))
    randomise(m)
    x = torch.randn(3, 8)
    expected = straightforward_linear(m, x)
    old = m.pairs["v"].lora_a
    m.pairs["v"].lora_a = Counting(8, 2, bias=False)
    m.pairs["v"].lora_a.load_state_dict(old.state_dict())
    torch.testing.assert_close(m(x), expected, atol=1e-6, rtol=1e-5)
    assert Counting.calls == 1


def test_hooks_on_the_base_still_fire():
    m = LoRALinear(nn.Linear(8, 24), rank=2, slices=("q", "v"))
    randomise(m)
    calls = []
    m.base.register_forward_hook(lambda *args: calls.append("base"))
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), straightforward_linear(m, x), atol=1e-6, rtol=1e-5)
    assert calls == ["base"]


# ----------------------------------------------------------------------------------------------------------------
# parity with PEFT's LoRA on equal weights


def peft_twin(model: nn.Module, targets: str, rank: int) -> nn.Module:
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
    return peft.get_peft_model(copy.deepcopy(model), cfg)


@pytest.mark.parametrize("qkv", [(), ("q", "v"), ("k",)])
def test_outputs_and_grads_equal_peft_with_equal_weights(qkv):
    backbone = make_vit()
    ours = copy.deepcopy(backbone)
    inject(ours, cfg(targets=("blocks.*.attn.qkv", "blocks.*.mlp.fc2"), qkv=qkv))
    perturb(ours)
    rank = 8 * max(1, len(qkv))  # q/v slices as one PEFT pair of rank 8·P: A stacked, B block-structured
    theirs = peft_twin(backbone, r"blocks\.\d+\.(attn\.qkv|mlp\.fc2)", rank)
    layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for path, m in ours.named_modules():
            if isinstance(m, LoRALinear):
                a, b = layers[path].lora_A["default"].weight, layers[path].lora_B["default"].weight
                a.zero_(), b.zero_()
                for i, (key, pair) in enumerate(m.pairs.items()):
                    start = QKV.index(key) * m.part_size if key in QKV else 0
                    a[8 * i : 8 * (i + 1)] = pair.lora_a.weight
                    b[start : start + m.part_size, 8 * i : 8 * (i + 1)] = pair.lora_b.weight
    x = torch.randn(4, 3, 32, 32)
    ours.train(), theirs.train()
    got, expected = ours(x), theirs(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    got.square().sum().backward()
    expected.square().sum().backward()
    for path, m in ours.named_modules():
        if isinstance(m, LoRALinear):
            a, b = layers[path].lora_A["default"].weight.grad, layers[path].lora_B["default"].weight.grad
            for i, (key, pair) in enumerate(m.pairs.items()):  # each pair's block of PEFT's factors
                start = QKV.index(key) * m.part_size if key in QKV else 0
                tol = {"atol": 1e-5, "rtol": 1e-4}
                torch.testing.assert_close(pair.lora_a.weight.grad, a[8 * i : 8 * (i + 1)], **tol)
                torch.testing.assert_close(
                    pair.lora_b.weight.grad, b[start : start + m.part_size, 8 * i : 8 * (i + 1)], **tol
                )
