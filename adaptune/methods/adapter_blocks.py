"""What `adapter` needs to know about timm blocks: which ones `targets: auto` picks, how a transformer block splits into
its attention and MLP sub-blocks, and each target's channel count and tensor layout (found by one dummy forward).

Kept apart from `adaptune.methods.adapter` so other bottleneck-style methods (MoSA) reuse it by calling it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptune.errors import TargetError
from adaptune.methods.common import adapter_modules, match_targets

SUBBLOCK_STYLES = ("adaptformer", "pfeiffer", "houlsby")  # need norm1/attn/norm2/mlp
ANY_BLOCK_STYLES = ("post", "parallel")  # work on any module whose output is one tensor
STYLES = (*SUBBLOCK_STYLES, *ANY_BLOCK_STYLES)

# attn(block, x, args, kwargs) / mlp(block, x) -> the sub-block's output before its residual add
AttnBranch = Callable[[Any, torch.Tensor, tuple[Any, ...], dict[str, Any]], torch.Tensor]
MlpBranch = Callable[[Any, torch.Tensor], torch.Tensor]


@functools.cache
def auto_block_classes() -> tuple[type, ...]:
    """The repeated residual blocks `targets: auto` adapts: timm's ViT/DeiT, Swin, ConvNeXt, EfficientNet, ResNet."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual
    from timm.models.convnext import ConvNeXtBlock
    from timm.models.resnet import BasicBlock, Bottleneck
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import Block, ResPostBlock

    return (
        Block,
        ResPostBlock,
        SwinTransformerBlock,
        ConvNeXtBlock,
        InvertedResidual,
        DepthwiseSeparableConv,
        EdgeResidual,
        Bottleneck,
        BasicBlock,
    )


# Sub-block branches, written against each class's own forward (timm 1.0):
#   Block:                x1 = x + drop_path1(ls1(attn(norm1(x))));  out = x1 + drop_path2(ls2(mlp(norm2(x1))))
#   ResPostBlock:         x1 = x + drop_path1(norm1(attn(x)));       out = x1 + drop_path2(norm2(mlp(x1)))
#   SwinTransformerBlock: x1 = x + drop_path1(_attn(norm1(x)));      out = x1 + drop_path2(mlp(norm2(x1)))
# (Swin's forward flattens (B, H, W, C) to (B, H*W, C) around the MLP; the MLP is per token, so this is the same.)


