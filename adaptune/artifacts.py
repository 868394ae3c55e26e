"""The run directory, its manifest, and atomic reads and writes.

```
runs/<name>/
  recipe.yaml                 the resolved recipe
  adapter_config.json         manifest (format_version, adaptune_version, method + options, backbone, classes, ...)
  adapter_model.safetensors   trainable tensors of the selected (best, else last) weights; manifest in the metadata
  checkpoints/last/, best/    adapter_model.safetensors + trainer_state.pt (optimizer, RNG, step, epoch)
  metrics.jsonl, summary.json
```
Every file is written to a temporary name in the same directory and renamed, so a crash never leaves a half-written
file under a final name. Checkpoint directories are swapped in with renames too.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune.errors import ArtifactError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from adaptune.recipe import Recipe

FORMAT_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.pt"
RECIPE_FILE = "recipe.yaml"
METADATA_KEY = "adaptune"


# ----------------------------------------------------------------------------------------------------------------
# atomic writes


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ArtifactError(f"{path}: directory {str(path.parent)!r} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; final files get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, manifest: dict[str, Any] | None = None
) -> None:
    """Save tensors atomically; ``manifest`` goes into the metadata as JSON under the key ``adaptune``."""
    from safetensors.torch import save

    metadata = {METADATA_KEY: json.dumps(manifest)} if manifest is not None else None
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Load tensors and the adaptune manifest (None if the file has none).

    Raises:
        ArtifactError: Missing, truncated or corrupt file; manifest that is not JSON.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file") from None
    try:
        tensors = load(data)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); the file is truncated or "
            "corrupt: re-create it (adaptune merge / train)"
        ) from None
    manifest = None
    if METADATA_KEY in metadata:
        try:
            manifest = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError:
            raise ArtifactError(f"{path}: the adaptune manifest in the metadata is not valid JSON") from None
        check_format_version(manifest, path)
    return tensors, manifest


def check_format_version(manifest: dict[str, Any], where: str | Path) -> None:
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{where}: manifest has no integer format_version; not an adaptune artifact")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: manifest format_version {version} is newer than this adaptune (supports <= {FORMAT_VERSION}); "
            "upgrade adaptune"
        )


# ----------------------------------------------------------------------------------------------------------------
# adapter state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a run must keep: every trainable parameter, plus each adapter module's own state.

    Adapter modules (those with ``adapter_param_names``) contribute their whole ``state_dict`` minus the wrapped
    ``base``, so buffers and extra state (MoSA's owner maps and expert generator) are saved with the weights.
    """
    from adaptune.methods.common import adapter_modules, own_state_keys

    state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for path, module in adapter_modules(model):
        sd = module.state_dict()
        for key in own_state_keys(module):
            state[f"{path}.{key}" if path else key] = sd[key]
    return {k: v.detach() for k, v in state.items()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Load a saved adapter state into an injected model; every saved tensor must find its place.

    Raises:
        ArtifactError: A tensor with no place in the model, or with the wrong shape (another backbone, method options
            or class count).
    """
    own = model.state_dict()
    for key, tensor in state.items():
        if key not in own:
            raise ArtifactError(
                f"{where}: tensor {key!r} has no place in the model; the checkpoint is for another backbone or method"
            )
        if own[key].shape != tensor.shape:
            hint = "class count" if key.startswith(_head_prefix(model)) else "backbone or method options"
            raise ArtifactError(
                f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(own[key].shape)}; "
                f"the checkpoint was made with another {hint}"
            )
    model.load_state_dict(state, strict=False)


def _head_prefix(model: nn.Module) -> str:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return "\0"


def build_manifest(
    recipe: Recipe, num_classes: int, class_names: list[str] | tuple[str, ...], trainable: int, targets: list[str]
) -> dict[str, Any]:
    """The adaptune manifest: what a loader needs to rebuild the model without the recipe file."""
    import timm

    from adaptune import __version__
    from adaptune.recipe import _plain

    return {
        "format": "adaptune",  # adaptune's run layout; `adaptune export --format peft` writes PEFT's
        "format_version": FORMAT_VERSION,
        "adaptune_version": __version__,
        "timm_version": timm.__version__,
        "adapter_type": recipe.method_name,
        "method": {"name": recipe.method_name, **_plain(recipe.method)},
        "targets": list(targets),
        "backbone": _plain(recipe.backbone),
        "num_classes": num_classes,
        "class_names": list(class_names),
        "trainable_parameters": trainable,
    }


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(ckpt_dir: Path, model: nn.Module, manifest: dict[str, Any], trainer_state: dict[str, Any]) -> None:
    """Write ``adapter_model.safetensors`` + ``trainer_state.pt`` into ``ckpt_dir``, replacing it atomically."""
    import torch

    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ckpt_dir.name}.", dir=ckpt_dir.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        save_safetensors(adapter_state_dict(model), tmp / ADAPTER_WEIGHTS, manifest)
        buf = io.BytesIO()
        torch.save(trainer_state, buf)
        atomic_write_bytes(tmp / TRAINER_STATE, buf.getvalue())
        old = ckpt_dir.parent / f".{ckpt_dir.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if ckpt_dir.exists():
            os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """``checkpoints/<which>``, or the previous copy a crash mid-swap left as ``.<which>.old``."""
    ckpt = run_dir / "checkpoints" / which
    if (ckpt / ADAPTER_WEIGHTS).is_file():
        return ckpt
    old = run_dir / "checkpoints" / f".{which}.old"
    if (old / ADAPTER_WEIGHTS).is_file():
        return old
    raise ArtifactError(f"{run_dir}: no {which!r} checkpoint (checkpoints/{which}/{ADAPTER_WEIGHTS})")


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ArtifactError(f"{ckpt}: no {TRAINER_STATE}; cannot resume from this checkpoint") from None
    except Exception as e:
        raise ArtifactError(f"{ckpt / TRAINER_STATE}: unreadable ({type(e).__name__}); the file is damaged") from None


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / ADAPTER_CONFIG
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{run_dir}: not a run directory (no {ADAPTER_CONFIG})") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON (line {e.lineno}); the file is damaged") from None
    check_format_version(manifest, path)
    return manifest


def load_run(run_dir: str | Path, checkpoint: str = "best") -> tuple[nn.Module, Recipe, dict[str, Any]]:
    """Rebuild a trained model from a run directory.

    Args:
        run_dir: The run directory.
        checkpoint: ``best`` (falls back to the final ``adapter_model.safetensors`` when the run kept no best),
            ``last``, or ``final`` (the top-level weights).

    Returns:
        (model in eval mode, recipe, manifest)
    """
    import torch

    from adaptune.backbone import create_backbone
    from adaptune.methods.registry import get_method
    from adaptune.recipe import load_recipe

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: no such run directory")
    manifest = read_manifest(run_dir)
    recipe = load_recipe(run_dir / RECIPE_FILE)
    if checkpoint == "final":
        weights = run_dir / ADAPTER_WEIGHTS
    elif checkpoint in ("best", "last"):
        try:
            weights = find_checkpoint(run_dir, checkpoint) / ADAPTER_WEIGHTS
        except ArtifactError:
            if checkpoint != "best" or not (run_dir / ADAPTER_WEIGHTS).is_file():
                raise
            weights = run_dir / ADAPTER_WEIGHTS
    else:
        raise ArtifactError(f"--checkpoint: expected best, last or final, got {checkpoint!r}")
    state, _ = load_safetensors(weights)
    # Training seeds torch before building the backbone, so a random-init (`pretrained: false`) backbone is only
    # reproduced under the same seed. Forked: the caller's RNG state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        model = create_backbone(recipe.backbone, manifest["num_classes"])
        get_method(recipe.method_name).inject(model, recipe.method)
    load_adapter_state(model, state, weights)
    model.eval()
    return model, recipe, manifest
