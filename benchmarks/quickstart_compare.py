"""Compare methods on the built-in task: test top-1 (mean ± std over seeds), trainable parameters, wall time.

Runs `adaptune train <recipe> --set train.seed=S` for every recipe and seed (a finished run in --out is reused), then
prints a Markdown table. Defaults: the four quickstart recipes, seed 0.

    python benchmarks/quickstart_compare.py --seeds 0 1 2 --out runs/compare
    python benchmarks/quickstart_compare.py --recipes quickstart quickstart_mosa --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RECIPES = ["quickstart_linear", "quickstart_lora", "quickstart", "quickstart_mosa"]


def run(recipe: str, seed: int, out: Path) -> dict:
    run_dir = out / f"{recipe}-s{seed}"
    summary = run_dir / "summary.json"
    if not summary.exists():
        cmd = [
            sys.executable,
            "-m",
            "adaptune",
            "train",
            recipe,
            "--set",
            f"train.seed={seed}",
            "--out",
            str(run_dir),
            "--quiet",
            "--json",
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = parser.parse_args()

    print("| recipe | method | trainable params | test top-1 (best val) | test top-1 (last) | seeds | time per run |")
    print("|---|---|---|---|---|---|---|")
    for recipe in args.recipes:
        results = [run(recipe, seed, args.out) for seed in args.seeds]

        def stat(key: str) -> str:
            values = [r[key] for r in results if r[key] is not None]
            if not values:
                return "-"
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.2f}%{spread}"

        seconds = statistics.mean(r["wall_time_s"] for r in results)
        print(
            f"| `{recipe}` | {results[0]['method']} | {results[0]['trainable_params']:,} | {stat('test_top1_best')} "
            f"| {stat('test_top1_last')} | {len(results)} | {seconds:.0f} s |"
        )


if __name__ == "__main__":
    main()
