"""Adapter methods. Each module registers itself; adding a method is one file and one import line here.

Import the registry through this package (``from adaptune.methods import get_method``): that loads every built-in
method first.
"""

from adaptune.methods import (  # noqa: F401  (each module registers its methods on import)
    adapter,
    adapterx,
    bitfit,
    compacter,
    convpass,
    fact,
    full,
    linear,
    lora,
    mosa,
    norm_tuning,
    repadapter,
    resadapter,
    ssf,
    vpt,
)
from adaptune.methods.registry import MethodSpec, get_method, list_methods, owners_of, register, registered

__all__ = ["MethodSpec", "get_method", "list_methods", "owners_of", "register", "registered"]
