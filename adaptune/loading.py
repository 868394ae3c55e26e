"""One way to build a model: from a recipe (to train), or from any artifact (to evaluate, merge, export).

```
recipe ──build──► Built (backbone + method injected, trainable parts marked, input spec, data description)
run dir / merged.safetensors / exported timm dir ──load_artifact──► Artifact (model in eval mode, manifest, recipe)
```
Everything that puts a method on a backbone goes through `inject_method`: the method's ``inject``, then the backbone
parameters it declares trainable (``MethodSpec.trainable_backbone``), then the classifier head.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

from adaptune import artifacts
from adaptune.errors import ArtifactError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from adaptune.batch import InputSpec
    from adaptune.data import DatasetInfo
    from adaptune.methods.registry import MethodSpec
    from adaptune.recipe import Recipe

FORMS = ("folded", "merged")
MERGED_FORMAT = "adaptune-merged"
TIMM_WEIGHTS = "model.safetensors"


@dataclass
class Built:
    """A model ready to train, and what the dry run reports.

    Attributes:
        model: The backbone with the method injected; exactly the trainable parts require grad.
        spec: The method.
        touched: Module paths the method wrapped or added.
        backbone_params: Backbone parameters the method trains (``MethodSpec.trainable_backbone``).
        info: The data's class count, names and split sizes.
        input: What the model takes (shape, normalisation).
        trainable: Trainable parameter count (method, declared backbone parts, head).
        total: All parameters.
    """

    model: nn.Module
    spec: MethodSpec
    touched: list[str]
    backbone_params: list[str]
    info: DatasetInfo
    input: InputSpec
    trainable: int
    total: int


def inject_method(model: nn.Module, recipe: Recipe) -> tuple[list[str], list[str]]:
    """Put ``recipe``'s method on ``model`` and mark what trains: its modules, its backbone parts, the head.

    Returns:
        (touched module paths, backbone parameter names made trainable).

    Raises:
        TargetError: As the method's ``inject``; a declared backbone parameter that does not exist.
    """
    from adaptune.errors import TargetError
    from adaptune.methods import get_method

    spec = get_method(recipe.method_name)
    touched = spec.inject(model, recipe.method)
    declared = spec.trainable_backbone(model, recipe.method) if spec.trainable_backbone is not None else []
    params = dict(model.named_parameters())
    for name in declared:
        if name not in params:
            raise TargetError(f"method {spec.name!r} declares {name!r} trainable, but the model has no such parameter")
        params[name].requires_grad_(True)
    model.get_classifier().requires_grad_(True)
    return touched, list(declared)


def build(recipe: Recipe) -> Built:
    """Backbone + method, seeded by ``train.seed``; cheap data description only (no images decoded).

    Raises:
        DataError, BackboneError, TargetError, RecipeError: As the data, backbone, method and input checks.
    """
    import random

    import torch

    from adaptune import data
    from adaptune.backbone import count_parameters, create_backbone
    from adaptune.methods import get_method

    info = data.describe(recipe.data)
    random.seed(recipe.train.seed)
    torch.manual_seed(recipe.train.seed)
    model = create_backbone(recipe.backbone, info.num_classes)
    touched, declared = inject_method(model, recipe)
    spec = data.input_spec(model, recipe)
    trainable, total = count_parameters(model)
    torch.manual_seed(recipe.train.seed)  # the method's draws and dropout start from the same state every run
    return Built(model, get_method(recipe.method_name), touched, declared, info, spec, trainable, total)


def count_method_parameters(model_name: str, method: str, num_classes: int = 10, **options: Any) -> dict[str, int]:
    """Parameters method ``method`` (default options, or ``options``) trains on timm model ``model_name``, counted on
    the meta device: no weights are downloaded or allocated.

    Returns:
        ``{"method": trainable parameters without the head, "head": the head's, "total": the backbone's}``.

    Raises:
        TargetError, RecipeError, BackboneError: As for training (a method that cannot adapt this backbone).
    """
    import torch

    from adaptune.backbone import count_parameters, create_backbone
    from adaptune.recipe import BackboneConfig, method_config

    recipe = _MethodOnly(method, method_config(method, **options))
    with torch.device("meta"):
        model = create_backbone(BackboneConfig(model=model_name), num_classes)
        inject_method(model, recipe)  # type: ignore[arg-type]
    trainable, total = count_parameters(model)
    head = sum(p.numel() for p in model.get_classifier().parameters())
    return {"method": trainable - head, "head": head, "total": total}


@dataclass(frozen=True)
class _MethodOnly:
    """The two recipe fields `inject_method` reads."""

    method_name: str
    method: Any


def build_deploy_model(recipe: Recipe, num_classes: int, form: str) -> nn.Module:
    """An empty model of the deploy structure: the plain timm model (``folded``), or the backbone with the method
    injected and consolidated (``merged``). Weights are random until a state is loaded; the caller's RNG state is
    left as it was."""
    import torch

    from adaptune.backbone import create_backbone
    from adaptune.methods import get_method

    with torch.random.fork_rng(devices=[]):
        model = create_backbone(replace(recipe.backbone, pretrained=False), num_classes)
        if form == "merged":
            spec = get_method(recipe.method_name)
            inject_method(model, recipe)
            if spec.consolidate is not None:
                spec.consolidate(model)
    return model


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """``load_state_dict(strict=True)`` with one-line errors that say which tensor and why.

    Raises:
        ArtifactError: A tensor with no place in the model, a missing tensor, or a shape that does not fit (the file
            was made for another backbone, method options or class count).
    """
    artifacts.check_state_fits(model, state, where, "file")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ArtifactError(
            f"{where}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}; the file is incomplete or for another "
            "backbone"
        )
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# recipes stored in artifacts


def upgrade_recipe(raw: dict[str, Any], format_version: int) -> dict[str, Any]:
    """A stored recipe in today's layout. Format 1 kept the data source's options flat in ``data``."""
    if format_version >= 2 or not isinstance(raw.get("data"), dict):
        return raw
    data = dict(raw["data"])
    source = data.get("source", "builtin")
    name, root, task, synthetic = (data.pop(k, None) for k in ("name", "root", "task", "synthetic"))
    if source == "builtin" and name == "synthetic":
        data.update(source="synthetic", synthetic=synthetic or {})
    elif source == "builtin":
        data["builtin"] = {"name": name} if name else {}
    elif source == "vtab":
        data["vtab"] = {"root": root, "task": task}
    elif source == "folder":
        data["folder"] = {"root": root}
    return {**raw, "data": data}


def stored_recipe(raw: Any, format_version: int, where: str) -> Recipe:
    """Validate a recipe read from an artifact (upgraded from older formats first)."""
    from adaptune.recipe import recipe_from_dict

    if not isinstance(raw, dict):
        raise ArtifactError(f"{where}: the stored recipe is not a mapping; the file is damaged")
    return recipe_from_dict(upgrade_recipe(raw, format_version), where)


def run_recipe(run_dir: Path, manifest: dict[str, Any]) -> Recipe:
    """The resolved recipe stored in a run directory."""
    path = run_dir / artifacts.RECIPE_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{run_dir}: not a run directory (no {artifacts.RECIPE_FILE})") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: not valid YAML; the file is damaged") from None
    if isinstance(raw, dict):
        raw.setdefault("name", run_dir.name)
    return stored_recipe(raw, manifest["format_version"], str(path))


# ----------------------------------------------------------------------------------------------------------------
# artifacts


class Artifact(NamedTuple):
    """A model rebuilt from a run directory, a merged file or an exported timm directory.

    ``manifest["form"]`` says what the model is: ``"run"`` (training structure, e.g. MoSA's split experts),
    ``"merged"`` (adapters consolidated) or ``"folded"`` (a plain timm model).
    """

    model: nn.Module
    manifest: dict[str, Any]
    recipe: Recipe

    @property
    def input(self) -> InputSpec:
        """The input the model was trained on (from the manifest, else recomputed from the model and recipe)."""
        from adaptune.batch import InputSpec
        from adaptune.data import input_spec

        if isinstance(self.manifest.get("input"), dict):
            return InputSpec.from_dict(self.manifest["input"])
        return input_spec(self.model, self.recipe)


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

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: no such run directory")
    manifest = artifacts.read_manifest(run_dir)
    recipe = run_recipe(run_dir, manifest)
    weights = _run_weights(run_dir, checkpoint)
    state, _ = artifacts.load_safetensors(weights)
    # Training seeds torch before building the backbone, so a random-init (`pretrained: false`) backbone is only
    # reproduced under the same seed. Forked: the caller's RNG state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        model = create_backbone(recipe.backbone, manifest["num_classes"])
        inject_method(model, recipe)
    artifacts.load_adapter_state(model, state, weights)
    model.eval()
    return model, recipe, manifest


def _run_weights(run_dir: Path, checkpoint: str) -> Path:
    if checkpoint == "final":
        return run_dir / artifacts.ADAPTER_WEIGHTS
    if checkpoint not in ("best", "last"):
        raise ArtifactError(f"--checkpoint: expected best, last or final, got {checkpoint!r}")
    try:
        return artifacts.find_checkpoint(run_dir, checkpoint) / artifacts.ADAPTER_WEIGHTS
    except ArtifactError:
        if checkpoint != "best" or not (run_dir / artifacts.ADAPTER_WEIGHTS).is_file():
            raise
        return run_dir / artifacts.ADAPTER_WEIGHTS


def load_artifact(path: str | Path, checkpoint: str = "best") -> Artifact:
    """Rebuild the model of a run directory, a merged ``.safetensors`` file or an exported timm directory.

    Args:
        path: Run directory (``adaptune_config.json``), merged file, or ``adaptune export --format timm`` directory.
        checkpoint: For a run directory: ``best``, ``last`` or ``final`` (see `load_run`).

    Returns:
        (model in eval mode on the CPU, manifest with ``form`` set, recipe).

    Raises:
        ArtifactError: Missing path, corrupt or truncated file, manifest from a newer adaptune, tensors that do not
            fit the backbone or class count.
    """
    path = Path(path)
    if artifacts.is_run_dir(path):
        model, recipe, manifest = load_run(path, checkpoint)
        return Artifact(model, {**manifest, "form": "run", "checkpoint": checkpoint}, recipe)
    if path.is_dir() and (path / TIMM_WEIGHTS).is_file():
        return _load_merged_file(path / TIMM_WEIGHTS)
    if path.is_file():
        return _load_merged_file(path)
    if path.is_dir():
        raise ArtifactError(
            f"{path}: neither a run directory ({artifacts.RUN_MANIFEST}) nor an exported timm directory "
            f"({TIMM_WEIGHTS})"
        )
    raise ArtifactError(f"{path}: no such file or directory")


def _load_merged_file(path: Path) -> Artifact:
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
    recipe = stored_recipe(manifest["recipe"], manifest["format_version"], f"{path} (manifest recipe)")
    model = build_deploy_model(recipe, manifest["num_classes"], manifest["form"])
    load_full_state(model, state, path)
    model.eval()
    return Artifact(model, manifest, recipe)
