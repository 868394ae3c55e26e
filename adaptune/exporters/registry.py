"""The export-format registry.

A format is one file under ``adaptune/exporters/`` that registers an `ExportFormat` (plus one import line in
``adaptune/exporters/__init__.py``). It supplies two functions: ``write`` the deploy model into a temporary path, and
``load`` that path back the way a user would read it. Everything else (output checks, the temporary name, the
comparison with the PyTorch model, the final rename) is `adaptune.export.export`, the one verified write path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from adaptune.errors import AdaptuneError, did_you_mean

if TYPE_CHECKING:
    import torch
    from torch import nn

    from adaptune.batch import InputSpec
    from adaptune.loading import Artifact
    from adaptune.methods.registry import MethodSpec


@dataclass
class ExportContext:
    """What a format's ``write`` and ``load`` get.

    Attributes:
        model: The model in deploy structure (folded where the format asks for it and the method allows), eval mode.
        form: ``folded`` or ``merged``.
        artifact: The source artifact (its recipe, manifest and unmerged model).
        method: The source's method.
        input: The model's `InputSpec`; ``input.example(n)`` builds inputs.
        trace_inputs: Inputs to trace with (batch 2; verification uses another batch size).
        manifest: The export manifest to store in the output's metadata.
    """

    model: nn.Module
    form: str
    artifact: Artifact
    method: MethodSpec
    input: InputSpec
    trace_inputs: torch.Tensor
    manifest: dict[str, Any]


Runner = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: Registry key, the value of ``--format``.
        summary: One line for ``--help`` and the docs.
        kind: ``file`` or ``dir``: what ``--out`` names.
        write: ``write(ctx, tmp)``: write the export to the temporary path ``tmp`` (a file path with ``suffix``, or an
            empty directory). Raise `ArtifactError` for a model the format cannot hold.
        load: ``load(ctx, tmp) -> (runner, verified_with)``: read the export back the way a user would; ``runner``
            maps inputs to logits, or is None when the reader is not installed (``verified_with`` then says why).
        suffix: File suffix of the temporary file (some readers need it: ``.pt2``).
        fold: Export the folded model where the method allows it (False: keep the adapter modules, e.g. PEFT).
        needs_fold: The format holds only plain timm weights: refuse methods that cannot be folded.
        atol: Absolute tolerance (scaled with the logits, as merge's) for this format's reader.
    """

    name: str
    summary: str
    kind: Literal["file", "dir"]
    write: Callable[[ExportContext, Path], None]
    load: Callable[[ExportContext, Path], tuple[Runner | None, str]]
    suffix: str = ""
    fold: bool = True
    needs_fold: bool = False
    atol: float = 1e-4


_REGISTRY: dict[str, ExportFormat] = {}


def register(fmt: ExportFormat) -> ExportFormat:
    """Add a format; each name once."""
    if fmt.name in _REGISTRY:
        raise ValueError(f"export format {fmt.name!r} registered twice")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ExportFormat:
    """Look a format up by name.

    Raises:
        AdaptuneError: Unknown name (exit 2), with the available formats.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AdaptuneError(
            f"--format: unknown format {name!r}{did_you_mean(name, _REGISTRY)}; use one of {', '.join(list_formats())}"
        ) from None


def list_formats() -> list[str]:
    return sorted(_REGISTRY)
