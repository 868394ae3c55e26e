"""LoRA: low-rank updates of frozen Linear and Conv2d weights (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

```
x ──► base (frozen W) ─────────────────────────────┐
 └──► dropout ─► lora_a (A: in -> r) ─► lora_b (B: r -> out) ─► × α/r ─► + ──► y
```

    y = W x + (α/r) · B A x,   A kaiming-uniform (or gaussian), B = 0, so the untrained model is the backbone.

Because the update is linear, `fold` adds ``(α/r) · B A`` into ``W`` and the result has exactly timm's keys.

Fused qkv: timm ViTs compute q, k and v with one ``attn.qkv`` Linear(dim, 3 · dim). LoRA "on q and v" therefore puts
one independent (A, B) pair on each chosen slice and adds its update into that slice's output rows only (q rows
``[0:d]``, k rows ``[d:2d]``, v rows ``[2d:3d]``). Every wrapper keeps its pairs in ``pairs``, an ``nn.ModuleDict``
keyed by slice (``"q"``, ``"k"``, ``"v"``) or ``"all"`` for the whole output, each pair holding ``lora_a`` and
``lora_b`` modules (other methods, e.g. MoSA on LoRA, swap them for their own modules, which are then called).

Fast path (same math, fewer kernels): when the base and every ``lora_a``/``lora_b`` are plain, unhooked
``nn.Linear``, the wrapper computes their math itself:

    fp32/fp64, dropout inactive:  y = x W'ᵀ + b,   W' = W + s Σ_p E_p B_p A_p   (one matmul; E_p: rows of pair p)
    otherwise (dropout, bf16/fp16, autocast):  y = x Wᵀ + b, then s (d A_catᵀ) B_pᵀ added in place into p's rows
                                               (A_cat: every pair's A stacked, one (P·r, in) matmul; d = dropout(x))

with a hand-written backward (``dx = g W'``, ``dA_p = s B_pᵀ g_pᵀ d``, ``dB_p = s g_pᵀ (d A_pᵀ)``) that never forms
the frozen W's dense gradient and needs no split, cat or separate (N, out) update. Convs (plain ``nn.Conv2d`` or
timm ``Conv2dSame`` base and factors) use the merged form ``conv(x, W + s·B∘A)`` in fp32/fp64 without active
dropout. Everything else (replaced or hooked modules, other conv cases) takes the plain path that calls the modules.
Numerics: the merged form rounds ``x (W + sBA)ᵀ`` instead of ``x Wᵀ + s (x Aᵀ) Bᵀ``; in fp32 the two differ by float
rounding (~1e-6 relative), and half precision never merges (B·A would round at W's precision). Double backward
through the fast path is not supported (``once_differentiable``).

Deviations from the VTAB "LoRA" row (NOAH): NOAH adapts the fused qkv matrix as one (A ∈ R^{768×8}, B ∈ R^{8×2304})
with no α/r scaling. adaptune's default is separate q and v pairs with α = r (scale 1): the same 294,912 parameters
on ViT-B/16 at r = 8. ``qkv: []`` reproduces NOAH's single fused pair.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from adaptune.config import opt
from adaptune.errors import TargetError
from adaptune.methods.common import adapter_modules, match_targets, replace_module
from adaptune.methods.registry import MethodSpec, register

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class LoRAConfig:
    """Options of ``method: {name: lora}``."""

    rank: int = opt(8, "rank r of the update B·A", ge=1)
    alpha: float | None = opt(
        None, "α: the update is scaled by α/r; default (null): α = r, so the scale is 1 (NOAH's unscaled LoRA)", gt=0.0
    )
    dropout: float = opt(0.0, "dropout on the LoRA input (the base path never drops)", ge=0.0, lt=1.0)
    targets: tuple[str, ...] = opt(
        ("*.attn.qkv",),
        "globs over module paths of Linear or Conv2d layers to adapt, e.g. `blocks.*.attn.qkv`, `blocks.*.mlp.fc1`; "
        "for convs target pointwise or full convs (groups 1), e.g. `blocks.*.*.conv_pw` on EfficientNet. "
        "The classifier head is never a target",
    )
    qkv: tuple[Literal["q", "k", "v"], ...] = opt(
        ("q", "v"),
        "for a fused qkv Linear of a timm attention: the slices that get their own LoRA pair; "
        "[] adapts the fused matrix as one (NOAH). Other targets always adapt their whole output",
    )
    init: Literal["lora", "gaussian"] = opt(
        "lora", "A's init: `lora` kaiming-uniform(a=√5) as nn.Linear, `gaussian` normal(0, 1/r); B starts at zero"
    )
    exclude: tuple[str, ...] = opt((), "globs of module paths to leave out even if a target glob matches them")

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: empty; list at least one module glob, e.g. ['*.attn.qkv']")
        for s in QKV:
            if self.qkv.count(s) > 1:
                raise ValueError(f"qkv: {s!r} is listed twice; list each of q, k, v at most once")


# ----------------------------------------------------------------------------------------------------------------
# pure math


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense update of a Linear weight: ``scale · B A``.

    Args:
        a: A, ``(r, in)`` (``lora_a.weight``).
        b: B, ``(out, r)`` (``lora_b.weight``).
        scale: α/r.

    Returns:
        ``(out, in)``, to add to the base weight.
    """
    return scale * (b @ a)


