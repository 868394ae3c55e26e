"""Merge time and unmerged-vs-merged inference latency, as ratios, on the CPU.

For each backbone (ViT-S/16, EfficientNet-Lite0; random init, ``pretrained: false``) and method (LoRA, MoSA) this
trains a run for a couple of steps on synthetic 224 px images (only so there is a real run directory), merges it
with `adaptune.merge.merge`, and times a forward pass of batch 8 of the unmerged run model and of the merged model as
`load_artifact` rebuilds them (interleaved passes after warm-up; the table shows the fastest pass of each, the JSON
the medians too).

    python benchmarks/merge_latency.py            # prints a table
    python benchmarks/merge_latency.py --json     # one JSON object per case
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adaptune.merge import load_artifact, merge
from adaptune.recipe import recipe_from_dict
from adaptune.train import train

EFFNET_BLOCKS = ["blocks.4", "blocks.5", "blocks.6"]
EFFNET_LORA = [f"{block}.*.{conv}" for block in EFFNET_BLOCKS for conv in ("conv_pw", "conv_pwl")]
WIDTHS = (24, 7, 8, 9, 13, 11, 8, 10)
CASES = {  # EfficientNet: the quickstart recipes' targets (LoRA on the pointwise convs, adapters after blocks 4-6)
    ("vit_small_patch16_224", "lora"): {},
    ("vit_small_patch16_224", "mosa"): {},
    ("tf_efficientnet_lite0", "lora"): {"targets": EFFNET_LORA},
    ("tf_efficientnet_lite0", "mosa"): {
        "style": "post",
        "norm": False,
        "scale": 1.0,
        "dropout": 0.0,
        "targets": [f"{b}.?" for b in EFFNET_BLOCKS],
    },
}


def tiny_run(model: str, method: str, options: dict, out_dir: Path) -> Path:
    recipe = recipe_from_dict(
        {
            "name": f"{model}-{method}",
            "backbone": {"model": model, "pretrained": False},
            "method": {"name": method, **options},
            "data": {
                "source": "synthetic",
                "img_size": 224,
                "synthetic": {"num_classes": 10, "train_per_class": 1, "val_per_class": 1, "test_per_class": 1},
            },
            "train": {"epochs": 1, "max_steps": 2, "batch_size": 5, "lr": 1e-2, "warmup_epochs": 0.0},
        }
    )
    return train(recipe, out_dir=out_dir).run_dir


def forward_ms(model: torch.nn.Module, images: torch.Tensor) -> float:
    start = time.perf_counter()
    model(images)
    return 1000 * (time.perf_counter() - start)


def latencies(a: torch.nn.Module, b: torch.nn.Module, images: torch.Tensor, rounds: int, warmup: int = 2):
    """Forward times of ``a`` and ``b`` in milliseconds, interleaved one pass each, so that changes in machine load
    hit both alike; returns both lists."""
    a.eval()
    b.eval()
    times_a, times_b = [], []
    with torch.inference_mode():
        for i in range(warmup + rounds):
            ta, tb = forward_ms(a, images), forward_ms(b, images)
            if i >= warmup:
                times_a.append(ta)
                times_b.append(tb)
    return times_a, times_b


def run_case(model: str, method: str, options: dict, root: Path, batch: int, repeats: int) -> dict:
    run_dir = tiny_run(model, method, options, root / f"{model}-{method}")
    report = merge(run_dir, root / f"{model}-{method}.safetensors")
    unmerged = load_artifact(run_dir).model
    merged = load_artifact(report["out"]).model
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    before, after = latencies(unmerged, merged, images, repeats)
    # the minimum is the least disturbed pass (a shared machine adds load, never removes it)
    t_unmerged, t_merged = min(before), min(after)
    return {
        "backbone": model,
        "method": method,
        "form": report["form"],
        "merge_s": report["seconds"],
        "max_abs_diff": report["max_abs_diff"],
        "unmerged_ms": t_unmerged,
        "merged_ms": t_merged,
        "unmerged_over_merged": t_unmerged / t_merged,
        "unmerged_median_ms": statistics.median(before),
        "merged_median_ms": statistics.median(after),
        "batch": batch,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timed passes per model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for (model, method), options in CASES.items():
            row = run_case(model, method, options, Path(tmp), args.batch, args.repeats)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if args.json:
        return
    print(f"CPU, {rows[0]['threads']} threads, batch {args.batch}, fp32, random-init weights")
    header = ("backbone", "method", "form", "merge s", "unmerged ms", "merged ms", "ratio", "diff")
    print("".join(f"{h:<{w}}" if i < 3 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, WIDTHS, strict=True))))
    for r in rows:
        print(
            f"{r['backbone']:<24}{r['method']:<7}{r['form']:<8}{r['merge_s']:>9.2f}{r['unmerged_ms']:>13.1f}"
            f"{r['merged_ms']:>11.1f}{r['unmerged_over_merged']:>8.2f}{r['max_abs_diff']:>10.2g}"
        )


if __name__ == "__main__":
    main()
