"""adaptune: parameter-efficient fine-tuning of timm backbones from YAML recipes.

The public API mirrors the CLI; torch and timm are imported only when a function that needs them is called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0.dev0"

__all__ = ["__version__", "load_recipe", "train", "evaluate", "merge", "export", "list_methods"]


def __getattr__(name: str) -> Any:
    # Lazy public API: `import adaptune` stays cheap, `adaptune.train` pulls in torch when first touched.
    if name == "load_recipe":
        from adaptune.recipe import load_recipe

        return load_recipe
    if name == "list_methods":
        from adaptune.methods.registry import list_methods

        return list_methods
    if name == "train":
        from adaptune.train import train

        return train
    if name == "evaluate":
        from adaptune.evaluate import evaluate_artifact

        return evaluate_artifact
    if name == "merge":
        from adaptune.merge import merge

        return merge
    if name == "export":
        from adaptune.export import export

        return export
    raise AttributeError(f"module 'adaptune' has no attribute {name!r}")
