"""Merge a run into one deployable ``merged.safetensors``, and load any artifact back as a model.

```
run dir ──load_run──► model (training structure) ──consolidate──► deploy structure ──fold (linear methods)──►
   plain timm weights, form "folded"     (loads with timm.create_model(name, num_classes=N) alone)
   adapters kept, form "merged"          (bottleneck adapters, MoSA: adaptune rebuilds inject + consolidate)
```

Every merge checks its own work before it writes: the merged weights are loaded into a freshly built model (plain
timm for ``folded``) and its logits on a fixed batch are compared with the unmerged model's. Above the method's
tolerance nothing is written and `ParityError` (exit 1) says by how much. The run directory is only read.

The tolerance is ``spec.merge_atol · max(1, max |logit|)``: the method's absolute fp32 tolerance, scaled with the
size of the logits, because folding changes the order of floating-point sums and the error grows with the values.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from adaptune import artifacts
from adaptune.errors import AdaptuneError, ArtifactError, ParityError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from adaptune.methods.registry import MethodSpec
    from adaptune.recipe import Recipe

FORMS = ("folded", "merged")
DTYPES = ("fp32", "bf16", "fp16")
MERGED_FORMAT = "adaptune-merged"
TIMM_WEIGHTS = "model.safetensors"
PARITY_BATCH = 4


class Artifact(NamedTuple):
    """A model rebuilt from a run directory, a merged file or an exported timm directory.

    ``manifest["form"]`` says what the model is: ``"run"`` (training structure, e.g. MoSA's split experts),
    ``"merged"`` (adapters consolidated) or ``"folded"`` (a plain timm model).
    """

    model: nn.Module
    manifest: dict[str, Any]
    recipe: Recipe


# ----------------------------------------------------------------------------------------------------------------
# loading


def load_artifact(path: str | Path, checkpoint: str = "best") -> Artifact:
    """Rebuild the model of a run directory, a merged ``.safetensors`` file or an exported timm directory.

    Args:
        path: Run directory (``adapter_config.json``), merged file, or ``adaptune export --format timm`` directory.
        checkpoint: For a run directory: ``best``, ``last`` or ``final`` (see `artifacts.load_run`).

    Returns:
        (model in eval mode on the CPU, manifest with ``form`` set, recipe).

    Raises:
        ArtifactError: Missing path, corrupt or truncated file, manifest from a newer adaptune, tensors that do not
            fit the backbone or class count.
    """
    path = Path(path)
    if path.is_dir() and (path / artifacts.ADAPTER_CONFIG).is_file():
        return _load_run(path, checkpoint)
    if path.is_dir() and (path / TIMM_WEIGHTS).is_file():
        return _load_merged_file(path / TIMM_WEIGHTS)
    if path.is_file():
        return _load_merged_file(path)
    if path.is_dir():
        raise ArtifactError(
            f"{path}: neither a run directory ({artifacts.ADAPTER_CONFIG}) nor an exported timm directory "
            f"({TIMM_WEIGHTS})"
        )
    raise ArtifactError(f"{path}: no such file or directory")


def _load_run(run_dir: Path, checkpoint: str) -> Artifact:
    model, recipe, manifest = artifacts.load_run(run_dir, checkpoint)
    return Artifact(model, {**manifest, "form": "run", "checkpoint": checkpoint}, recipe)


def _load_merged_file(path: Path) -> Artifact:
    from adaptune.recipe import recipe_from_dict

    state, manifest = artifacts.load_safetensors(path)
    if manifest is None:
        raise ArtifactError(
            f"{path}: no adaptune manifest in the safetensors metadata; pass a run directory or a file written by "
            "adaptune merge"
        )
    if manifest.get("form") not in FORMS:
        if "adapter_type" in manifest and "form" not in manifest:
            raise ArtifactError(
                f"{path}: an adapter checkpoint, not a merged model; pass its run directory, or merge it first: "
                f"adaptune merge RUN_DIR --out merged.safetensors"
            )
        raise ArtifactError(f"{path}: manifest form {manifest.get('form')!r} is not one of {', '.join(FORMS)}")
    missing = [key for key in ("recipe", "num_classes") if key not in manifest]
    if missing:
        raise ArtifactError(f"{path}: the manifest has no {missing[0]!r}; re-create the file with adaptune merge")
    recipe = recipe_from_dict(manifest["recipe"], f"{path} (manifest recipe)")
    model = build_deploy_model(recipe, manifest["num_classes"], manifest["form"])
    load_full_state(model, state, path)
    model.eval()
    return Artifact(model, manifest, recipe)


def build_deploy_model(recipe: Recipe, num_classes: int, form: str) -> nn.Module:
    """An empty model of the deploy structure: the plain timm model (``folded``), or the backbone with the method
    injected and consolidated (``merged``). Weights are random until a state is loaded; the caller's RNG state is
    left as it was."""
    import torch

    from adaptune.backbone import create_backbone
    from adaptune.methods.registry import get_method

    with torch.random.fork_rng(devices=[]):
        model = create_backbone(replace(recipe.backbone, pretrained=False), num_classes)
        if form == "merged":
            spec = get_method(recipe.method_name)
            spec.inject(model, recipe.method)
            if spec.consolidate is not None:
                spec.consolidate(model)
    return model


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """``load_state_dict(strict=True)`` with one-line errors that say which tensor and why.

    Raises:
        ArtifactError: A tensor with no place in the model, a missing tensor, or a shape that does not fit (the file
            was made for another backbone, method options or class count).
    """
    own = model.state_dict()
    head = head_path(model)
    for key, tensor in state.items():
        if key not in own:
            raise ArtifactError(
                f"{where}: tensor {key!r} has no place in the model; the file is for another backbone or method"
            )
        if own[key].shape != tensor.shape:
            what = "class count" if head and key.startswith(head + ".") else "backbone or method options"
            raise ArtifactError(
                f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(own[key].shape)}; "
                f"the file was made with another {what}"
            )
    missing = [k for k in own if k not in state]
    if missing:
        raise ArtifactError(
            f"{where}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}; the file is incomplete or for another "
            "backbone"
        )
    model.load_state_dict(state, strict=True)


def head_path(model: nn.Module) -> str:
    """Module path of the classifier head (``model.get_classifier()``); empty if there is none."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    return next((name for name, m in model.named_modules() if m is head and name), "")


# ----------------------------------------------------------------------------------------------------------------
# deploy structure and parity


def to_deploy(model: nn.Module, spec: MethodSpec, form: str, fold: bool) -> tuple[nn.Module, str]:
    """A copy of ``model`` in deploy structure; the original is not touched.

    Args:
        model: A model as `load_artifact` returns it.
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


def deploy_input(model: nn.Module, recipe: Recipe) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(input size, mean, std) the model was trained with: the backbone's size and the recipe's normalisation."""
    from adaptune.backbone import input_spec
    from adaptune.data import normalization

    size, mean, std = input_spec(model, recipe)
    mean, std = normalization(recipe.data.normalize, mean, std)  # type: ignore[arg-type]
    return size, tuple(mean), tuple(std)


def parity_batch(size: int, n: int = PARITY_BATCH, seed: int = 0) -> torch.Tensor:
    """Fixed seeded random images ``(n, 3, size, size)`` (already normalised) for the parity checks."""
    import torch

    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """fp32 logits of ``model`` in eval mode, no autograd."""
    import torch

    model.eval()
    with torch.inference_mode():
        return model(images).float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def tolerance(atol: float, reference: torch.Tensor) -> float:
    """``atol · max(1, max |reference|)``: an absolute fp32 tolerance scaled with the size of the logits."""
    return atol * max(1.0, reference.abs().max().item())


def check_out_path(out: str | Path) -> Path:
    """The output path, checked before any work: its directory must exist.

    Raises:
        ArtifactError: The directory does not exist.
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise ArtifactError(f"--out: directory {str(out.parent)!r} does not exist; create it first")
    return out


# ----------------------------------------------------------------------------------------------------------------
# merge


def merge(
    run_dir: str | Path, out: str | Path, checkpoint: str = "best", fold: bool = True, dtype: str = "fp32"
) -> dict[str, Any]:
    """Write a run's model as one deployable ``.safetensors`` file, after checking it reproduces the run.

    Args:
        run_dir: The run directory (only read).
        out: The merged file to write (its directory must exist).
        checkpoint: ``best`` (default; the run's selected weights when it kept no best), ``last`` or ``final``.
        fold: Fold linear methods into the backbone's weights (form ``folded``: exactly timm's ``state_dict`` keys).
            Methods that cannot be folded, and ``fold=False``, give form ``merged`` (adapters consolidated).
        dtype: Floating-point dtype of the written tensors: ``fp32``, ``bf16`` or ``fp16``. Merge math runs in fp32
            and is cast once; parity is checked on the fp32 result, the cast's drift is only reported.

    Returns:
        Report: ``out``, ``form``, ``method``, ``max_abs_diff``, ``tolerance``, ``cast_max_abs_diff`` (None for
        fp32), ``dtype``, ``keys`` (tensor count), ``extra_modules``, ``seconds``, ``bytes``.

    Raises:
        ArtifactError: Unusable run directory or output path; ``dtype`` unknown.
        ParityError: The merged model's logits differ from the run's by more than the method's tolerance; nothing is
            written.
    """
    import torch

    from adaptune import __version__
    from adaptune.methods.common import adapter_modules
    from adaptune.methods.registry import get_method

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise AdaptuneError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    out = check_out_path(out)
    if out.is_dir():
        raise ArtifactError(f"--out: {str(out)!r} is a directory; give a file name such as merged.safetensors")
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise ArtifactError(f"{run_dir}: merge takes a run directory; this is a file (already merged?)")
    art = load_artifact(run_dir, checkpoint)
    if art.manifest["form"] != "run":
        raise ArtifactError(f"{run_dir}: merge takes a run directory; this is an exported model")
    spec = get_method(art.recipe.method_name)
    deploy, form = to_deploy(art.model, spec, "run", fold)
    state = {k: v.detach().clone() for k, v in deploy.state_dict().items()}

    size, mean, std = deploy_input(art.model, art.recipe)
    images = parity_batch(size)
    reference = logits(art.model, images)
    # Check what will be written, the way it will be read: a fresh model built from the manifest + these tensors.
    rebuilt = build_deploy_model(art.recipe, art.manifest["num_classes"], form)
    load_full_state(rebuilt, state, out)
    diff, tol = max_abs_diff(logits(rebuilt, images), reference), tolerance(spec.merge_atol, reference)
    if not diff <= tol:
        raise ParityError(
            f"merge of {run_dir} ({spec.name}, form {form}): largest logit difference {diff:.3g} exceeds the "
            f"tolerance {tol:.3g}; nothing was written. Re-run with --no-fold, or report this with --debug output"
        )
    cast_diff = None
    if dtype != "fp32":
        cast = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
        rebuilt.load_state_dict(state)  # copied back into fp32 parameters: the drift of rounding the weights
        cast_diff = max_abs_diff(logits(rebuilt, images), reference)

    extra = [path for path, _ in adapter_modules(deploy)] if form == "merged" else []
    manifest = {
        **{k: v for k, v in art.manifest.items() if k not in ("form", "checkpoint")},
        "format": MERGED_FORMAT,
        "format_version": artifacts.FORMAT_VERSION,
        "adaptune_version": __version__,
        "form": form,
        "dtype": dtype,
        "checkpoint": checkpoint,
        "extra_modules": extra,
        "input": {"size": size, "mean": list(mean), "std": list(std)},
        "recipe": art.recipe.to_dict(),
        "merge": {"max_abs_diff": diff, "tolerance": tol, "cast_max_abs_diff": cast_diff},
    }
    artifacts.save_safetensors(state, out, manifest)
    return {
        "out": str(out),
        "form": form,
        "method": spec.name,
        "max_abs_diff": diff,
        "tolerance": tol,
        "cast_max_abs_diff": cast_diff,
        "dtype": dtype,
        "keys": len(state),
        "extra_modules": extra,
        "bytes": out.stat().st_size,
        "seconds": time.perf_counter() - start,
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