def conv_lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense update of a Conv2d weight: a k×k conv to r channels followed by a 1×1 conv is one k×k conv.

    Args:
        a: A, ``(r, in, kh, kw)`` (``lora_a.weight``).
        b: B, ``(out, r, 1, 1)`` (``lora_b.weight``).
        scale: α/r.

    Returns:
        ``(out, in, kh, kw)``, to add to the base weight.
    """
    return scale * torch.einsum("or,rihw->oihw", b.flatten(1), a)


# ----------------------------------------------------------------------------------------------------------------
# modules


class LoRAPair(nn.Module):
    """One low-rank update: ``lora_b(lora_a(x))``. Both are submodules, always called as modules."""

    def __init__(self, lora_a: nn.Module, lora_b: nn.Module):
        super().__init__()
        self.lora_a = lora_a
        self.lora_b = lora_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_b(self.lora_a(x))


def _init_pair(pair: LoRAPair, init: str, rank: int) -> None:
    if init == "gaussian":
        nn.init.normal_(pair.lora_a.weight, std=1.0 / rank)
    else:
        nn.init.kaiming_uniform_(pair.lora_a.weight, a=math.sqrt(5))
    nn.init.zeros_(pair.lora_b.weight)


def _add_updates(wrapper: LoRALinear | LoRAConv2d, y: torch.Tensor, h: torch.Tensor, dim: int) -> torch.Tensor:
    """Add each pair's scaled update to its part of ``y`` along ``dim`` (the whole output, or the q/k/v slices)."""
    parts = list(y.split(wrapper.part_size, dim=dim))  # [whole] or [q, k, v]
    for key, pair in wrapper.pairs.items():
        i = QKV.index(key) if key in QKV else 0
        parts[i] = parts[i] + wrapper.scale * pair(h)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _folded(wrapper: LoRALinear | LoRAConv2d) -> nn.Module:
    """The base module with a new weight ``W + ΔW`` (computed in fp32 or wider, cast once); old tensors untouched."""
    base = wrapper.base
    weight = _wide(base.weight) + wrapper.delta_weight()
    base.weight = nn.Parameter(weight.to(base.weight.dtype), requires_grad=base.weight.requires_grad)
    return base


