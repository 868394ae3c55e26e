"""Every benchmark of this folder in one command: a Markdown report (``RESULTS.md``) and ``results.json``.

Each part runs as its own subprocess and writes JSON into ``--out`` (``<part>.json``; its stdout and stderr go to
``<part>.out`` and ``<part>.err`` there); this script then renders one Markdown section per part: the command, the
table, and a sentence on what bounds its ratios. A part that fails (non-zero exit, no JSON, time-out) is reported as
failed with its error line, and the suite goes on with the next.

    part             script                          what it gives
    methods_step     methods_step.py --json          every method's step time, images/s and memory as ratios to
                                                     full fine-tuning and to the frozen floor
    lora_vs_peft     lora_vs_peft.py --json          adaptune LoRA vs PEFT LoRA: step and inference ratios, the
                                                     largest output difference with equal weights
    mosa_step        mosa_step.py's models and       MoSA vs the dense adapter: step-time ratios, trainable state
                     steps (``build``, ``make_step``, (mosa_step.py itself prints only a text table; this script
                     ``state_bytes``), timed here     times its steps with `methods_step.interleaved` in a
                                                     subprocess: ``suite.py _mosa_step --json PATH``)
    merge_latency    merge_latency.py --json         merge time, unmerged vs merged inference latency (CPU only)
    speed_switches   speed_switches.py --json        compile, channels_last, grad_checkpointing vs off
    prefix_cache     prefix_cache.py --json          the quickstart with the prefix cache and without: wall time,
                                                     same weights; its runs' summary.json give the data time share
                                                     section (``data_time_fraction``, both modes)

Sizes: the CPU defaults are each script's own CPU cases (ViT-S/16 at 96 px, EfficientNet-Lite0 at 128 px, batch
32, 2 threads) with fewer rounds, sized so that the whole suite takes about 15-17 minutes on an idle 2-core machine
(estimated from single-step timings: methods_step ~6, prefix_cache ~4.5 (the full 8-epoch quickstart, twice),
speed_switches ~3.5 (``compile`` on the CNN case only), lora_vs_peft, mosa_step and merge_latency ~1 each). With CUDA
(``torch.cuda.is_available()``, or ``--device cuda``) each part gets its script's GPU sizes (ViT-B/16 at 224 px,
larger batches, every switch on both cases; merge_latency stays on the CPU). ``--quick`` runs every part at its
smallest size (a smoke run: ~4 min idle; methods_step with adapter, lora, mosa and linear only, speed_switches without
``compile``, whose compilation alone takes minutes on a CPU, a 1-epoch 64 px quickstart). The exact command of every
part is in the report.

Output: ``--out`` (default ``runs/benchmarks-<time>``) holds every part's files, ``results.json`` (every part's
results, its command, status and seconds, plus the machine: CPU model, cores, load, torch/timm/adaptune versions,
threads, GPU, git commit, date) and ``RESULTS.md``. A full run (no ``--quick``, no ``--parts``) also writes the report
to ``benchmarks/RESULTS.md``, the committed one; ``--out-md PATH`` writes it there instead (in any mode).

    python benchmarks/suite.py                                  # everything, ~15 min idle -> benchmarks/RESULTS.md
    python benchmarks/suite.py --quick --out runs/bench-smoke   # every part at its smallest size
    python benchmarks/suite.py --parts speed_switches prefix_cache --out runs/bench-partial
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


@dataclasses.dataclass(frozen=True)
class Part:
    """One benchmark of the suite.

    Attributes:
        name: Its name in ``--parts`` and the output files.
        title: The report's section title.
        bounds: What bounds its ratios (one sentence, in the report).
        command: ``(quick, cuda, json path) -> argv`` after the Python executable.
        render: The Markdown of its results.
        reads_stdout: The part prints its JSON (one object per line) on stdout instead of writing ``json path``.
    """

    name: str
    title: str
    bounds: str
    command: Callable[[bool, bool, Path], list[str]]
    render: Callable[[dict[str, Any]], str]
    reads_stdout: bool = False


# ----------------------------------------------------------------------------------------------------------------
# the parts: commands


def _script(name: str) -> str:
    return str(HERE / f"{name}.py")


def _methods_step_cmd(quick: bool, cuda: bool, out: Path) -> list[str]:
    if quick:  # full and the frozen floor are always added
        size = ["--quick", "--methods", "adapter", "lora", "mosa", "linear"]
    else:  # every method, 1 + 3 rounds: ViT-S's 21 configurations take most of the suite's time
        size = [] if cuda else ["--rounds", "3", "--warmup", "1", "--memory-steps", "1"]
    return [_script("methods_step"), *size, *_device(cuda), "--json", str(out)]


def _lora_vs_peft_cmd(quick: bool, cuda: bool, out: Path) -> list[str]:
    if quick:
        size = ["--img-size", "48", "--batch", "8", "--steps", "3", "--infer-steps", "3", "--warmup", "1"]
    elif cuda:
        size = ["--img-size", "224", "--batch", "128", "--threads", "0"]
    else:
        size = ["--steps", "10", "--infer-steps", "10", "--warmup", "2"]  # ViT-S/16 at 96 px, batch 32
    return [_script("lora_vs_peft"), *size, *_device(cuda), "--json", str(out)]


def _mosa_step_cmd(quick: bool, cuda: bool, out: Path) -> list[str]:
    if quick:
        size = ["--img-size", "48", "--batch", "8", "--steps", "3", "--warmup", "1"]
    elif cuda:
        size = ["--model", "vit_base_patch16_224", "--img-size", "224", "--batch", "128", "--steps", "30"]
    else:
        size = ["--steps", "12", "--warmup", "3"]  # vit_tiny at 96 px, batch 32
    return [__file__, "_mosa_step", *size, *_device(cuda), "--json", str(out)]


def _merge_latency_cmd(quick: bool, cuda: bool, out: Path) -> list[str]:
    size = ["--repeats", "2", "--batch", "1"] if quick else ["--repeats", "8", "--batch", "8"]
    return [_script("merge_latency"), *size, "--threads", "2", "--json"]  # CPU only, like the script


def _speed_switches_cmd(quick: bool, cuda: bool, out: Path) -> list[str]:
    if quick:
        size = ["--quick", "--skip", "compile"]
    elif cuda:
        size = []
    else:
        # compile on the quickstart's CNN only: its compilation takes ~2 min of CPU per case (timing + memory)
        size = ["--rounds", "5", "--warmup", "1", "--memory-steps", "1", "--compile-on", "cnn"]
    return [_script("speed_switches"), *size, *_device(cuda), "--json", str(out)]


def _prefix_cache_cmd(quick: bool, cuda: bool, out: Path) -> list[str]:
    size = ["--epochs", "1", "--img-size", "64"] if quick else []  # else: the shipped quickstart as it is
    runs = out.parent / f"prefix_cache-runs-{time.strftime('%Y%m%d-%H%M%S')}"  # new run directories every time
    return [_script("prefix_cache"), *size, "--out", str(runs), "--json", str(out)]


def _device(cuda: bool) -> list[str]:
    return ["--device", "cuda" if cuda else "cpu"]


# ----------------------------------------------------------------------------------------------------------------
# the parts: tables


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _spread(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['p10']:.{digits}f}-{s['p90']:.{digits}f})"


def _render_methods_step(result: dict[str, Any]) -> str:
    import methods_step

    return "\n\n".join(methods_step.markdown(case) for case in result["cases"])


def _render_lora_vs_peft(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"**{c['model']}**, {c['img_size']} px, batch {c['batch']}, r={c['rank']}, targets `{c['targets']}`, "
        f"{c['device']}, {c['threads']} threads, {c['steps']} train / {c['infer_steps']} inference rounds, "
        f"interleaved, {c['clock']} clock (ratios: adaptune / PEFT, median of per-round ratios, p10-p90)",
        "",
        "| vs PEFT fused qkv | adaptune step ms | PEFT step ms | step ratio | inference ratio | trainable "
        "| max abs diff logits (scale) | max abs diff grads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        d = r["difference"]
        grad = f"{d['grad']:.1e}" if "grad" in d else "-"
        lines.append(
            f"| {r['row']} | {r['adaptune_step_ms']:.1f} | {r['peft_step_ms']:.1f} | {_spread(r['step'], 3)} | "
            f"{_spread(r['inference'], 3)} | {r['trainable']:,} | {d['logits']:.1e} ({d['logits_scale']:.1f}) | "
            f"{grad} |"
        )
    lines += ["", "q/v slices: PEFT cannot slice a fused qkv Linear; its row compares with PEFT's fused pair."]
    return "\n".join(lines)


def _render_mosa_step(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"**{c['model']}**, {c['img_size']} px, batch {c['batch']}, r={c['bottleneck']}, N={c['num_experts']}, "
        f"{c['device']}, {c['threads']} threads, median of {c['steps']} interleaved rounds after {c['warmup']} "
        "warm-up (ratios: median of per-round ratios, p10-p90; state: trainable parameters + AdamW state)",
        "",
        "| variant | step ms | vs adapter | vs adapter x2 | state bytes | state vs adapter |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        x2 = _spread(r["vs_adapter_x2"]) if r.get("vs_adapter_x2") else "-"
        lines.append(
            f"| {r['variant']} | {r['step_ms']['median']:.1f} | {_spread(r['vs_adapter'])} | {x2} | "
            f"{r['state_bytes']:,} | {r['state_vs_adapter']:.3f} |"
        )
    return "\n".join(lines)


def _render_merge_latency(result: dict[str, Any]) -> str:
    rows = result["rows"]
    if not rows:
        raise ValueError("merge_latency printed no JSON rows")
    lines = [
        f"CPU, {rows[0]['threads']} threads, batch {rows[0]['batch']}, fp32, random-init weights, 224 px; fastest of "
        "the interleaved passes (the least disturbed), medians in brackets",
        "",
        "| backbone | method | merged form | merge s | unmerged ms | merged ms | unmerged / merged | max abs diff |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['method']} | {r['form']} | {r['merge_s']:.2f} | {r['unmerged_ms']:.1f} "
            f"({r['unmerged_median_ms']:.1f}) | {r['merged_ms']:.1f} ({r['merged_median_ms']:.1f}) | "
            f"{r['unmerged_over_merged']:.2f} | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def _render_speed_switches(result: dict[str, Any]) -> str:
    import speed_switches

    return "\n\n".join(speed_switches.markdown(case) for case in result["cases"])


def _render_prefix_cache(result: dict[str, Any]) -> str:
    import prefix_cache

    return prefix_cache.markdown(result)


def render_data_time(result: dict[str, Any]) -> str:
    """The data time share of the prefix_cache runs (``data_time_fraction`` of their summary.json)."""
    lines = [
        "| run | prefix_cache | data time share | train images/s | train s |",
        "|---|---|---:|---:|---:|",
    ]
    for i, rep in enumerate(result["repeats"]):
        for mode in rep["order"]:
            r = rep["runs"][mode]
            share = "-" if r["data_time_fraction"] is None else f"{100 * r['data_time_fraction']:.1f}%"
            lines.append(f"| {i} | {mode} | {share} | {_fmt(r['train_images_per_s'], 0)} | {r['train_s']:.1f} |")
    return "\n".join(lines)


PARTS = {
    p.name: p
    for p in (
        Part(
            "methods_step",
            "Every method against full fine-tuning and the frozen floor",
            "A method's step still runs the whole frozen forward and the activation gradients down to its first "
            "trainable module, so `vs floor` is bounded below by about 1 for methods that train early layers (only "
            "late placements, as the CNN recipes' adapters, and the linear probe go under it), and `vs full` by the "
            "share of full fine-tuning's step that is weight gradients and the AdamW update of the backbone; memory "
            "`vs full` is bounded below by the activations that backward must keep, which no method removes.",
            _methods_step_cmd,
            _render_methods_step,
        ),
        Part(
            "lora_vs_peft",
            "adaptune LoRA against PEFT LoRA",
            "Both run the same frozen matmuls; the ratio is bounded by the share of time in the frozen ViT's "
            "forward/backward (the LoRA branches are a few percent of the step, so an implementation can only move "
            "the ratio within that share), and the output difference by fp32 rounding of a different summation order.",
            _lora_vs_peft_cmd,
            _render_lora_vs_peft,
        ),
        Part(
            "mosa_step",
            "MoSA against the dense adapter",
            "MoSA's experts are slices of the dense adapter's shapes, so one pass costs the adapter's step plus the "
            "expert selection: `vs adapter` is bounded by the adapter's share of the step (the frozen ViT dominates "
            "both), and `mosa +kl` runs a doubled batch, so it is bounded by `adapter x2`, not by the adapter.",
            _mosa_step_cmd,
            _render_mosa_step,
        ),
        Part(
            "merge_latency",
            "Merged against unmerged inference",
            "A folded LoRA is the plain backbone, so `unmerged / merged` is bounded by the LoRA branches' share of "
            "the unmerged forward; a consolidated MoSA still runs one dense adapter per block, so its ratio is "
            "bounded by the split bookkeeping alone and stays near 1.",
            _merge_latency_cmd,
            _render_merge_latency,
            reads_stdout=True,
        ),
        Part(
            "speed_switches",
            "Speed switches: compile, channels_last, grad_checkpointing",
            "Checkpointing's time ratio is bounded by about 1 + the checkpointed blocks' forward share of the step "
            "(their forward runs twice) and its memory ratio by the share of saved activations inside those blocks; "
            "channels_last by the share of time in convolutions whose kernels prefer NHWC; compile by the share of "
            "time in elementwise and normalisation ops it can fuse (matmuls and convolutions stay library kernels).",
            _speed_switches_cmd,
            _render_speed_switches,
        ),
        Part(
            "prefix_cache",
            "The quickstart with and without the prefix cache",
            "The cache runs the frozen layers before the first adapter once per image instead of once per epoch, so "
            "auto / off is bounded below by the share of the run outside those layers: the trainable tail's "
            "forward/backward, start-up and testing, which both runs pay (and the cache's one build pass).",
            _prefix_cache_cmd,
            _render_prefix_cache,
        ),
    )
}
DATA_TIME_INTRO = (
    "The loop's time waiting for batches over waiting + computing (`data_time_fraction` of each prefix_cache run's "
    "summary.json), with the cache and without."
)
DATA_TIME_BOUNDS = (
    "The share is bounded by the loader's work per batch against the step's compute: without the cache a batch is "
    "images resized and flipped on the CPU, with it a slice of cached feature maps, so both sides shrink together."
)


# ----------------------------------------------------------------------------------------------------------------
# running


def error_line(stderr: str, fallback: str) -> str:
    """The exception line of the last traceback in ``stderr``, else its last non-empty line, else ``fallback``."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        after = [line for line in lines[starts[-1] + 1 :] if line.strip() and not line.startswith((" ", "\t"))]
        if after:
            return after[0]
    return next((line.strip() for line in reversed(lines) if line.strip()), fallback)


