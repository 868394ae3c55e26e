"""Recipes: YAML into frozen, validated dataclasses.

A recipe has five sections (``backbone``, ``method``, ``data``, ``train``, ``output``). Loading is strict: unknown
keys, wrong types and out-of-range values are all collected and raised together as one `RecipeError`, each line
``recipes/x.yaml:12: method.rank: expected an integer >= 1, got -4``. ``--set key=value`` overrides go through the
same validator. Method options are validated against the method's own config dataclass from the registry.

Field documentation lives in ``metadata["help"]``; range checks in ``metadata["ge"|"gt"|"le"|"lt"]``
(`adaptune.config`).
The ``data`` section holds the chosen data source's options in a sub-section named after it (``data.vtab.root``),
validated against that source's own config dataclass from the data-source registry.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from adaptune.config import internal, is_internal, opt, plain
from adaptune.errors import AdaptuneError, RecipeError, did_you_mean

SECTIONS = ("backbone", "method", "data", "train", "output")
Size = int | tuple[int, int]


@dataclass(frozen=True)
class BackboneConfig:
    model: str = opt("tf_efficientnet_lite0", "any `timm.create_model` name, with an optional `.tag`")
    pretrained: bool | str = opt(
        False,
        "true: weights from the Hugging Face hub; false: random init; a path to .safetensors/.pth/.npz; or "
        "`package:efficientnet-lite0` (offline ImageNet weights from the `[demo]` extra)",
    )
    img_size: Size | None = opt(
        None,
        "input size for models that take one (ViT, Swin): one side, or [height, width]; default: the model's",
        ge=1,
    )
    drop_path_rate: float = opt(0.0, "stochastic depth of the frozen backbone", ge=0.0, lt=1.0)
    train_mode: bool = opt(
        True, "keep the frozen backbone in train mode (dropout, drop-path); frozen BatchNorm always stays in eval"
    )
    head_init: Literal["zeros", "timm"] = opt(
        "zeros",
        "initialisation of the new classifier head: `zeros` (loss starts at log(classes), the usual PEFT choice) or "
        "timm's own (EfficientNet's is wide: a first-epoch loss near 6 on 10 classes)",
    )
    model_kwargs: dict[str, Any] = opt(factory=dict, help="extra keyword arguments for `timm.create_model`")
    grad_checkpointing: bool = opt(
        False, "recompute block activations in the backward pass (timm's set_grad_checkpointing): less memory, slower"
    )


@dataclass(frozen=True)
class AugmentConfig:
    crop: Literal["none", "random_resized", "random"] = opt(
        "none",
        "training crop: `random_resized` (timm's RandomResizedCrop, ImageNet style), `random` (a random crop from "
        "the stored size, the VPT/FGVC protocol: resize 256, crop 224) or none",
    )
    resize: int | None = opt(
        None, "side the images are stored at before cropping; default: img_size / 0.875 (224 -> 256) with a crop", ge=8
    )
    scale: tuple[float, float] = opt((0.08, 1.0), "random_resized: range of the crop's area fraction", gt=0.0, le=1.0)
    ratio: tuple[float, float] = opt((0.75, 4 / 3), "random_resized: range of the crop's aspect ratio", gt=0.0)
    auto_augment: str | None = opt(
        None, "timm auto-augment string, e.g. `rand-m9-mstd0.5-inc1` (RandAugment), `original`, `v0` (AutoAugment)"
    )
    color_jitter: float | None = opt(None, "color jitter strength (timm; ignored when auto_augment is set)", ge=0.0)
    re_prob: float = opt(0.0, "probability of timm's random erasing per image", ge=0.0, le=1.0)
    re_mode: Literal["const", "rand", "pixel"] = opt("pixel", "random erasing fill: const, rand (per channel) or pixel")
    mixup: float = opt(0.0, "mixup alpha (timm Mixup); 0: off", ge=0.0)
    cutmix: float = opt(0.0, "cutmix alpha (timm Mixup); 0: off", ge=0.0)
    mix_prob: float = opt(1.0, "probability of applying mixup/cutmix to a batch", ge=0.0, le=1.0)
    switch_prob: float = opt(0.5, "probability of cutmix instead of mixup when both are on", ge=0.0, le=1.0)

    @property
    def per_image(self) -> bool:
        """Any per-image transform beyond flips (what the frozen-prefix cache cannot replay)."""
        return self.crop != "none" or bool(self.auto_augment) or bool(self.color_jitter) or self.re_prob > 0

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def active(self) -> bool:
        return self.per_image or self.mixing


@dataclass(frozen=True)
class DataConfig:
    source: str = opt("builtin", "where the images come from: a registered data source (`adaptune sources`)")
    train_split: str = opt("train", "split to train on (`vtab`: train800 or train800val200)")
    val_split: str | None = opt("val", "split for model selection (`vtab`: val200); null to skip")
    test_split: str | None = opt("test", "split reported at the end; null to skip")
    img_size: Size | None = opt(
        None, "resize images to this size: one side, or [height, width]; default: the backbone's input size", ge=8
    )
    interpolation: Literal["bilinear", "bicubic", "nearest"] = opt("bicubic", "resize interpolation")
    normalize: Literal["model", "imagenet", "inception", "none"] = opt(
        "model", "mean/std: the backbone's own (`model`), ImageNet, 0.5/0.5 (`inception`) or none"
    )
    hflip: bool = opt(False, "random horizontal flips while training")
    cache: bool = opt(True, "keep decoded, resized images in memory (uint8)")
    workers: int = opt(0, "DataLoader worker processes", ge=0)
    augment: AugmentConfig = opt(
        factory=AugmentConfig, help="training augmentation (timm's crops, auto-augment, erasing, mixup); off by default"
    )
    options: Any = internal()  # the chosen source's options: the recipe's `data.<source>` section


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = opt(10, "training epochs", ge=1)
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides epochs)", ge=1)
    batch_size: int = opt(32, "images per optimizer step (before accumulation)", ge=1)
    eval_batch_size: int | None = opt(None, "batch size for evaluation; default: 2 x batch_size", ge=1)
    optimizer: Literal["adamw", "sgd"] = opt("adamw", "optimizer")
    lr: float = opt(1e-3, "peak learning rate", gt=0.0)
    weight_decay: float = opt(1e-4, "decoupled weight decay (not on biases, norms, tokens, scales)", ge=0.0)
    eps: float = opt(1e-8, "AdamW epsilon", gt=0.0)
    momentum: float = opt(0.9, "SGD momentum", ge=0.0, lt=1.0)
    schedule: Literal["cosine", "constant"] = opt("cosine", "learning-rate schedule after warmup, stepped per step")
    warmup_epochs: float = opt(1.0, "linear warmup length in epochs", ge=0.0)
    warmup_lr: float = opt(1e-6, "learning rate at the start of warmup", ge=0.0)
    min_lr: float = opt(1e-6, "learning rate at the end of the cosine", ge=0.0)
    precision: Literal["fp32", "bf16", "fp16"] = opt("fp32", "autocast precision (fp16 uses a grad scaler, CUDA only)")
    grad_accum: int = opt(1, "gradient accumulation steps", ge=1)
    clip_grad: float | None = opt(None, "clip the gradient norm to this value", gt=0.0)
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing", ge=0.0, lt=1.0)
    seed: int = opt(0, "seed for weights, data order and method randomness")
    eval_every: int = opt(1, "evaluate on validation every N epochs (and after the last)", ge=1)
    log_every: int = opt(10, "log a training line every N steps", ge=1)
    device: str = opt("auto", "`auto` (CUDA if available), `cpu`, `cuda` or `cuda:N`")
    threads: int | None = opt(None, "torch CPU threads; default: torch's choice", ge=1)
    compile: bool = opt(False, "compile the training forward with torch.compile (a warm-up cost, then faster steps)")
    channels_last: bool = opt(False, "channels-last memory format for the model and image batches (CNNs on GPU)")
    ema: bool = opt(False, "keep an exponential moving average of the weights (timm's ModelEmaV3)")
    ema_decay: float = opt(0.9998, "EMA decay per optimizer step (with timm's warm-up of the decay)", gt=0.0, lt=1.0)
    ema_final: bool = opt(
        True,
        "with ema: validate, select (best) and keep the EMA weights as the run's weights; false: keep the raw ones and "
        "report the EMA's validation accuracy beside them",
    )
    prefix_cache: Literal["auto", "off"] = opt(
        "auto",
        "compute the frozen layers before the first trainable block once per image instead of every epoch, where "
        "that cannot change the result (`auto`; the log says when it is on and why not otherwise)",
    )
    prefix_cache_dtype: Literal["fp32", "bf16", "fp16"] = opt(
        "fp32", "storage of cached features: fp32 (same results) or half the memory with bf16/fp16 (drift reported)"
    )
    prefix_cache_gb: float = opt(4.0, "memory for cached features; beyond it they go to a memory-mapped file", gt=0.0)


@dataclass(frozen=True)
class OutputConfig:
    dir: str | None = opt(None, "run directory; default: runs/<recipe name>-<timestamp>")
    save_best: bool = opt(True, "keep the checkpoint with the best validation top-1")
    report_to: tuple[str, ...] = opt(
        (),
        "experiment trackers that get every metrics.jsonl record: `csv` (metrics.csv, epochs.csv), `tensorboard` "
        "(<run>/tensorboard/), `wandb` (honours WANDB_MODE; offline logs locally for `wandb sync`); tensorboard and "
        "wandb are extras: pip install 'adaptune[tensorboard]' / 'adaptune[wandb]'",
    )
    wandb_project: str | None = opt(None, "W&B project (default: $WANDB_PROJECT, else 'adaptune')")

    def __post_init__(self) -> None:
        from adaptune.tracking import problems

        found = problems(self.report_to, installed=False)
        if found:
            raise ValueError(found[0].removeprefix("output."))


@dataclass(frozen=True)
class Recipe:
    """A fully validated recipe. ``method`` is an instance of the method's own config dataclass."""

    backbone: BackboneConfig
    method_name: str
    method: Any
    data: DataConfig
    train: TrainConfig
    output: OutputConfig
    name: str = "run"
    source: str = "<recipe>"

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data; `load_recipe` of its YAML gives the same recipe back."""
        return {
            "name": self.name,
            "backbone": plain(self.backbone),
            "method": {"name": self.method_name, **plain(self.method)},
            "data": {**plain(self.data), self.data.source: plain(self.data.options)},
            "train": plain(self.train),
            "output": plain(self.output),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: Any) -> Recipe:
        return dataclasses.replace(self, **sections)


_plain = plain  # the name other modules used before `adaptune.config`


# ----------------------------------------------------------------------------------------------------------------
# loading


class _Where:
    """Maps dotted keys to ``file:line`` for error messages (with ``base:`` recipes, the file that holds the key)."""

    def __init__(self, source: str, lines: dict[str, int | tuple[str, int]] | None = None):
        self.source = source
        self.lines = lines or {}
        self.overrides: set[str] = set()

    def __call__(self, key: str) -> str:
        if key in self.overrides:
            return f"--set {key}"
        probe = key
        while probe:
            if probe in self.lines:
                at = self.lines[probe]
                return f"{at[0]}:{at[1]}" if isinstance(at, tuple) else f"{self.source}:{at}"
            probe = probe.rsplit(".", 1)[0] if "." in probe else ""
        return self.source


RECIPES_DIR = Path(__file__).parent / "recipes"


def shipped_recipe(name: str) -> Path | None:
    """The packaged recipe called ``name`` (``quickstart`` -> ``adaptune/recipes/quickstart.yaml``), or None."""
    path = RECIPES_DIR / f"{name}.yaml"
    return path if "/" not in name and path.is_file() else None


def resolve_recipe_path(recipe: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe path (relative to ``relative_to``'s folder when given), or the name of a shipped recipe."""
    path = Path(recipe)
    if relative_to is not None and not path.is_absolute():
        local = relative_to.parent / path
        if local.exists() or path.suffix in (".yaml", ".yml"):
            return local
    if path.exists() or path.suffix in (".yaml", ".yml") or "/" in str(recipe):
        return path
    return shipped_recipe(str(recipe)) or path


