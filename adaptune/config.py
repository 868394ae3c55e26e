"""Building blocks of every config dataclass: recipe sections, method options, data-source options.

A leaf module (it imports nothing from adaptune), so methods and data sources can declare their options without
importing the recipe loader that validates them.

- `opt` declares a field with its help text and range checks (``ge``, ``gt``, ``le``, ``lt``), which the recipe
  validator and the README's recipe reference read from ``metadata``.
- `with_defaults` derives a config that differs from another only in some defaults, saying only what differs::

      AdapterPlusConfig = with_defaults(AdapterConfig, "AdapterPlusConfig", scale="channel", init="houlsby")

- `plain` turns a config (nested dataclasses, tuples) into plain YAML/JSON data.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import field
from typing import Any


def opt(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None, **checks: float) -> Any:
    """A dataclass field with a help string and optional range checks (ge, gt, le, lt)."""
    meta = {"help": help, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def internal(default: Any = None) -> Any:
    """A field the engine fills in, never read from a recipe (e.g. ``data.options``: the chosen source's section)."""
    return field(default=default, metadata={"internal": True, "help": ""})


def is_internal(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("internal"))


def with_defaults(base: type, name: str, doc: str | None = None, **defaults: Any) -> type:
    """A frozen subclass of dataclass ``base`` whose fields in ``defaults`` get new defaults (help and checks kept).

    Args:
        base: The config dataclass to derive from.
        name: The new class's name.
        doc: Its docstring (default: says which defaults differ).
        **defaults: ``field=new_default`` pairs; each must be a field of ``base``.

    Raises:
        TypeError: A name in ``defaults`` is not a field of ``base``.
    """
    own = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(defaults) - set(own))
    if unknown:
        raise TypeError(f"with_defaults({base.__name__}): {', '.join(unknown)} are not fields of {base.__name__}")
    hints = typing.get_type_hints(base)  # resolved types: the new class lives in the caller's module
    fields = [(key, hints[key], field(default=value, metadata=own[key].metadata)) for key, value in defaults.items()]
    derived = dataclasses.make_dataclass(name, fields, bases=(base,), frozen=True)
    derived.__doc__ = doc or f"{base.__name__} with other defaults: " + ", ".join(
        f"{k}={v!r}" for k, v in defaults.items()
    )
    derived.__module__ = sys._getframe(1).f_globals.get("__name__", base.__module__)  # the caller's module
    return derived


def plain(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) from a config: what YAML and JSON hold. Internal fields are left out."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not is_internal(f)}
    if isinstance(obj, tuple | list):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    return obj
