"""Helpers every method uses: target globs, module replacement, and finding what a method created."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence

from torch import nn

from adaptune.errors import TargetError, did_you_mean


def match_targets(model: nn.Module, globs: Sequence[str], kinds: tuple[type, ...] | None = None) -> list[str]:
    """Module paths of ``model`` matching any of ``globs`` (fnmatch over ``named_modules()``), in model order.

    Args:
        model: The backbone.
        globs: Patterns such as ``"blocks.*.attn.qkv"``.
        kinds: If given, only modules of these types match.

    Raises:
        TargetError: A glob matches no module; the message names the closest real module paths.
    """
    names = [n for n, m in model.named_modules() if n and (kinds is None or isinstance(m, kinds))]
    matched: list[str] = []
    for pattern in globs:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            what = " or ".join(k.__name__ for k in kinds) if kinds else "module"
            closest = did_you_mean(pattern, names, n=3, cutoff=0.3) or f"; e.g. {', '.join(names[:3])}"
            raise TargetError(f"method.targets: {pattern!r} matched no {what} of {type(model).__name__}{closest}")
        matched.extend(h for h in hits if h not in matched)
    order = {n: i for i, n in enumerate(names)}
    return sorted(matched, key=order.__getitem__)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where ``path`` is, e.g. ``replace_module(model, "blocks.0.attn.qkv", wrapper)``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules created by a method: those with ``adapter_param_names`` (the `AdapterModule` protocol).

    Nested adapter modules (a wrapper's inner parts) are not repeated: only the outermost is yielded.
    """
    seen: list[str] = []
    for name, module in model.named_modules():
        if callable(getattr(module, "adapter_param_names", None)):
            if any(name.startswith(s + ".") for s in seen):
                continue
            seen.append(name)
            yield name, module


def own_state_keys(module: nn.Module) -> list[str]:
    """Keys of ``module.state_dict()`` that belong to the adapter itself, not to the wrapped ``base``."""
    return [k for k in module.state_dict() if not k.startswith("base.")]


# ----------------------------------------------------------------------------------------------------------------
# modules shared by several wrappers

SHARED_ATTR = "adaptune_shared"


class SharedModules(nn.ModuleDict):
    """Modules that several wrappers use (Adapter-X's expert pool, FacT's factors), held once at the model's root.

    A method puts each shared module here with `share`; its wrappers keep a plain reference (`SharedRef`), not a
    registered child, so ``state_dict()``, checkpoints and merged files hold each shared tensor exactly once (under
    ``adaptune_shared.<name>.``), DDP sees each parameter once, and ``model.to()`` moves it with the model.
    """

    def adapter_param_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.named_parameters())


def share(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Register ``module`` once at the root of ``model`` as ``adaptune_shared.<name>``; return it."""
    container = getattr(model, SHARED_ATTR, None)
    if container is None:
        container = SharedModules()
        model.add_module(SHARED_ATTR, container)
    if name in container:
        raise ValueError(f"shared module {name!r} is already registered; inject once")
    container[name] = module
    return module


class SharedRef:
    """A reference to a shared module that does not register it as a child: ``self.pool = SharedRef(pool)``, then
    ``self.pool()`` returns the module. Deep copies keep the sharing (``copy.deepcopy`` memoises the module)."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self) -> nn.Module:
        return self.module