def run_part(part: Part, out: Path, quick: bool, cuda: bool, timeout: float | None) -> dict[str, Any]:
    """Run ``part`` into ``out``; ``{"status": "ok"|"failed", "command", "seconds", "result" | "error"}``."""
    json_path = out / f"{part.name}.json"
    argv = part.command(quick, cuda, json_path)
    shown = " ".join(["python", *(_relative(a) for a in argv)])
    record: dict[str, Any] = {"status": "failed", "command": shown}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        record.update(seconds=time.perf_counter() - t0, error=f"timed out after {timeout:.0f} s")
        _write(out / f"{part.name}.err", e.stderr)
        return record
    record["seconds"] = time.perf_counter() - t0
    (out / f"{part.name}.out").write_text(proc.stdout)
    (out / f"{part.name}.err").write_text(proc.stderr)
    if proc.returncode != 0:
        record["error"] = error_line(proc.stderr, f"exit code {proc.returncode}")
        return record
    try:
        if part.reads_stdout:
            rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            result: dict[str, Any] = {"rows": rows}
            json_path.write_text(json.dumps(result, indent=1))
        else:
            result = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        record["error"] = f"no results: {type(e).__name__}: {e}"
        return record
    record.update(status="ok", result=result)
    return record


def _write(path: Path, text: str | bytes | None) -> None:
    if text is not None:
        path.write_text(text.decode(errors="replace") if isinstance(text, bytes) else text)


