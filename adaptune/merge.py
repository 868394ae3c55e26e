"""Merge a run into one deployable ``merged.safetensors``.

```
run dir ──load_artifact──► model (training structure) ──consolidate──► deploy structure ──fold (linear methods)──►
   plain timm weights, form "folded"     (loads with timm.create_model(name, num_classes=N) alone)
   adapters kept, form "merged"          (bottleneck adapters, MoSA: adaptune rebuilds inject + consolidate)
```

Every merge checks its own work before it writes: the merged weights are loaded into a freshly built model (plain
timm for ``folded``) and its logits on a fixed batch (built from the run's `InputSpec`) are compared with the
unmerged model's. Above the method's tolerance nothing is written and `ParityError` (exit 1) says by how much. The run
directory is only read; merge never writes inside it.

The tolerance is ``spec.merge_atol · max(1, max |logit|)``: the method's absolute fp32 tolerance, scaled with the
size of the logits, because folding changes the order of floating-point sums and the error grows with the values.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune import artifacts
from adaptune.errors import AdaptuneError, ArtifactError, ParityError
from adaptune.loading import MERGED_FORMAT, build_deploy_model, load_artifact, load_full_state

if TYPE_CHECKING:
    import torch
    from torch import nn

    from adaptune.methods.registry import MethodSpec

DTYPES = ("fp32", "bf16", "fp16")
PARITY_BATCH = 4


def to_deploy(model: nn.Module, spec: MethodSpec, form: str, fold: bool) -> tuple[nn.Module, str]:
    """A copy of ``model`` in deploy structure; the original is not touched.

    Args:
        model: A model as `loading.load_artifact` returns it.
        spec: Its method.
        form: Its ``manifest["form"]``: ``run``, ``merged`` or ``folded``.
        fold: Fold the method into the backbone's weights where the method allows it.

    Returns:
        (copy in eval mode, its form: ``folded`` or ``merged``).
    """
    deploy = copy.deepcopy(model)
    if form == "run" and spec.consolidate is not None:
        spec.consolidate(deploy)
    if form != "folded" and fold and spec.fold is not None:
        spec.fold(deploy)
        form = "folded"
    return deploy.eval(), "folded" if form == "folded" else "merged"


def logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """fp32 logits of ``model`` in eval mode, no autograd."""
    import torch

    model.eval()
    with torch.inference_mode():
        return model(inputs).float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def tolerance(atol: float, reference: torch.Tensor) -> float:
    """``atol · max(1, max |reference|)``: an absolute fp32 tolerance scaled with the size of the logits."""
    return atol * max(1.0, reference.abs().max().item())


def check_out_path(out: str | Path, overwrite: bool = False, kind: str = "file") -> Path:
    """The output path, checked before any work.

    Args:
        out: The path to write.
        overwrite: Allow replacing an existing ``out`` (never a run directory or anything inside one).
        kind: ``file`` or ``dir``: what ``out`` will be.

    Raises:
        ArtifactError: The directory does not exist; ``out`` exists and ``overwrite`` is false; ``out`` is, or lies
            inside, a run directory; ``out`` is a directory where a file is wanted (or the other way round).
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise ArtifactError(f"--out: directory {str(out.parent)!r} does not exist; create it first")
    run = next((p for p in (out, *out.parents) if artifacts.is_run_dir(p)), None)
    if run is not None:
        raise ArtifactError(
            f"--out: {str(out)!r} is inside the run directory {str(run)!r}, which merge and export never change; "
            "write somewhere else"
        )
    if kind == "file" and out.is_dir():
        raise ArtifactError(f"--out: {str(out)!r} is a directory; give a file name such as merged.safetensors")
    if kind == "dir" and out.exists() and not out.is_dir():
        raise ArtifactError(f"--out: {str(out)!r} is a file; give the name of a new directory")
    exists = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if exists and not overwrite:
        raise ArtifactError(
            f"--out: {str(out)!r} already exists; choose another name, or pass --overwrite to replace it"
        )
    return out