def _wide(t: torch.Tensor) -> torch.Tensor:
    """A detached copy in fp32, or fp64 if ``t`` already is: merge math never runs in half precision."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _own_param_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, _ in module.named_parameters() if not n.startswith("base."))


# ----------------------------------------------------------------------------------------------------------------
# fast path: the same update as calling the modules, in fewer kernels (used only when the modules are plain)

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")


def _plain(module: nn.Module, cls: type) -> bool:
    """``module`` is exactly ``cls``, unhooked and unpatched, so computing its math directly equals calling it."""
    return type(module) is cls and "forward" not in module.__dict__ and not any(getattr(module, h) for h in _HOOKS)


def _fast_factors(
    wrapper: LoRALinear | LoRAConv2d, a_cls: type, b_cls: type
) -> tuple[tuple[int, ...], list[torch.Tensor]] | None:
    """Row offsets and ``[A_0, B_0, A_1, B_1, ...]`` weights when every pair is plain bias-free modules, else None.

    None (call the modules) when a pair's modules were replaced (MoSA's split experts draw in forward), or any of
    the modules involved carries hooks, so every observable call still happens.
    """
    hooks = torch.nn.modules.module
    if any(getattr(hooks, h, None) for h in _GLOBAL_HOOKS):
        return None
    if not _plain(wrapper.base, type(wrapper.base)) or type(wrapper.lora_dropout) not in (nn.Identity, nn.Dropout):
        return None
    offsets, factors = [], []
    for key, pair in wrapper.pairs.items():
        a, b = pair.lora_a, pair.lora_b
        if not (_plain(pair, LoRAPair) and _plain(a, a_cls) and _plain(b, b_cls)) or (a.bias, b.bias) != (None, None):
            return None
        offsets.append(QKV.index(key) * wrapper.part_size if key in QKV else 0)
        factors += [a.weight, b.weight]
    return tuple(offsets), factors


def _drops(wrapper: LoRALinear | LoRAConv2d) -> bool:
    d = wrapper.lora_dropout
    return isinstance(d, nn.Dropout) and d.training and d.p > 0


def _merged_rows(
    weight: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], offsets: tuple[int, ...], scale: float
) -> torch.Tensor:
    """``W' = W + s Σ_p E_p B_p A_p``, a new tensor: pair p's ``(out_p, in)`` update added to its rows.

    The scale rides on B's matmul (``addmm(..., alpha=s)``); W itself is never modified.
    """
    if len(a) == 1 and b[0].shape[0] == weight.shape[0]:
        return torch.addmm(weight, b[0], a[0], alpha=scale)  # (out, in)
    merged = weight.clone()
    for o, ap, bp in zip(offsets, a, b, strict=True):
        merged[o : o + bp.shape[0]].addmm_(bp, ap, alpha=scale)
    return merged  # (out, in)


def _linear_forward(
    x: torch.Tensor,
    d: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    offsets: tuple[int, ...],
    merge: bool,
    factors: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`_LoRALinearFn`'s forward, also the no-grad path: ``y``, the weight used (W' or W), and ``A_cat dᵀ`` or None."""
    a, b = list(factors[0::2]), list(factors[1::2])
    if merge:
        w = _merged_rows(weight, a, b, offsets, scale)
        return F.linear(x, w, bias), w, None  # (..., out)
    y = F.linear(x, weight, bias)  # (..., out)
    src = (x if d is None else d).reshape(-1, x.shape[-1])  # (N, in)
    ht = torch.cat(a) @ src.t()  # (P·r, N): every pair's A in one matmul
    y2, r = y.view(-1, y.shape[-1]), a[0].shape[0]  # (N, out)
    for p, (o, bp) in enumerate(zip(offsets, b, strict=True)):
        y2[:, o : o + bp.shape[0]].addmm_(ht[p * r : (p + 1) * r].t(), bp.t(), alpha=scale)  # pair p's rows
    return y, weight, ht


