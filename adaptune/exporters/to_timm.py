"""``--format timm``: timm's own layout (``config.json`` + ``model.safetensors``), read back with
``timm.create_model("local-dir:...")``. Plain timm weights only: the method must fold."""

from __future__ import annotations

from pathlib import Path

from adaptune.exporters.registry import ExportContext, ExportFormat, Runner, register
from adaptune.files import save_safetensors
from adaptune.loading import TIMM_WEIGHTS


def write(ctx: ExportContext, tmp: Path) -> None:
    from timm.models import save_for_hf

    data_config = {
        "input_size": tuple(ctx.input.shape),
        "mean": list(ctx.input.mean),
        "std": list(ctx.input.std),
        "interpolation": ctx.input.interpolation,
        "crop_pct": 1.0,
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