def merge(
    run_dir: str | Path,
    out: str | Path,
    checkpoint: str = "best",
    fold: bool = True,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a run's model as one deployable ``.safetensors`` file, after checking it reproduces the run.

    Args:
        run_dir: The run directory (only read).
        out: The merged file to write (its directory must exist; an existing file only with ``overwrite``).
        checkpoint: ``best`` (default; the run's selected weights when it kept no best), ``last`` or ``final``.
        fold: Fold linear methods into the backbone's weights (form ``folded``: exactly timm's ``state_dict`` keys).
            Methods that cannot be folded, and ``fold=False``, give form ``merged`` (adapters consolidated).
        dtype: Floating-point dtype of the written tensors: ``fp32``, ``bf16`` or ``fp16``. Merge math runs in fp32
            and is cast once; parity is checked on the fp32 result, the cast's drift is only reported.
        overwrite: Replace an existing ``out``.

    Returns:
        Report: ``out``, ``form``, ``method``, ``max_abs_diff``, ``tolerance``, ``cast_max_abs_diff`` (None for
        fp32), ``dtype``, ``keys`` (tensor count), ``extra_modules``, ``seconds``, ``bytes``.

    Raises:
        ArtifactError: Unusable run directory or output path; ``dtype`` unknown.
        ParityError: The merged model's logits differ from the run's by more than the method's tolerance; nothing is
            written.
    """
    from adaptune.methods import get_method

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise AdaptuneError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    out = check_out_path(out, overwrite)
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise ArtifactError(f"{run_dir}: merge takes a run directory; this is a file (already merged?)")
    art = load_artifact(run_dir, checkpoint)
    if art.manifest["form"] != "run":
        raise ArtifactError(f"{run_dir}: merge takes a run directory; this is an exported model")
    spec = get_method(art.recipe.method_name)
    deploy, form = to_deploy(art.model, spec, "run", fold)
    state = {k: v.detach().clone() for k, v in deploy.state_dict().items()}
    parity = _check_parity(art, spec, form, state, dtype, out)
    manifest = _merged_manifest(art, form, dtype, checkpoint, deploy, parity, run_dir)
    artifacts.save_safetensors(state if dtype == "fp32" else parity.pop("cast_state"), out, manifest)
    return {
        "out": str(out),
        "form": form,
        "method": spec.name,
        **{k: parity[k] for k in ("max_abs_diff", "tolerance", "cast_max_abs_diff")},
        "dtype": dtype,
        "keys": len(state),
        "extra_modules": manifest["extra_modules"],
        "bytes": out.stat().st_size,
        "seconds": time.perf_counter() - start,
    }


def _check_parity(
    art: Any, spec: MethodSpec, form: str, state: dict[str, torch.Tensor], dtype: str, out: Path
) -> dict[str, Any]:
    """Rebuild the deploy model from the tensors about to be written, the way they will be read, and compare its
    logits with the run's; the cast to ``dtype`` is measured, not checked.

    Raises:
        ParityError: Above the method's tolerance.
    """
    import torch

    inputs = art.input.example(PARITY_BATCH)
    reference = logits(art.model, inputs)
    rebuilt = build_deploy_model(art.recipe, art.manifest["num_classes"], form)
    load_full_state(rebuilt, state, out)
    diff, tol = max_abs_diff(logits(rebuilt, inputs), reference), tolerance(spec.merge_atol, reference)
    if not diff <= tol:
        raise ParityError(
            f"merge ({spec.name}, form {form}): largest logit difference {diff:.3g} exceeds the tolerance {tol:.3g}; "
            "nothing was written. Re-run with --no-fold, or report this with --debug output"
        )
    result: dict[str, Any] = {"max_abs_diff": diff, "tolerance": tol, "cast_max_abs_diff": None}
    if dtype != "fp32":
        cast = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        result["cast_state"] = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
        rebuilt.load_state_dict(result["cast_state"])  # copied back into fp32 parameters: the rounding's drift
        result["cast_max_abs_diff"] = max_abs_diff(logits(rebuilt, inputs), reference)
    return result


def _merged_manifest(
    art: Any, form: str, dtype: str, checkpoint: str, deploy: nn.Module, parity: dict[str, Any], run_dir: Path
) -> dict[str, Any]:
    from adaptune import __version__
    from adaptune.exporters.model_card import run_evaluation
    from adaptune.methods.common import adapter_modules

    extra = [path for path, _ in adapter_modules(deploy)] if form == "merged" else []
    return {
        **{k: v for k, v in art.manifest.items() if k not in ("form", "checkpoint")},
        "format": MERGED_FORMAT,
        "format_version": artifacts.FORMAT_VERSION,
        "adaptune_version": __version__,
        "form": form,
        "dtype": dtype,
        "checkpoint": checkpoint,
        "extra_modules": extra,
        "input": art.input.to_dict(),
        "recipe": art.recipe.to_dict(),
        "merge": {k: parity[k] for k in ("max_abs_diff", "tolerance", "cast_max_abs_diff")},
        "evaluation": run_evaluation(run_dir, {**art.manifest, "recipe": art.recipe.to_dict()}),  # for model cards
    }


def format_merge_report(report: dict[str, Any]) -> str:
    """The lines ``adaptune merge`` prints."""
    form = (
        "folded: plain timm weights, loads with timm.create_model alone"
        if report["form"] == "folded"
        else f"merged: {len(report['extra_modules'])} adapter modules kept; load with adaptune eval / export"
    )
    lines = [
        f"wrote {report['out']} ({report['keys']} tensors, {report['bytes'] / 2**20:.1f} MiB, {report['dtype']})",
        f"  form       {form}",
        f"  parity     largest logit difference {report['max_abs_diff']:.3g} (tolerance {report['tolerance']:.3g})",
    ]
    if report["cast_max_abs_diff"] is not None:
        lines.append(f"  {report['dtype']} cast drift {report['cast_max_abs_diff']:.3g} (reported, not checked)")
    lines.append(f"  time       {report['seconds']:.2f} s")
    return "\n".join(lines)
