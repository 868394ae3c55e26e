"""Full fine-tuning: every backbone weight trains. The upper-cost baseline."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptune.methods.registry import MethodSpec, register


@dataclass(frozen=True)
class FullConfig:
    """No options: everything requires grad."""


def inject(model: nn.Module, cfg: FullConfig) -> list[str]:
    """Add nothing; `trainable_backbone` names every parameter."""
    return [""]


def trainable_backbone(model: nn.Module, cfg: FullConfig) -> list[str]:
    """Every parameter of the backbone."""
    return [name for name, _ in model.named_parameters()]


register(
    MethodSpec(
        name="full",
        reported_vtab1k=(68.97, "V-PETL Bench"),
        summary="full fine-tuning: every backbone parameter trains",
        config_cls=FullConfig,
        inject=inject,
        trainable_backbone=trainable_backbone,
        fold=lambda model: None,
    )
)
