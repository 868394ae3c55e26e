"""Adapter methods. Each module registers itself; adding a method is one file and one import line here."""

from adaptune.methods import full, linear  # noqa: F401
from adaptune.methods import lora  # noqa: F401
from adaptune.methods import adapter  # noqa: F401
from adaptune.methods import mosa  # noqa: F401