class _LoRALinearFn(torch.autograd.Function):
    """``y = x Wᵀ + b + s Σ_p E_p (d A_pᵀ) B_pᵀ``, pair p writing output rows ``[o_p, o_p + out_p)``; d is x or
    dropout(x).

    ``merge`` (d is x): one matmul with ``W' = W + s Σ_p E_p B_p A_p``, so there is no (N, out) update to add, no
    split and no cat. Otherwise the base matmul, one stacked ``(P·r, in)`` A matmul and each B's product added in
    place into its rows of the base output. Backward never forms a dense (out, in) gradient for the frozen W:
    ``dx = g W'`` (merge: the LoRA path is inside W'), ``dA_p = s B_pᵀ g_pᵀ d``, ``dB_p = s g_pᵀ (d A_pᵀ)``, with the
    small operand on the left of every skinny matmul (measured 2-3x faster on CPU than the other orientation).
    """

    @staticmethod
    def forward(ctx, x, d, weight, bias, scale, offsets, merge, *factors):
        y, w, ht = _linear_forward(x, d, weight, bias, scale, offsets, merge, factors)
        ctx.save_for_backward(x, d, w, ht, *factors)
        ctx.scale, ctx.offsets, ctx.merge = scale, offsets, merge
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, d, w, ht, *factors = ctx.saved_tensors
        a, b, s, need = factors[0::2], factors[1::2], ctx.scale, ctx.needs_input_grad
        g, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, out), (N, in)
        src = x2 if d is None else d.reshape(-1, d.shape[-1])  # (N, in): the LoRA input
        acat, r = torch.cat(a), a[0].shape[0]  # (P·r, in)
        gp = [g[:, o : o + bp.shape[0]] for o, bp in zip(ctx.offsets, b, strict=True)]  # (N, out_p) views
        grads: list[torch.Tensor | None] = [None] * len(factors)
        if any(need[7:]) or need[1] or (need[0] and not ctx.merge):
            ut = torch.cat([bp.t() @ gq.t() for bp, gq in zip(b, gp, strict=True)]).mul_(s)  # (P·r, N) = s Bᵀ gᵀ
        if any(need[7:]):
            hs = (acat @ src.t() if ht is None else ht).mul(s)  # (P·r, N) = s A dᵀ
            grads[0::2] = list((ut @ src).split(r))  # (r, in) each
            grads[1::2] = [(hs[p * r : (p + 1) * r] @ gq).t() for p, gq in enumerate(gp)]  # (out_p, r) each
        gx = gd = gw = gbias = None
        if need[0]:
            gx = g @ w  # (N, in); with merge this includes the LoRA path
            if not ctx.merge and d is None:
                gx.addmm_(ut.t(), acat)
            gx = gx.view_as(x)
        if need[1]:
            gd = (ut.t() @ acat).view_as(d)  # (..., in)
        if need[2]:
            gw = g.t() @ x2  # (out, in), only when the base weight trains
        if need[3]:
            gbias = g.sum(0)
        return gx, gd, gw, gbias, None, None, None, *grads


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype for ``x``'s device when autocast is on there, else None."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _fast_linear(wrapper: LoRALinear, x: torch.Tensor, offsets: tuple[int, ...], factors: list[torch.Tensor]):
    """`LoRALinear`'s output through `_LoRALinearFn`, merged when fp32/fp64 with no dropout active."""
    base, dt = wrapper.base, _compute_dtype(x)
    d = wrapper.lora_dropout(x) if _drops(wrapper) else None  # (..., in)
    tensors = [x, d, base.weight, base.bias, *factors]
    if dt is not None:  # autocast: cast as it would for F.linear, then run with it off (the Function is explicit)
        tensors = [t if t is None else t.to(dt) for t in tensors]
        with torch.autocast(x.device.type, enabled=False):
            return _fused_linear_apply(tensors, wrapper.scale, offsets)
    return _fused_linear_apply(tensors, wrapper.scale, offsets)


def _fused_linear_apply(tensors: list, scale: float, offsets: tuple[int, ...]) -> torch.Tensor:
    x, d, weight, bias, *factors = tensors
    # merging rounds B·A at W's precision: only where that is as exact as the unmerged sum (fp32, fp64)
    merge = d is None and weight.dtype in (torch.float32, torch.float64)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _LoRALinearFn.apply(x, d, weight, bias, scale, offsets, merge, *factors)  # (..., out)
    return _linear_forward(x, d, weight, bias, scale, offsets, merge, factors)[0]  # no graph: plain ops (export)


