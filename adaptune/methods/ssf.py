"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022, https://arxiv.org/abs/2210.08823).

A learned per-channel scale γ and shift β after chosen layers of the frozen backbone:

    SSF(y) = γ ⊙ y + β        γ ~ N(1, σ²), β ~ N(0, σ²), σ = 0.02, per output channel (dim 1 of NCHW tensors)

Where (``targets: auto``): after every Linear and Conv2d that has a bias and every norm layer with an affine weight and
bias (LayerNorm, GroupNorm, BatchNorm and timm's variants of them), except the classifier head. On a timm ViT this is
exactly the reference's list (spec methods-others §7.6): ``patch_embed.proj``, per block ``norm1``, ``attn.qkv``,
``attn.proj``, ``norm2``, ``mlp.fc1`` (before GELU), ``mlp.fc2``, and the final ``norm``: 205,824 parameters on
ViT-B/16. On CNNs (ResNet, EfficientNet, ConvNeXt) convs usually have no bias and auto puts SSF after each norm.

```
Linear / Conv2d / norm:   x ──► base ──► γ ⊙ · + β ──► y          (γ, β over the channel dim: last, or 1 for NCHW)
timm norm + act layer:    x ──► normalise, affine ──► drop ──► γ ⊙ · + β ──► act ──► y      (wraps its ``drop``)
```

Every target gets an `SSF` wrapper around the module whose output it scales. Channel dim: last for Linear and
LayerNorm on tokens, 1 for Conv2d, BatchNorm, GroupNorm and timm's channels-first LayerNorms (class names with
``2d``: ``LayerNorm2d``). timm's fused norm + activation layers (``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct``
...) compute ``act(drop(norm(x)))``: SSF wraps their ``drop`` (Identity without dropout), so it sits between the norm
and its activation, where it can still be folded.

Folding (``fold``): the operation is linear, so it goes into the layer it follows and the result has exactly timm's
keys: after a Linear or conv ``W' = diag(γ) W, b' = γ ⊙ b + β``; after a norm's affine ``w' = γ ⊙ w, b' = γ ⊙ b + β``.
A layer without a bias (or a norm without an affine) cannot absorb β, so it is not a target (auto skips it; a glob
naming it is an error).

Deviations from the reference code (dongzelian/SSF ``models/vision_transformer.py``):
- Targets are module globs; the reference edits each model class. Same list on ViTs.
- CNN placements (after norms, between a fused norm and its activation) are adaptune's; the reference's models are
  ViT, Swin and ConvNeXt. With dropout inside a fused norm-act layer, SSF comes after the dropout (same at eval).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from adaptune.config import opt
from adaptune.errors import TargetError
from adaptune.methods.common import adapter_modules, match_targets, replace_module
from adaptune.methods.registry import MethodSpec, register


@dataclass(frozen=True)
class SSFConfig:
    """Options of ``method: {name: ssf}``. Defaults: the reference's placement and init (dongzelian/SSF)."""

    targets: tuple[str, ...] = opt(
        ("auto",),
        "`auto`: after every Linear/Conv2d with a bias and every affine norm layer except the head (on ViTs the SSF "
        "paper's list); or globs over module paths of such layers, e.g. `blocks.*.attn.qkv`, `blocks.*.norm1`",
    )
    exclude: tuple[str, ...] = opt((), "globs of module paths to leave out even if a target matches them")
    init_std: float = opt(0.02, "σ of the init: γ ~ N(1, σ²), β ~ N(0, σ²); 0 starts at the identity", ge=0.0)

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: empty; use ['auto'] or list module globs, e.g. ['blocks.*.norm1']")
        if "auto" in self.targets and len(self.targets) > 1:
            raise ValueError(f"targets: 'auto' cannot be combined with globs, got {list(self.targets)}; use one")


# ----------------------------------------------------------------------------------------------------------------
# pure math


