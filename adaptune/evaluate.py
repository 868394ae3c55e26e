"""One evaluation function for training, ``adaptune eval`` and the merge/export checks."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader


def autocast(device: torch.device, precision: str):  # noqa: ANN201
    """Autocast context for ``precision`` (fp32: none)."""
    import torch

    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    precision: str = "fp32",
    confusion: bool = True,
) -> dict[str, Any]:
    """Loss, top-1, top-5 (in %), per-class and macro accuracy, confusion matrix, throughput.

    The model is put in eval mode for the pass (consolidated adapters: MoSA evaluates its merged expert) and its mode
    is restored afterwards.

    Returns:
        ``{"loss", "top1", "top5", "macro_top1", "per_class_top1" (list), "confusion" (list of lists, rows = true
        class), "samples", "images_per_s", "peak_memory_mb"}``
    """
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, top5_hits, seen = 0.0, 0, 0
    k = min(5, num_classes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            topk = logits.topk(k, dim=1).indices  # (B, k)
            top5_hits += (topk == labels[:, None]).any(dim=1).sum().item()
            pred = topk[:, 0]
            matrix += torch.bincount(
                (labels * num_classes + pred).cpu(), minlength=num_classes * num_classes
            ).view(num_classes, num_classes)
            seen += labels.numel()
    elapsed = time.perf_counter() - start
    model.train(was_training)
    if seen == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    correct = matrix.diag()
    per_class_total = matrix.sum(dim=1)
    per_class = torch.where(per_class_total > 0, correct.double() / per_class_total.clamp(min=1), torch.nan)
    present = per_class_total > 0
    result: dict[str, Any] = {
        "loss": loss_sum / seen,
        "top1": 100.0 * correct.sum().item() / seen,
        "top5": 100.0 * top5_hits / seen,
        "macro_top1": 100.0 * per_class[present].mean().item(),
        "per_class_top1": [None if torch.isnan(v) else 100.0 * v.item() for v in per_class],
        "samples": seen,
        "images_per_s": seen / elapsed if elapsed > 0 else float("inf"),
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    if confusion:
        result["confusion"] = matrix.tolist()
    return result


def evaluate_run(run_dir: str, split: str = "test", checkpoint: str = "best", device: str = "auto") -> dict[str, Any]:
    """Rebuild a run's model from its directory and evaluate it on a split of its recipe's data."""
    import torch

    from adaptune import data
    from adaptune.artifacts import load_run
    from adaptune.backbone import input_spec

    model, recipe, manifest = load_run(run_dir, checkpoint)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    size, mean, std = input_spec(model, recipe)
    loader = data.build_eval_loader(
        recipe.data, split, img_size=size, mean=mean, std=std,
        batch_size=recipe.train.eval_batch_size or 2 * recipe.train.batch_size,
    )
    result = evaluate(model.to(dev), loader, dev, manifest["num_classes"], recipe.train.precision)
    result.update(run_dir=str(run_dir), checkpoint=checkpoint, split=split, class_names=manifest.get("class_names"))
    return result
