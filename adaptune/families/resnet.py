"""ResNet blocks (timm ``resnet.Bottleneck`` and ``BasicBlock``): black boxes (``post`` / ``parallel`` only)."""

from __future__ import annotations

from adaptune.families.registry import BlockFamily, register


def _classes() -> tuple[type, ...]:
    from timm.models.resnet import BasicBlock, Bottleneck

    return (Bottleneck, BasicBlock)


register(BlockFamily(name="resnet", summary="ResNet blocks (Bottleneck, BasicBlock), NCHW", classes=_classes))
