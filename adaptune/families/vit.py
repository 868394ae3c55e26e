"""ViT / DeiT blocks (timm ``vision_transformer.Block`` and ``ResPostBlock``).

The branches mirror timm 1.0's forwards:

    Block:        x1 = x + drop_path1(ls1(attn(norm1(x))));  out = x1 + drop_path2(ls2(mlp(norm2(x1))))
    ResPostBlock: x1 = x + drop_path1(norm1(attn(x)));       out = x1 + drop_path2(norm2(mlp(x1)))
"""

from __future__ import annotations

from typing import Any

from adaptune.families.registry import BlockFamily, register


def _classes() -> tuple[type, ...]:
    from timm.models.vision_transformer import Block

    return (Block,)


def _post_classes() -> tuple[type, ...]:
    from timm.models.vision_transformer import ResPostBlock

    return (ResPostBlock,)


def _attn(b: Any, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return b.drop_path1(b.ls1(b.attn(b.norm1(x), *args, **kwargs)))


def _mlp_norm(b: Any, x: Any) -> Any:
    return b.norm2(x)


def _mlp_ffn(b: Any, u: Any) -> Any:
    return b.drop_path2(b.ls2(b.mlp(u)))


def _mlp(b: Any, x: Any) -> Any:
    return _mlp_ffn(b, _mlp_norm(b, x))


def _post_attn(b: Any, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return b.drop_path1(b.norm1(b.attn(x, *args, **kwargs)))


def _post_mlp(b: Any, x: Any) -> Any:
    return b.drop_path2(b.norm2(b.mlp(x)))


register(
    BlockFamily(
        name="vit",
        summary="ViT / DeiT / BEiT-style pre-norm transformer blocks (timm Block)",
        classes=_classes,
        attn=_attn,
        mlp=_mlp,
        mlp_norm=_mlp_norm,
        mlp_ffn=_mlp_ffn,
        norm2="norm2",
        tokens=True,
    )
)

register(
    BlockFamily(
        name="vit_respost",
        summary="post-norm ViT blocks (timm ResPostBlock)",
        classes=_post_classes,
        attn=_post_attn,
        mlp=_post_mlp,
        norm2="norm2",
        tokens=True,
    )
)
