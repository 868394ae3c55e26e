"""ConvNeXt blocks (timm ``convnext.ConvNeXtBlock``): black boxes (``post`` / ``parallel`` placements only)."""

from __future__ import annotations

from adaptune.families.registry import BlockFamily, register


def _classes() -> tuple[type, ...]:
    from timm.models.convnext import ConvNeXtBlock

    return (ConvNeXtBlock,)


register(BlockFamily(name="convnext", summary="ConvNeXt blocks (timm ConvNeXtBlock), NCHW", classes=_classes))
