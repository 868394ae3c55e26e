"""MoSA's cost against the dense adapter it merges into: train-step time and trainable state, as ratios.

Every variant shares one backbone (same weights, same batch) and the same adapter options (MoSA's defaults unless
overridden); steps are measured interleaved (variant A step, variant B step, ...) so drift hits all alike, and the
median after warmup is reported.

    variants                what a step does
    adapter                 dense adapter, one pass
    mosa                    MoSA, consistency off: one pass, one expert per split module
    adapter x2              dense adapter, two passes as one doubled batch + symmetric KL (the regulariser's cost)
    mosa +kl                MoSA, consistency on: one doubled-batch forward in groups mode + symmetric KL
    n-copy                  the reference's formulation: N full copies of ``up``, dense expert forward, gradient
                            masks after backward (consistency off)

State = trainable parameters + AdamW state after one step, in bytes (the head is frozen so only adapters count).

    python benchmarks/mosa_step.py                                     # vit_tiny at 96 px, batch 32, CPU
    python benchmarks/mosa_step.py --model vit_base_patch16_224 --img-size 224 --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from adaptune.batch import Batch
from adaptune.methods import adapter, mosa
from adaptune.methods.adapter import AdapterConfig, BottleneckAdapter
from adaptune.methods.mosa import MoSAConfig, symmetric_kl
from adaptune.methods.mosa_split import partition


class NCopyUp(nn.Module):
    """The released code's split ``up``: N full-size Linear copies, one drawn per forward, masks applied to grads."""

    def __init__(self, up: nn.Linear, num_experts: int, generator: torch.Generator):
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(up) for _ in range(num_experts))
        owner = partition(up.weight.shape, num_experts, generator).to(up.weight.device)
        self.register_buffer("masks", torch.stack([owner == i for i in range(num_experts)]))
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(len(self.experts), (1,), generator=self.generator))
        return self.experts[k](x)  # (..., out): the dense expert

    def mask_grads(self) -> None:
        for expert, mask in zip(self.experts, self.masks, strict=True):
            if expert.weight.grad is not None:
                expert.weight.grad *= mask


def build(args: argparse.Namespace, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    backbone = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=10)
    backbone.requires_grad_(False)
    cfg = MoSAConfig(bottleneck=args.bottleneck, num_experts=args.num_experts, split_bias=args.split_bias, seed=0)
    fields = {f: getattr(cfg, f) for f in AdapterConfig.__dataclass_fields__}
    adapter_cfg = AdapterConfig(**fields)

    models: dict[str, nn.Module] = {}
    models["adapter"] = copy.deepcopy(backbone)
    adapter.inject(models["adapter"], adapter_cfg)
    models["mosa"] = copy.deepcopy(backbone)
    mosa.inject(models["mosa"], dataclasses.replace(cfg, consistency_weight=0.0))
    models["adapter x2"] = copy.deepcopy(models["adapter"])
    models["mosa +kl"] = copy.deepcopy(backbone)
    mosa.inject(models["mosa +kl"], cfg)

    generator = torch.Generator().manual_seed(0)

    def make_ncopy(dim: int, c: AdapterConfig) -> nn.Module:
        a = BottleneckAdapter.from_config(dim, c)
        a.up = NCopyUp(a.up, args.num_experts, generator)
        return a

    models["n-copy"] = copy.deepcopy(backbone)
    adapter.inject(models["n-copy"], adapter_cfg, make_ncopy)
    return {k: m.to(device).train() for k, m in models.items()}


def make_step(
    name: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    ncopies = [m for m in model.modules() if isinstance(m, NCopyUp)]

    def step() -> None:
        opt.zero_grad(set_to_none=name != "n-copy")  # the reference ran torch 1.11: zero tensors are kept
        if name.startswith("mosa"):
            cfg = MoSAConfig(consistency_weight=1.0 if name == "mosa +kl" else 0.0)
            loss = mosa.training_loss(model, cfg, Batch(images, targets), F.cross_entropy).total
        elif name == "adapter x2":
            z1, z2 = model(torch.cat([images, images])).chunk(2)
            loss = F.cross_entropy(z1, targets) + symmetric_kl(z1, z2)
        else:
            loss = F.cross_entropy(model(images), targets)
        loss.backward()
        for m in ncopies:
            m.mask_grads()
        opt.step()

    return step, opt


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return params + state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--bottleneck", type=int, default=16)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--split-bias", action="store_true", help="partition the up bias instead of N bias rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    models = build(args, device)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    targets = torch.randint(10, (args.batch,), generator=g).to(device)
    made = {name: make_step(name, m, images, targets) for name, m in models.items()}
    steps = {name: step for name, (step, _) in made.items()}
    for s in steps.values():  # every expert of the n-copy model holds a gradient from here on (torch 1.11 semantics)
        s()

    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    dense_bytes = state_bytes(models["adapter"], made["adapter"][1])

    print(
        f"{args.model} img {args.img_size} batch {args.batch} | r={args.bottleneck} N={args.num_experts} "
        f"split_bias={args.split_bias} | {device} threads={torch.get_num_threads()} | median of {args.steps} steps"
    )
    print(f"{'variant':<12} {'step ms':>9} {'vs adapter':>11} {'vs adapter x2':>14} {'state bytes':>12} {'ratio':>7}")
    for name in steps:
        b = state_bytes(models[name], made[name][1])
        vs2 = f"{med[name] / med['adapter x2']:.3f}" if name in ("mosa +kl", "adapter x2") else ""
        print(
            f"{name:<12} {med[name]:>9.2f} {med[name] / med['adapter']:>11.3f} {vs2:>14} {b:>12,} "
            f"{b / dense_bytes:>7.3f}"
        )


if __name__ == "__main__":
    main()
