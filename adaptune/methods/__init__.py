"""Adapter methods. Each module registers itself; adding a method is one file and one import line here."""

from adaptune.methods import (  # noqa: F401
    adapter,
    full,
    linear,
    lora,
    mosa,
)
