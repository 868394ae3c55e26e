"""Linear probe: only the classifier head trains. The baseline every PEFT table starts from."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaptune.methods.registry import MethodSpec, register


@dataclass(frozen=True)
class LinearConfig:
    """No options: the backbone stays frozen and the engine trains the head."""


def inject(model: nn.Module, cfg: LinearConfig) -> list[str]:
    """Add nothing; the head is made trainable by the engine."""
    return []


register(
    MethodSpec(
        name="linear",
        reported_vtab1k=(57.64, "V-PETL Bench"),
        summary="linear probe: train the classifier head only",
        config_cls=LinearConfig,
        inject=inject,
        fold=lambda model: None,  # nothing to fold: the model already has the plain timm keys
    )
)