def _line_map(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            lines.update(_line_map(value_node, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix}[{i}]"
            lines[key] = item.start_mark.line + 1
            lines.update(_line_map(item, key))
    return lines


def _duplicate_keys(node: yaml.Node | None, source: str, prefix: str = "") -> list[str]:
    """``file:line: key: ...`` for every key a mapping repeats (YAML keeps the last one silently)."""
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    f"{source}:{line}: {key}: appears twice (first on line {seen[key]}); the second would silently "
                    "replace the first: keep one"
                )
            seen.setdefault(key, line)
            problems += _duplicate_keys(value_node, source, key)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, source, f"{prefix}[{i}]")
    return problems


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, override and validate a recipe file.

    A recipe may start from another: ``base: quickstart`` (a shipped name, or a path relative to this file). The two
    are deep-merged, this file winning; a ``method`` (or ``data.<source>``) section for another method (or source)
    replaces the base's instead of merging with it. Errors name the file and line that hold the key.

    Args:
        path: The YAML file.
        overrides: ``key.path=value`` strings; values are parsed as YAML (``train.lr=5e-3``, ``method.targets=[a, b]``).

    Raises:
        RecipeError: With every problem found, one per line.
    """
    path = Path(path)
    raw, lines = _read_with_bases(path, ())
    raw.setdefault("name", path.stem)
    return recipe_from_dict(raw, _Where(str(path), lines), overrides)


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([f"{source}: no such recipe file; `adaptune recipes` lists the shipped ones"]) from None
    except UnicodeDecodeError as e:
        raise RecipeError([f"{source}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8"]) from None
    except IsADirectoryError:
        raise RecipeError([f"{source}: is a directory; give a recipe .yaml file"]) from None
    except OSError as e:
        raise RecipeError([f"{source}: cannot read the recipe ({e.strerror})"]) from None
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError([f"{where}: invalid YAML: {problem}"]) from None
    duplicates = _duplicate_keys(node, source)
    if duplicates:
        raise RecipeError(duplicates)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([f"{source}:1: a recipe must be a mapping of sections ({', '.join(SECTIONS)})"])
    return raw, node


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(raw recipe with its bases merged in, dotted key -> (file, line))."""
    raw, node = _read_yaml(path)
    lines: dict[str, Any] = {k: (str(path), v) for k, v in (_line_map(node) if node is not None else {}).items()}
    base = raw.pop("base", None)
    if base is None:
        return raw, lines
    at = f"{path}:{lines.get('base', (path, 1))[1]}"
    if not isinstance(base, str) or not base:
        raise RecipeError([f"{at}: base: expected a shipped recipe name or a path, got {base!r}"])
    base_path = resolve_recipe_path(base, relative_to=path)
    if not base_path.is_file():
        raise RecipeError([f"{at}: base: no recipe {base!r} (neither a file next to {path.name} nor a shipped recipe)"])
    if base_path.resolve() in {p.resolve() for p in (*chain, path)}:
        raise RecipeError([f"{at}: base: {base!r} leads back to {path.name}; recipes cannot be their own base"])
    base_raw, base_lines = _read_with_bases(base_path, (*chain, path))
    base_raw.pop("name", None)  # a recipe is named after its own file
    merged = _merge_recipe(base_raw, raw)
    return merged, {**{k: v for k, v in base_lines.items() if _kept(k, merged)}, **lines}


