"""Backbone families. Each module registers itself; adding a family is one file and one import line here."""

from adaptune.families import convnext, efficientnet, resnet, swin, vit  # noqa: F401
from adaptune.families.registry import (
    BlockFamily,
    auto_block_classes,
    describe_classes,
    family_of,
    list_families,
    register,
)

__all__ = ["BlockFamily", "auto_block_classes", "describe_classes", "family_of", "list_families", "register"]
