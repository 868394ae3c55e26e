"""Adapter-X against the dense adapter with about as many trainable parameters: step time, memory, top-1.

Part 1, cost. One backbone (same weights, same batch), two methods:

    variant      what a step does
    adapter      dense bottleneck adapter parallel to each block's MLP (`adapter`, style adaptformer), bottleneck r
                 chosen so its trainable parameters match Adapter-X's
    adapterx     Adapter-X defaults (routed sub-tokens, shared experts, prompts, norm2 + CLS trained, balance loss)

Steps (forward, loss, backward, AdamW) are interleaved (A, B, A, B, ...) so drift hits both alike; the median ratio
after warmup is reported (goal: adapterx at most 1.3x adapter). Memory: on CUDA the peak allocated during a step
above the resting state; on the CPU the bytes autograd saves for backward in one step (distinct storages), since a
process-wide peak cannot separate two models.

Part 2, accuracy (``--train-epochs N``, 0 skips it): ``adaptune train`` on the built-in ``fashion-mnist-1k`` with the
quickstart's pretrained EfficientNet-Lite0 (the only offline pretrained weights): ``quickstart_adapterx`` against the
dense adapter ``parallel`` to the same five blocks (the same placement as Adapter-X's CNN form), its bottleneck
matched to the same trainable parameters, at the same schedule shortened to N epochs.

    python benchmarks/adapterx_step.py                                    # vit_small at 112 px, batch 16, CPU
    python benchmarks/adapterx_step.py --img-size 224 --batch 8 --train-epochs 0   # the ViT's own 197 tokens
    python benchmarks/adapterx_step.py --cnn --train-epochs 0             # quickstart_adapterx's EfficientNet form
    python benchmarks/adapterx_step.py --model vit_base_patch16_224 --img-size 224 --batch 64 --device cuda
    python benchmarks/adapterx_step.py --steps 0 --train-epochs 8         # accuracy only, the full schedule
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptune.backbone import create_backbone
from adaptune.batch import Batch, Loss
from adaptune.loading import count_method_parameters, inject_method
from adaptune.methods import get_method
from adaptune.recipe import BackboneConfig, method_config
from adaptune.train import set_train_mode


class _Recipe:
    def __init__(self, name: str, cfg: Any):
        self.method_name, self.method = name, cfg


def matched_bottleneck(adapterx_params: int, widths: list[int]) -> int:
    """The dense adapter bottleneck r whose ``Σ_blocks (2·C·r + r + C)`` is closest to ``adapterx_params``."""
    return max(1, round((adapterx_params - sum(widths)) / sum(2 * c + 1 for c in widths)))


def quickstart_method() -> dict[str, Any]:
    """quickstart_adapterx's ``method`` section (EfficientNet-Lite0, five shape-keeping blocks)."""
    import yaml

    from adaptune.cli import resolve_recipe_path

    return yaml.safe_load(resolve_recipe_path("quickstart_adapterx").read_text())["method"]


def build(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, tuple[nn.Module, Any]], str]:
    """``{"adapter": (model, cfg), "adapterx": (model, cfg)}`` on one backbone, and the dense adapter's label.

    ViT: Adapter-X defaults against ``adapter`` style adaptformer. ``--cnn``: quickstart_adapterx's method against
    ``adapter`` style parallel on the same blocks (random weights: only the cost is measured).
    """
    if args.cnn:
        options = {k: v for k, v in quickstart_method().items() if k != "name"}
        x_cfg = method_config("adapterx", **options)
        model_name, widths = "tf_efficientnet_lite0", [112, 112, 192, 192, 192]  # the five targets' channels
    else:
        x_cfg, model_name = method_config("adapterx"), args.model
    backbone = create_backbone(BackboneConfig(model=model_name, img_size=None if args.cnn else args.img_size), 10)
    if not args.cnn:
        widths = [b.mlp.fc1.in_features for b in backbone.blocks]
    x_params = count_method_parameters(model_name, "adapterx", **dataclasses.asdict(x_cfg))["method"]
    r = matched_bottleneck(x_params, widths)
    style = {"style": "parallel", "targets": x_cfg.targets} if args.cnn else {"style": "adaptformer"}
    models = {}
    for name, cfg in (("adapter", method_config("adapter", bottleneck=r, **style)), ("adapterx", x_cfg)):
        model = copy.deepcopy(backbone)
        inject_method(model, _Recipe(name, cfg))
        set_train_mode(model.to(device), backbone_train=False)
        models[name] = (model, cfg)
    return models, f"adapter r={r}"