def _vit_attn(b: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return b.drop_path1(b.ls1(b.attn(b.norm1(x), *args, **kwargs)))


def _vit_mlp(b: Any, x: torch.Tensor) -> torch.Tensor:
    return b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def _respost_attn(b: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return b.drop_path1(b.norm1(b.attn(x, *args, **kwargs)))


def _respost_mlp(b: Any, x: torch.Tensor) -> torch.Tensor:
    return b.drop_path2(b.norm2(b.mlp(x)))


def _swin_attn(b: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return b.drop_path1(b._attn(b.norm1(x)))


def _swin_mlp(b: Any, x: torch.Tensor) -> torch.Tensor:
    return b.drop_path2(b.mlp(b.norm2(x)))


@functools.cache
def _branch_table() -> dict[type, tuple[AttnBranch, MlpBranch]]:
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import Block, ResPostBlock

    return {
        Block: (_vit_attn, _vit_mlp),
        ResPostBlock: (_respost_attn, _respost_mlp),
        SwinTransformerBlock: (_swin_attn, _swin_mlp),
    }


def sub_block_branches(module: nn.Module) -> tuple[AttnBranch, MlpBranch] | None:
    """(attention branch, MLP branch) of a supported transformer block, or None.

    Matched on the exact class: a subclass may override ``forward``, and the branches must reproduce it.
    """
    return _branch_table().get(type(module))


def supported_styles(module: nn.Module) -> tuple[str, ...]:
    """The placements `adapter` can use on ``module``."""
    return STYLES if sub_block_branches(module) is not None else ANY_BLOCK_STYLES


def check_style(path: str, module: nn.Module, style: str) -> None:
    """Raise `TargetError` naming the module, its class and what it supports when ``style`` cannot adapt it."""
    if style in supported_styles(module):
        return
    where = f"{path} ({type(module).__name__})" if path else type(module).__name__
    supported = " or ".join(supported_styles(module))
    raise TargetError(
        f"method.style: {style!r} cannot adapt {where}: it needs a transformer block with norm1/attn/norm2/mlp "
        f"(timm Block, ResPostBlock, SwinTransformerBlock); {where} supports style {supported}"
    )


# ----------------------------------------------------------------------------------------------------------------
# targets and their shapes


@dataclass(frozen=True)
class Target:
    """One module to wrap: its path, channel count and whether channels sit at dim 1 (NCHW) instead of last."""

    path: str
    channels: int
    channels_first: bool


def resolve_targets(model: nn.Module, targets: Sequence[str], style: str) -> list[Target]:
    """Turn ``method.targets`` into the modules to wrap, with channel count and layout, checked against ``style``.

    ``("auto",)`` picks the model's repeated residual blocks by class (`auto_block_classes`); for ``parallel`` it skips
    blocks whose output shape differs from their input (stride 2 or a channel change). Explicit globs go through
    `match_targets`, and such a block is an error for ``parallel``.

    Raises:
        TargetError: Nothing to adapt, an unsupported style, overlapping or already adapted targets, a target the
            forward pass never calls or whose output is not one tensor of rank 2 to 4.
    """
    auto = tuple(targets) == ("auto",)
    if auto:
        kinds = auto_block_classes()
        paths = [n for n, m in model.named_modules() if n and isinstance(m, kinds)]
        if not paths:
            raise TargetError(
                f"method.targets: 'auto' found no known residual block in {type(model).__name__} (known: "
                f"{', '.join(k.__name__ for k in kinds)}); list module globs instead, e.g. targets: ['blocks.*']"
            )
    else:
        paths = match_targets(model, targets)
    _check_overlap(model, paths)

    modules = {p: model.get_submodule(p) for p in paths}
    unsupported = [p for p in paths if style not in supported_styles(modules[p])]
    if unsupported and auto:
        p = unsupported[0]
        raise TargetError(
            f"method.style: {style!r} needs transformer blocks with norm1/attn/norm2/mlp, but {type(model).__name__}'s "
            f"blocks are {type(modules[p]).__name__} (e.g. {p}); set method.style: post or parallel"
        )
    for p in unsupported:
        check_style(p, modules[p], style)

    shapes = probe_shapes(model, paths)
    out: list[Target] = []
    for p in paths:
        shape_in, shape_out = shapes[p]
        if style == "parallel" and shape_in != shape_out:
            if auto:
                continue
            raise TargetError(
                f"method.style: 'parallel' adds A(input) to {p} ({type(modules[p]).__name__})'s output, but it maps "
                f"{_fmt(shape_in)} to {_fmt(shape_out)}; use style: post, or target blocks that keep their shape"
            )
        channels, channels_first = channel_layout(p, shape_out, model)
        out.append(Target(p, channels, channels_first))
    if not out:
        raise TargetError(
            f"method.targets: 'auto' found no block of {type(model).__name__} that keeps its input shape, which "
            "style 'parallel' needs; use style: post"
        )
    return out


def _check_overlap(model: nn.Module, paths: list[str]) -> None:
    owners = [name for name, _ in adapter_modules(model)]
    for p in paths:
        owner = next((o for o in owners if p == o or p.startswith(o + ".")), None)
        if owner is not None:
            raise TargetError(f"method.targets: {p} is already part of the adapter module {owner!r}; inject once")
        parent = next((q for q in paths if p.startswith(q + ".")), None)
        if parent is not None:
            raise TargetError(f"method.targets: {p} lies inside another target, {parent}; make the globs disjoint")


def _fmt(shape: tuple[int, ...] | None) -> str:
    return "(" + ", ".join(map(str, shape)) + ")" if shape is not None else "a non-tensor"


def channel_layout(path: str, shape: tuple[int, ...], model: nn.Module) -> tuple[int, bool]:
    """(channels, channels_first) of a target's output.

    Rank 2 and 3 (``(B, C)``, ViT tokens ``(B, N, C)``) are channels-last. Rank 4 is NCHW unless the model declares
    channels-last features (timm sets ``output_fmt = 'NHWC'`` on Swin and its kin, whose blocks take ``(B, H, W, C)``).
    """
    fmt = getattr(model, "output_fmt", "NCHW")
    if len(shape) == 4 and getattr(fmt, "value", fmt) != "NHWC":
        return shape[1], True
    if len(shape) in (2, 3, 4):
        return shape[-1], False
    raise TargetError(f"method.targets: {path} outputs a rank-{len(shape)} tensor {_fmt(shape)}; target rank 2-4")


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model takes: the patch embedding's fixed size (ViT, Swin), else ``pretrained_cfg['input_size']``.

    ``img_size=`` changes the patch embedding but not ``pretrained_cfg``, so the patch embedding comes first.
    """
    cfg_size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = first_conv.in_channels if first_conv is not None else int(cfg_size[0])
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        return chans, int(h), int(w)
    return chans, int(cfg_size[1]), int(cfg_size[2])


def probe_shapes(model: nn.Module, paths: Sequence[str]) -> dict[str, tuple[tuple[int, ...] | None, tuple[int, ...]]]:
    """(input shape, output shape) of each module in ``paths`` from one forward of a zero batch of 1.

    Runs under ``torch.no_grad`` in eval mode and restores every module's own mode afterwards (frozen BatchNorm may be
    in eval inside a model in train mode). The input shape is None when the first argument is not a tensor.

    Raises:
        TargetError: A target is never called, or returns something other than one tensor.
    """
    seen: dict[str, tuple[tuple[int, ...] | None, Any]] = {}

    def hook(path: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if path not in seen:
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                seen[path] = (tuple(first.shape) if first is not None else None, output)

        return record

    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    modes = [(m, m.training) for m in model.modules()]
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_size(model)), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training

    shapes: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...]]] = {}
    for p in paths:
        if p not in seen:
            raise TargetError(f"method.targets: {p} is never called in a forward pass of {type(model).__name__}")
        shape_in, output = seen[p]
        if not isinstance(output, torch.Tensor):
            raise TargetError(
                f"method.targets: {p} ({type(model.get_submodule(p)).__name__}) returns {type(output).__name__}, "
                "not one tensor; target a module that returns a tensor"
            )
        shapes[p] = (shape_in, tuple(output.shape))
    return shapes