def fold_into_layer(
    weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSF after a layer ``y = W x + b`` as that layer's own weights.

    Args:
        weight: ``(C, ...)``: a Linear's ``(C, in)``, a conv's ``(C, in / groups, kh, kw)`` or a norm's affine ``(C,)``.
        bias: ``(C,)``.
        gamma: γ, ``(C,)``.
        beta: β, ``(C,)``.

    Returns:
        ``(diag(γ) W, γ ⊙ b + β)``, shapes as ``weight`` and ``bias``.
    """
    scale = gamma.reshape(-1, *([1] * (weight.dim() - 1)))  # (C, 1, ...)
    return weight * scale, gamma * bias + beta


def _wide(t: torch.Tensor) -> torch.Tensor:
    """A detached copy in fp32 (fp64 if ``t`` already is): fold math never runs in half precision."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


# ----------------------------------------------------------------------------------------------------------------
# modules


class SSF(nn.Module):
    """``γ ⊙ base(x) + β`` over one channel dim.

    Args:
        base: The frozen module whose output is scaled (a Linear, Conv2d or norm layer, or a fused norm's ``drop``).
        channels: C.
        channel_dim: ``-1`` (channels last) or ``1`` (NCHW).
        init_std: σ of the init.
        like: A tensor whose device and dtype γ and β take (the layer's weight).
    """

    def __init__(self, base: nn.Module, channels: int, channel_dim: int, init_std: float, like: torch.Tensor):
        super().__init__()
        self.base = base
        self.channel_dim = channel_dim
        self.gamma = nn.Parameter(torch.empty(channels, device=like.device, dtype=like.dtype))
        self.beta = nn.Parameter(torch.empty(channels, device=like.device, dtype=like.dtype))
        nn.init.normal_(self.gamma, mean=1.0, std=init_std)
        nn.init.normal_(self.beta, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)  # (..., C) or (B, C, H, W)
        if self.channel_dim == 1:
            shape = (-1,) + (1,) * (y.dim() - 2)
            return y * self.gamma.view(shape) + self.beta.view(shape)  # (B, C, H, W)
        return y * self.gamma + self.beta  # (..., C)

    def adapter_param_names(self) -> tuple[str, ...]:
        return ("gamma", "beta")

    def extra_repr(self) -> str:
        return f"channels={self.gamma.shape[0]}, channel_dim={self.channel_dim}"


def fold_into(layer: nn.Module, wrapper: SSF) -> None:
    """Replace ``layer``'s weight and bias with the folded ones (new tensors in the layer's dtype, math in fp32)."""
    weight, bias = fold_into_layer(_wide(layer.weight), _wide(layer.bias), _wide(wrapper.gamma), _wide(wrapper.beta))
    layer.weight = nn.Parameter(weight.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias.to(layer.bias.dtype), requires_grad=layer.bias.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# targets


NORMS = (nn.LayerNorm, nn.GroupNorm, _BatchNorm)


def _plain_conv(module: nn.Module) -> bool:
    """A conv whose weight is used as is (not weight-standardised like timm's StdConv2d, which would undo γ)."""
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    return type(module) in (nn.Conv2d, Conv2dSame, Conv2dSameExport)


def _kind(module: nn.Module) -> str | None:
    """``"output"`` (Linear/conv), ``"norm"``, or None where SSF cannot go; the reason goes in `_unfit`."""
    if type(module) is nn.Linear or _plain_conv(module):
        return "output"
    if isinstance(module, NORMS):
        return "norm"
    return None


def _fused(norm: nn.Module) -> bool:
    """A timm norm + activation layer: ``act(drop(norm(x)))`` with ``drop`` and ``act`` submodules."""
    return isinstance(getattr(norm, "drop", None), nn.Module) and isinstance(getattr(norm, "act", None), nn.Module)


def placement(module: nn.Module) -> tuple[str, int, int]:
    """Where SSF goes for a target layer: (relative path of the module to wrap, channels, channel dim).

    ``""`` wraps the layer itself; ``"drop"`` wraps a fused norm's dropout, before its activation. Channels sit last
    for Linear and token LayerNorms, at dim 1 for convs, BatchNorm, GroupNorm and timm's ``*2d`` LayerNorms.
    """
    if isinstance(module, nn.Linear):
        return "", module.out_features, -1
    if isinstance(module, nn.Conv2d):
        return "", module.out_channels, 1
    last = isinstance(module, nn.LayerNorm) and "2d" not in type(module).__name__.lower()
    return ("drop" if _fused(module) else ""), module.weight.shape[0], -1 if last else 1


def _unfit(module: nn.Module) -> str | None:
    """Why a Linear/conv/norm cannot take a foldable SSF, or None if it can."""
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    if _kind(module) == "norm":
        if weight is None or bias is None or weight.dim() != 1:
            return "has no per-channel affine weight and bias to fold γ and β into"
        return None
    if _kind(module) is None:
        return f"is a {type(module).__name__}, not a Linear, plain Conv2d or norm layer"
    return None if bias is not None else "has no bias to fold the shift β into; target the norm after it"


def _called(model: nn.Module, paths: list[str]) -> set[str]:
    """The modules of ``paths`` that one forward of a zero batch calls (some layers are only read for their weights,
    e.g. ``nn.MultiheadAttention.out_proj``). Modes are restored afterwards."""
    from adaptune.backbone import model_input

    seen: set[str] = set()

    def hook(path: str) -> Callable[..., None]:
        return lambda module, args, output: seen.add(path)

    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    modes = [(m, m.training) for m in model.modules()]
    param = next(p for p in model.parameters() if p.is_floating_point())
    try:
        model.eval()
        with torch.no_grad():
            own = model_input(model)
            model(torch.zeros((1, own.channels, *own.size), device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return seen


def resolve_targets(model: nn.Module, cfg: SSFConfig) -> list[str]:
    """The layers SSF follows, in model order (see `SSFConfig.targets`).

    Raises:
        TargetError: A glob matches no Linear/Conv2d/norm layer, or matches one that cannot fold γ and β (no bias, no
            affine, weight-standardised conv) or that the forward never calls; nothing left after ``exclude``.
    """
    from adaptune.backbone import head_path

    auto = tuple(cfg.targets) == ("auto",)
    kinds = (nn.Linear, nn.Conv2d, *NORMS)
    paths = [n for n, m in model.named_modules() if n and isinstance(m, kinds)] if auto else []
    if not auto:
        paths = match_targets(model, cfg.targets, kinds=kinds)
    if cfg.exclude:
        match_targets(model, cfg.exclude)  # an exclude glob that matches nothing is a typo: say so
    head = head_path(model)
    owners = [name for name, _ in adapter_modules(model)]

    def under(path: str, roots: list[str]) -> bool:
        return any(path == r or path.startswith(r + ".") for r in roots if r)

    paths = [p for p in paths if not under(p, [head, *owners])]
    paths = [p for p in paths if not any(fnmatch.fnmatchcase(p, g) for g in cfg.exclude)]
    if auto:
        paths = [p for p in paths if _unfit(model.get_submodule(p)) is None]
    for p in paths:
        reason = _unfit(model.get_submodule(p))
        if reason is not None:
            raise TargetError(f"method.targets: {p} {reason}; leave it out with method.exclude")
    called = _called(model, paths) if paths else set()
    if not auto:
        missed = [p for p in paths if p not in called]
        if missed:
            raise TargetError(f"method.targets: {missed[0]} is never called in a forward pass; target another layer")
    paths = [p for p in paths if p in called]
    if not paths:
        raise TargetError(
            f"method.targets: {list(cfg.targets)} leaves no layer for SSF in {type(model).__name__} (after the head, "
            f"method.exclude and existing adapters); SSF needs Linear/Conv2d layers with a bias or affine norm layers"
        )
    return paths


# ----------------------------------------------------------------------------------------------------------------
# method contract


def inject(model: nn.Module, cfg: SSFConfig) -> list[str]:
    """Wrap every target (or a fused norm's ``drop``) in an `SSF`; γ and β require grad.

    Returns:
        The wrapped module paths, in model order.

    Raises:
        TargetError: As `resolve_targets`.
    """
    wrapped = []
    for path in resolve_targets(model, cfg):
        layer = model.get_submodule(path)
        child, channels, dim = placement(layer)
        where = f"{path}.{child}" if child else path
        base = model.get_submodule(where)
        wrapper = SSF(base, channels, dim, cfg.init_std, like=layer.weight)
        wrapper.gamma.requires_grad_(True)  # not requires_grad_ on the wrapper: that would unfreeze the base
        wrapper.beta.requires_grad_(True)
        wrapper.training = base.training
        replace_module(model, where, wrapper)
        wrapped.append(where)
    return wrapped


def fold(model: nn.Module) -> None:
    """Fold every SSF wrapper into the layer it follows (a fused norm's, for a wrapped ``drop``) and put the wrapped
    module back, in place: the model's ``state_dict`` then has exactly the plain timm keys. The math runs in fp32 and
    is cast once; no existing tensor is changed."""
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, SSF)]
    for path, wrapper in wrappers:
        own = isinstance(getattr(wrapper.base, "weight", None), torch.Tensor)
        layer = wrapper.base if own else model.get_submodule(path.rpartition(".")[0])
        fold_into(layer, wrapper)
        replace_module(model, path, wrapper.base)


register(
    MethodSpec(
        name="ssf",
        reported_vtab1k=(75.69, "V-PETL Bench, SSF"),
        summary="SSF: per-channel scale and shift after linear layers and norms; folds into plain timm weights",
        config_cls=SSFConfig,
        inject=inject,
        fold=fold,
        identity_at_init=False,
    )
)
