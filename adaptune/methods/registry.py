"""The method registry: the only list of adapter methods.

A method is one module under ``adaptune/methods/`` that calls `register(MethodSpec(...))` once at import time, plus
one import line in ``adaptune/methods/__init__.py``. The CLI's ``methods`` command, recipe validation, the README table
and the conformance tests all iterate `list_methods()` (import it from ``adaptune.methods``, which loads every
built-in method); nothing else enumerates methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from adaptune.errors import UnknownMethodError, did_you_mean

if TYPE_CHECKING:
    import torch
    from torch import nn

    from adaptune.batch import Batch, Loss


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
            model and returns the module paths it touched. Afterwards exactly the method's own modules require grad;
            the engine then makes the head and `trainable_backbone` trainable.
        trainable_backbone: ``trainable_backbone(model, cfg) -> list[str]``: names (in the injected model) of backbone
            parameters the method trains: BitFit's biases, Adapter-X's per-block norms and CLS token, everything for
            ``full``. Checkpoints store them; ``None`` means none.
        consolidate: ``consolidate(model)`` turns training-time structure into deploy structure in place (MoSA:
            average the split experts). ``None`` means identity.
        fold: ``fold(model)`` folds a linear method into the backbone's own weights in place, so the model's
            ``state_dict`` has exactly the plain timm keys. ``None`` where the math does not allow it.
        forward: ``forward(model, cfg, batch) -> logits`` for methods whose forward needs more than ``batch.inputs``
            (task ids). Used by training and evaluation; ``None`` means ``model(batch.inputs)``.
        training_loss: ``training_loss(model, cfg, batch, loss_fn) -> Loss`` replaces the plain cross-entropy step
            (MoSA's two-pass consistency, a mixture's load-balancing term); every term in ``Loss.terms`` is logged by
            name. ``None`` means ``Loss(ce, logits, {"ce": ce})``.
        diagnostics: ``diagnostics(model, cfg)`` returns a context manager that yields a dict, filled when the context
            exits with what the method observed during the forwards inside it (Adapter-X: expert use per block).
            Evaluation runs inside it; the dict goes into ``metrics.jsonl`` and ``adaptune eval``'s report, and each
            string in its ``"warnings"`` list is logged. ``None``: nothing to report.
        lr_scales: ``lr_scales(model, cfg) -> {parameter name: factor}``: learning-rate multipliers for some of the
            trainable parameters (timm's ``lr_scale`` param-group key, applied by the schedule at every step), e.g.
            MoSA's ``split_lr_scale``. ``None`` or an empty dict: every parameter at ``train.lr``.
        identity_at_init: The untrained method leaves the backbone's outputs unchanged.
        merge_atol: Largest logit difference accepted between the unmerged and merged/folded model (fp32).
        find_unused_parameters: DDP must search for parameters that got no gradient in a step.
        reported_vtab1k: ``(mean top-1, source)`` the method's authors or a benchmark report on VTAB-1k with ViT-B/16
            IN-21k (e.g. ``(72.25, "V-PETL Bench, mean of 19 tasks")``), for the README table; None if none.
    """

    name: str
    summary: str
    config_cls: type
    inject: Callable[[nn.Module, Any], list[str]]
    trainable_backbone: Callable[[nn.Module, Any], list[str]] | None = None
    consolidate: Callable[[nn.Module], None] | None = None
    fold: Callable[[nn.Module], None] | None = None
    forward: Callable[[nn.Module, Any, Batch], torch.Tensor] | None = None
    training_loss: Callable[[nn.Module, Any, Batch, LossFn], Loss] | None = None
    diagnostics: Callable[[nn.Module, Any], AbstractContextManager[dict[str, Any]]] | None = None
    lr_scales: Callable[[nn.Module, Any], dict[str, float]] | None = None
    identity_at_init: bool = True
    merge_atol: float = 1e-5
    find_unused_parameters: bool = False
    reported_vtab1k: tuple[float, str] | None = None

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


@contextmanager
def registered(spec: MethodSpec) -> Iterator[MethodSpec]:
    """Register ``spec`` for the duration of a ``with`` block (test-only methods)."""
    register(spec)
    try:
        yield spec
    finally:
        _REGISTRY.pop(spec.name, None)


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; unknown names list the available ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}{did_you_mean(name, _REGISTRY)} (available: {', '.join(sorted(_REGISTRY))})"
        ) from None


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_REGISTRY)


def owners_of(option: str) -> list[str]:
    """Registered methods whose config has a field ``option`` (for "unknown key" messages)."""
    import dataclasses

    return [n for n, s in sorted(_REGISTRY.items()) if option in {f.name for f in dataclasses.fields(s.config_cls)}]
