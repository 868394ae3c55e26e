"""Norm tuning: train the affine scale and shift of the backbone's normalisation layers, everything else frozen.

ResAdapter's "ResENorm" (Cheng et al., AAAI 2025, https://arxiv.org/abs/2403.02084: unfreezing the GroupNorms of the
UNet's ResNet blocks gives resolution extrapolation), generalised to timm backbones (spec methods-others §2(b)):
BatchNorm, GroupNorm and LayerNorm affines. On a ViT it is "LN-tune".

    y = γ ⊙ (x − μ) / σ + β          only γ, β train; μ, σ: batch/token statistics (GN, LN) or running stats (BN)

The trained parameters are the backbone's own (declared through ``MethodSpec.trainable_backbone``): nothing is added,
so folding has nothing to do and the merged file is plain timm weights.

BatchNorm running statistics stay frozen: the engine keeps every BatchNorm in eval mode
(`adaptune.train.set_train_mode`), so the method is a pure change of γ and β, identical in training and inference,
and the untrained model is the backbone.

Deviation from ResAdapter: it trains only the ResNet blocks' GroupNorms (not the attention blocks' norms); here every
norm of the listed kinds trains, minus ``exclude``. Re-estimating BatchNorm statistics is not offered.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from adaptune.config import opt
from adaptune.errors import TargetError
from adaptune.methods.common import adapter_modules, match_targets
from adaptune.methods.registry import MethodSpec, register

NormKind = Literal["batch", "group", "layer"]
KINDS: dict[str, tuple[type, ...]] = {"batch": (_BatchNorm,), "group": (nn.GroupNorm,), "layer": (nn.LayerNorm,)}


@dataclass(frozen=True)
class NormTuningConfig:
    """Options of ``method: {name: norm_tuning}``."""

    norms: tuple[NormKind, ...] = opt(
        ("batch", "group", "layer"),
        "kinds of norm layers whose affine γ, β train: `batch` (BatchNorm, running stats frozen), `group`, `layer` "
        "(timm's LayerNorm2d included)",
    )
    exclude: tuple[str, ...] = opt((), "globs of norm module paths to keep frozen, e.g. `blocks.0.*`")

    def __post_init__(self) -> None:
        if not self.norms:
            raise ValueError("norms: empty; list at least one of batch, group, layer")
        for kind in self.norms:
            if self.norms.count(kind) > 1:
                raise ValueError(f"norms: {kind!r} is listed twice; list each kind at most once")


def _affine(module: nn.Module) -> bool:
    return getattr(module, "weight", None) is not None or getattr(module, "bias", None) is not None


def chosen_norms(model: nn.Module, cfg: NormTuningConfig) -> list[str]:
    """Paths of the norm layers the method trains, in model order.

    A norm is chosen if it is of a kind in ``cfg.norms``, has affine parameters, is neither in the head, inside
    another method's module nor matched by ``cfg.exclude``.
    """
    from adaptune.backbone import head_path

    kinds = tuple(k for kind in cfg.norms for k in KINDS[kind])
    head = head_path(model)
    owned = [n for n, _ in adapter_modules(model)]
    out = []
    for path, module in model.named_modules():
        if (
            path
            and isinstance(module, kinds)
            and _affine(module)
            and not (head and (path == head or path.startswith(head + ".")))
            and not any(path.startswith(o + ".") for o in owned)
            and not any(fnmatch.fnmatchcase(path, g) for g in cfg.exclude)
        ):
            out.append(path)
    return out


def check(model: nn.Module, cfg: NormTuningConfig) -> list[str]:
    """The norms `inject` would choose; changes nothing.

    Raises:
        TargetError: An exclude glob matches nothing, or no norm with affine parameters is left.
    """
    if cfg.exclude:
        match_targets(model, cfg.exclude)  # an exclude glob that matches nothing is a typo
    paths = chosen_norms(model, cfg)
    if not paths:
        raise TargetError(
            f"method.norms: {type(model).__name__} has no {'/'.join(cfg.norms)} norm layer with affine parameters "
            f"left after method.exclude {list(cfg.exclude)}; list other kinds in method.norms"
        )
    return paths


def inject(model: nn.Module, cfg: NormTuningConfig) -> list[str]:
    """Add nothing (`trainable_backbone` names the γ, β that train).

    Returns:
        The chosen norms' paths.

    Raises:
        TargetError: As `check`.
    """
    return check(model, cfg)


def trainable_backbone(model: nn.Module, cfg: NormTuningConfig) -> list[str]:
    """Names of the chosen norms' γ and β."""
    return [
        f"{path}.{name}"
        for path in chosen_norms(model, cfg)
        for name, _ in model.get_submodule(path).named_parameters(recurse=False)
    ]


def fold(model: nn.Module) -> None:
    """Nothing to do: the trained γ, β already sit in timm's own keys."""


register(
    MethodSpec(
        name="norm_tuning",
        summary="norm tuning: BatchNorm/GroupNorm/LayerNorm affines train (BN stats frozen); ResENorm / LN-tune",
        config_cls=NormTuningConfig,
        inject=inject,
        trainable_backbone=trainable_backbone,
        fold=fold,
        identity_at_init=True,
    )
)
