"""MoSA: the split primitive (partition, sparse learning, N-copy equivalence, expectation, groups, resume) and the
`mosa` / `mosa_lora` methods (consolidated structure, fold, state size, losses, recipes)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_backbone
from safetensors.torch import load_file, save_file
from torch import nn

from adaptune.batch import Batch
from adaptune.errors import RecipeError, TargetError
from adaptune.methods.adapter import AdapterBlock, AdapterConfig
from adaptune.methods.lora import LoRAConfig
from adaptune.methods.mosa import MoSAConfig, MoSALoRAConfig, deepreg_loss, symmetric_kl
from adaptune.methods.mosa_split import (
    SplitConv2d,
    SplitLinear,
    mosa_groups,
    partition,
    split_module,
    split_modules,
)
from adaptune.methods.registry import get_method
from adaptune.recipe import load_recipe, method_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def injected(name: str, cfg, model: str = "test_vit", **backbone):
    torch.manual_seed(0)
    net = tiny_backbone(model=model, **backbone)
    get_method(name).inject(net, cfg)
    return net


def perturb(model: nn.Module, seed: int = 1) -> None:
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def fix_draws(model: nn.Module, ks: list[int]) -> None:
    """Make every split module of ``model`` draw ``ks`` (one per group) instead of sampling."""
    for _, m in split_modules(model):
        m.sampler.draw = lambda ks=ks: list(ks)


# ----------------------------------------------------------------------------------------------------------------
# the split primitive


@pytest.mark.parametrize("shape", [(64, 16), (7, 5), (13,), (3, 2, 3, 3)])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_partition_is_exact_with_the_reference_chunk_sizes(shape, n):
    owner = partition(shape, n, gen(n))
    assert owner.dtype == torch.uint8 and owner.shape == torch.Size(shape)
    numel = owner.numel()
    sizes = torch.bincount(owner.flatten().long(), minlength=n)
    assert sizes.numel() == n  # every element owned by exactly one expert in [0, n)
    reference = [(i + 1) * numel // n - i * numel // n for i in range(n)]  # the kthvalue chunks of spec §2.4
    assert sizes.tolist() == reference and max(reference) - min(reference) <= 1


def test_every_split_tensor_of_an_injected_model_is_partitioned():
    model = injected("mosa", method_config("mosa", share="none", split_bias=True, num_experts=3))
    splits = list(split_modules(model))
    assert len(splits) == 2 * 6
    for _, m in splits:
        for owner, tensor in ((m.owner, m.weight), (m.bias_owner, m.bias)):
            assert owner.shape == tensor.shape
            sizes = torch.bincount(owner.flatten().long(), minlength=3)
            assert sizes.numel() == 3 and sizes.max() - sizes.min() <= 1
    owners = [m.owner for _, m in splits if m.owner.shape == splits[0][1].owner.shape]
    assert not torch.equal(owners[0], owners[1])  # each tensor has its own random partition


class TwoLayer(nn.Module):
    """x -> down -> GELU -> up, either projection possibly split."""

    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__()
        self.down, self.up = down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x)))


def test_learning_stays_inside_the_drawn_experts():
    torch.manual_seed(0)
    down, up = nn.Linear(8, 6), nn.Linear(6, 8)  # both non-zero, so every drawn element gets a gradient
    net = TwoLayer(SplitLinear.from_linear(down, 6, gen(1)), SplitLinear.from_linear(up, 6, gen(2)))
    start = copy.deepcopy(net.state_dict())
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    drawn: dict[str, set[int]] = {"down": set(), "up": set()}
    for opt_cls in (torch.optim.SGD, torch.optim.AdamW):  # AdamW: momentum keeps moving drawn experts
        opt = opt_cls(net.parameters(), lr=0.05, weight_decay=0.0)
        for _ in range(3):
            F.mse_loss(net(x), y).backward()
            opt.step()
            opt.zero_grad()
            for name in drawn:
                drawn[name] |= set(getattr(net, name).sampler.last_draw)
    for name, m in (("down", net.down), ("up", net.up)):
        assert 1 <= len(drawn[name]) < 6, "pick seeds where some expert is never drawn"
        in_drawn = torch.isin(m.owner.long(), torch.tensor(sorted(drawn[name])))
        changed = m.weight.detach() != start[f"{name}.weight"]
        assert not (changed & ~in_drawn).any()  # nothing outside the drawn experts moved
        assert changed[in_drawn].float().mean() > 0.9  # and the drawn ones did learn
        rows_changed = (m.bias.detach() != start[f"{name}.bias"]).any(1)
        assert rows_changed.nonzero().flatten().tolist() == sorted(drawn[name])


class NCopyReference(nn.Module):
    """The released code's formulation: N full-size copies of ``up`` (all deep copies of one), the dense expert in
    the forward, gradients multiplied by the fixed masks after backward."""

    def __init__(self, down: nn.Linear, up: nn.Linear, owner: torch.Tensor):
        super().__init__()
        n = int(owner.max()) + 1
        self.down = copy.deepcopy(down)
        self.experts = nn.ModuleList(copy.deepcopy(up) for _ in range(n))
        self.masks = [owner == i for i in range(n)]

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.experts[k](F.gelu(self.down(x)))

    def mask_grads(self) -> None:
        for expert, mask in zip(self.experts, self.masks, strict=True):
            if expert.weight.grad is not None:
                expert.weight.grad *= mask  # biases unmasked (BIAS=True)


def decay_groups(module: nn.Module, wd: float) -> list[dict]:
    named = list(module.named_parameters())
    return [
        {"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": wd},
        {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def run_pair(make_opt, steps: int = 8, warm_reference: bool = False, reference_set_to_none: bool = True, check=True):
    """Train ours (one dense split ``up``) and the N-copy reference on the same draws; with ``check``, their outputs
    must agree at every step. Returns both and the draws."""
    torch.manual_seed(0)
    down, up = nn.Linear(8, 5), nn.Linear(5, 8)
    nn.init.zeros_(up.weight)  # lora init; the biases start non-zero (and equal in every expert)
    ours = TwoLayer(copy.deepcopy(down), SplitLinear.from_linear(up, 4, gen(3)))
    ref = NCopyReference(down, up, ours.up.owner)
    opt_ours, opt_ref = make_opt(ours), make_opt(ref)
    if warm_reference:  # torch 1.11 after every expert held a gradient: zero tensors, never None
        for p in ref.parameters():
            p.grad = torch.zeros_like(p)
    data = torch.Generator().manual_seed(5)
    draws = []
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=data), torch.randn(16, 8, generator=data)
        out = ours(x)
        k = ours.up.sampler.last_draw[0]
        draws.append(k)
        out_ref = ref(x, k)
        if check:
            torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=0)
        F.mse_loss(out, y).backward()
        F.mse_loss(out_ref, y).backward()
        ref.mask_grads()
        opt_ours.step()
        opt_ref.step()
        opt_ours.zero_grad(set_to_none=True)
        opt_ref.zero_grad(set_to_none=reference_set_to_none)
    return ours, ref, draws


def assert_same(ours: TwoLayer, ref: NCopyReference, atol: float = 1e-6) -> None:
    torch.testing.assert_close(ours.down.weight, ref.down.weight, atol=atol, rtol=0)
    for i, expert in enumerate(ref.experts):
        torch.testing.assert_close(ours.up.weight * (ours.up.owner == i), expert.weight, atol=atol, rtol=0)
        torch.testing.assert_close(ours.up.bias[i], expert.bias, atol=atol, rtol=0)
    # the up experts have disjoint supports, so their sum is the one dense tensor
    torch.testing.assert_close(ours.up.weight, sum(e.weight for e in ref.experts), atol=atol, rtol=0)


def test_equals_the_n_copy_reference_under_sgd():
    ours, ref, draws = run_pair(lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
    assert len(set(draws)) > 1
    assert ours.up.weight.abs().sum() > 0
    assert_same(ours, ref)


def test_adamw_equals_the_reference_with_zero_grads_kept_not_with_set_to_none():
    def adamw(m):
        return torch.optim.AdamW(decay_groups(m, 0.01), lr=0.05)

    ours, ref, draws = run_pair(adamw, warm_reference=True, reference_set_to_none=False)
    assert len(set(draws)) == 4
    assert_same(ours, ref)  # torch 1.11 semantics once every expert holds a gradient: exact

    ours, ref, _ = run_pair(adamw, reference_set_to_none=True, check=False)  # torch >= 2: inactive experts skipped
    moved = [(ours.up.weight * (ours.up.owner == i) - e.weight).abs().max() for i, e in enumerate(ref.experts)]
    assert max(moved) > 1e-3


def test_eval_and_consolidation_are_the_exact_expectation_over_experts():
    torch.manual_seed(0)
    for split_bias in (False, True):
        layer = SplitLinear.from_linear(nn.Linear(6, 5), 3, gen(0), split_bias=split_bias)
        with torch.no_grad():
            layer.bias.add_(torch.randn(layer.bias.shape))  # distinct bias rows
        x = torch.randn(4, 2, 6)
        outs = []
        for k in range(3):
            fix_draws(layer, [k])
            outs.append(layer(x))
        expected = torch.stack(outs).mean(0)
        layer.eval()
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.merged()(x), expected, atol=1e-6, rtol=0)


def test_mosa_block_output_in_eval_equals_the_mean_over_all_experts():
    cfg = method_config("mosa", dropout=0.0, num_experts=3)
    model = injected("mosa", cfg, model_kwargs={"depth": 1})
    perturb(model)
    block = model.blocks[0]
    assert isinstance(block, AdapterBlock)
    x = torch.randn(2, 5, 64)
    outs = []
    for k in range(3):
        fix_draws(model, [k])
        outs.append(block(x))
    block.eval()
    torch.testing.assert_close(block(x), torch.stack(outs).mean(0), atol=1e-6, rtol=0)
    get_method("mosa").consolidate(model)
    torch.testing.assert_close(model.blocks[0](x), torch.stack(outs).mean(0), atol=1e-6, rtol=0)


def test_mosa_lora_eval_is_the_exact_expectation_even_with_both_factors_split():
    # B_k A_j x is bilinear and j, k are drawn independently, so E[B_k A_j] = E[B] E[A]: exact for share none too
    model = injected("mosa_lora", method_config("mosa_lora", share="none", num_experts=2), model_kwargs={"depth": 1})
    perturb(model)
    qkv = model.blocks[0].attn.qkv
    x = torch.randn(2, 5, 64)
    outs = []
    for ka, kb in itertools.product(range(2), range(2)):
        for key in qkv.pairs:
            fix_draws(qkv.pairs[key].lora_a, [ka])
            fix_draws(qkv.pairs[key].lora_b, [kb])
        outs.append(qkv(x))
    qkv.eval()
    torch.testing.assert_close(qkv(x), torch.stack(outs).mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_groups_mode_equals_separate_forwards_with_the_same_draws(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer = SplitLinear.from_linear(nn.Linear(6, 5), 4, gen(0))
        x1, x2 = torch.randn(3, 7, 6), torch.randn(3, 7, 6)
    else:
        layer = SplitConv2d(nn.Conv2d(3, 4, 3, padding=1), 4, gen(0))
        x1, x2 = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    twin = copy.deepcopy(layer)
    with mosa_groups(layer, 2):
        grouped = layer(torch.cat([x1, x2]))
        draws = layer.sampler.last_draw
    separate = torch.cat([twin(x1), twin(x2)])
    assert len(draws) == 2 and layer.sampler.groups == 1
    torch.testing.assert_close(grouped, separate, atol=1e-6, rtol=1e-6)
    grouped.square().sum().backward()
    separate.square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, twin.bias.grad, atol=1e-5, rtol=1e-5)


def test_doubled_batch_through_the_model_equals_two_passes(images):
    model = injected("mosa", method_config("mosa", dropout=0.0, share="none"))
    perturb(model)
    model.train()
    twin = copy.deepcopy(model)
    with mosa_groups(model, 2):
        both = model(torch.cat([images, images]))
    torch.testing.assert_close(both, torch.cat([twin(images), twin(images)]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both[:3], both[3:])  # the two halves drew different experts somewhere


def test_groups_mode_needs_a_divisible_batch():
    layer = SplitLinear.from_linear(nn.Linear(4, 4), 2, gen(0))
    with mosa_groups(layer, 2), pytest.raises(ValueError, match="batch dimension 3 is not a multiple of 2"):
        layer(torch.randn(3, 4))


def test_generator_state_and_owner_maps_survive_a_safetensors_round_trip(tmp_path):
    model = injected("mosa", method_config("mosa", seed=7))
    model.train()
    images = torch.randn(2, 3, 32, 32)
    model(images)  # advance the generators
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    expected = []
    for _ in range(3):
        model(images)
        expected.append([m.sampler.last_draw[0] for _, m in split_modules(model)])

    fresh = injected("mosa", method_config("mosa", seed=8))  # other owner maps and draw seeds until loaded
    assert any(not torch.equal(a.owner, b.owner) for (_, a), (_, b) in zip(split_modules(model), split_modules(fresh)))
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    fresh.train()
    for draws in expected:
        fresh(images)
        assert [m.sampler.last_draw[0] for _, m in split_modules(fresh)] == draws
    for (_, a), (_, b) in zip(split_modules(model), split_modules(fresh), strict=True):
        assert torch.equal(a.owner, b.owner)


def test_seed_makes_injection_reproducible_and_distinct_per_module():
    a = injected("mosa", method_config("mosa", seed=3))
    b = injected("mosa", method_config("mosa", seed=3))
    seeds = [m.sampler.generator.initial_seed() for _, m in split_modules(a)]
    assert seeds == [m.sampler.generator.initial_seed() for _, m in split_modules(b)]
    assert len(set(seeds)) == len(seeds)
    assert all(torch.equal(x.owner, y.owner) for (_, x), (_, y) in zip(split_modules(a), split_modules(b)))


# ----------------------------------------------------------------------------------------------------------------
# methods


def structure(model: nn.Module) -> list[tuple[str, str, tuple[int, ...] | None]]:
    return [(n, type(m).__name__, None) for n, m in model.named_modules()] + [
        (n, "param", tuple(p.shape)) for n, p in model.named_parameters()
    ]


@pytest.mark.parametrize("share", ["down", "up", "none"])
@pytest.mark.parametrize("style", ["adaptformer", "houlsby", "post"])
def test_consolidated_mosa_has_the_structure_of_adapter(share, style):
    cfg = method_config("mosa", share=share, style=style)
    model = injected("mosa", cfg)
    get_method("mosa").consolidate(model)
    assert not list(split_modules(model))
    adapter_cfg = AdapterConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(AdapterConfig)})
    plain = injected("adapter", adapter_cfg)
    assert structure(model) == structure(plain)
    assert list(model.state_dict()) == list(plain.state_dict())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in plain.named_parameters() if p.requires_grad]


def trainable_state_bytes(model: nn.Module) -> int:
    """Trainable parameters plus AdamW state after one step, in bytes."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return state + sum(p.numel() * p.element_size() for p in params)


