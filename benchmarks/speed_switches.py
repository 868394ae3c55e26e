"""The speed switches against the plain training step: step time and peak memory with each one on, as ratios to off.

What is measured, per backbone case (CPU: ViT-S/16 at 96 px and EfficientNet-Lite0 at 128 px, batch 32, 2 threads;
CUDA: ViT-B/16 and EfficientNet-Lite0 at 224 px, batch 64; random weights, the cases of `methods_step`):

    case   method                                      switches
    vit    ``lora`` with its defaults                  grad_checkpointing, compile
    cnn    the ``quickstart`` recipe's adapter         channels_last, grad_checkpointing, compile
           (post-block, r=32, blocks 4-6)

    switch               recipe key                       what it does
    off                  -                                the reference of every ratio
    channels_last        ``train.channels_last``          model and image batch in channels-last memory format
    grad_checkpointing   ``backbone.grad_checkpointing``  timm's ``set_grad_checkpointing(True)``: block activations
                                                          recomputed in the backward pass
    compile              ``train.compile``                ``torch.compile`` of the model the training forward calls

Each switch is applied by the engine's own function, `adaptune.train._training_model`, to a copy of one injected model
(same weights, same batch); the batch is made channels-last the way the loop's ``_to_device`` does it. One step is
what `methods_step.make_step` runs, as adaptune's loop does it: forward + loss + backward + gradient norm + AdamW
step + zero_grad.

Correctness: before timing, one forward + backward of every configuration on the same weights; the table gives the
largest absolute difference of the trainable gradients from off's, next to the largest gradient (the scale). The
first call's time is reported too (``first s``): for ``compile`` it is the compilation, which is excluded from the
step times.

Timing: the technique of `methods_step` (`methods_step.interleaved`): one step of every configuration per round, the
order rotating every round, warm-up rounds dropped; step time is the median over rounds, a ratio is computed per
round (switch / off, same round) and reported as the median with its 10th-90th percentile spread.

Memory: `methods_step`'s subprocess measurement, imported (`methods_step.in_subprocess`, `methods_step.step_memory`):
each configuration is built from scratch in its own process forked from a server that has only imported the
libraries, and runs two warm-up steps first (``compile`` compiles in them; AdamW's moments are allocated in them, the
same for every switch, so they are not counted). Then the heap's freed pages are given back to the OS (glibc
``malloc_trim``: without it the warm-up's freed activations stay resident and hide the next step's peak), the peak is
reset, and ``step_memory`` measures 1 + ``--memory-steps`` steps: CPU: the ``ru_maxrss`` high-water mark minus the
resident size before them; CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before them. So the figure
is what one step adds to the warmed-up state: activations saved for backward, gradients, temporaries. Resident
memory on the CPU still includes some allocator caching: treat differences under ~10 MiB as noise.

    python benchmarks/speed_switches.py                         # both CPU cases, every switch (~6 min idle, 2 cores)
    python benchmarks/speed_switches.py --quick                 # half-size images, batch 8, 3 rounds: a smoke run
    python benchmarks/speed_switches.py --cases cnn --skip compile --rounds 20 --json switches.json
    python benchmarks/speed_switches.py --compile-on cnn              # compile (minutes on a CPU) on one case only
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import methods_step  # benchmarks/ is not a package: found through the path above
from methods_step import Case, _fmt

OFF = "off"
SWITCHES = {  # switch: (recipe key, the cases it applies to)
    "channels_last": ("train.channels_last", ("cnn",)),
    "grad_checkpointing": ("backbone.grad_checkpointing", ("vit", "cnn")),
    "compile": ("train.compile", ("vit", "cnn")),
}


def case_method(key: str) -> tuple[str, Any, str]:
    """(method name, config, where it comes from) of case ``key``: LoRA's defaults (vit), the quickstart's adapter."""
    from adaptune.recipe import RECIPES_DIR, load_recipe, method_config

    if key == "vit":
        return "lora", method_config("lora"), "defaults"
    recipe = load_recipe(RECIPES_DIR / "quickstart.yaml")
    return recipe.method_name, recipe.method, "recipe quickstart"


def _switched_recipe(switch: str) -> Any:
    """The recipe fields `adaptune.train._training_model` reads, with ``switch`` on."""
    return SimpleNamespace(
        backbone=SimpleNamespace(grad_checkpointing=switch == "grad_checkpointing"),
        train=SimpleNamespace(channels_last=switch == "channels_last", compile=switch == "compile"),
    )


def apply_switch(model: nn.Module, method: str, batch: Any, switch: str) -> tuple[nn.Module, Any]:
    """(the model the training forward calls, the batch) with ``switch`` applied as the engine applies it."""
    from adaptune.methods import get_method
    from adaptune.train import _training_model

    built = SimpleNamespace(model=model, spec=get_method(method))
    train_model = _training_model(built, SimpleNamespace(enabled=False), _switched_recipe(switch))  # type: ignore[arg-type]
    if switch == "channels_last" and batch.inputs.ndim == 4:  # what the loop's _to_device does
        batch.inputs = batch.inputs.contiguous(memory_format=torch.channels_last)
    return train_model, batch


def build_switch(
    case: Case, key: str, switch: str, device: torch.device, injected: nn.Module | None = None
) -> tuple[Callable[[], None], nn.Module, nn.Module, Any]:
    """(step, model, training model, batch) of ``switch`` on ``case``; ``injected``: the model to copy (else built)."""
    name, cfg, _ = case_method(key)
    if injected is None:
        injected = methods_step.inject(methods_step.backbone(case), name, cfg)
    model = copy.deepcopy(injected).to(device)
    batch = methods_step.make_batch(case, device)
    train_model, batch = apply_switch(model, name, batch, switch)
    return methods_step.make_step(model, name, cfg, batch, train_model=train_model), model, train_model, batch


def gradients(model: nn.Module, train_model: nn.Module, method: str, cfg: Any, batch: Any) -> list[torch.Tensor]:
    """The trainable gradients of one forward + backward through ``train_model`` (left zeroed afterwards)."""
    from adaptune.evaluate import model_forward
    from adaptune.methods import get_method

    spec = get_method(method)
    if spec.training_loss is not None:
        loss = spec.training_loss(train_model, cfg, batch, F.cross_entropy).total
    else:
        loss = F.cross_entropy(model_forward(spec, cfg)(train_model, batch), batch.targets)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


def switch_memory(case: dict, key: str, switch: str, device: str, threads: int | None, warmup: int, steps: int):
    """`methods_step.step_memory` of ``switch`` built from scratch, after ``warmup`` steps and a heap trim (run it
    with `methods_step.in_subprocess`): see the module docstring."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    step, *_ = build_switch(Case(**case), key, switch, dev)
    for _ in range(warmup):  # compile's compilation, AdamW's moments: before the baseline
        step()
    gc.collect()
    _trim_heap()
    return methods_step.step_memory(step, dev, 1, steps)


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so the resident size is what is in use."""
    import contextlib
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed pages stay in the baseline (reads low)
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def measure(
    case: Case,
    key: str,
    switches: list[str],
    *,
    rounds: int = 10,
    warmup: int = 2,
    memory: str = "subprocess",
    memory_steps: int = 2,
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """Time (and measure the memory of) off and every applicable switch on ``case``.

    Args:
        case: The backbone setting.
        key: ``vit`` or ``cnn`` (picks the method, see the module docstring).
        switches: Switches to measure; those that do not apply to ``key`` are left out.
        rounds: Measured interleaved rounds; ``warmup`` rounds before them (after the first, checked call) dropped.
        memory: ``subprocess`` (one per configuration), ``inprocess`` (tests) or ``off``.
        memory_steps: Measured steps of each memory measurement (after two warm-up steps).
        device: ``cpu`` or ``cuda``.
        threads: torch CPU threads (None: as set).

    Returns:
        ``{"case", "key", "method", "options", "rows", "skipped", ...}``; each row has ``step_ms`` (its spread),
        ``images_per_s``, ``vs_off`` (per-round ratio spread), ``first_s``, ``max_grad_diff``, ``grad_scale`` and,
        with memory on, ``memory_mib`` and ``memory_vs_off``.
    """
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    name, cfg, options = case_method(key)
    injected = methods_step.inject(methods_step.backbone(case), name, cfg)
    with torch.no_grad():  # LoRA's B starts at zero: perturb every trainable tensor so all gradients are non-trivial
        g = torch.Generator().manual_seed(0)
        for p in injected.parameters():
            if p.requires_grad:
                p.add_(1e-2 * torch.randn(p.shape, generator=g))
    wanted = [OFF, *(s for s in switches if key in SWITCHES[s][1])]
    sync = methods_step.synchronizer(dev)
    steps: dict[str, Callable[[], None]] = {}
    rows: dict[str, dict[str, Any]] = {}
    skipped = []
    reference: list[torch.Tensor] = []
    for switch in wanted:
        try:
            step, model, train_model, batch = build_switch(case, key, switch, dev, injected)
            sync()
            t0 = time.perf_counter()
            grads = gradients(model, train_model, name, cfg, batch)
            sync()
            first = time.perf_counter() - t0
        except Exception as e:  # a switch this torch/backbone cannot run (no compiler, no set_grad_checkpointing)
            if switch == OFF:
                raise
            skipped.append({"switch": switch, "reason": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"})
            continue
        if switch == OFF:
            reference = grads
        diff = max((float((a - b).abs().max()) for a, b in zip(grads, reference, strict=True)), default=0.0)
        scale = max((float(a.abs().max()) for a in reference), default=0.0)
        key_name = SWITCHES[switch][0] if switch != OFF else "-"
        rows[switch] = {"switch": switch, "recipe_key": key_name, "first_s": first, "max_grad_diff": diff,
                        "grad_scale": scale}  # fmt: skip
        steps[switch] = step
    times, _ = methods_step.interleaved(steps, rounds, warmup, sync)
    for switch, row in rows.items():
        step_ms = methods_step.spread([t * 1e3 for t in times[switch]])
        row.update(step_ms=step_ms, images_per_s=case.batch / (step_ms["median"] / 1e3))
        row["vs_off"] = methods_step.ratio_spread(times[switch], times[OFF])
    if memory != "off":
        run = methods_step.in_subprocess if memory == "subprocess" else (lambda fn, *a: fn(*a))
        for switch, row in rows.items():
            row["memory_mib"] = run(switch_memory, asdict(case), key, switch, device, threads, 2, memory_steps)[
                "peak_mib"
            ]
        for row in rows.values():
            base = rows[OFF]["memory_mib"]
            row["memory_vs_off"] = row["memory_mib"] / base if base > 0 else None
    return {
        "case": asdict(case),
        "key": key,
        "method": name,
        "options": options,
        "device": device,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "warmup": warmup,
        "rows": list(rows.values()),
        "skipped": skipped,
        "memory": None if memory == "off" else _memory_note(dev, memory),
    }


def _memory_note(device: torch.device, memory: str) -> str:
    where = "each configuration in its own subprocess" if memory == "subprocess" else "in this process"
    if device.type == "cuda":
        what = "torch.cuda.max_memory_allocated over 1 + N steps minus the allocation before them"
    else:
        what = "ru_maxrss over 1 + N steps minus the resident size before them (heap trimmed, peak reset)"
    return f"{where}, after 2 warm-up steps: {what}, MiB"


# ----------------------------------------------------------------------------------------------------------------
# report


def markdown(result: dict[str, Any]) -> str:
    """One case's table (and its skipped switches) in Markdown."""
    c = result["case"]
    lines = [
        f"**{c['model']}**, `{result['method']}` ({result['options']}), {c['img_size']} px, batch {c['batch']}, "
        f"{result['device']}, {result['threads']} threads, median of {result['rounds']} interleaved rounds after "
        f"{result['warmup']} warm-up (ratios: median of per-round ratios, p10-p90)",
        "",
        "| switch | recipe key | step ms | images/s | time vs off | peak MiB | mem vs off | first s "
        "| max grad diff (scale) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        v = r["vs_off"]
        lines.append(
            f"| {r['switch']} | {r['recipe_key']} | {r['step_ms']['median']:.1f} | {r['images_per_s']:.1f} | "
            f"{v['median']:.2f} ({v['p10']:.2f}-{v['p90']:.2f}) | {_fmt(r.get('memory_mib'), 0)} | "
            f"{_fmt(r.get('memory_vs_off'))} | {r['first_s']:.1f} | {r['max_grad_diff']:.1e} ({r['grad_scale']:.1e}) |"
        )
    if result["memory"]:
        lines += ["", f"Memory: {result['memory']}."]
    if result["skipped"]:
        lines += ["", "Not measured:", ""]
        lines += [f"- `{s['switch']}`: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=["vit", "cnn"], default=["vit", "cnn"])
    parser.add_argument("--skip", nargs="+", choices=list(SWITCHES), default=[], help="switches to leave out")
    parser.add_argument(
        "--compile-on", nargs="+", choices=["vit", "cnn"], default=["vit", "cnn"], help="cases that measure compile"
    )
    parser.add_argument("--vit", default=None, help="ViT model (default: by device)")
    parser.add_argument("--img-size", type=int, default=None, help="ViT input side (default: by device)")
    parser.add_argument("--cnn-img-size", type=int, default=None, help="CNN input side (default: by device)")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 64 on CUDA; --quick 8")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 10; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; --quick 1)")
    parser.add_argument("--memory", choices=["subprocess", "off"], default="subprocess")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="half-size images, batch 8, 3 rounds: a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; 0 keeps torch's default")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    cases = methods_step.default_cases(args.device.startswith("cuda"), args.quick)
    vit, cnn = cases["vit"], cases["cnn"]
    cases["vit"] = Case(args.vit or vit.model, args.img_size or vit.img_size, args.batch or vit.batch, True)
    cases["cnn"] = Case(cnn.model, args.cnn_img_size or cnn.img_size, args.batch or cnn.batch, False, True)
    rounds = args.rounds or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    results = []
    for key in args.cases:
        left_out = {s: "left out with --skip" for s in args.skip}
        if key not in args.compile_on:
            left_out.setdefault("compile", f"measured on {', '.join(args.compile_on)} only (--compile-on)")
        switches = [s for s in SWITCHES if s not in left_out]
        t0 = time.perf_counter()
        res = measure(cases[key], key, switches, rounds=rounds, warmup=warmup, memory=args.memory,
                      memory_steps=args.memory_steps, device=args.device, threads=args.threads or None)  # fmt: skip
        res["skipped"] += [{"switch": s, "reason": why} for s, why in left_out.items() if key in SWITCHES[s][1]]
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        print(markdown(res) + "\n", flush=True)
    if args.json:
        command = " ".join(["python", "benchmarks/" + Path(__file__).name, *(sys.argv[1:] if argv is None else argv)])
        payload = {"command": command, "torch": torch.__version__, "cases": results}
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
