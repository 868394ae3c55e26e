"""Export a run or a merged file for deployment, each format verified against PyTorch before it is kept.

| format             | writes                                                          | methods                   |
|--------------------|-----------------------------------------------------------------|---------------------------|
| `timm`             | ``config.json`` + ``model.safetensors`` in timm's own layout    | foldable (LoRA, linear)   |
| `onnx`             | one ``.onnx`` file, dynamic batch dimension                     | every method              |
| `exported-program` | a ``torch.export`` archive (``.pt2``), dynamic batch dimension  | every method              |
| `peft`             | PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``  | LoRA on whole modules     |

Verification: the exported model is read back the way a user would read it (``timm.create_model("local-dir:…")``,
onnxruntime, ``torch.export.load``) and run on fixed seeded images of a batch size other than the one traced; the
largest logit difference from the unmerged model is reported, and above the tolerance nothing is kept
(`ParityError`). Everything is written under a temporary name beside ``out`` and renamed at the end.

ONNX uses torch's TorchScript-based exporter (``dynamo=False``): it needs no extra package (the ``torch.export``
based one needs ``onnxscript``), exports test_vit about 6x faster here, and is still shipped by the pinned torch.
The tolerance for exports is ``max(spec.merge_atol, 1e-4) · max(1, max |logit|)``: onnxruntime and exported programs
use their own kernels and fusions, so their sums differ from eager PyTorch's at the 1e-5 level.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune import artifacts
from adaptune.errors import AdaptuneError, ArtifactError, ParityError
from adaptune.merge import (
    TIMM_WEIGHTS,
    Artifact,
    check_out_path,
    deploy_input,
    head_path,
    load_artifact,
    logits,
    max_abs_diff,
    parity_batch,
    to_deploy,
    tolerance,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMATS = ("timm", "onnx", "exported-program", "peft")
EXPORT_ATOL = 1e-4
VERIFY_BATCH = 3  # not the traced batch size, so a batch dimension baked in by mistake fails the check
TRACE_BATCH = 2


def export(source: str | Path, fmt: str, out: str | Path, checkpoint: str = "best") -> dict[str, Any]:
    """Export a run directory, merged file or exported timm directory as ``fmt``, verified before it is kept.

    Args:
        source: See `merge.load_artifact`.
        fmt: ``timm``, ``onnx``, ``exported-program`` or ``peft``.
        out: The file (``onnx``, ``exported-program``) or directory (``timm``, ``peft``) to write; its parent must
            exist and a directory ``out`` must not exist yet (or be empty).
        checkpoint: For a run directory: ``best``, ``last`` or ``final``.

    Returns:
        Report: ``out``, ``format``, ``method``, ``max_abs_diff``, ``tolerance``, ``verified_with``, ``seconds``.

    Raises:
        AdaptuneError: Unknown format.
        ArtifactError: Unusable source or output path; ``timm`` for a method that cannot be folded; ``peft`` for a
            model that is not LoRA on whole modules.
        ParityError: The exported model's logits differ from the source's by more than the tolerance.
    """
    from adaptune.methods.registry import get_method

    start = time.perf_counter()
    if fmt not in FORMATS:
        raise AdaptuneError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    out = check_out_path(out)
    if fmt in ("timm", "peft"):
        if out.exists() and not (out.is_dir() and not any(out.iterdir())):
            raise ArtifactError(f"--out: {str(out)!r} already exists; remove it or choose a new directory name")
    elif out.is_dir():
        raise ArtifactError(f"--out: {str(out)!r} is a directory; give a file name such as model.{_suffix(fmt)}")
    art = load_artifact(source, checkpoint)
    spec = get_method(art.recipe.method_name)
    if fmt == "timm" and spec.fold is None:
        raise ArtifactError(
            f"--format timm: method {spec.name!r} is not linear, so it cannot be folded into plain timm weights; "
            f"deploy it with --format onnx (or exported-program), or keep the merged file for adaptune"
        )
    size, mean, std = deploy_input(art.model, art.recipe)
    images = parity_batch(size, n=VERIFY_BATCH)
    reference = logits(art.model, images)
    tol = tolerance(max(spec.merge_atol, EXPORT_ATOL), reference)
    deploy, form = to_deploy(art.model, spec, art.manifest["form"], fold=fmt != "peft")
    manifest = _export_manifest(art, fmt, form, size, mean, std)
    write = {"timm": _write_timm, "onnx": _write_onnx, "exported-program": _write_program, "peft": _write_peft}[fmt]
    got, verified_with = write(deploy, art, manifest, out, images, size, tol, reference)
    diff = max_abs_diff(got, reference) if got is not None else None
    return {
        "out": str(out),
        "format": fmt,
        "method": spec.name,
        "max_abs_diff": diff,
        "tolerance": tol,
        "verified_with": verified_with,
        "seconds": time.perf_counter() - start,
    }


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


def _suffix(fmt: str) -> str:
    return {"onnx": "onnx", "exported-program": "pt2"}.get(fmt, "")


def _export_manifest(
    art: Artifact, fmt: str, form: str, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> dict[str, Any]:
    from adaptune import __version__

    keep = (
        "format_version",
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
        "input": {"size": size, "mean": list(mean), "std": list(std)},
        "recipe": art.recipe.to_dict(),
    }


def _check(got: torch.Tensor, reference: torch.Tensor, tol: float, what: str) -> None:
    diff = max_abs_diff(got, reference)
    if not diff <= tol:
        raise ParityError(
            f"{what}: largest logit difference {diff:.3g} from the PyTorch model exceeds the tolerance {tol:.3g}; "
            "nothing was written. Report this with --debug output"
        )


# ----------------------------------------------------------------------------------------------------------------
# formats


def _write_timm(
    model: nn.Module,
    art: Artifact,
    manifest: dict[str, Any],
    out: Path,
    images: torch.Tensor,
    size: int,
    tol: float,
    reference: torch.Tensor,
) -> tuple[torch.Tensor, str]:
    """timm's own layout via ``timm.models.save_for_hf``, read back with ``timm.create_model("local-dir:...")``."""
    import timm
    from timm.models import save_for_hf

    tmp = _tmp_dir(out)
    try:
        data_config = {
            "input_size": (3, size, size),
            "mean": manifest["input"]["mean"],
            "std": manifest["input"]["std"],
            "interpolation": art.recipe.data.interpolation,
            "crop_pct": 1.0,
        }
        save_for_hf(
            model,
            str(tmp),
            model_config={"label_names": manifest.get("class_names")},
            safe_serialization=True,
            data_config=data_config,
        )
        # the same tensors again, with the adaptune manifest in the metadata (timm ignores metadata)
        artifacts.save_safetensors(model.state_dict(), tmp / TIMM_WEIGHTS, manifest)
        loaded = timm.create_model(f"local-dir:{tmp}", pretrained=True)
        got = logits(loaded, images)
        _check(got, reference, tol, "--format timm")
        _move_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return got, f"timm {timm.__version__} local-dir"


