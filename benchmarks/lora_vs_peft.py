"""adaptune's LoRA against PEFT's on the same timm ViT, targets and rank: step and inference time as ratios, and the
largest output difference with equal weights.

One process, one backbone (random weights, no download), one batch. Each model trains only its LoRA factors (the
head is frozen in all, so the step is LoRA's alone): forward + cross-entropy + backward + AdamW step. Steps are
interleaved (one step of every model per round, the order rotating each round) so drift hits all alike; a round's
ratio is adaptune's time over PEFT's in that round, and the table gives the median round ratio with its 10th-90th
percentile spread.

    row              adaptune                               PEFT (``peft.get_peft_model``)
    fused            ``method.qkv: []``: one pair on qkv    one pair on qkv (``target_modules`` = the qkv Linears)
    q/v slices       ``qkv: [q, v]`` (the default)          the same fused pair: PEFT has no q/v slices of a fused
                                                            qkv Linear, so this compares against its natural setting
                                                            (same trainable parameter count at r on a d -> 3d qkv)

Output difference: fused: PEFT loaded with adaptune's A and B; q/v: PEFT at rank 2r holding the same update exactly
(A = [A_q; A_v], B = [B_q 0; 0 0; 0 B_v]), used only for this check. Gradient difference (fused): the largest
|dL/dA|, |dL/dB| difference after one backward.

    python benchmarks/lora_vs_peft.py                      # ViT-S/16 at 96 px, batch 32, 2 threads, r=8 (~2 min)
    python benchmarks/lora_vs_peft.py --steps 60 --json lora_vs_peft.json
    python benchmarks/lora_vs_peft.py --img-size 224 --batch 128 --device cuda --threads 0
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from adaptune.methods import lora
from adaptune.methods.lora import LoRAConfig, LoRALinear


def adaptune_model(backbone: nn.Module, args: argparse.Namespace, qkv: tuple[str, ...]) -> nn.Module:
    model = copy.deepcopy(backbone)
    lora.inject(model, LoRAConfig(rank=args.rank, targets=(args.targets,), qkv=qkv))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B = 0 at init would hide the update: random A and B, the same for every comparison
        for p in (p for m in model.modules() if isinstance(m, LoRALinear) for p in m.pairs.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def peft_model(backbone: nn.Module, args: argparse.Namespace, rank: int) -> nn.Module:
    import peft

    regex = args.targets.replace(".", r"\.").replace("*", r"[^.]+")
    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=regex)  # scale 1, as adaptune
    return peft.get_peft_model(copy.deepcopy(backbone), cfg)


def peft_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers by the backbone path they wrap."""
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in model.named_modules() if hasattr(m, "lora_A") and n}


@torch.no_grad()
def copy_into_peft(ours: nn.Module, theirs: nn.Module) -> None:
    """Give PEFT's layers adaptune's update: the fused pair as is, q/v slices as one rank-2r block pair."""
    layers = peft_layers(theirs)
    for path, m in ours.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        a_t, b_t = layers[path].lora_A["default"].weight, layers[path].lora_B["default"].weight
        a_t.zero_()
        b_t.zero_()
        r = m.rank
        for i, (key, pair) in enumerate(m.pairs.items()):
            rows = slice(0, m.part_size) if key == "all" else slice(lora.QKV.index(key) * m.part_size, None)
            a_t[i * r : (i + 1) * r] = pair.lora_a.weight
            b_t[rows][: m.part_size, i * r : (i + 1) * r] = pair.lora_b.weight


def lora_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(lora_params(model), lr=1e-3, weight_decay=0.01)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), targets).backward()
        opt.step()

    return step


