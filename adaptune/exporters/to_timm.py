"""``--format timm``: timm's own layout (``config.json`` + ``model.safetensors``) and a model card (``README.md``),
read back with ``timm.create_model("local-dir:...")``, published with ``adaptune push``. Plain timm weights only: the
method must fold.

The data config makes timm's own evaluation transform (``resolve_data_config`` + ``create_transform``) reproduce
adaptune's input: resize to the stored size without keeping the aspect ratio (``crop_mode: squash``), then the centre
crop to the model's size (``crop_pct`` = model size / stored size; 1.0 without a cropping augmentation).
"""

from __future__ import annotations

from pathlib import Path

from adaptune.exporters import model_card
from adaptune.exporters.registry import ExportContext, ExportFormat, Runner, register
from adaptune.files import save_safetensors
from adaptune.loading import TIMM_WEIGHTS


def write(ctx: ExportContext, tmp: Path) -> None:
    from timm.models import save_for_hf

    resize = model_card.eval_resize(ctx.artifact.recipe, ctx.input)
    data_config = {
        "input_size": tuple(ctx.input.shape),
        "mean": list(ctx.input.mean),
        "std": list(ctx.input.std),
        "interpolation": ctx.input.interpolation,
        "crop_pct": model_card.crop_pct(ctx.input.size, resize),
        "crop_mode": "squash",
    }
    save_for_hf(
        ctx.model,
        str(tmp),
        model_config={"label_names": ctx.manifest.get("class_names")},
        safe_serialization=True,
        data_config=data_config,
    )
    # the same tensors again, with the adaptune manifest in the metadata (timm ignores metadata)
    save_safetensors(ctx.model.state_dict(), tmp / TIMM_WEIGHTS, ctx.manifest)
    card = model_card.render(ctx.manifest, method_summary=ctx.method.summary, resize=resize)
    (tmp / model_card.CARD_FILE).write_text(card, encoding="utf-8")


def load(ctx: ExportContext, tmp: Path) -> tuple[Runner, str]:
    import timm
    import torch

    model = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()

    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(inputs).float()

    return run, f"timm {timm.__version__} local-dir"


register(
    ExportFormat(
        name="timm",
        summary="timm's layout: config.json + model.safetensors (foldable methods)",
        kind="dir",
        write=write,
        load=load,
        needs_fold=True,
    )
)
