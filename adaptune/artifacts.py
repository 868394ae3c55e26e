"""The run directory contract: its files, the manifest, adapter state and checkpoints.

```
runs/<name>/
  recipe.yaml                 the resolved recipe
  adaptune_config.json        manifest (format_version, adaptune_version, method + options, backbone, classes, input)
  adapter_model.safetensors   trainable tensors of the selected (best, else last) weights; manifest in the metadata
  checkpoints/last/, best/    adapter_model.safetensors + trainer_state.pt (optimizer, RNG, step, epoch)
  metrics.jsonl, summary.json
```
Every file is written atomically (`adaptune.files`). A checkpoint directory is swapped in with renames so that a crash
at any point leaves a complete copy that `find_checkpoint` finds and `recover_checkpoints` puts back in place: see
`save_checkpoint`. Nothing here runs code from a file: weights are safetensors, the trainer state is loaded with
``torch.load(weights_only=True)``.

Building models from these files lives in `adaptune.loading`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune import files as _files
from adaptune.errors import ArtifactError
from adaptune.files import (
    TMP_SUFFIX,
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    read_safetensors,
    save_safetensors,
    tmp_prefix,
    umask,
    write_json,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from adaptune.batch import InputSpec
    from adaptune.recipe import Recipe

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FORMAT_VERSION",
    "RECIPE_FILE",
    "RUN_MANIFEST",
    "TRAINER_STATE",
    "adapter_state_dict",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_manifest",
    "check_format_version",
    "find_checkpoint",
    "is_run_dir",
    "load_adapter_state",
    "load_safetensors",
    "load_trainer_state",
    "read_manifest",
    "recover_checkpoints",
    "save_checkpoint",
    "save_safetensors",
    "write_json",
]

FORMAT_VERSION = 2  # 2: data sources in their own recipe sections, the input spec in the manifest
RUN_MANIFEST = "adaptune_config.json"  # its own name: PEFT reads adapter_config.json and cannot read this layout
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's config name (PEFT exports), and the run manifest of format_version 1
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.pt"
RECIPE_FILE = "recipe.yaml"
METADATA_KEY = "adaptune"
CHECKPOINTS = ("last", "best")


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Load tensors and the adaptune manifest (None if the file has none).

    Raises:
        ArtifactError: Missing, truncated or corrupt file; manifest that is not a JSON object or from a newer adaptune.
    """
    tensors, metadata = read_safetensors(path)
    manifest = None
    if METADATA_KEY in metadata:
        try:
            manifest = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError:
            raise ArtifactError(f"{path}: the adaptune manifest in the metadata is not valid JSON") from None
        check_format_version(manifest, path)
    return tensors, manifest