def test_trainable_state_is_that_of_one_dense_adapter():
    cfg = method_config("mosa", split_bias=True)
    adapter_cfg = AdapterConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(AdapterConfig)})
    dense = trainable_state_bytes(injected("adapter", adapter_cfg))
    assert trainable_state_bytes(injected("mosa", cfg)) == dense
    # default: each expert keeps a private bias row (reference BIAS=True): (N - 1) extra rows of C per block,
    # each with two AdamW moments
    extra = 6 * (4 - 1) * 64 * 4 * 3
    assert trainable_state_bytes(injected("mosa", method_config("mosa"))) == dense + extra


@pytest.mark.parametrize("share", ["a", "b", "none"])
def test_mosa_lora_folds_into_plain_timm_weights(share, images):
    model = injected("mosa_lora", method_config("mosa_lora", share=share))
    perturb(model)
    model.eval()
    expected = model(images)
    spec = get_method("mosa_lora")
    deploy = copy.deepcopy(model)
    spec.consolidate(deploy)
    lora_cfg = LoRAConfig()
    assert structure(deploy) == structure(injected("lora", lora_cfg))
    spec.fold(model)
    plain = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5).eval()
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(images), expected, atol=1e-5, rtol=1e-5)


def test_mosa_lora_splits_convs_including_same_padding_and_folds():
    cfg = method_config("mosa_lora", share="none", targets=["blocks.*.*.conv_pw*"])
    model = injected("mosa_lora", cfg, model="test_efficientnet")
    splits = [m for _, m in split_modules(model)]
    assert splits and all(isinstance(m, SplitConv2d) for m in splits)
    perturb(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    get_method("mosa_lora").fold(model)
    assert not list(split_modules(model))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)

    from timm.layers import Conv2dSame

    same = SplitConv2d(Conv2dSame(3, 4, 3, stride=2), 2, gen(0))
    same.eval()
    ref = Conv2dSame(3, 4, 3, stride=2)
    ref.load_state_dict({"weight": same.weight / 2, "bias": same.bias.mean(0)})
    x = torch.randn(1, 3, 9, 9)
    torch.testing.assert_close(same(x), ref(x))
    assert type(same.merged()) is Conv2dSame


