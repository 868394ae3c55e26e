"""Swin Transformer blocks (timm ``swin_transformer.SwinTransformerBlock``), tensors ``(B, H, W, C)``.

Mirrors timm 1.0's forward:

    x1 = x + drop_path1(_attn(norm1(x)));  out = x1 + drop_path2(mlp(norm2(x1)))

(timm flattens ``(B, H, W, C)`` to ``(B, H*W, C)`` around the MLP; the MLP acts per token, so this is the same.)
"""

from __future__ import annotations

from typing import Any

from adaptune.families.registry import BlockFamily, register


def _classes() -> tuple[type, ...]:
    from timm.models.swin_transformer import SwinTransformerBlock

    return (SwinTransformerBlock,)


def _attn(b: Any, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return b.drop_path1(b._attn(b.norm1(x)))


def _mlp_norm(b: Any, x: Any) -> Any:
    return b.norm2(x)


def _mlp_ffn(b: Any, u: Any) -> Any:
    return b.drop_path2(b.mlp(u))


def _mlp(b: Any, x: Any) -> Any:
    return _mlp_ffn(b, _mlp_norm(b, x))


register(
    BlockFamily(
        name="swin",
        summary="Swin Transformer blocks (timm SwinTransformerBlock), tensors (B, H, W, C)",
        classes=_classes,
        attn=_attn,
        mlp=_mlp,
        mlp_norm=_mlp_norm,
        mlp_ffn=_mlp_ffn,
        norm2="norm2",
    )
)