def _write_onnx(
    model: nn.Module,
    art: Artifact,
    manifest: dict[str, Any],
    out: Path,
    images: torch.Tensor,
    size: int,
    tol: float,
    reference: torch.Tensor,
) -> tuple[torch.Tensor, str]:
    """ONNX (opset 17) with a dynamic batch dimension, the manifest in ``metadata_props["adaptune"]``."""
    import torch

    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ArtifactError("--format onnx needs onnx and onnxruntime; run: pip install 'adaptune[onnx]'") from None
    tmp = _tmp_path(out, ".onnx")
    try:
        with warnings.catch_warnings():  # the tracer's notes on Python constants and the exporter's deprecation
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (parity_batch(size, n=TRACE_BATCH, seed=1),),
                str(tmp),
                dynamo=False,
                opset_version=17,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "adaptune", json.dumps(manifest)
        onnx.save(proto, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        _check(got, reference, tol, "--format onnx")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return got, f"onnxruntime {ort.__version__}"


def _write_program(
    model: nn.Module,
    art: Artifact,
    manifest: dict[str, Any],
    out: Path,
    images: torch.Tensor,
    size: int,
    tol: float,
    reference: torch.Tensor,
) -> tuple[torch.Tensor, str]:
    """``torch.export`` with a dynamic batch dimension, saved with ``torch.export.save`` (manifest as an extra file
    ``adaptune.json``) and read back with ``torch.export.load``."""
    import torch
    from torch.export import Dim

    tmp = _tmp_path(out, ".pt2")  # torch.export.load wants the .pt2 suffix
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(
                model,
                (parity_batch(size, n=TRACE_BATCH, seed=1),),
                dynamic_shapes=({0: Dim("batch", min=1, max=1 << 16)},),
            )
        torch.export.save(program, str(tmp), extra_files={"adaptune.json": json.dumps(manifest)})
        with torch.inference_mode():  # an exported program's module has no eval(); it was exported in eval mode
            got = torch.export.load(str(tmp)).module()(images).float()
        _check(got, reference, tol, "--format exported-program")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return got, f"torch.export.load (torch {torch.__version__})"


def _write_peft(
    model: nn.Module,
    art: Artifact,
    manifest: dict[str, Any],
    out: Path,
    images: torch.Tensor,
    size: int,
    tol: float,
    reference: torch.Tensor,
) -> tuple[torch.Tensor | None, str]:
    """PEFT's LoRA layout: ``adapter_config.json`` (``peft_type: LORA``) + ``adapter_model.safetensors`` with keys
    ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight`` and the head in full (``modules_to_save``).

    Possible where every adapter module is a LoRA wrapper over a whole Linear or plain Conv2d (no q/k/v slices of a
    fused qkv: set ``method.qkv: []``) with one rank and scale; verified with PEFT when it is installed.
    """
    import torch

    from adaptune.methods.common import adapter_modules
    from adaptune.methods.lora import LoRAConv2d, LoRALinear

    modules = list(adapter_modules(model))
    if art.manifest["form"] == "folded" or not modules:
        raise ArtifactError("--format peft: the source has no LoRA modules (already folded?); export a run directory")
    head = head_path(model)
    tensors: dict[str, torch.Tensor] = {}
    ranks, scales, dropouts = set(), set(), set()
    for path, module in modules:
        if not isinstance(module, LoRALinear | LoRAConv2d) or list(module.pairs) != ["all"]:
            raise ArtifactError(
                f"--format peft: {path} is a {type(module).__name__} with parts {list(getattr(module, 'pairs', []))}; "
                "PEFT's layout holds LoRA on whole Linear/Conv2d modules only (for a fused qkv train with "
                "method.qkv: []); deploy with --format onnx instead"
            )
        if isinstance(module, LoRAConv2d) and type(module.base) is not torch.nn.Conv2d:
            raise ArtifactError(
                f"--format peft: {path} wraps a {type(module.base).__name__}, whose padding PEFT's plain Conv2d "
                "LoRA does not reproduce; deploy with --format onnx instead"
            )
        tensors[f"base_model.model.{path}.lora_A.weight"] = module.get_parameter("pairs.all.lora_a.weight").detach()
        tensors[f"base_model.model.{path}.lora_B.weight"] = module.get_parameter("pairs.all.lora_b.weight").detach()
        ranks.add(module.rank)
        scales.add(module.scale)
        dropouts.add(getattr(module.lora_dropout, "p", 0.0))
    if len(ranks) != 1 or len(scales) != 1 or len(dropouts) != 1:
        raise ArtifactError("--format peft: the LoRA modules differ in rank, scale or dropout; PEFT needs one of each")
    for key, tensor in model.get_submodule(head).state_dict().items():
        tensors[f"base_model.model.{head}.{key}"] = tensor.detach()
    (rank,), (scale,), (dropout,) = ranks, scales, dropouts
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "r": rank,
        "lora_alpha": scale * rank,
        "lora_dropout": dropout,
        "target_modules": [path for path, _ in modules],
        "modules_to_save": [head],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    tmp = _tmp_dir(out)
    try:
        artifacts.write_json(tmp / artifacts.ADAPTER_CONFIG, config)
        artifacts.save_safetensors(tensors, tmp / artifacts.ADAPTER_WEIGHTS, {**manifest, "peft_config": config})
        got, verified_with = _peft_logits(model, [path for path, _ in modules], tmp, images)
        if got is not None:
            _check(got, reference, tol, "--format peft")
        _move_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return got, verified_with


def _peft_logits(
    model: nn.Module, paths: list[str], peft_dir: Path, images: torch.Tensor
) -> tuple[torch.Tensor | None, str]:
    """Load the written adapter with PEFT into the plain backbone (each LoRA wrapper replaced by the module it
    wraps), when PEFT is installed."""
    try:
        import peft
    except ImportError:
        return None, "PEFT not installed; pip install peft to verify"
    from adaptune.methods.common import replace_module

    base = copy.deepcopy(model)
    for path in paths:
        replace_module(base, path, base.get_submodule(f"{path}.base"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(base, str(peft_dir))
    return logits(loaded, images), f"peft {peft.__version__}"


def _tmp_path(out: Path, suffix: str) -> Path:
    """A fresh hidden name beside ``out``; the file is created by the writer, with the usual permissions."""
    return out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp{suffix}"


def _tmp_dir(out: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
    return tmp


def _move_dir(tmp: Path, out: Path) -> None:
    if out.is_dir():
        out.rmdir()  # empty (checked up front)
    os.replace(tmp, out)