def _merged_conv_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W' = W + s · B ∘ A`` (`conv_lora_delta`'s update, scale on B's matmul), ``(out, in, kh, kw)``, a new tensor."""
    return torch.addmm(weight.flatten(1), b.flatten(1), a.flatten(1), alpha=scale).view_as(weight)


class _LoRAConvFn(torch.autograd.Function):
    """``y = conv(x, W') + b`` with ``W' = W + s · B ∘ A`` (a k×k conv to r channels, then 1×1: one k×k conv).

    Backward as `_LoRALinearFn`: ``dx = convᵀ(g, W')``, ``dA = ∂conv(x, gh)`` with ``gh = s Bᵀ g`` per pixel,
    ``dB = s ∂conv1×1(A x, g)``; no dense gradient of the frozen W.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, geometry, a, b):
        w = _merged_conv_weight(weight, a, b, scale)
        ctx.save_for_backward(x, w, a, b)
        ctx.scale, ctx.geometry = scale, geometry
        return F.conv2d(x, w, bias, *geometry)  # (B, out, H', W')

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        from torch.nn.grad import conv2d_input, conv2d_weight

        x, w, a, b = ctx.saved_tensors
        geo, s, need = ctx.geometry, ctx.scale, ctx.needs_input_grad
        gx = conv2d_input(x.shape, w, g, *geo) if need[0] else None  # (B, in, H, W)
        gw = conv2d_weight(x, w.shape, g, *geo) if need[1] else None
        gbias = g.sum((0, 2, 3)) if need[2] else None
        ga = gb = None
        if need[5] or need[6]:
            gh = F.conv2d(g, b.flatten(1).t()[:, :, None, None].mul(s))  # (B, r, H', W') = s Bᵀ g
            ga = conv2d_weight(x, a.shape, gh, *geo)  # (r, in, kh, kw)
            gb = conv2d_weight(F.conv2d(x, a, None, *geo), b.shape, g).mul_(s)  # (out, r, 1, 1)
        return gx, gw, gbias, None, None, ga, gb


def _fast_conv(wrapper: LoRAConv2d, x: torch.Tensor) -> torch.Tensor | None:
    """`LoRAConv2d`'s output through `_LoRAConvFn`, or None where the merged form does not apply."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same

    base = wrapper.base
    if _drops(wrapper) or _compute_dtype(x) is not None or base.weight.dtype not in (torch.float32, torch.float64):
        return None
    if base.padding_mode != "zeros" or isinstance(base.padding, str) or base.groups != 1:
        return None
    found = _fast_factors(wrapper, type(base), nn.Conv2d)
    if found is None or type(base) not in (nn.Conv2d, Conv2dSame):
        return None
    if type(base) is Conv2dSame:
        x = pad_same(x, base.kernel_size, base.stride, base.dilation)  # (B, in, H+p, W+p): what conv2d_same pads
    a, b = found[1]
    geometry, tensors = (base.stride, base.padding, base.dilation), (x, base.weight, base.bias, a, b)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _LoRAConvFn.apply(x, base.weight, base.bias, wrapper.scale, geometry, a, b)  # (B, out, H', W')
    return F.conv2d(x, _merged_conv_weight(base.weight, a, b, wrapper.scale), base.bias, *geometry)