def test_split_module_rejects_what_it_cannot_split():
    with pytest.raises(TargetError, match=r"'blocks.0.norm' is a LayerNorm; MoSA splits only nn.Linear"):
        split_module(nn.LayerNorm(4), 2, gen(0), False, 0, "blocks.0.norm")
    with pytest.raises(TargetError, match="is a Conv2d"):
        split_module(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), 2, gen(0), False, 0, "conv")


def test_config_validation():
    with pytest.raises(RecipeError, match=r"method.num_experts: expected a value >= 1, got 0"):
        method_config("mosa", num_experts=0)
    with pytest.raises(RecipeError, match=r"method.num_experts: expected a value <= 255, got 256"):
        method_config("mosa", num_experts=256)
    with pytest.raises(RecipeError, match=r"method.share: expected one of 'down', 'up', 'none', got 'a'"):
        method_config("mosa", share="a")
    with pytest.raises(RecipeError, match=r"method.share: expected one of 'a', 'b', 'none'"):
        method_config("mosa_lora", share="down")
    cfg = method_config("mosa")
    assert isinstance(cfg, MoSAConfig) and isinstance(method_config("mosa_lora"), MoSALoRAConfig)
    assert (cfg.style, cfg.bottleneck, cfg.scale, cfg.dropout, cfg.norm) == ("adaptformer", 16, 0.1, 0.1, True)


