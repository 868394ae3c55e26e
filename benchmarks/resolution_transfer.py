"""Accuracy at resolutions a model was not trained at (ResAdapter's point), on the built-in Fashion-MNIST task.

Trains the quickstart recipes (tf_efficientnet_lite0 with the offline ImageNet weights, ``fashion-mnist-1k``) of each
method at one input size, then evaluates every run on the test split at several other sizes with
`adaptune.evaluate.evaluate_artifact(..., img_size=N)` (what ``adaptune eval --img-size N`` does) and prints a
Markdown table of test top-1. A finished run in ``--out`` is reused. Needs the ``[demo]`` extra.

    python benchmarks/resolution_transfer.py                                  # 64 px, 3 epochs: a few minutes
    python benchmarks/resolution_transfer.py --train-size 96 --epochs 8 --seeds 0 1 2 --out runs/resolution

The methods differ only in what trains (same data, schedule, seed): ``linear`` (head), ``lora`` (rank 8 on the
pointwise convs of the last three stages), ``resadapter`` (conv-LoRA on the down-sampling convs + BatchNorm affines)
and ``norm_tuning`` (BatchNorm affines).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

RECIPES = {
    "linear": "quickstart_linear",
    "lora": "quickstart_lora",
    "resadapter": "quickstart_resadapter",
    "norm_tuning": "quickstart_norm_tuning",
}


def train_run(method: str, seed: int, args: argparse.Namespace) -> tuple[Path, dict]:
    """Train (or reuse) the quickstart recipe of ``method`` at ``args.train_size``; returns (run dir, summary)."""
    import json

    from adaptune.cli import resolve_recipe_path
    from adaptune.recipe import load_recipe
    from adaptune.train import train

    run_dir = args.out / f"{method}-{args.train_size}px-{args.epochs}ep-s{seed}"
    if not (run_dir / "summary.json").is_file():
        overrides = [
            f"data.img_size={args.train_size}",
            f"train.epochs={args.epochs}",
            f"train.seed={seed}",
            "train.log_every=1000",
        ]
        recipe = load_recipe(resolve_recipe_path(RECIPES[method]), overrides)
        train(recipe, out_dir=run_dir)
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--train-size", type=int, default=64, help="input size during training (px)")
    parser.add_argument("--eval-sizes", nargs="+", type=int, default=[48, 64, 96, 128, 160])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=Path("runs/resolution"))
    args = parser.parse_args()

    from adaptune.evaluate import evaluate_artifact

    sizes = sorted(set(args.eval_sizes) | {args.train_size})
    head = " | ".join(f"**{s}**" if s == args.train_size else str(s) for s in sizes)
    print(f"Test top-1 (%) on fashion-mnist-1k, trained at {args.train_size} px for {args.epochs} epochs")
    print(f"(seeds {', '.join(map(str, args.seeds))}; columns: evaluation size in px, bold = training size)\n")
    print(f"| method | trainable params | {head} | train time |")
    print("|---|---|" + "---|" * len(sizes) + "---|")
    for method in args.methods:
        accs: dict[int, list[float]] = {s: [] for s in sizes}
        seconds, params = [], 0
        for seed in args.seeds:
            t0 = time.perf_counter()
            run_dir, summary = train_run(method, seed, args)
            seconds.append(summary.get("wall_time_s", time.perf_counter() - t0))
            params = summary["trainable_params"]
            for s in sizes:
                accs[s].append(evaluate_artifact(run_dir, img_size=s, write=False)["top1"])

        def cell(values: list[float]) -> str:
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.1f}{spread}"

        cells = " | ".join(cell(accs[s]) for s in sizes)
        print(f"| {method} | {params:,} | {cells} | {statistics.mean(seconds):.0f} s |", flush=True)


if __name__ == "__main__":
    main()
