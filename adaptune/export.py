"""Export a run or a merged file for deployment, each format verified against PyTorch before it is kept.

| format             | writes                                                          | methods                   |
|--------------------|-----------------------------------------------------------------|---------------------------|
| `timm`             | ``config.json`` + ``model.safetensors`` in timm's own layout    | foldable (LoRA, linear)   |
| `onnx`             | one ``.onnx`` file, dynamic batch dimension                     | every method              |
| `exported-program` | a ``torch.export`` archive (``.pt2``), dynamic batch dimension  | every method              |
| `peft`             | PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``  | LoRA on whole modules     |

The formats are registered in `adaptune.exporters`; this module is their one write path: check the output, write to a
temporary name beside it, read it back the way a user would and run it on fixed seeded inputs (built from the model's
`InputSpec`, of a batch size other than the one traced), compare with the unmerged model, and only then rename it
into place. Above the tolerance nothing is kept (`ParityError`).

The tolerance is ``max(spec.merge_atol, format.atol) · max(1, max |logit|)``: onnxruntime and exported programs use
their own kernels and fusions, so their sums differ from eager PyTorch's at the 1e-5 level.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune import artifacts
from adaptune.errors import ArtifactError, ParityError
from adaptune.files import umask
from adaptune.loading import Artifact, load_artifact
from adaptune.merge import check_out_path, logits, max_abs_diff, to_deploy, tolerance

if TYPE_CHECKING:
    from adaptune.exporters.registry import ExportFormat

VERIFY_BATCH = 3  # not the traced batch size, so a batch dimension baked in by mistake fails the check
TRACE_BATCH = 2


def export(
    source: str | Path, fmt: str, out: str | Path, checkpoint: str = "best", overwrite: bool = False
) -> dict[str, Any]:
    """Export a run directory, merged file or exported timm directory as ``fmt``, verified before it is kept.

    Args:
        source: See `loading.load_artifact`.
        fmt: A registered format: ``timm``, ``onnx``, ``exported-program`` or ``peft``.
        out: The file (``onnx``, ``exported-program``) or directory (``timm``, ``peft``) to write; its parent must
            exist, and it must not exist yet (an empty directory is fine) unless ``overwrite``.
        checkpoint: For a run directory: ``best``, ``last`` or ``final``.
        overwrite: Replace an existing ``out``.

    Returns:
        Report: ``out``, ``format``, ``method``, ``max_abs_diff``, ``tolerance``, ``verified_with``, ``seconds``.

    Raises:
        AdaptuneError: Unknown format.
        ArtifactError: Unusable source or output path; ``timm`` for a method that cannot be folded; a model the
            format cannot hold.
        ParityError: The exported model's logits differ from the source's by more than the tolerance.
    """
    from adaptune.exporters import ExportContext, get_format
    from adaptune.methods import get_method

    start = time.perf_counter()
    format_ = get_format(fmt)
    out = check_out_path(out, overwrite, kind=format_.kind)
    art = load_artifact(source, checkpoint)
    spec = get_method(art.recipe.method_name)
    if format_.needs_fold and spec.fold is None:
        raise ArtifactError(
            f"--format {fmt}: method {spec.name!r} is not linear, so it cannot be folded into plain timm weights; "
            f"deploy it with --format onnx (or exported-program), or keep the merged file for adaptune"
        )
    deploy, form = to_deploy(art.model, spec, art.manifest["form"], fold=format_.fold)
    spec_in = art.input
    ctx = ExportContext(
        model=deploy,
        form=form,
        artifact=art,
        method=spec,
        input=spec_in,
        trace_inputs=spec_in.example(TRACE_BATCH, seed=1),
        manifest=_export_manifest(art, fmt, form, Path(source)),
    )
    inputs = spec_in.example(VERIFY_BATCH)
    reference = logits(art.model, inputs)
    tol = tolerance(max(spec.merge_atol, format_.atol), reference)
    diff, verified_with = _write_verified(format_, ctx, out, inputs, reference, tol)
    return {
        "out": str(out),
        "format": fmt,
        "method": spec.name,
        "max_abs_diff": diff,
        "tolerance": tol,
        "verified_with": verified_with,
        "seconds": time.perf_counter() - start,
    }


def _write_verified(
    format_: ExportFormat, ctx: Any, out: Path, inputs: Any, reference: Any, tol: float
) -> tuple[float | None, str]:
    """Write to a temporary name, read back, compare, rename into place; nothing is left behind on failure.

    Raises:
        ParityError: Above ``tol``.
    """
    tmp = _tmp_dir(out) if format_.kind == "dir" else out.parent / f".{out.name[:64]}.{secrets.token_hex(4)}.tmp"
    if format_.kind == "file":
        tmp = tmp.with_name(tmp.name + format_.suffix)
    try:
        format_.write(ctx, tmp)
        runner, verified_with = format_.load(ctx, tmp)
        diff = None
        if runner is not None:
            diff = max_abs_diff(runner(inputs), reference)
            if not diff <= tol:
                raise ParityError(
                    f"--format {format_.name}: largest logit difference {diff:.3g} from the PyTorch model exceeds the "
                    f"tolerance {tol:.3g}; nothing was written. Report this with --debug output"
                )
        _move_into_place(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return diff, verified_with


def format_export_report(report: dict[str, Any]) -> str:
    """The lines ``adaptune export`` prints."""
    if report["max_abs_diff"] is None:
        check = f"not verified ({report['verified_with']})"
    else:
        check = (
            f"largest logit difference {report['max_abs_diff']:.3g} (tolerance {report['tolerance']:.3g}, "
            f"{report['verified_with']})"
        )
    return (
        f"wrote {report['out']} ({report['format']}, {report['method']})\n  parity     {check}\n"
        f"  time       {report['seconds']:.2f} s"
    )


def _export_manifest(art: Artifact, fmt: str, form: str, source: Path) -> dict[str, Any]:
    from adaptune import __version__
    from adaptune.exporters.model_card import run_evaluation

    keep = (
        "timm_version",
        "adapter_type",
        "method",
        "targets",
        "backbone",
        "num_classes",
        "class_names",
        "trainable_parameters",
    )
    return {
        **{k: art.manifest[k] for k in keep if k in art.manifest},
        "format": fmt,
        "form": form,
        "format_version": artifacts.FORMAT_VERSION,
        "adaptune_version": __version__,
        "input": art.input.to_dict(),
        "recipe": art.recipe.to_dict(),
        "evaluation": run_evaluation(source, {**art.manifest, "recipe": art.recipe.to_dict()}),  # model cards
    }


def _tmp_dir(out: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:64]}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private; the export is an ordinary directory
    return tmp


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (checked: empty, or allowed by ``overwrite``) is replaced."""
    if tmp.is_dir() and out.is_dir():
        old = out.with_name(f".{out.name[:64]}.{secrets.token_hex(4)}.old.tmp")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