def check_format_version(manifest: Any, where: str | Path) -> None:
    """Raise unless ``manifest`` is a JSON object with a ``format_version`` this adaptune reads."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: the manifest is not a JSON object; not an adaptune artifact")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{where}: manifest has no integer format_version; not an adaptune artifact")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: manifest format_version {version} is newer than this adaptune (supports <= {FORMAT_VERSION}); "
            "upgrade adaptune"
        )


def manifest_path(run_dir: Path) -> Path | None:
    """The run manifest of ``run_dir`` (``adaptune_config.json``; ``adapter_config.json`` in format_version 1 runs)."""
    for name in (RUN_MANIFEST, ADAPTER_CONFIG):
        path = Path(run_dir) / name
        if path.is_file() and (name == RUN_MANIFEST or "peft_type" not in path.read_text()[:4096]):
            return path
    return None


def is_run_dir(path: Path) -> bool:
    """``path`` is an adaptune run directory (it holds a run manifest)."""
    return Path(path).is_dir() and manifest_path(path) is not None


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The run's manifest (``adaptune_config.json``), checked.

    Raises:
        ArtifactError: Missing, not JSON, not an object, from a newer adaptune, or without ``num_classes``.
    """
    path = manifest_path(run_dir) or run_dir / RUN_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{run_dir}: not a run directory (no {RUN_MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        line = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ArtifactError(f"{path}: not valid JSON{line}; the file is damaged") from None
    check_format_version(manifest, path)
    num_classes = manifest.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ArtifactError(f"{path}: the manifest has no valid num_classes; the file is damaged")
    return manifest


def build_manifest(
    recipe: Recipe,
    num_classes: int,
    class_names: list[str] | tuple[str, ...],
    trainable: int,
    targets: list[str],
    spec: InputSpec,
) -> dict[str, Any]:
    """The adaptune manifest: what a loader needs to rebuild the model without the recipe file."""
    import timm

    from adaptune import __version__
    from adaptune.config import plain

    return {
        "format": "adaptune",  # adaptune's run layout; `adaptune export --format peft` writes PEFT's
        "format_version": FORMAT_VERSION,
        "adaptune_version": __version__,
        "timm_version": timm.__version__,
        "adapter_type": recipe.method_name,
        "method": {"name": recipe.method_name, **plain(recipe.method)},
        "targets": list(targets),
        "backbone": plain(recipe.backbone),
        "num_classes": num_classes,
        "class_names": list(class_names),
        "trainable_parameters": trainable,
        "input": spec.to_dict(),
    }


# ----------------------------------------------------------------------------------------------------------------
# adapter state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a run must keep: every trainable parameter, plus each adapter module's own state.

    Adapter modules (those with ``adapter_param_names``, including the shared-module container) contribute their whole
    ``state_dict`` minus the wrapped ``base``, so buffers and extra state (MoSA's owner maps and expert generator) are
    saved with the weights. Each tensor appears once.
    """
    from adaptune.methods.common import adapter_modules, own_state_keys

    state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for path, module in adapter_modules(model):
        sd = module.state_dict()
        for key in own_state_keys(module):
            state[f"{path}.{key}" if path else key] = sd[key]
    return {k: v.detach() for k, v in state.items()}


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor], where: str | Path, noun: str) -> None:
    """Every tensor of ``state`` has a place in ``model`` with the same shape; ``noun`` names the file in the error.

    Raises:
        ArtifactError: The first tensor with no place, or with the wrong shape (another backbone, method options or
            class count).
    """
    from adaptune.backbone import head_path

    own = model.state_dict()
    head = head_path(model)
    for key, tensor in state.items():
        if key not in own:
            raise ArtifactError(
                f"{where}: tensor {key!r} has no place in the model; the {noun} is for another backbone or method"
            )
        if own[key].shape != tensor.shape:
            what = "class count" if head and key.startswith(head + ".") else "backbone or method options"
            raise ArtifactError(
                f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(own[key].shape)}; "
                f"the {noun} was made with another {what}"
            )


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Load a saved adapter state into an injected model; every saved tensor must find its place.

    Raises:
        ArtifactError: A tensor with no place in the model, or with the wrong shape (another backbone, method options
            or class count).
    """
    check_state_fits(model, state, where, "checkpoint")
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
#
# A checkpoint directory is replaced in four steps:
#   1. write the new copy into checkpoints/.<which>.<random>.tmp/ (both files, each atomically);
#   2. rename checkpoints/<which> to checkpoints/.<which>.old;
#   3. rename the new copy to checkpoints/<which>;
#   4. delete .<which>.old.
# After a crash between any two steps a complete copy exists: the old <which> (before 2), the new copy in the
# temporary directory and the old one in .old (between 2 and 3), the new <which> (after 3). `find_checkpoint` reads
# the newest complete copy; `recover_checkpoints` (at the start of a run) puts it back in place and removes the rest.


def _complete(ckpt: Path) -> bool:
    return (ckpt / ADAPTER_WEIGHTS).is_file() and (ckpt / TRAINER_STATE).is_file()


def _pending(parent: Path, which: str) -> list[Path]:
    """Complete temporary copies of ``which`` (left by a crash between steps 2 and 3), newest first."""
    if not parent.is_dir():
        return []
    prefix = tmp_prefix(parent / which)
    found = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(TMP_SUFFIX)]
    return sorted((p for p in found if p.is_dir() and _complete(p)), key=lambda p: p.stat().st_mtime, reverse=True)


def save_checkpoint(ckpt_dir: Path, model: nn.Module, manifest: dict[str, Any], trainer_state: dict[str, Any]) -> None:
    """Write ``adapter_model.safetensors`` + ``trainer_state.pt`` into ``ckpt_dir``, replacing it crash-safely."""
    import torch

    parent = ckpt_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(ckpt_dir), suffix=TMP_SUFFIX, dir=parent))
    except OSError as e:
        from adaptune.files import unwritable

        raise unwritable(ckpt_dir, e) from None
    old = parent / f".{ckpt_dir.name}.old"
    try:
        tmp.chmod(0o777 & ~umask())
        save_safetensors(adapter_state_dict(model), tmp / ADAPTER_WEIGHTS, manifest)
        buf = io.BytesIO()
        torch.save(trainer_state, buf)
        atomic_write_bytes(tmp / TRAINER_STATE, buf.getvalue())
        _files._step("swap-written")
        if _complete(ckpt_dir):
            if old.exists():
                shutil.rmtree(old)  # a stale copy: the current one is complete
            os.replace(ckpt_dir, old)
        elif ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)  # incomplete (hand-edited): nothing to keep
        _files._step("swap-moved-old")
        os.replace(tmp, ckpt_dir)
        fsync_dir(parent)
        _files._step("swap-renamed")
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if not ckpt_dir.exists() and old.exists() and tmp.exists() and _complete(tmp):
            pass  # crashed between the renames: keep both, `find_checkpoint` reads the new copy
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """The newest complete copy of ``checkpoints/<which>`` (read only; see the swap steps above).

    Raises:
        ArtifactError: No complete copy exists.
    """
    parent = run_dir / "checkpoints"
    ckpt = parent / which
    if _complete(ckpt):
        return ckpt
    pending = _pending(parent, which)
    if pending:
        return pending[0]
    old = parent / f".{which}.old"
    if _complete(old):
        return old
    raise ArtifactError(f"{run_dir}: no {which!r} checkpoint (checkpoints/{which}/{ADAPTER_WEIGHTS})")