def _relative(arg: str) -> str:
    try:
        return str(Path(arg).resolve().relative_to(REPO)) if os.sep in arg else arg
    except ValueError:
        return arg


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import timm
    import torch

    import adaptune

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO)
    cuda = torch.cuda.is_available()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "adaptune": adaptune.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "git": (commit.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")) or None,
        "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------------------------------------------
# the report


def render_markdown(results: dict[str, Any]) -> str:
    """The whole report from ``results`` (what results.json holds): machine, summary table, one section per part."""
    m = results["machine"]
    load = m.get("load_average")
    lines = [
        "# Benchmarks",
        "",
        f"Measured {m['date']} with `{results['command']}` ({results['mode']}): {m['cpu']}, {m['cpu_count']} "
        f"CPUs, GPU {m['gpu'] or 'none'}, torch {m['torch']}, timm {m['timm']}, adaptune {m['adaptune']} "
        f"(git {m['git'] or '?'}), Python {m['python']}."
        + (f" Load average at the start {load[0]:.2f} (1 min)." if load else "")
        + (f" At the end {results['load_average_end'][0]:.2f}." if results.get("load_average_end") else ""),
        "",
        "Every ratio is measured within one run against its baseline, the configurations interleaved so load "
        "changes hit all alike; figures are medians with the 10th-90th percentile spread in brackets (see each "
        "script's docstring for exactly what is timed). Regenerate with `python benchmarks/suite.py`.",
        "",
        "| part | status | seconds |",
        "|---|---|---:|",
    ]
    for name, rec in results["parts"].items():
        status = "ok" if rec["status"] == "ok" else f"**failed**: {rec.get('error', '?')}"
        lines.append(f"| `{name}` | {status} | {_fmt(rec.get('seconds'), 0)} |")
    for name, rec in results["parts"].items():
        part = PARTS[name]
        lines += ["", f"## {part.title} (`{name}`)", "", f"`{rec['command']}`", ""]
        body = _section_body(part, rec)
        lines += [body, "", f"What bounds these ratios: {part.bounds}"]
        if name == "prefix_cache":
            lines += ["", "## Data time share (from `prefix_cache`)", "", DATA_TIME_INTRO, ""]
            lines += [_data_time_body(rec), "", f"What bounds it: {DATA_TIME_BOUNDS}"]
    return "\n".join(lines) + "\n"


def _section_body(part: Part, rec: dict[str, Any]) -> str:
    if rec["status"] != "ok":
        return f"**Failed** after {_fmt(rec.get('seconds'), 0)} s: `{rec.get('error', '?')}` (log: `{part.name}.err`)."
    try:
        return part.render(rec["result"])
    except Exception as e:  # a result this renderer cannot read: say so, keep the others
        return f"**Failed** to render the results: `{type(e).__name__}: {e}`."


def _data_time_body(rec: dict[str, Any]) -> str:
    if rec["status"] != "ok":
        return "Not measured: the prefix_cache part failed."
    try:
        return render_data_time(rec["result"])
    except Exception as e:
        return f"**Failed** to render the results: `{type(e).__name__}: {e}`."


# ----------------------------------------------------------------------------------------------------------------
# mosa_step's steps timed with per-round ratios (mosa_step.py has no JSON output)


def mosa_part(argv: list[str]) -> None:
    """``suite.py _mosa_step``: mosa_step.py's variants (its ``build`` and ``make_step``) timed interleaved."""
    from types import SimpleNamespace

    import methods_step
    import mosa_step
    import torch

    parser = argparse.ArgumentParser(prog="suite.py _mosa_step")
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--bottleneck", type=int, default=16)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    opts = SimpleNamespace(model=args.model, img_size=args.img_size, bottleneck=args.bottleneck,
                           num_experts=args.num_experts, split_bias=False)  # fmt: skip
    models = mosa_step.build(opts, device)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    targets = torch.randint(10, (args.batch,), generator=g).to(device)
    made = {name: mosa_step.make_step(name, m, images, targets) for name, m in models.items()}
    steps = {name: step for name, (step, _) in made.items()}
    for step in steps.values():  # as mosa_step.py: every n-copy expert holds a gradient from here on
        step()
    times, _ = methods_step.interleaved(steps, args.steps, args.warmup, methods_step.synchronizer(device))
    dense = mosa_step.state_bytes(models["adapter"], made["adapter"][1])
    rows = []
    for name in steps:
        state = mosa_step.state_bytes(models[name], made[name][1])
        x2 = methods_step.ratio_spread(times[name], times["adapter x2"]) if name in ("mosa +kl", "adapter x2") else None
        rows.append({"variant": name, "step_ms": methods_step.spread([t * 1e3 for t in times[name]]),
                     "vs_adapter": methods_step.ratio_spread(times[name], times["adapter"]), "vs_adapter_x2": x2,
                     "state_bytes": state, "state_vs_adapter": state / dense})  # fmt: skip
    config = {**{k: v for k, v in vars(args).items() if k != "json"}, "threads": torch.get_num_threads()}
    Path(args.json).write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    print(_render_mosa_step({"config": config, "rows": rows}))


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_mosa_step"]:
        mosa_part(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=None, help="default: every part")
    parser.add_argument("--quick", action="store_true", help="every part at its smallest size: a smoke run")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="sizes and device")
    parser.add_argument("--out", default=None, help="output folder (default: runs/benchmarks-<time>)")
    parser.add_argument("--out-md", default=None, help="also write the report here (full run: benchmarks/RESULTS.md)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a part is stopped and failed")
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        cuda = torch.cuda.is_available()
    else:
        cuda = args.device == "cuda"
    out = Path(args.out) if args.out else REPO / "runs" / f"benchmarks-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    names = args.parts or list(PARTS)
    full = not args.quick and args.parts is None
    results: dict[str, Any] = {
        "command": " ".join(["python benchmarks/suite.py", *argv]),
        "mode": ("quick" if args.quick else "full") + (", CUDA sizes" if cuda else ", CPU sizes"),
        "machine": machine_info(),
        "parts": {},
    }
    for name in names:
        print(f"[suite] {name} ...", file=sys.stderr, flush=True)
        rec = run_part(PARTS[name], out, args.quick, cuda, args.timeout)
        results["parts"][name] = rec
        tail = "ok" if rec["status"] == "ok" else f"FAILED: {rec['error']}"
        print(f"[suite] {name}: {tail} ({rec['seconds']:.0f} s)", file=sys.stderr, flush=True)
        _save(results, out)  # after every part: an interrupted suite keeps what it measured
    results["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    md = _save(results, out)
    targets = [out / "RESULTS.md"]
    if args.out_md or full:
        targets.append(Path(args.out_md) if args.out_md else HERE / "RESULTS.md")
        targets[-1].write_text(md)
    print(md)
    print(f"wrote {', '.join(str(t) for t in targets)} and {out / 'results.json'}", file=sys.stderr)


def _save(results: dict[str, Any], out: Path) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = render_markdown(results)
    (out / "RESULTS.md").write_text(md)
    return md


if __name__ == "__main__":
    main()
