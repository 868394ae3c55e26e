"""Full fine-tuning: every backbone weight trains. The upper-cost baseline."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptune.methods.registry import MethodSpec, register


@dataclass(frozen=True)
class FullConfig:
    """No options: everything requires grad."""


def inject(model: nn.Module, cfg: FullConfig) -> list[str]:
    """Unfreeze the whole backbone."""
    model.requires_grad_(True)
    return [""]


register(
    MethodSpec(
        name="full",
        summary="full fine-tuning: every backbone parameter trains",
        config_cls=FullConfig,
        inject=inject,
        fold=lambda model: None,
        trains_backbone=True,
    )
)