class LoRALinear(nn.Module):
    """``y = base(x) + (α/r) · B A dropout(x)``, per output part.

    Args:
        base: The frozen Linear.
        rank: r.
        alpha: α; ``None`` means α = r.
        dropout: Dropout probability on the LoRA input.
        slices: ``("all",)`` for the whole output, or a subset of ``("q", "k", "v")`` for a fused qkv Linear
            (``out_features`` divisible by 3), each slice getting its own pair.
        init: ``"lora"`` or ``"gaussian"`` (see `LoRAConfig.init`).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        slices: tuple[str, ...] = ("all",),
        init: str = "lora",
    ):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        fused = slices != ("all",)
        self.part_size = base.out_features // 3 if fused else base.out_features
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dd = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.pairs = nn.ModuleDict()
        for key in slices:
            pair = LoRAPair(
                nn.Linear(base.in_features, rank, bias=False, **dd), nn.Linear(rank, self.part_size, bias=False, **dd)
            )
            _init_pair(pair, init, rank)
            self.pairs[key] = pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        found = _fast_factors(self, nn.Linear, nn.Linear)
        if found is not None and type(self.base) is nn.Linear:
            return _fast_linear(self, x, *found)  # (..., out)
        y = self.base(x)  # (..., out)
        h = self.lora_dropout(x)  # (..., in)
        return _add_updates(self, y, h, dim=-1)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in fp32 (fp64 for an fp64 base), ``(out, in)``, from the pairs' current weights.

        Rows of slices without a pair (k by default) are zero.
        """
        w = self.base.weight
        delta = torch.zeros_like(_wide(w))
        for key, pair in self.pairs.items():
            start = QKV.index(key) * self.part_size if key in QKV else 0
            delta[start : start + self.part_size] += lora_delta(
                _wide(pair.lora_a.weight), _wide(pair.lora_b.weight), self.scale
            )
        return delta

    def adapter_param_names(self) -> tuple[str, ...]:
        return _own_param_names(self)


class LoRAConv2d(nn.Module):
    """``y = base(x) + (α/r) · B(A(dropout(x)))`` with A a conv like ``base`` to r channels and B a 1×1 conv.

    Args:
        base: The frozen Conv2d (groups 1; plain or timm's TF-"same" padding variant).
        rank: r.
        alpha: α; ``None`` means α = r.
        dropout: Dropout probability on the LoRA input.
        init: ``"lora"`` or ``"gaussian"`` (see `LoRAConfig.init`).
    """

    def __init__(
        self, base: nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0, init: str = "lora"
    ):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.part_size = base.out_channels
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dd = {"device": base.weight.device, "dtype": base.weight.dtype}
        # Same class, kernel, stride, padding and dilation as the base, so A sees exactly the base's windows.
        lora_a = type(base)(
            base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False, **dd
        )
        lora_a.padding_mode = base.padding_mode
        pair = LoRAPair(lora_a, nn.Conv2d(rank, base.out_channels, 1, bias=False, **dd))
        _init_pair(pair, init, rank)
        self.pairs = nn.ModuleDict({"all": pair})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = _fast_conv(self, x)
        if fast is not None:
            return fast  # (B, out, H', W')
        y = self.base(x)  # (B, out, H', W')
        h = self.lora_dropout(x)  # (B, in, H, W)
        return _add_updates(self, y, h, dim=1)  # (B, out, H', W')

    def delta_weight(self) -> torch.Tensor:
        """ΔW in fp32 (fp64 for an fp64 base), ``(out, in, kh, kw)``, from the pair's current weights."""
        pair = self.pairs["all"]
        return conv_lora_delta(_wide(pair.lora_a.weight), _wide(pair.lora_b.weight), self.scale)

    def adapter_param_names(self) -> tuple[str, ...]:
        return _own_param_names(self)


# ----------------------------------------------------------------------------------------------------------------
# method contract


