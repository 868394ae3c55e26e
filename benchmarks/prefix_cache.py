"""The quickstart end to end with the prefix cache (``train.prefix_cache=auto``, the default) and without (``off``):
wall time of each whole run, their ratio, and proof that the cache changes nothing (test top-1, adapter weights).

Each run is the shipped recipe as a user runs it, in its own process: ``python -m adaptune train quickstart --out DIR
--json --set train.prefix_cache=auto|off`` (EfficientNet-Lite0 with the offline ImageNet weights of the ``[demo]``
extra, the built-in ``fashion-mnist-1k`` task, 8 epochs; ``--epochs N`` and ``--img-size N`` shorten it through
``--set train.epochs=N`` and ``--set data.img_size=N``). Measured per run:

    field              where it comes from
    process s          wall clock of the whole process in this script: start-up, imports, weight conversion, cache
                       build, training, testing
    train s            the run's own ``wall_time_s`` (summary.json: `adaptune.train.train` from start to summary)
    test top-1         ``test_top1_best`` and ``test_top1_last`` of the summary
    data time share    ``data_time_fraction`` of summary.json: the loop's time waiting for batches over waiting +
                       computing (with the cache, batches are cached feature maps)
    images/s           ``train_images_per_s`` of the summary
    cache              the run's ``prefix cache: ...`` log line (what it cached and how long that took, or why off)

The two modes of a repeat run one after the other, the order alternating between repeats (off first in the first)
so a change of machine load hits both alike; a ratio is auto / off within one repeat, reported as the median over
repeats with its 10th-90th percentile spread. Same results: the largest absolute difference between the two runs'
final adapter weights (``adapter_model.safetensors``, every tensor; 0 expected: the cache is only used where it
cannot change a result) and between their test top-1.

    python benchmarks/prefix_cache.py                                     # the full quickstart, twice (~4 min idle)
    python benchmarks/prefix_cache.py --epochs 1 --img-size 64            # a smoke run (~1 min)
    python benchmarks/prefix_cache.py --repeats 3 --out runs/prefix --json prefix_cache.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from methods_step import spread

MODES = ("off", "auto")


def run_once(recipe: str, mode: str, run_dir: Path, sets: list[str]) -> dict[str, Any]:
    """One ``adaptune train`` process; its summary.json with the process wall time and the cache log line.

    Raises:
        RuntimeError: The run failed (its last stderr line).
    """
    if run_dir.exists():
        raise RuntimeError(f"{run_dir} exists: give a new --out (adaptune would resume or refuse it)")
    overrides = [f"train.prefix_cache={mode}", *sets]
    cmd = [sys.executable, "-m", "adaptune", "train", recipe, "--out", str(run_dir), "--json"]
    for item in overrides:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log = proc.stderr.splitlines()
    (run_dir.parent / f"{run_dir.name}.log").write_text(proc.stderr)
    if proc.returncode != 0:
        last = next((line for line in reversed(log) if line.strip()), f"exit code {proc.returncode}")
        raise RuntimeError(f"{' '.join(cmd[1:])}: {last}")
    summary = json.loads((run_dir / "summary.json").read_text())
    cache = next((line for line in log if line.startswith("prefix cache:")), None)
    return {
        "mode": mode,
        "run_dir": str(run_dir),
        "process_s": seconds,
        "train_s": summary["wall_time_s"],
        "test_top1_best": summary["test_top1_best"],
        "test_top1_last": summary["test_top1_last"],
        "final_weights": summary["final_weights"],
        "data_time_fraction": summary["data_time_fraction"],
        "train_images_per_s": summary["train_images_per_s"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "cache": cache or ("prefix cache: off (train.prefix_cache=off)" if mode == "off" else "no prefix cache line"),
        "command": " ".join(["adaptune", *cmd[3:]]),
    }


def weight_difference(a: Path, b: Path) -> float:
    """Largest absolute difference over every tensor of two runs' ``adapter_model.safetensors`` (same keys)."""
    from adaptune.artifacts import ADAPTER_WEIGHTS, load_safetensors

    ta, _ = load_safetensors(a / ADAPTER_WEIGHTS)
    tb, _ = load_safetensors(b / ADAPTER_WEIGHTS)
    if ta.keys() != tb.keys():
        raise RuntimeError(f"{a} and {b} hold different tensors: {sorted(ta.keys() ^ tb.keys())[:5]}")
    return max((float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if ta[k].numel()), default=0.0)


