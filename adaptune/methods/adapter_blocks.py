"""Where block-level methods go: `targets: auto` (the registered backbone families' blocks), which placements a block
supports, and each target's channel count and tensor layout (found by one dummy forward).

Which classes are blocks and where their branches are lives in `adaptune.families`; this module only asks it. Kept apart
from `adaptune.methods.adapter` so other block-level methods (MoSA, Adapter-X) reuse it by calling it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptune.backbone import model_input
from adaptune.errors import TargetError
from adaptune.families import auto_block_classes, describe_classes, family_of
from adaptune.families.registry import AttnBranch, MlpBranch
from adaptune.methods.common import adapter_modules, match_targets

SUBBLOCK_STYLES = ("adaptformer", "pfeiffer", "houlsby")  # need the block's attention and MLP branches
ANY_BLOCK_STYLES = ("post", "parallel")  # work on any module whose output is one tensor
STYLES = (*SUBBLOCK_STYLES, *ANY_BLOCK_STYLES)


def sub_block_branches(module: nn.Module) -> tuple[AttnBranch, MlpBranch] | None:
    """(attention branch, MLP branch) of a block whose family has sub-blocks (`adaptune.families`), or None."""
    family = family_of(module)
    if family is None or not family.has_sub_blocks:
        return None
    return family.attn, family.mlp  # type: ignore[return-value]


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
        f"method.style: {style!r} cannot adapt {where}: it needs a transformer block with attention and MLP "
        f"branches (timm Block, ResPostBlock, SwinTransformerBlock); {where} supports style {supported}"
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
    paths = auto_block_paths(model) if auto else match_targets(model, targets)
    _check_overlap(model, paths)

    modules = {p: model.get_submodule(p) for p in paths}
    unsupported = [p for p in paths if style not in supported_styles(modules[p])]
    if unsupported and auto:
        p = unsupported[0]
        raise TargetError(
            f"method.style: {style!r} needs transformer blocks with attention and MLP branches, but "
            f"{type(model).__name__}'s blocks are {type(modules[p]).__name__} (e.g. {p}); set method.style: post or "
            "parallel"
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


def auto_block_paths(model: nn.Module) -> list[str]:
    """``targets: [auto]``: the paths of the model's residual blocks the families know (`adaptune.families`).

    Raises:
        TargetError: The model has none.
    """
    kinds = auto_block_classes()
    paths = [n for n, m in model.named_modules() if n and isinstance(m, kinds)]
    if not paths:
        raise TargetError(
            f"method.targets: 'auto' found no known residual block in {type(model).__name__} (known: "
            f"{describe_classes()}); list module globs instead, e.g. targets: ['blocks.*']"
        )
    return paths


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
            own = model_input(model)
            model(torch.zeros((1, own.channels, *own.size), device=device, dtype=dtype))
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