def _is_fused_qkv(model: nn.Module, path: str, module: nn.Linear) -> bool:
    """A Linear named ``qkv`` inside a timm attention module (Attention, WindowAttention, ...), out = 3 · attn_dim."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return (
        child == "qkv"
        and module.out_features % 3 == 0
        and type(parent).__module__.startswith("timm.")
        and type(parent).__name__.endswith("Attention")
    )


def _check_conv(model: nn.Module, path: str, conv: nn.Conv2d) -> None:
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    if conv.groups != 1:
        pointwise = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size == (1, 1) and n != path
        ]
        parent = path.rpartition(".")[0]
        near = [n for n in pointwise if n.rpartition(".")[0] == parent] or pointwise
        hint = f" such as {near[0]!r}" if near else ""
        raise TargetError(
            f"method.targets: {path!r} is a grouped/depthwise Conv2d (groups={conv.groups}); LoRA needs groups=1: "
            f"target a pointwise conv{hint}, or leave it out with method.exclude"
        )
    if type(conv) not in (nn.Conv2d, Conv2dSame, Conv2dSameExport):  # others (StdConv2d) transform their weight
        raise TargetError(
            f"method.targets: {path!r} is a {type(conv).__name__}, not a plain Conv2d, so a LoRA update cannot be "
            f"folded into its weight; leave it out with method.exclude"
        )


def inject(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every Linear/Conv2d matching ``cfg.targets`` (minus ``cfg.exclude`` and the head) in a LoRA wrapper.

    Returns:
        The wrapped module paths, in model order.

    Raises:
        TargetError: A glob matches nothing (with close names), only the classifier head or excluded modules match,
            or a match is a grouped/depthwise or weight-standardized conv.
    """
    paths = match_targets(model, cfg.targets, kinds=(nn.Linear, nn.Conv2d))
    if cfg.exclude:
        match_targets(model, cfg.exclude)  # an exclude glob that matches nothing is a typo: say so
    get_classifier = getattr(model, "get_classifier", None)
    head_module = get_classifier() if callable(get_classifier) else None
    head = [n for n, m in model.named_modules() if m is head_module and n]

    def under(path: str, roots: list[str]) -> bool:
        return any(path == r or path.startswith(r + ".") for r in roots)

    # never wrap the insides of adapter modules already there (e.g. a second inject)
    paths = [p for p in paths if not under(p, [n for n, _ in adapter_modules(model)])]
    not_head = [p for p in paths if not under(p, head)]
    if paths and not not_head:
        raise TargetError(
            f"method.targets: {list(cfg.targets)} matched only the classifier head {head[0]!r}, which LoRA never "
            f"adapts (it trains in full); target backbone layers, e.g. ['*.attn.qkv']"
        )
    chosen = [p for p in not_head if not any(fnmatch.fnmatchcase(p, g) for g in cfg.exclude)]
    if not chosen:
        raise TargetError(
            f"method.targets: {list(cfg.targets)} leaves nothing to wrap after method.exclude {list(cfg.exclude)} "
            f"and existing adapters; widen the targets"
        )

    modules = {p: model.get_submodule(p) for p in chosen}
    for path, module in modules.items():  # check everything before changing the model
        if isinstance(module, nn.Conv2d):
            _check_conv(model, path, module)
    for path, module in modules.items():
        wrapper: nn.Module
        if isinstance(module, nn.Conv2d):
            wrapper = LoRAConv2d(module, cfg.rank, cfg.alpha, cfg.dropout, cfg.init)
        else:
            slices = cfg.qkv if cfg.qkv and _is_fused_qkv(model, path, module) else ("all",)
            wrapper = LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout, tuple(slices), cfg.init)
        wrapper.pairs.requires_grad_(True)
        replace_module(model, path, wrapper)
    return chosen


def fold(model: nn.Module) -> None:
    """Fold every LoRA wrapper into its base weight and put the plain base module back, in place.

    Afterwards ``model.state_dict()`` has exactly the plain timm keys. Each ΔW is computed in fp32 from the pairs'
    current ``lora_a.weight``/``lora_b.weight`` and added to a copy of the base weight (cast once to its dtype); no
    existing tensor is modified.
    """
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear | LoRAConv2d)]
    for path, wrapper in wrappers:
        replace_module(model, path, _folded(wrapper))


register(
    MethodSpec(
        name="lora",
        reported_vtab1k=(74.60, "V-PETL Bench / NOAH, fused-qkv r=8"),
        summary="LoRA: low-rank updates B·A of Linear/Conv2d weights (q/v slices of a fused qkv), foldable",
        config_cls=LoRAConfig,
        inject=inject,
        fold=fold,
        identity_at_init=True,
        merge_atol=1e-5,
    )
)
