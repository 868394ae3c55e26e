"""The method registry: the only list of adapter methods.

A method is one module under ``adaptune/methods/`` that calls `register(MethodSpec(...))` once at import time. The
CLI's ``methods`` command, recipe validation, the README table and the conformance tests all iterate
`list_methods()`; nothing else enumerates methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from adaptune.errors import UnknownMethodError, did_you_mean

if TYPE_CHECKING:
    import torch
    from torch import nn


@runtime_checkable
class AdapterModule(Protocol):
    """A module a method created. Wrappers hold the wrapped timm module as ``.base``.

    The adapter's own state is the module's ``state_dict()`` minus everything under ``base.``; that is what
    checkpoints store, so buffers (MoSA's owner map) and extra state survive save and resume.
    """

    def adapter_param_names(self) -> tuple[str, ...]: ...


LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class MethodSpec:
    """Everything the engine and the shared tests know about one method.

    Attributes:
        name: Registry key, used as ``method.name`` in recipes.
        summary: One line for ``adaptune methods`` and the README table.
        config_cls: Frozen dataclass of the method's options; validated with the recipe.
        inject: ``inject(model, cfg) -> list[str]`` wraps or adds modules in place on an unmodified, frozen timm
            model and returns the module paths it touched. Afterwards exactly the method's parameters require grad
            (the engine makes the classifier head trainable itself).
        consolidate: ``consolidate(model)`` turns training-time structure into deploy structure in place (MoSA:
            average the split experts). ``None`` means identity.
        fold: ``fold(model)`` folds a linear method into the backbone's own weights in place, so the model's
            ``state_dict`` has exactly the plain timm keys. ``None`` where the math does not allow it.
        training_loss: ``training_loss(model, images, targets, loss_fn) -> (loss, logits)`` replaces the plain
            ``loss_fn(model(images), targets)`` (MoSA's two-pass consistency). ``None`` means the plain loss.
        identity_at_init: The untrained method leaves the backbone's outputs unchanged.
        merge_atol: Largest logit difference accepted between the unmerged and merged/folded model (fp32).
        find_unused_parameters: DDP must search for parameters that got no gradient in a step.
        trains_backbone: The method makes backbone weights trainable (``full``), so checkpoints hold them.
    """

    name: str
    summary: str
    config_cls: type
    inject: Callable[[nn.Module, Any], list[str]]
    consolidate: Callable[[nn.Module], None] | None = None
    fold: Callable[[nn.Module], None] | None = None
    training_loss: (
        Callable[[nn.Module, torch.Tensor, torch.Tensor, LossFn], tuple[torch.Tensor, torch.Tensor]] | None
    ) = None
    identity_at_init: bool = True
    merge_atol: float = 1e-5
    find_unused_parameters: bool = False
    trains_backbone: bool = False

    @property
    def foldable(self) -> bool:
        return self.fold is not None


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method; each name once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"adapter method {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; unknown names list the available ones."""
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}{did_you_mean(name, _REGISTRY)} (available: {', '.join(sorted(_REGISTRY))})"
        ) from None


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def _load_builtin_methods() -> None:
    import adaptune.methods  # noqa: F401  (each method module registers itself on import)