# ----------------------------------------------------------------------------------------------------------------
# training loss


def test_symmetric_kl_and_deepreg_match_their_formulas():
    z1, z2 = torch.randn(4, 6), torch.randn(4, 6)
    p1, p2 = z1.softmax(-1), z2.softmax(-1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1).mean()  # KL(p || q), batch mean
    torch.testing.assert_close(symmetric_kl(z1, z2), 0.5 * (kl(p2, p1) + kl(p1, p2)))
    z1.requires_grad_(True)
    symmetric_kl(z1, z2.detach()).backward()
    g = z1.grad.clone()  # only the KL(sg(p2) || p1) side reaches z1: the other side's target is detached
    z1.grad = None
    (0.5 * F.kl_div(F.log_softmax(z1, -1), p2, reduction="batchmean")).backward()
    torch.testing.assert_close(g, z1.grad)
    h = [torch.randn(4, 3, 5), torch.randn(4, 3, 5)]
    expected = 0.01 / 12 * sum(((x[:2] - x[2:]) ** 2).mean() for x in h)
    torch.testing.assert_close(deepreg_loss(h, 12), expected)


@pytest.mark.parametrize("deepreg", [False, True])
def test_training_loss_is_ce_plus_consistency_over_one_doubled_forward(deepreg, images):
    cfg = method_config("mosa", dropout=0.0, consistency_weight=0.7, deepreg=deepreg)
    model = injected("mosa", cfg)
    perturb(model)
    model.train()
    twin = copy.deepcopy(model)
    targets = torch.tensor([0, 1, 2])
    out = get_method("mosa").training_loss(model, cfg, Batch(images, targets), F.cross_entropy)
    loss, logits = out.total, out.logits
    assert set(out.terms) == ({"ce", "kl", "deepreg"} if deepreg else {"ce", "kl"})

    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in twin.blocks[:3]]  # first 3 of 6
    z1, z2 = twin(images), twin(images)
    for h in handles:
        h.remove()
    expected = F.cross_entropy(z1, targets) + 0.7 * symmetric_kl(z1, z2)
    if deepreg:
        expected = expected + 0.7 * 0.01 / 6 * sum(F.mse_loss(a, b) for a, b in zip(outs[:3], outs[3:], strict=True))
    torch.testing.assert_close(logits, z1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable)  # DDP needs no unused-parameter search


