"""adaptune: parameter-efficient fine-tuning of timm backbones from YAML recipes.

The public API mirrors the CLI; torch and timm are imported only when a function that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

# public name -> (module, attribute); resolved lazily so `import adaptune` stays cheap
_API = {
    "load_recipe": ("adaptune.recipe", "load_recipe"),
    "list_methods": ("adaptune.methods.registry", "list_methods"),
    "train": ("adaptune.train", "train"),
    "evaluate": ("adaptune.evaluate", "evaluate_artifact"),
    "merge": ("adaptune.merge", "merge"),
    "export": ("adaptune.export", "export"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'adaptune' has no attribute {name!r}")