def make_infer(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def infer() -> None:
        with torch.no_grad():
            model(images)

    return infer


def interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, warmup: int, sync: Callable, clock: Callable[[], float]
) -> dict[str, list]:
    """Seconds per call of each function, one call of each per round, the order rotating every round."""
    names, times = list(fns), {n: [] for n in fns}
    for i in range(warmup + rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = clock()
            fns[name]()
            sync()
            if i >= warmup:
                times[name].append(clock() - t0)
    return times


def ratio_stats(ours: list[float], theirs: list[float]) -> dict[str, float]:
    """Median and 10th/90th percentile of the per-round ratios, and the ratio of the medians."""
    rounds = sorted(a / b for a, b in zip(ours, theirs, strict=True))
    q = statistics.quantiles(rounds, n=10, method="inclusive") if len(rounds) > 1 else [rounds[0]] * 9
    return {
        "median": statistics.median(rounds),
        "p10": q[0],
        "p90": q[-1],
        "of_medians": statistics.median(ours) / statistics.median(theirs),
    }


def differences(ours: nn.Module, theirs: nn.Module, images: torch.Tensor, targets: torch.Tensor, grads: bool):
    """Largest |Δ logits| (eval, with |logits| max for scale) and, if ``grads``, largest |Δ grad| of A and B."""
    ours.eval(), theirs.eval()
    with torch.no_grad():
        y_ours, y_theirs = ours(images), theirs(images)
    out = {"logits": (y_ours - y_theirs).abs().max().item(), "logits_scale": y_theirs.abs().max().item()}
    if grads:
        for m in (ours, theirs):
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(images), targets).backward()
        layers = peft_layers(theirs)
        worst = 0.0
        for path, m in ours.named_modules():
            if isinstance(m, LoRALinear):
                pair, theirs_layer = m.pairs["all"], layers[path]
                worst = max(
                    worst,
                    (pair.lora_a.weight.grad - theirs_layer.lora_A["default"].weight.grad).abs().max().item(),
                    (pair.lora_b.weight.grad - theirs_layer.lora_B["default"].weight.grad).abs().max().item(),
                )
        out["grad"] = worst
    ours.train(), theirs.train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="blocks.*.attn.qkv")
    parser.add_argument("--steps", type=int, default=30, help="measured training rounds (every model once a round)")
    parser.add_argument("--infer-steps", type=int, default=30, help="measured inference rounds")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; 0 keeps torch's default")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1 and a CPU device, insensitive to "
        "other processes sharing the cores, for measuring on a loaded machine)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    torch.manual_seed(0)
    backbone = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=10)
    backbone.requires_grad_(False)
    models = {
        "peft fused": peft_model(backbone, args, args.rank),
        "adaptune fused": adaptune_model(backbone, args, ()),
        "adaptune q/v": adaptune_model(backbone, args, ("q", "v")),
    }
    copy_into_peft(models["adaptune fused"], models["peft fused"])
    check_qv = peft_model(backbone, args, 2 * args.rank)
    copy_into_peft(models["adaptune q/v"], check_qv)
    models = {k: m.to(device).train() for k, m in models.items()}
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    targets = torch.randint(10, (args.batch,), generator=g).to(device)

    diffs = {
        "fused": differences(models["adaptune fused"], models["peft fused"], images, targets, grads=True),
        "q/v slices": differences(models["adaptune q/v"], check_qv.to(device), images, targets, grads=False),
    }
    steps = {k: make_step(m, images, targets) for k, m in models.items()}
    train = interleaved(steps, args.steps, args.warmup, sync, clock)
    for m in models.values():
        m.eval()
    infer = interleaved(
        {k: make_infer(m, images) for k, m in models.items()}, args.infer_steps, args.warmup, sync, clock
    )
    report(args, device, models, train, infer, diffs)


def report(args, device, models, train, infer, diffs) -> None:
    med = {k: statistics.median(v) * 1e3 for k, v in train.items()}
    rows = []
    for row, ours in (("fused", "adaptune fused"), ("q/v slices", "adaptune q/v")):
        step, inf = ratio_stats(train[ours], train["peft fused"]), ratio_stats(infer[ours], infer["peft fused"])
        params = sum(p.numel() for p in lora_params(models[ours]))
        rows.append({"row": row, "adaptune_step_ms": med[ours], "peft_step_ms": med["peft fused"], "step": step,
                     "inference": inf, "trainable": params, "difference": diffs[row]})  # fmt: skip
    print(
        f"{args.model} img {args.img_size} batch {args.batch} r={args.rank} targets {args.targets} | {device} "
        f"threads={torch.get_num_threads()} | {args.steps} train / {args.infer_steps} inference rounds, interleaved, "
        f"{args.clock} clock"
    )
    print("\n| vs PEFT fused qkv | adaptune step ms | PEFT step ms | step ratio (p10-p90) | inference ratio (p10-p90) "
          "| trainable | max abs diff logits (scale) | max abs diff grads |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, i, d = r["step"], r["inference"], r["difference"]
        grad = f"{d['grad']:.1e}" if "grad" in d else "-"
        print(
            f"| {r['row']} | {r['adaptune_step_ms']:.1f} | {r['peft_step_ms']:.1f} | "
            f"{s['median']:.3f} ({s['p10']:.3f}-{s['p90']:.3f}) | {i['median']:.3f} ({i['p10']:.3f}-{i['p90']:.3f}) | "
            f"{r['trainable']:,} | {d['logits']:.1e} ({d['logits_scale']:.1f}) | {grad} |"
        )
    print(
        "\nq/v slices: PEFT cannot slice a fused qkv Linear, so its time is PEFT's fused pair at the same rank; its "
        "output difference is against PEFT at rank 2r holding the same update."
    )
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        meta.update(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__)
        with open(args.json, "w") as f:
            json.dump({"config": meta, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