def measure(
    out: Path, recipe: str = "quickstart", repeats: int = 1, epochs: int | None = None, img_size: int | None = None
) -> dict[str, Any]:
    """Run ``recipe`` with the cache off and auto ``repeats`` times into ``out`` and compare (see the docstring)."""
    sets = []
    if epochs is not None:
        sets.append(f"train.epochs={epochs}")
    if img_size is not None:
        sets.append(f"data.img_size={img_size}")
    repeats_out = []
    for i in range(repeats):
        order = MODES if i % 2 == 0 else MODES[::-1]
        runs = {mode: run_once(recipe, mode, out / f"r{i}-{mode}", sets) for mode in order}
        on, off = runs["auto"], runs["off"]
        repeats_out.append(
            {
                "order": list(order),
                "runs": runs,
                "process_ratio": on["process_s"] / off["process_s"],
                "train_ratio": on["train_s"] / off["train_s"],
                "max_abs_weight_diff": weight_difference(Path(on["run_dir"]), Path(off["run_dir"])),
                "test_top1_diff": max(
                    abs(on[k] - off[k]) for k in ("test_top1_best", "test_top1_last") if on[k] is not None
                ),
            }
        )
    return {
        "recipe": recipe,
        "overrides": sets,
        "repeats": repeats_out,
        "process_ratio": spread([r["process_ratio"] for r in repeats_out]),
        "train_ratio": spread([r["train_ratio"] for r in repeats_out]),
        "max_abs_weight_diff": max(r["max_abs_weight_diff"] for r in repeats_out),
        "test_top1_diff": max(r["test_top1_diff"] for r in repeats_out),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}%"


def markdown(result: dict[str, Any]) -> str:
    """The runs' table and the ratios in Markdown."""
    extra = f" with `{' '.join('--set ' + s for s in result['overrides'])}`" if result["overrides"] else ""
    lines = [
        f"`adaptune train {result['recipe']}`{extra}, {len(result['repeats'])} repeat(s), the order alternating",
        "",
        "| repeat | prefix_cache | process s | train s | images/s | data time share | test top-1 (best) "
        "| test top-1 (last) | cache |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, rep in enumerate(result["repeats"]):
        for mode in rep["order"]:
            r = rep["runs"][mode]
            share = "-" if r["data_time_fraction"] is None else f"{100 * r['data_time_fraction']:.1f}%"
            ips = "-" if r["train_images_per_s"] is None else f"{r['train_images_per_s']:.0f}"
            lines.append(
                f"| {i} | {mode} | {r['process_s']:.1f} | {r['train_s']:.1f} | {ips} | {share} | "
                f"{_pct(r['test_top1_best'])} | {_pct(r['test_top1_last'])} | {r['cache']} |"
            )
    p, t = result["process_ratio"], result["train_ratio"]
    lines += [
        "",
        f"auto / off: process {p['median']:.2f} ({p['p10']:.2f}-{p['p90']:.2f}), train {t['median']:.2f} "
        f"({t['p10']:.2f}-{t['p90']:.2f}); largest adapter weight difference {result['max_abs_weight_diff']:.1e}, "
        f"largest test top-1 difference {result['test_top1_diff']:.2f} points.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quickstart", help="a shipped recipe name or a recipe file")
    parser.add_argument("--epochs", type=int, default=None, help="--set train.epochs=N (default: the recipe's)")
    parser.add_argument("--img-size", type=int, default=None, help="--set data.img_size=N (default: the recipe's)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs, the order alternating")
    parser.add_argument("--out", default=None, help="keep the run directories here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        result = measure(out, args.recipe, args.repeats, args.epochs, args.img_size)
    result["command"] = " ".join(
        ["python", "benchmarks/" + Path(__file__).name, *(sys.argv[1:] if argv is None else argv)]
    )
    print(markdown(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