def test_training_loss_with_zero_weight_is_one_plain_pass(images):
    cfg = method_config("mosa", consistency_weight=0.0, dropout=0.0)
    model = injected("mosa", cfg)
    perturb(model)
    model.train()
    twin = copy.deepcopy(model)
    targets = torch.tensor([0, 1, 2])
    out = get_method("mosa").training_loss(model, cfg, Batch(images, targets), F.cross_entropy)
    loss, logits = out.total, out.logits
    assert set(out.terms) == {"ce"}
    z = twin(images)
    torch.testing.assert_close(logits, z)
    torch.testing.assert_close(loss, F.cross_entropy(z, targets))
    assert all(len(m.sampler.last_draw) == 1 for _, m in split_modules(model))


# ----------------------------------------------------------------------------------------------------------------
# recipes


def test_shipped_recipes_validate():
    vtab = load_recipe(RECIPES / "mosa_vtab.yaml")
    assert vtab.method_name == "mosa" and vtab.backbone.model == "vit_base_patch16_224.orig_in21k"
    m = vtab.method
    assert (m.bottleneck, m.num_experts, m.share, m.scale, m.dropout) == (16, 4, "down", 0.1, 0.1)
    assert m.consistency_weight == 1.0 and (m.style, m.norm, m.activation) == ("adaptformer", True, "gelu")
    t, d = vtab.train, vtab.data
    assert (t.lr, t.weight_decay, t.batch_size, t.epochs, t.warmup_epochs, t.seed) == (5e-3, 0.01, 128, 100, 10, 3407)
    assert (d.source, d.options.root, d.options.task, d.train_split, d.test_split) == (
        "vtab",
        "data/vtab-1k",
        "cifar",
        "trainval",
        "test",
    )
    assert (d.normalize, d.interpolation) == ("imagenet", "bilinear")
    fgvc = load_recipe(RECIPES / "mosa_fgvc.yaml")
    assert fgvc.method.bottleneck == 64 and fgvc.data.source == "folder"