def make_step(name: str, model: nn.Module, cfg: Any, batch: Batch) -> Callable[[], Loss]:
    spec = get_method(name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)

    def step() -> Loss:
        if spec.training_loss is not None:
            loss = spec.training_loss(model, cfg, batch, F.cross_entropy)
        else:
            logits = model(batch.inputs)
            ce = F.cross_entropy(logits, batch.targets)
            loss = Loss(ce, logits, {"ce": ce})
        loss.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def step_memory(step: Callable[[], Loss], device: torch.device) -> int:
    """Bytes one step needs beyond the resting state (CUDA), or bytes saved for backward (CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        rest = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - rest
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def time_steps(
    args: argparse.Namespace, models: dict[str, tuple[nn.Module, Any]], device: torch.device
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    batch = Batch(
        torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g),
        torch.randint(10, (args.batch,), generator=g),
    ).to(device)
    steps = {name: make_step(name, m, cfg, batch) for name, (m, cfg) in models.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ratios = [x / a for x, a in zip(times["adapterx"], times["adapter"], strict=True)]
    return {
        "median_ms": {name: statistics.median(t) * 1e3 for name, t in times.items()},
        "median_ratio": statistics.median(ratios),
        "memory": {name: step_memory(step, device) for name, step in steps.items()},
    }


def train_top1(args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    """Test top-1 of quickstart_adapterx and of the matched dense adapter at ``--train-epochs`` epochs."""
    import yaml

    from adaptune.cli import resolve_recipe_path
    from adaptune.recipe import load_recipe

    # the whole recipe, its `base: quickstart` resolved
    raw = load_recipe(resolve_recipe_path("quickstart_adapterx")).to_dict()
    options = {k: v for k, v in raw["method"].items() if k != "name"}
    x_params = count_method_parameters("tf_efficientnet_lite0", "adapterx", **options)["method"]
    r = matched_bottleneck(x_params, [112, 112, 192, 192, 192])
    dense = {"name": "adapter", "style": "parallel", "bottleneck": r, "targets": raw["method"]["targets"]}
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, method in (("adapterx", raw["method"]), (f"adapter r={r}", dense)):
        recipe = out / f"{name.split()[0]}.yaml"
        recipe.write_text(
            yaml.safe_dump({**raw, "method": method, "train": {**raw["train"], "epochs": args.train_epochs}})
        )
        cmd = [sys.executable, "-m", "adaptune", "train", str(recipe), "--out", str(out / name.split()[0])]
        t0 = time.perf_counter()
        done = subprocess.run([*cmd, "--quiet", "--json"], check=True, capture_output=True, text=True)
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        results[name] = {**summary, "seconds": time.perf_counter() - t0}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--cnn", action="store_true", help="time quickstart_adapterx's EfficientNet-Lite0 form instead")
    parser.add_argument("--img-size", type=int, default=None, help="default: 112 (ViT), 128 (--cnn, the quickstart's)")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 (ViT), 32 (--cnn)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant (0: skip part 1)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--train-epochs", type=int, default=2, help="epochs of the accuracy runs (0: skip part 2)")
    parser.add_argument("--out", type=Path, default=None, help="run directories of part 2 (default: a temp dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    args.img_size = args.img_size or (128 if args.cnn else 112)
    args.batch = args.batch or (32 if args.cnn else 16)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.steps > 0:
        torch.manual_seed(0)
        models, dense = build(args, device)
        counts = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, (m, _) in models.items()}
        t = time_steps(args, models, device)
        print(
            f"{'tf_efficientnet_lite0' if args.cnn else args.model} img {args.img_size} batch {args.batch} | {device} "
            f"threads={torch.get_num_threads()} | median of {args.steps} interleaved steps"
        )
        print(f"{'variant':<14} {'trainable':>10} {'step ms':>9} {'memory MiB':>11}")
        for name in models:
            label = dense if name == "adapter" else name
            print(f"{label:<14} {counts[name]:>10,} {t['median_ms'][name]:>9.1f} {t['memory'][name] / 2**20:>11.1f}")
        mem = t["memory"]["adapterx"] / t["memory"]["adapter"]
        print(f"adapterx / adapter: step {t['median_ratio']:.3f}x (median of per-pair ratios), memory {mem:.3f}x")
    if args.train_epochs > 0:
        with tempfile.TemporaryDirectory() as tmp:
            results = train_top1(args, args.out or Path(tmp))
        print(f"\nfashion-mnist-1k, tf_efficientnet_lite0 (package weights), {args.train_epochs} epochs")
        print(f"{'method':<14} {'trainable':>10} {'test top-1 (best val)':>22} {'test top-1 (last)':>18} {'time s':>7}")
        for name, s in results.items():
            print(
                f"{name:<14} {s['trainable_params']:>10,} {s['test_top1_best']:>21.2f}% {s['test_top1_last']:>17.2f}% "
                f"{s['seconds']:>7.0f}"
            )


if __name__ == "__main__":
    main()
