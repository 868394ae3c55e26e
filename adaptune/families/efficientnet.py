"""EfficientNet / MobileNet blocks (timm ``_efficientnet_blocks``): black boxes (``post`` / ``parallel`` only)."""

from __future__ import annotations

from adaptune.families.registry import BlockFamily, register


def _classes() -> tuple[type, ...]:
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual

    return (InvertedResidual, DepthwiseSeparableConv, EdgeResidual)


register(
    BlockFamily(
        name="efficientnet",
        summary="EfficientNet / MobileNet blocks (InvertedResidual, DepthwiseSeparableConv, EdgeResidual), NCHW",
        classes=_classes,
    )
)