def _merge_recipe(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` deep-merged over ``base``; another method or data source replaces the base's section."""
    base = _deepcopy(base)
    method, base_method = child.get("method"), base.get("method")
    if (
        isinstance(method, dict)
        and isinstance(base_method, dict)
        and method.get("name", base_method.get("name")) != (base_method.get("name"))
    ):
        base.pop("method")
    data, base_data = child.get("data"), base.get("data")
    if isinstance(data, dict) and isinstance(base_data, dict) and "source" in data:
        old = base_data.get("source", DataConfig.source)
        if data["source"] != old:
            base_data.pop(old, None)
    return _deep_merge(base, child)


def _deep_merge(base: Any, child: Any) -> Any:
    if not (isinstance(base, dict) and isinstance(child, dict)):
        return _deepcopy(child)
    out = dict(base)
    for key, value in child.items():
        out[key] = _deep_merge(base[key], value) if key in base else _deepcopy(value)
    return out


def _kept(key: str, merged: dict[str, Any]) -> bool:
    """Whether dotted ``key`` (from a base) is still in the merged recipe."""
    node: Any = merged
    for part in key.replace("[", ".[").split("."):
        if part.startswith("["):
            continue
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def recipe_from_dict(
    raw: dict[str, Any], where: _Where | str = "<recipe>", overrides: list[str] | tuple[str, ...] = ()
) -> Recipe:
    """Validate a recipe given as plain data (the tests and the Python API use this)."""
    if isinstance(where, str):
        where = _Where(where)
    raw = _deepcopy(raw)
    errors: list[str] = []
    for item in overrides:
        _apply_override(raw, item, where, errors)

    for key in raw:
        if key not in (*SECTIONS, "name", "description"):
            errors.append(f"{where(key)}: {key}: unknown section{did_you_mean(key, SECTIONS)}")

    sections: dict[str, Any] = {}
    for key, cls in (("backbone", BackboneConfig), ("train", TrainConfig), ("output", OutputConfig)):
        sections[key] = _build(cls, raw.get(key) or {}, key, where, errors)
    sections["data"] = _build_data(raw.get("data") or {}, where, errors)
    method_name, method_cfg = _build_method(raw.get("method"), where, errors)

    name = raw.get("name", "run")
    if not isinstance(name, str) or not name:
        errors.append(f"{where('name')}: name: expected a non-empty string, got {name!r}")
    if errors:
        raise RecipeError(errors)
    return Recipe(
        backbone=sections["backbone"],
        method_name=str(method_name),
        method=method_cfg,
        data=sections["data"],
        train=sections["train"],
        output=sections["output"],
        name=str(name),
        source=where.source,
    )


def _build_method(method_raw: Any, where: _Where, errors: list[str]) -> tuple[str, Any]:
    """(method name, its validated config) from the ``method`` section; problems go to ``errors``."""
    from adaptune.methods import get_method, owners_of

    if method_raw is None:
        errors.append(f"{where('method')}: method: missing; add `method: {{name: adapter}}` (see `adaptune methods`)")
        return "linear", None
    if not isinstance(method_raw, dict) or "name" not in method_raw:
        errors.append(f"{where('method')}: method.name: missing; add `name: <method>` (see `adaptune methods`)")
        return "linear", None
    options = dict(method_raw)
    name = str(options.pop("name"))
    try:
        spec = get_method(name)
    except AdaptuneError as e:
        errors.append(f"{where('method.name')}: method.name: {e}")
        return name, None

    def whose(key: str) -> str:
        owners = owners_of(key)
        return f"; it is an option of {', '.join(owners)}, not of {name}" if owners else ""

    return name, _build(spec.config_cls, options, "method", where, errors, whose)


def _build_data(data_raw: Any, where: _Where, errors: list[str]) -> DataConfig | None:
    """The ``data`` section: common keys against `DataConfig`, ``data.<source>`` against that source's options."""
    from adaptune.data.sources import get_source, list_sources, option_owners

    if not isinstance(data_raw, dict):
        errors.append(f"{where('data')}: data: expected a mapping, got {_show(data_raw)}")
        return None
    data_raw = dict(data_raw)
    source = data_raw.get("source", DataConfig.source)
    sections = {name: data_raw.pop(name) for name in list_sources() if name in data_raw}
    sections = {name: value for name, value in sections.items() if value is not None}  # `--set data.vtab=null`
    spec = None
    try:
        spec = get_source(str(source))
    except AdaptuneError as e:
        errors.append(f"{where('data.source')}: {e}")
    for name in sections:
        if name != source and spec is not None:
            errors.append(
                f"{where(f'data.{name}')}: data.{name}: options of data source {name!r}, but data.source is "
                f"{source!r}; set data.source: {name}, or remove data.{name}"
            )

    def whose(key: str) -> str:
        owners = option_owners(key)
        if not owners:
            return ""
        if source in owners:
            return f"; it is an option of the data source: write it as data.{source}.{key}"
        return f"; it is an option of data source {' and '.join(owners)} (data.<source>.{key}), not of {source}"

    common = _build(DataConfig, data_raw, "data", where, errors, whose)
    if spec is None or common is None:
        return None
    options = _build(spec.config_cls, sections.get(spec.name) or {}, f"data.{spec.name}", where, errors)
    return None if options is None else dataclasses.replace(common, options=options)


def _deepcopy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def _apply_override(raw: dict[str, Any], item: str, where: _Where, errors: list[str]) -> None:
    if "=" not in item:
        errors.append(f"--set {item}: expected key.path=value, e.g. --set train.lr=5e-3")
        return
    key, _, text = item.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    if (len(parts) < 2 or parts[0] not in SECTIONS) and key != "name":
        errors.append(f"--set {key}: keys start with a section ({', '.join(SECTIONS)}), e.g. train.lr")
        return
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            errors.append(f"--set {key}: {part} is not a section")
            return
        node = child
    node[parts[-1]] = value
    where.overrides.add(key)


def _build(cls: type, data: Any, prefix: str, where: _Where, errors: list[str], whose: Any = None) -> Any:
    """Validate ``data`` against dataclass ``cls``; append problems to ``errors``; return an instance or None.

    ``whose(key)`` adds a hint to an unknown key's message (whose option it is, where it belongs).
    """
    if not isinstance(data, dict):
        errors.append(f"{where(prefix)}: {prefix}: expected a mapping, got {_show(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not is_internal(f)}
    values: dict[str, Any] = {}
    ok = True
    for key, value in data.items():
        dotted = f"{prefix}.{key}"
        if key not in fields:
            hint = (whose(str(key)) if whose else "") or did_you_mean(str(key), fields)
            errors.append(f"{where(dotted)}: {dotted}: unknown key{hint}")
            ok = False
            continue
        f = fields[key]
        converted, problem = _convert(hints[key], value, dotted, where, errors)
        if problem is None and converted is not None:
            problem = _check_range(f, converted)
        if problem is not None:
            errors.append(f"{where(dotted)}: {dotted}: {problem}")
            ok = False
            continue
        values[key] = converted
    if not ok:
        return None
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        errors.append(f"{where(prefix)}: {prefix}: {e}")
        return None


def _check_range(f: dataclasses.Field, value: Any) -> str | None:
    if isinstance(value, tuple):  # [height, width] and other fixed-size tuples: each item
        return next((p for p in (_check_range(f, v) for v in value) if p), None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    m = f.metadata
    for op, test, word in (("ge", value >= m.get("ge", value), ">="), ("gt", "gt" not in m or value > m["gt"], ">")):
        if op in m and not test:
            return f"expected a value {word} {m[op]}, got {value}"
    if "le" in m and not value <= m["le"]:
        return f"expected a value <= {m['le']}, got {value}"
    if "lt" in m and not value < m["lt"]:
        return f"expected a value < {m['lt']}, got {value}"
    return None


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, dict | list) else type(value).__name__


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if len(args) > 1 and Ellipsis not in args:
            return f"[{', '.join(_describe(a) for a in args)}]"
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


_YAML_BOOLS = {True: ("on", "yes", "true", "y"), False: ("off", "no", "false", "n")}


def _convert(tp: Any, value: Any, dotted: str, where: _Where, errors: list[str]) -> tuple[Any, str | None]:
    """Return (converted value, problem or None)."""
    bad = (None, f"expected {_describe(tp)}, got {_show(value)}")
    origin = typing.get_origin(tp)
    if tp is Any:
        return value, None
    if origin in (typing.Union, types.UnionType):
        return _convert_union(tp, value, dotted, where, bad)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and not (isinstance(value, bool) and all(isinstance(c, str) for c in choices)):
            return value, None
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on/no/yes as a bool: take the spelling meant
            spelled = [c for c in choices if isinstance(c, str) and c.lower() in _YAML_BOOLS[value]]
            if len(spelled) == 1:
                return spelled[0], None
        hint = did_you_mean(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
        return None, f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}"
    if origin in (list, tuple):
        return _convert_sequence(tp, value, dotted, where, errors, bad)
    if origin is dict:
        return (dict(value), None) if isinstance(value, dict) else bad
    if dataclasses.is_dataclass(tp):
        before = len(errors)
        built = _build(tp, value if value is not None else {}, dotted, where, errors)
        if built is None and len(errors) > before:
            return None, None  # already reported in detail
        return built, None
    if tp is bool:
        return (value, None) if isinstance(value, bool) else bad
    if tp is int:
        return (value, None) if isinstance(value, int) and not isinstance(value, bool) else bad
    if tp is float:
        return _convert_float(value, bad)
    if tp is str:
        return (value, None) if isinstance(value, str) else bad
    return bad


def _convert_union(tp: Any, value: Any, dotted: str, where: _Where, bad: tuple[None, str]) -> tuple[Any, str | None]:
    args = typing.get_args(tp)
    if value is None:
        return (None, None) if type(None) in args else bad
    problems: list[str] = []
    # bool first: YAML `true` must not become the string "True"
    for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is not bool):
        converted, problem = _convert(arg, value, dotted, where, [])
        if problem is None:
            return converted, None
        problems.append(problem)
    # say what is wrong (a non-finite number, a list of the wrong length) rather than list every accepted type
    specific = [p for p in problems if p.startswith("expected a finite") or "got a list of" in p]
    return None, specific[0] if specific else bad[1]


def _convert_sequence(
    tp: Any, value: Any, dotted: str, where: _Where, errors: list[str], bad: tuple[None, str]
) -> tuple[Any, str | None]:
    """A list (a scalar is a list of one), or a fixed-size tuple such as ``[height, width]``."""
    args = typing.get_args(tp)
    fixed = len(args) > 1 and Ellipsis not in args
    if isinstance(value, str | int | float) and not isinstance(value, bool) and not fixed:
        value = [value]
    if not isinstance(value, list | tuple):
        return bad
    if fixed and len(value) != len(args):
        return None, f"expected {_describe(tp)}, got a list of {len(value)}"
    out = []
    for i, item in enumerate(value):
        converted, problem = _convert(args[0], item, f"{dotted}[{i}]", where, errors)
        if problem is not None:
            return None, f"item {i}: {problem}"
        out.append(converted)
    return tuple(out), None


def _convert_float(value: Any, bad: tuple[None, str]) -> tuple[float | None, str | None]:
    """Numbers, and strings YAML 1.1 leaves unparsed (``1e-3`` without a dot); never NaN or infinity."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return bad
    try:
        number = float(value)
    except ValueError:
        return bad
    if not math.isfinite(number):
        return None, f"expected a finite number, got {value!r}"
    return number, None


def method_config(name: str, **options: Any) -> Any:
    """Build a validated config of method ``name`` from keyword options (Python API and tests)."""
    from adaptune.methods import get_method

    errors: list[str] = []
    cfg = _build(get_method(name).config_cls, options, "method", _Where("<python>"), errors)
    if errors:
        raise RecipeError(errors)
    return cfg


def field_docs(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type description, default, help) for each option of a config dataclass: the README reference."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if is_internal(f):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = plain(f.default_factory())  # type: ignore[misc]
        else:
            default = None
        rows.append((f.name, _describe(hints[f.name]), default, f.metadata.get("help", "")))
    return rows
