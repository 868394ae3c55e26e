"""ResAdapter for timm backbones: conv-LoRA on the down-sampling convolutions plus norm tuning (Cheng et al.,
"ResAdapter: Domain Consistent Resolution Adapter for Diffusion Models", AAAI 2025, https://arxiv.org/abs/2403.02084;
released weights bytedance/res-adapter, spec methods-others §2 and §12).

ResAdapter = ResCLoRA (LoRA on the 3×3 conv of every UNet down/up-sampler: ``lora_down`` a k×k conv C_in -> r,
``lora_up`` a 1×1 conv r -> C_out, r = 16, α = 8) + ResENorm (the ResNet blocks' GroupNorm affines train). A timm
classifier has no up-samplers, so here (spec §2(b)):

    conv (stride > 1, groups 1):  y = W * x + (α/r) · B * (A * x)       A: same kernel/stride as W, to r; B: 1×1
    norms (BN / GN / LN):         γ, β train (`adaptune.methods.norm_tuning`: BatchNorm statistics stay frozen)

``targets: auto`` picks the down-sampling full convs: every Conv2d with groups 1 and stride > 1 (the stem, ResNet's
stride-2 3×3 and its 1×1 shortcut projections, ConvNeXt's down-sampling layers, a ViT's patch embedding). Where the
down-sampling conv is depthwise (EfficientNet, MobileNet: a stride-2 ``conv_dw``, groups = channels, which LoRA cannot
factor), the full convs of that same block (its pointwise expansion ``conv_pw`` and projection ``conv_pwl``) stand in
for it. On tf_efficientnet_lite0 that is ``conv_stem`` and the pointwise convs of blocks 1.0, 2.0, 3.0 and 5.0.

Both parts are linear in the trained parameters' effect on the weights, so `fold` writes plain timm weights (LoRA's
ΔW into each conv, the norms as they are). The untrained model is the backbone (B = 0, norms unchanged).

Deviations: ResAdapter's LoRA also adapts up-samplers and its norms are only the ResNet blocks' GroupNorms; the
"resolution" behaviour (ResAdapter's point) is measured here on a classifier (``benchmarks/resolution_transfer.py``),
not on a diffusion model. ResAdapter trains on many resolutions at once; adaptune trains at one size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

import adaptune.methods.lora as lora
import adaptune.methods.norm_tuning as norm_tuning
from adaptune.config import opt
from adaptune.errors import TargetError
from adaptune.methods.common import adapter_modules
from adaptune.methods.norm_tuning import NormKind, NormTuningConfig
from adaptune.methods.registry import MethodSpec, register


@dataclass(frozen=True)
class ResAdapterConfig:
    """Options of ``method: {name: resadapter}``. Defaults from the released ResAdapter weights: r = 16, α = 8."""

    rank: int = opt(16, "LoRA rank r of each adapted conv", ge=1)
    alpha: float | None = opt(
        8.0, "α: the LoRA update is scaled by α/r (ResAdapter: 8 / 16 = 0.5); null: α = r", gt=0.0
    )
    dropout: float = opt(0.0, "dropout on the LoRA input", ge=0.0, lt=1.0)
    init: Literal["lora", "gaussian"] = opt("lora", "A's init (as `lora`); B starts at zero")
    targets: tuple[str, ...] = opt(
        ("auto",),
        "`auto`: the down-sampling full convs (groups 1, stride > 1; for a depthwise down-sampling conv, the full "
        "convs of its block); or globs over Conv2d paths, e.g. `layer*.0.conv2`",
    )
    exclude: tuple[str, ...] = opt((), "globs of conv paths to leave without LoRA")
    norms: tuple[NormKind, ...] = opt(
        ("batch", "group", "layer"), "norm kinds whose affine γ, β train (as `norm_tuning`); BatchNorm stats frozen"
    )
    norm_exclude: tuple[str, ...] = opt((), "globs of norm paths to keep frozen")

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: empty; use ['auto'] or list conv globs")
        if "auto" in self.targets and len(self.targets) > 1:
            raise ValueError(f"targets: 'auto' cannot be combined with globs, got {list(self.targets)}; use one")


def _foldable_conv(module: nn.Module) -> bool:
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    return type(module) in (nn.Conv2d, Conv2dSame, Conv2dSameExport) and module.groups == 1


def downsampling_convs(model: nn.Module) -> list[str]:
    """Paths of the down-sampling full convs (``targets: auto``), in model order.

    Every plain Conv2d with groups 1 and a stride > 1, plus, for each grouped conv with a stride > 1, the plain
    groups-1 convs that are direct children of the same parent (the block's pointwise convs). The classifier head,
    weight-transforming convs (StdConv2d) and convs inside other methods' modules are skipped.
    """
    from adaptune.backbone import head_path

    head = head_path(model)
    owned = [n for n, _ in adapter_modules(model)]
    convs = {n: m for n, m in model.named_modules() if n and isinstance(m, nn.Conv2d)}
    chosen = {n for n, m in convs.items() if max(m.stride) > 1 and _foldable_conv(m)}
    for name, m in convs.items():
        if max(m.stride) > 1 and m.groups > 1:
            parent = name.rpartition(".")[0]
            chosen |= {n for n, c in convs.items() if n.rpartition(".")[0] == parent and _foldable_conv(c)}
    return [
        n
        for n in convs
        if n in chosen
        and not (head and (n == head or n.startswith(head + ".")))
        and not any(n == o or n.startswith(o + ".") for o in owned)
    ]


def _norm_cfg(cfg: ResAdapterConfig) -> NormTuningConfig:
    return NormTuningConfig(norms=cfg.norms, exclude=cfg.norm_exclude)


def inject(model: nn.Module, cfg: ResAdapterConfig) -> list[str]:
    """Conv-LoRA (`adaptune.methods.lora.inject`) on the targets, then norm tuning (`norm_tuning.inject`).

    Returns:
        The LoRA-wrapped conv paths, then the tuned norms' paths.

    Raises:
        TargetError: ``auto`` finds no down-sampling full conv; as `lora.inject` and `norm_tuning.inject`.
    """
    if tuple(cfg.targets) == ("auto",):
        targets = tuple(downsampling_convs(model))
        if not targets:
            raise TargetError(
                f"method.targets: 'auto' found no down-sampling conv with groups 1 in {type(model).__name__}; list "
                "Conv2d globs in method.targets, or use norm_tuning alone"
            )
    else:
        targets = tuple(cfg.targets)
    norm_tuning.check(model, _norm_cfg(cfg))  # fail before LoRA changes the model
    lora_cfg = lora.LoRAConfig(
        rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=targets, qkv=(), init=cfg.init, exclude=cfg.exclude
    )
    convs = lora.inject(model, lora_cfg)
    return convs + norm_tuning.inject(model, _norm_cfg(cfg))


def trainable_backbone(model: nn.Module, cfg: ResAdapterConfig) -> list[str]:
    """The tuned norms' γ and β (the LoRA factors are the method's own modules)."""
    return norm_tuning.trainable_backbone(model, _norm_cfg(cfg))


def fold(model: nn.Module) -> None:
    """Fold LoRA into the conv weights and put the BatchNorms back: plain timm keys."""
    lora.fold(model)
    norm_tuning.fold(model)


register(
    MethodSpec(
        name="resadapter",
        summary="ResAdapter-style: conv-LoRA (r 16, α 8) on down-sampling convs + norm affines; foldable",
        config_cls=ResAdapterConfig,
        inject=inject,
        trainable_backbone=trainable_backbone,
        fold=fold,
        identity_at_init=True,
    )
)
