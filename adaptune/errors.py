"""Errors a user can act on.

Every `AdaptuneError` carries a one-line message that says where (file:line, key, module path), what went wrong and
how to fix it. The CLI prints it as ``adaptune: error: <message>`` and exits with ``exit_code`` (2 for bad input,
1 for runtime failures); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AdaptuneError(Exception):
    """Base class: a problem the user can fix, reported in one line."""

    exit_code = 2


class RecipeError(AdaptuneError):
    """One or more problems in a recipe or in ``--set`` overrides; ``problems`` holds each line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class UnknownMethodError(AdaptuneError):
    """A method name that is not in the registry."""


class TargetError(AdaptuneError):
    """A target glob that matches no module of the backbone."""


class BackboneError(AdaptuneError):
    """An unknown timm model name or weights that cannot be loaded."""


class DataError(AdaptuneError):
    """Missing or malformed data."""


class ArtifactError(AdaptuneError):
    """A run directory, checkpoint or merged file that cannot be used."""


class DivergenceError(AdaptuneError):
    """A non-finite loss or gradient stopped training."""

    exit_code = 1


class ParityError(AdaptuneError):
    """A merged or exported model does not reproduce the original within tolerance."""

    exit_code = 1


def did_you_mean(name: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.5) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choices, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=cutoff)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
