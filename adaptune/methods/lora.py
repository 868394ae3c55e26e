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
``lora_b`` modules that are always *called* (other methods, e.g. MoSA on LoRA, swap them for their own modules).

Deviations from the VTAB "LoRA" row (NOAH): NOAH adapts the fused qkv matrix as one (A ∈ R^{768×8}, B ∈ R^{8×2304})
with no α/r scaling. adaptune's default is separate q and v pairs with α = r (scale 1): the same 294,912 parameters
on ViT-B/16 at r = 8. ``qkv: []`` reproduces NOAH's single fused pair.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

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