def recover_checkpoints(run_dir: Path) -> list[str]:
    """Put the newest complete copy of each checkpoint back in place and delete leftovers of interrupted writes.

    Returns:
        What was done, one line each (for the log).
    """
    from adaptune.files import remove_leftovers

    parent = run_dir / "checkpoints"
    if not parent.is_dir():
        return []
    done = []
    for which in CHECKPOINTS:
        ckpt = parent / which
        if _complete(ckpt):
            continue
        try:
            newest = find_checkpoint(run_dir, which)
        except ArtifactError:
            continue
        if ckpt.exists():
            shutil.rmtree(ckpt)
        os.replace(newest, ckpt)
        done.append(f"recovered checkpoints/{which} from {newest.name}")
    for which in CHECKPOINTS:
        old = parent / f".{which}.old"
        if old.exists() and _complete(parent / which):
            shutil.rmtree(old)
    removed = remove_leftovers(parent) + remove_leftovers(run_dir)
    if removed:
        done.append(f"removed {len(removed)} leftover temporary file(s) of an interrupted write")
    return done


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, unpickled with ``weights_only=True`` (tensors and plain data only).

    Raises:
        ArtifactError: Missing, damaged, or holding anything but tensors and plain data (a crafted file is refused,
            never executed), or without the optimizer state.
    """
    import pickle

    import torch

    path = ckpt / TRAINER_STATE
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the outcome is what matters here
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{ckpt}: no {TRAINER_STATE}; cannot resume from this checkpoint") from None
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise ArtifactError(
                f"{path}: refused: it names code to run when loaded, not just tensors and plain data (a crafted "
                "file?); only resume runs you trained yourself"
            ) from None
        raise ArtifactError(
            f"{path}: unreadable: damaged, or not a trainer state adaptune can load safely (tensors and plain data "
            "only)"
        ) from None
    except Exception as e:
        raise ArtifactError(f"{path}: unreadable ({type(e).__name__}); the file is damaged") from None
    missing = [k for k in ("optimizer", "loop", "rng") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ArtifactError(f"{path}: no {missing[0]!r} in the trainer state; the file is damaged or not adaptune's")
    return state