@pytest.mark.parametrize("name", ["mosa", "mosa_lora"])
def test_split_lr_scale_scales_only_the_split_tensors(name):
    from conftest import tiny_recipe

    from adaptune.methods.mosa_split import SplitConv2d, SplitLinear
    from adaptune.train import _optimizer_and_schedule

    recipe = tiny_recipe(
        name, method={"split_lr_scale": 8.0}, train={"lr": 0.01, "warmup_epochs": 0, "schedule": "constant"}
    )
    model = tiny_backbone()
    spec = get_method(name)
    spec.inject(model, recipe.method)
    model.get_classifier().requires_grad_(True)
    scales = spec.lr_scales(model, recipe.method)
    split = {f"{p}.{n}" for p, m in model.named_modules() if isinstance(m, SplitLinear | SplitConv2d)
             for n, _ in m.named_parameters(recurse=False)}  # fmt: skip
    assert set(scales) == split and split and set(scales.values()) == {8.0}
    optimizer, scheduler = _optimizer_and_schedule(model, recipe, 10, 10, scales)
    scheduler.step_update(1)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lr_of) == trainable  # every trainable parameter once
    assert all(lr_of[n] == pytest.approx(0.08 if n in split else 0.01) for n in trainable)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # the logged lr is train.lr
    default = method_config(name)
    assert default.split_lr_scale == 1.0 and spec.lr_scales(model, default) == {}  # the paper's setting by default


def test_split_lr_scale_run_resumes_exactly(tmp_path):
    from conftest import interrupted_and_resumed, last_weights, tiny_recipe

    from adaptune.train import train

    recipe = tiny_recipe("mosa", train={"epochs": 2}, method={"split_lr_scale": 4.0})
    straight = train(recipe, out_dir=tmp_path / "a")
    resumed = interrupted_and_resumed(recipe, tmp_path / "b", at_step=3)
    a, b = last_weights(straight.run_dir), last_weights(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
