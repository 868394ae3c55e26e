"""``--format exported-program``: a ``torch.export`` archive (``.pt2``) with a dynamic batch dimension, the manifest as
the extra file ``adaptune.json``, read back with ``torch.export.load``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from adaptune.exporters.registry import ExportContext, ExportFormat, Runner, register


def write(ctx: ExportContext, tmp: Path) -> None:
    import torch
    from torch.export import Dim

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(
            ctx.model, (ctx.trace_inputs,), dynamic_shapes=({0: Dim("batch", min=1, max=1 << 16)},)
        )
    torch.export.save(program, str(tmp), extra_files={"adaptune.json": json.dumps(ctx.manifest)})


def load(ctx: ExportContext, tmp: Path) -> tuple[Runner, str]:
    import torch

    module = torch.export.load(str(tmp)).module()

    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # an exported program's module has no eval(); it was exported in eval mode
            return module(inputs).float()

    return run, f"torch.export.load (torch {torch.__version__})"


register(
    ExportFormat(
        name="exported-program",
        summary="a torch.export archive (.pt2), dynamic batch dimension (every method)",
        kind="file",
        write=write,
        load=load,
        suffix=".pt2",  # torch.export.load wants the .pt2 suffix
    )
)
