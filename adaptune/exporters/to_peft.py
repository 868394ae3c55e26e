"""``--format peft``: PEFT's LoRA layout, ``adapter_config.json`` (``peft_type: LORA``) + ``adapter_model.safetensors``
with keys ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight`` and the head in full (``modules_to_save``).

Possible where every adapter module is a LoRA wrapper over a whole Linear or plain Conv2d (no q/k/v slices of a fused
qkv: set ``method.qkv: []``) with one rank and scale; verified by loading it with PEFT when PEFT is installed. A
model card (``README.md``, `adaptune.exporters.model_card`) says how to load it onto its timm base model.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adaptune.errors import ArtifactError
from adaptune.exporters import model_card
from adaptune.exporters.registry import ExportContext, ExportFormat, Runner, register
from adaptune.files import save_safetensors, write_json

if TYPE_CHECKING:
    import torch
    from torch import nn


def _lora_modules(model: nn.Module, form: str) -> list[tuple[str, Any]]:
    """The LoRA wrappers PEFT's layout can hold, checked.

    Raises:
        ArtifactError: No LoRA modules, q/k/v slices, a conv PEFT cannot reproduce.
    """
    import torch

    from adaptune.methods.common import adapter_modules
    from adaptune.methods.lora import LoRAConv2d, LoRALinear

    modules = list(adapter_modules(model))
    if form == "folded" or not modules:
        raise ArtifactError("--format peft: the source has no LoRA modules (already folded?); export a run directory")
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
    return modules


def _peft_config(modules: list[tuple[str, Any]], head: str) -> dict[str, Any]:
    ranks = {m.rank for _, m in modules}
    scales = {m.scale for _, m in modules}
    dropouts = {getattr(m.lora_dropout, "p", 0.0) for _, m in modules}
    if len(ranks) != 1 or len(scales) != 1 or len(dropouts) != 1:
        raise ArtifactError("--format peft: the LoRA modules differ in rank, scale or dropout; PEFT needs one of each")
    (rank,), (scale,), (dropout,) = ranks, scales, dropouts
    return {
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


def write(ctx: ExportContext, tmp: Path) -> None:
    from adaptune.backbone import head_path

    modules = _lora_modules(ctx.model, ctx.form)
    head = head_path(ctx.model)
    tensors: dict[str, torch.Tensor] = {}
    for path, module in modules:
        tensors[f"base_model.model.{path}.lora_A.weight"] = module.get_parameter("pairs.all.lora_a.weight").detach()
        tensors[f"base_model.model.{path}.lora_B.weight"] = module.get_parameter("pairs.all.lora_b.weight").detach()
    for key, tensor in ctx.model.get_submodule(head).state_dict().items():
        tensors[f"base_model.model.{head}.{key}"] = tensor.detach()
    config = _peft_config(modules, head)
    write_json(tmp / ADAPTER_CONFIG, config)
    save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, {**ctx.manifest, "peft_config": config})
    resize = model_card.eval_resize(ctx.artifact.recipe, ctx.input)
    card = model_card.render(ctx.manifest, method_summary=ctx.method.summary, resize=resize)
    (tmp / model_card.CARD_FILE).write_text(card, encoding="utf-8")


def load(ctx: ExportContext, tmp: Path) -> tuple[Runner | None, str]:
    """Load the written adapter with PEFT into the plain backbone (each LoRA wrapper replaced by the module it
    wraps), when PEFT is installed."""
    import torch

    try:
        import peft
    except ImportError:
        return None, "PEFT not installed; pip install peft to verify"
    from adaptune.methods.common import replace_module

    base = copy.deepcopy(ctx.model)
    for path, _ in _lora_modules(ctx.model, ctx.form):
        replace_module(base, path, base.get_submodule(f"{path}.base"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(base, str(tmp)).eval()

    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return loaded(inputs).float()

    return run, f"peft {peft.__version__}"


register(
    ExportFormat(
        name="peft",
        summary="PEFT's LoRA layout: adapter_config.json + adapter_model.safetensors (LoRA on whole modules)",
        kind="dir",
        write=write,
        load=load,
        fold=False,
    )
)
