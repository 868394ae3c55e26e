"""Every registered method's training step against full fine-tuning and the frozen floor: time, images/s, memory.

What is measured, per backbone case (CPU: ViT-S/16 at 96 px and EfficientNet-Lite0 at 128 px, batch 32, 2 threads,
random weights; CUDA: ViT-B/16 and EfficientNet-Lite0 at 224 px, batch 64):

    configuration   one step
    <method>        forward + loss + backward + gradient norm + AdamW step + zero_grad, as adaptune's loop does it
                    (`adaptune.train._compute_loss`, `_optimizer_step`): the method's own ``training_loss`` when it
                    has one (MoSA's consistency pass, Adapter-X's balance term), else cross-entropy on its forward
                    (``model_forward``); timm's AdamW over exactly what the method trains (head included)
    full            the same for ``full`` (every backbone weight trains): the reference of the ``vs full`` ratios
    frozen floor    the backbone with every parameter frozen (head too), the inputs requiring grad; forward +
                    cross-entropy + ``torch.autograd.grad(loss, inputs)``: a backward that computes only the
                    activation gradients from the loss down to the input images, through every layer, with no
                    parameter gradient and no optimizer: the reference of the ``vs floor`` ratios

Methods come from `adaptune.methods.list_methods()` with their defaults (`adaptune.recipe.method_config`), put on the
model by `adaptune.loading.inject_method` (the engine's way). On a CNN case a method uses the method section of a
shipped recipe for that backbone where one exists (``quickstart``, ``quickstart_lora``, ...: adaptune's own CNN
placements), else its defaults; a method whose options cannot adapt the backbone is listed as skipped with its error.

Timing: every configuration is built in one process on the same backbone weights and batch; a round runs one step of
each, the order rotating every round, so load changes hit all alike; warm-up rounds are dropped. Step time is the
median over rounds; a ratio is computed per round (configuration / reference, same round) and reported as the median
with its 10th-90th percentile spread. images/s = batch / median step time.

Memory: each configuration in its own subprocess (forked from a server that only imported the libraries, so nothing
of the other configurations is resident): build the model and step, then CPU: ``resource.getrusage(RUSAGE_SELF)
.ru_maxrss`` after the warm-up and measured steps minus the same process's value right after building (on Linux the
high-water mark is first reset to the current resident size through ``/proc/self/clear_refs``, so the build's own
transient peak cannot hide a smaller step peak); CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated
after building. Both count what training adds to the built model: saved activations, gradients, AdamW moments. The
CPU figure is resident memory (allocator caching included), so treat differences under ~10 MiB as noise.

    python benchmarks/methods_step.py                         # both CPU cases, every method (~20 min idle, 2 cores)
    python benchmarks/methods_step.py --quick                 # small images and batch, 3 rounds: a smoke run
    python benchmarks/methods_step.py --cases vit --methods full lora adapter mosa --rounds 20 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptune.batch import Batch

FLOOR = "frozen floor"
MiB = 2**20
NUM_CLASSES = 10


@dataclass(frozen=True)
class Case:
    """One backbone setting.

    Attributes:
        model: timm model name (random weights).
        img_size: Input side in pixels.
        batch: Batch size.
        sized: The model takes ``img_size`` at construction (ViT); CNNs take any size as is.
        recipes: Use the method section of a shipped recipe for this backbone where one exists.
    """

    model: str
    img_size: int
    batch: int
    sized: bool
    recipes: bool = False


class _MethodRecipe:
    """The two recipe fields `adaptune.loading.inject_method` reads."""

    def __init__(self, name: str, cfg: Any):
        self.method_name, self.method = name, cfg


def default_cases(cuda: bool, quick: bool) -> dict[str, Case]:
    """The brief's cases: CPU ViT-S/16 96 px and Lite0 128 px, batch 32; CUDA ViT-B/16 and Lite0 224 px, batch 64."""
    if cuda:
        vit, cnn = Case("vit_base_patch16_224", 224, 64, True), Case("tf_efficientnet_lite0", 224, 64, False, True)
    else:
        vit, cnn = Case("vit_small_patch16_224", 96, 32, True), Case("tf_efficientnet_lite0", 128, 32, False, True)
    if quick:
        vit = Case(vit.model, vit.img_size // 2, 8, True)
        cnn = Case(cnn.model, cnn.img_size // 2, 8, False, True)
    return {"vit": vit, "cnn": cnn}


def backbone(case: Case) -> nn.Module:
    """The frozen timm model of ``case`` (seed 0, random weights), built by adaptune's own factory."""
    from adaptune.backbone import create_backbone
    from adaptune.recipe import BackboneConfig

    torch.manual_seed(0)
    cfg = BackboneConfig(model=case.model, img_size=case.img_size if case.sized else None, head_init="timm")
    return create_backbone(cfg, NUM_CLASSES)


def shipped_options(model: str) -> dict[str, tuple[Any, str]]:
    """``{method: (config, recipe name)}`` from the shipped recipes on backbone ``model`` (first by name)."""
    from adaptune.recipe import RECIPES_DIR, load_recipe

    found: dict[str, tuple[Any, str]] = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        recipe = load_recipe(path)
        if recipe.backbone.model == model and recipe.method_name not in found:
            found[recipe.method_name] = (recipe.method, path.stem)
    return found


def method_options(case: Case, name: str, shipped: dict[str, tuple[Any, str]] | None = None) -> tuple[Any, str]:
    """(config, where it comes from) of method ``name`` on ``case``: a shipped recipe's (CNN cases) or the defaults."""
    from adaptune.recipe import method_config

    if case.recipes:
        shipped = shipped_options(case.model) if shipped is None else shipped
        if name in shipped:
            cfg, recipe = shipped[name]
            return cfg, f"recipe {recipe}"
    return method_config(name), "defaults"


def inject(model: nn.Module, name: str, cfg: Any) -> nn.Module:
    """``model`` with method ``name`` injected as the engine does it, in adaptune's training mode (BN in eval)."""
    from adaptune.loading import inject_method
    from adaptune.train import set_train_mode

    inject_method(model, _MethodRecipe(name, cfg))
    set_train_mode(model, backbone_train=True)  # the recipe default backbone.train_mode: true
    return model


def floor_model(model: nn.Module) -> nn.Module:
    """The frozen floor's model: ``model`` with nothing trainable, in the same mode."""
    from adaptune.train import set_train_mode

    model.requires_grad_(False)
    set_train_mode(model, backbone_train=True)
    return model


def make_batch(case: Case, device: torch.device, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(case.batch, 3, case.img_size, case.img_size, generator=g)
    return Batch(images, torch.randint(NUM_CLASSES, (case.batch,), generator=g)).to(device)


def make_step(
    model: nn.Module, name: str, cfg: Any, batch: Batch, train_model: nn.Module | None = None
) -> Callable[[], None]:
    """One training step of method ``name`` as adaptune's loop runs it; ``train_model`` is what the forward calls
    (a compiled or wrapped ``model``; default ``model``)."""
    import timm.optim

    from adaptune.evaluate import model_forward
    from adaptune.methods import get_method

    spec = get_method(name)
    fwd_model = model if train_model is None else train_model
    opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    forward = model_forward(spec, cfg)

    def step() -> None:
        if spec.training_loss is not None:
            loss = spec.training_loss(fwd_model, cfg, batch, F.cross_entropy).total
        else:
            loss = F.cross_entropy(forward(fwd_model, batch), batch.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, math.inf)  # the loop always measures the norm
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_floor_step(model: nn.Module, batch: Batch) -> Callable[[], None]:
    """Forward + cross-entropy + the input-activation gradient only (see the module docstring)."""
    inputs = batch.inputs.detach().clone().requires_grad_(True)

    def step() -> None:
        loss = F.cross_entropy(model(inputs), batch.targets)
        torch.autograd.grad(loss, inputs)  # (B, 3, H, W); no parameter requires grad

    return step


def build_config(case: Case, name: str, device: torch.device, base: nn.Module | None = None) -> tuple[Callable, int]:
    """(step, trainable parameter count) of configuration ``name`` (a method or `FLOOR`) on ``case``.

    Raises:
        AdaptuneError: The method's options cannot adapt this backbone (TargetError, RecipeError).
    """
    model = copy.deepcopy(base) if base is not None else backbone(case)
    batch = make_batch(case, device)
    if name == FLOOR:
        model = floor_model(model).to(device)
        return make_floor_step(model, batch), 0
    cfg, _ = method_options(case, name)
    model = inject(model, name, cfg).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return make_step(model, name, cfg, batch), trainable


# ----------------------------------------------------------------------------------------------------------------
# timing and memory, shared by the other benchmarks of this folder


def synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, warmup: int, sync: Callable[[], None]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per call of each function, one call of each per round, the order rotating every round.

    Returns:
        (measured times, warm-up times) per name.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    warm: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            (times if i >= warmup else warm)[name].append(time.perf_counter() - t0)
    return times, warm


def spread(values: list[float]) -> dict[str, float]:
    """Median and 10th/90th percentiles (inclusive: within the observed range)."""
    if len(values) == 1:
        return {"median": values[0], "p10": values[0], "p90": values[0]}
    q = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p10": q[0], "p90": q[-1]}


def ratio_spread(ours: list[float], ref: list[float]) -> dict[str, float]:
    """`spread` of the per-round ratios ``ours[i] / ref[i]``."""
    return spread([a / b for a, b in zip(ours, ref, strict=True)])


def _reset_peak(device: torch.device) -> bool:
    """Reset the peak to the current use: CUDA's peak statistics, or Linux's VmHWM (which ``ru_maxrss`` reads)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_bytes(device: torch.device) -> int:
    import resource

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def step_memory(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Memory ``warmup + steps`` calls of ``step`` add to the process as it is now (the model built).

    Returns:
        ``peak_mib``: peak over all calls minus the baseline; ``steady_mib``: peak over the last ``steps`` calls only
        (the peak reset after the warm-up; None where it cannot be reset), minus the same baseline; ``how``.
    """
    gc.collect()
    resettable = _reset_peak(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else _peak_bytes(device)
    for _ in range(warmup):
        step()
    warm = _peak_bytes(device) - base
    steady = None
    if resettable and warmup:
        _reset_peak(device)
    for _ in range(steps):
        step()
    last = _peak_bytes(device) - base
    if resettable and warmup:
        steady = last / MiB
    how = "cuda max_memory_allocated" if device.type == "cuda" else "ru_maxrss"
    return {"peak_mib": max(warm, last) / MiB, "steady_mib": steady, "how": how}


_CONTEXT: Any = None
PRELOAD = ["torch", "timm", "adaptune.methods", "adaptune.loading", "adaptune.recipe", "adaptune.train"]


def in_subprocess(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh process forked from a server that has only imported `PRELOAD`.

    Raises:
        RuntimeError: The child raised (its message) or died (its exit code).
    """
    import multiprocessing

    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    receive, send = _CONTEXT.Pipe(duplex=False)
    proc = _CONTEXT.Process(target=_child, args=(send, fn, args))
    proc.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        ok, value = False, None
    proc.join()
    if not ok:
        raise RuntimeError(value or f"{fn.__name__}{args} died with exit code {proc.exitcode}")
    return value


def _child(send: Any, fn: Callable[..., Any], args: tuple) -> None:
    try:
        send.send((True, fn(*args)))
    except Exception as e:
        send.send((False, f"{fn.__name__}: {type(e).__name__}: {e}"))


def config_memory(case: dict, name: str, device: str, threads: int | None, warmup: int, steps: int) -> dict:
    """`step_memory` of configuration ``name`` built from scratch (run it with `in_subprocess`)."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    step, _ = build_config(Case(**case), name, dev)
    return step_memory(step, dev, warmup, steps)


# ----------------------------------------------------------------------------------------------------------------
# the measurement


def measure(
    case: Case,
    methods: list[str] | None = None,
    *,
    rounds: int = 10,
    warmup: int = 2,
    memory: str = "subprocess",
    memory_steps: int = 2,
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """Time (and measure the memory of) every method, ``full`` and the frozen floor on ``case``.

    Args:
        case: The backbone setting.
        methods: Method names (default: every registered one); ``full`` is always added.
        rounds: Measured interleaved rounds; ``warmup`` rounds before them are dropped.
        memory: ``subprocess`` (one per configuration, the published way), ``inprocess`` (tests), or ``off``.
        memory_steps: Steps after one warm-up step in each memory measurement.
        device: ``cpu`` or ``cuda``.
        threads: torch CPU threads (None: as set).

    Returns:
        ``{"case", "rows", "skipped", "memory", "threads", "device"}``; each row has ``step_ms`` (with its spread),
        ``images_per_s``, ``vs_full`` and ``vs_floor`` (per-round ratio spreads) and, with memory on, ``memory_mib``,
        ``memory_vs_full``, ``memory_vs_floor``.
    """
    from adaptune.errors import AdaptuneError
    from adaptune.methods import list_methods

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    names = list(dict.fromkeys([*(methods or list_methods()), "full"]))
    base, shipped = backbone(case), shipped_options(case.model) if case.recipes else {}
    steps: dict[str, Callable[[], None]] = {}
    info: dict[str, dict[str, Any]] = {}
    skipped = []
    for name in [*names, FLOOR]:
        try:
            steps[name], trainable = build_config(case, name, dev, base)
        except AdaptuneError as e:
            skipped.append({"method": name, "reason": str(e)})
            continue
        source = method_options(case, name, shipped)[1] if name != FLOOR else "-"
        info[name] = {"method": name, "options": source, "trainable": trainable}
    if "full" not in steps:
        raise RuntimeError(f"full fine-tuning cannot run on {case.model}: {skipped}")
    times, _ = interleaved(steps, rounds, warmup, synchronizer(dev))
    rows = [_row(info[n], times[n], times, case.batch) for n in steps]
    if memory != "off":
        run = in_subprocess if memory == "subprocess" else (lambda fn, *a: fn(*a))
        mem = {n: run(config_memory, asdict(case), n, device, threads, 1, memory_steps) for n in steps}
        for row in rows:
            got = mem[row["method"]]["peak_mib"]
            row.update(
                memory_mib=got,
                memory_vs_full=_safe_ratio(got, mem["full"]["peak_mib"]),
                memory_vs_floor=_safe_ratio(got, mem[FLOOR]["peak_mib"]),
            )
    return {
        "case": asdict(case),
        "device": device,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "warmup": warmup,
        "rows": rows,
        "skipped": skipped,
        "memory": None if memory == "off" else _memory_note(dev, memory),
    }


def _row(info: dict[str, Any], mine: list[float], times: dict[str, list[float]], batch: int) -> dict[str, Any]:
    step = spread([t * 1e3 for t in mine])
    return {
        **info,
        "step_ms": step,
        "images_per_s": batch / (step["median"] / 1e3),
        "vs_full": ratio_spread(mine, times["full"]),
        "vs_floor": ratio_spread(mine, times[FLOOR]),
    }


def _safe_ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _memory_note(device: torch.device, memory: str) -> str:
    where = "each configuration in its own subprocess" if memory == "subprocess" else "in this process"
    if device.type == "cuda":
        return f"{where}: torch.cuda.max_memory_allocated minus the allocation after building, MiB"
    return f"{where}: ru_maxrss after the steps minus the same process's value after building (peak reset), MiB"


# ----------------------------------------------------------------------------------------------------------------
# report


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """One case's table (and its skipped methods) in Markdown."""
    c = result["case"]
    lines = [
        f"**{c['model']}**, {c['img_size']} px, batch {c['batch']}, {result['device']}, {result['threads']} threads, "
        f"median of {result['rounds']} interleaved rounds after {result['warmup']} warm-up "
        "(ratios: median of per-round ratios, p10-p90)",
        "",
        "| method | options | trainable | step ms | images/s | vs full | vs floor | peak MiB | mem vs full "
        "| mem vs floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        vf, vfl = r["vs_full"], r["vs_floor"]
        lines.append(
            f"| {r['method']} | {r['options']} | {r['trainable']:,} | {r['step_ms']['median']:.1f} | "
            f"{r['images_per_s']:.1f} | {vf['median']:.2f} ({vf['p10']:.2f}-{vf['p90']:.2f}) | "
            f"{vfl['median']:.2f} ({vfl['p10']:.2f}-{vfl['p90']:.2f}) | {_fmt(r.get('memory_mib'), 0)} | "
            f"{_fmt(r.get('memory_vs_full'))} | {_fmt(r.get('memory_vs_floor'))} |"
        )
    if result["memory"]:
        lines += ["", f"Memory: {result['memory']}."]
    if result["skipped"]:
        lines += ["", "Skipped (the method's options cannot adapt this backbone):", ""]
        lines += [f"- `{s['method']}`: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=["vit", "cnn"], default=["vit", "cnn"])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--vit", default=None, help="ViT model (default: by device)")
    parser.add_argument("--cnn", default=None, help="CNN model (default: tf_efficientnet_lite0)")
    parser.add_argument("--img-size", type=int, default=None, help="ViT input side (default: by device)")
    parser.add_argument("--cnn-img-size", type=int, default=None, help="CNN input side (default: by device)")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 64 on CUDA")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 10; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; --quick 1)")
    parser.add_argument("--memory", choices=["subprocess", "off"], default="subprocess")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="half-size images, batch 8, 3 rounds: a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; 0 keeps torch's default")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    cases = _cases(args)
    rounds = args.rounds or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    results = []
    for key in args.cases:
        t0 = time.perf_counter()
        res = measure(cases[key], args.methods, rounds=rounds, warmup=warmup, memory=args.memory,
                      memory_steps=args.memory_steps, device=args.device, threads=args.threads or None)  # fmt: skip
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        print(markdown(res) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": _command(argv), "cases": results}, indent=1))
        print(f"wrote {args.json}")


def _cases(args: argparse.Namespace) -> dict[str, Case]:
    cases = default_cases(args.device.startswith("cuda"), args.quick)
    vit, cnn = cases["vit"], cases["cnn"]
    cases["vit"] = Case(args.vit or vit.model, args.img_size or vit.img_size, args.batch or vit.batch, True)
    cases["cnn"] = Case(args.cnn or cnn.model, args.cnn_img_size or cnn.img_size, args.batch or cnn.batch, False, True)
    return cases


def _command(argv: list[str] | None) -> str:
    return " ".join(["python", "benchmarks/" + Path(__file__).name, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
