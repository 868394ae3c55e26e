"""The backbone-family registry: which timm block classes adaptune adapts, and where their branches are.

A family is one file under ``adaptune/families/`` that registers a `BlockFamily` (plus one import line in
``adaptune/families/__init__.py``). Methods ask this registry, never a list of their own:

- ``targets: auto`` wraps every module whose exact class some family lists (`auto_block_classes`);
- placements inside a block (AdaptFormer, Pfeiffer, Houlsby, Adapter-X's mixture beside the MLP) need the block's
  attention and MLP branches (`BlockFamily.attn`, `BlockFamily.mlp`, and for pre-norm blocks `BlockFamily.mlp_norm`
  and `BlockFamily.mlp_ffn`);
- any other placement (``post``, ``parallel``) treats a block as a black box and calls its own ``forward``.

Branch functions re-state one line of the timm block's ``forward`` each (timm has no public hook between the
residual adds); each family file quotes the ``forward`` it mirrors, and a shared test checks, for every family, that
the branches recombine to exactly the block's own output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# attn(block, x, args, kwargs) / mlp(block, x) -> the sub-block's output before its residual add
AttnBranch = Callable[[Any, Any, tuple[Any, ...], dict[str, Any]], Any]
MlpBranch = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class BlockFamily:
    """One kind of timm residual block.

    Attributes:
        name: Registry key (``vit``, ``swin``, ...).
        summary: What the family covers, for the docs.
        classes: Returns the timm block classes (imported lazily: importing timm takes seconds). Matched on the exact
            class: a subclass may override ``forward``, and the branches must reproduce it.
        attn: Attention branch ``x -> a`` with ``x1 = x + a``; None for blocks without sub-blocks (CNNs).
        mlp: MLP branch ``x1 -> m`` with ``out = x1 + m``.
        mlp_norm: Pre-norm blocks: the MLP's input ``u = norm2(x1)``.
        mlp_ffn: Pre-norm blocks: the MLP branch from its normed input, ``m = mlp_ffn(u)``.
        norm2: Attribute name of the norm before the MLP (methods that train it).
        tokens: The block's tensors are tokens ``(B, N, C)`` with the model's prefix tokens (CLS) first.
    """

    name: str
    summary: str
    classes: Callable[[], tuple[type, ...]]
    attn: AttnBranch | None = None
    mlp: MlpBranch | None = None
    mlp_norm: MlpBranch | None = None
    mlp_ffn: MlpBranch | None = None
    norm2: str | None = None
    tokens: bool = False

    @property
    def has_sub_blocks(self) -> bool:
        return self.attn is not None and self.mlp is not None

    @property
    def pre_norm(self) -> bool:
        return self.mlp_norm is not None and self.mlp_ffn is not None


_REGISTRY: dict[str, BlockFamily] = {}
_BY_CLASS: dict[type, BlockFamily] = {}  # filled on first lookup, cleared by `register`


def register(family: BlockFamily) -> BlockFamily:
    """Add a family; each name once."""
    if family.name in _REGISTRY:
        raise ValueError(f"backbone family {family.name!r} registered twice")
    _REGISTRY[family.name] = family
    _BY_CLASS.clear()
    return family


def list_families() -> list[BlockFamily]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def auto_block_classes() -> tuple[type, ...]:
    """Every block class of every family: what ``targets: auto`` wraps."""
    return tuple(cls for family in list_families() for cls in family.classes())


def family_of(module: Any) -> BlockFamily | None:
    """The family whose classes include ``type(module)`` exactly, or None."""
    if not _BY_CLASS:
        _BY_CLASS.update({cls: f for f in list_families() for cls in f.classes()})
    return _BY_CLASS.get(type(module))


def describe_classes() -> str:
    """``Block, ResPostBlock, ...``: the class names ``targets: auto`` knows, for messages."""
    return ", ".join(cls.__name__ for cls in auto_block_classes())
