"""Is adaptune's MoSA faithful on real data? adaptune's `mosa` against the released code's N-copy formulation.

What is measured (issue 11, item 3a): test top-1 (%) of the last weights of the ``quickstart_mosa`` recipe on a
built-in task, on the accuracy suite's protocol (`accuracy_suite.protocol_overrides`: 64 px, 10 epochs, batch 32,
train + val, no flips, the real ImageNet EfficientNet-Lite0 ``package:efficientnet-lite0``), trained two ways at
identical settings, over ``--seeds``:

    adaptune    the recipe trained by adaptune's engine (`adaptune.train.train`): one dense tensor per split ``up``,
                forward with ``W ⊙ M_k``, both consistency passes as one doubled batch (`mosa_groups`)
    reference   the released code's formulation (``Theia-4869/MoSA``, methods-core.md §2.3-2.8) with a plain loop:
                every split ``up`` replaced by `NCopyUp`, N full-size zero-initialised copies of the up weight, each
                with a private bias row; one expert drawn per module per forward (one Python ``random.Random(seed)``
                shared by all modules, as the released code's global ``random``); the drawn copy's *dense* weight in
                the forward; after backward every expert's weight gradient multiplied by its fixed mask; two separate
                forward passes for CE(z1) + λ·½[KL(sg p2 ‖ p1) + KL(sg p1 ‖ p2)]; eval with the released code's
                ``MERGE="add"``: ``W = (1/N) Σ_k W_k``, ``b = (1/N) Σ_k b_k``

Everything else is the engine's: the model is adaptune's own `adaptune.loading.build` of the recipe (same backbone
weights, zero head, adapter placement and init, seeded by ``train.seed``; the masks are its owner maps, or with
``--partition independent`` a fresh partition cut the reference's way, ``kthvalue`` thresholds over uniform scores);
the batches are adaptune's own loaders (`adaptune.data.build_loaders`: same images, normalisation and order per
seed); AdamW through timm's ``create_optimizer_v2`` (no decay on biases and 1-d tensors), timm's
``CosineLRScheduler`` with the recipe's per-step warm-up, stepped after every step; fp32; model in train mode with
BatchNorm in eval (``backbone.train_mode: true``; the model has no dropout). The reference keeps torch 1.11's
``zero_grad(set_to_none=False)`` (the released environment): an expert joins AdamW at its first draw and keeps moving
on its momentum afterwards. ``--set-to-none`` adds the torch >= 2 default as a third variant (``reference-none``),
under which AdamW skips the experts not drawn in a step.

Deviations of the reference from the released code, all shared with the adaptune variant so that only the MoSA
formulation differs: timm's AdamW (eps 1e-8, weight decay 1e-4 from the recipe) instead of the released HF-style
AdamW (eps 1e-6, wd 0.01), a per-step schedule instead of per-epoch, the recipe's post-block adapters on a CNN instead
of AdaptFormer adapters on a ViT, the draw generator seeded by ``train.seed`` instead of 3407.

Expected differences between the two variants besides the random draws (mosa.py's docstring): at equal draws the
reference's up experts stay inside their masks, so expert k is ``W ⊙ M_k`` and the two are the same model; they differ
only in AdamW's bias correction of an expert's first steps (the reference counts an expert's weight and bias from
its first draw, adaptune from step 1) and, with ``set_to_none``, in skipped experts. tests/test_mosa_reference.py
checks that `NCopyUp` fed adaptune's draws reproduces adaptune's model exactly under SGD (momentum, weight decay).

The table: per task, mean ± std (over seeds) of each variant, the difference reference − adaptune, its standard error
``sqrt(sd_a²/n_a + sd_r²/n_r)``, whether ``|difference| <= 2 SE``, and the mean ± SE of the per-seed differences (a
seed fixes both variants' init and batch order, and with ``--partition same`` their masks; the expert draws differ).
Each finished run is kept under ``--out`` (adaptune runs as the accuracy suite keeps them, reference runs as
``reference-<hash>-s<seed>/result.json``, with the reference's largest off-mask weight and its draw counts) and
reused by the next call; the table goes to stdout and, with ``--json``, everything to a file. Cost: the reference
holds N full copies (254,288 trainable parameters against adaptune's 117,584 here) and runs the whole backbone twice
per step, where adaptune caches the frozen prefix (`adaptune.prefix`, exact); one 10-epoch run takes 1-2 minutes on
2 CPU cores.

    python benchmarks/mosa_reference.py                                  # orientation-1k, seeds 0 1 2: 6 runs
    python benchmarks/mosa_reference.py --tasks count-1k --seeds 0 1 2 3 4 --set-to-none --json mosa_ref.json
    python benchmarks/mosa_reference.py --epochs 2 --seeds 0 --partition independent
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

RECIPE = "quickstart_mosa"
VARIANTS = ("adaptune", "reference", "reference-none")
FORMAT = 1  # bump when the reference loop changes, so stored reference runs are not reused


def _suite() -> Any:
    """benchmarks/accuracy_suite.py, imported from this file's folder (benchmarks/ is not a package)."""
    if "accuracy_suite" in sys.modules:
        return sys.modules["accuracy_suite"]
    spec = importlib.util.spec_from_file_location("accuracy_suite", Path(__file__).with_name("accuracy_suite.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["accuracy_suite"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@dataclass(frozen=True)
class ReferenceOptions:
    """How the reference variant trains."""

    set_to_none: bool = False  # False: torch 1.11's zero_grad (the released environment); True: torch >= 2's
    partition: str = "same"  # "same": adaptune's owner maps; "independent": a fresh kthvalue partition


# ----------------------------------------------------------------------------------------------------------------
# the reference formulation


def kthvalue_partition(
    shape: torch.Size | tuple[int, ...], num_experts: int, generator: torch.Generator
) -> torch.Tensor:
    """The reference's masks (methods-core.md §2.4): uniform scores, expert i keeps the scores between the
    ``⌊i·n/N⌋ + 1``-th and the ``⌊(i+1)·n/N⌋``-th smallest.

    Returns:
        Bool masks ``(N, *shape)``, disjoint, covering every element.
    """
    score = torch.rand(shape, generator=generator)
    flat, n = score.flatten(), score.numel()
    masks = []
    for i in range(num_experts):
        lo = flat.kthvalue(i * n // num_experts + 1).values
        hi = flat.kthvalue((i + 1) * n // num_experts).values
        masks.append((score >= lo) & (score <= hi))
    return torch.stack(masks)


class NCopyUp(nn.Module):
    """The released code's split ``up`` (`MoSABlock`): N full-size Linear copies, one drawn per training forward and
    used dense, masks applied to the gradients (`mask_grads`, after backward), the mean of the copies in eval.

    Args:
        experts: N Linear copies (the reference deep-copies expert 0: same zero weight, same bias).
        masks: Bool ``(N, out, in)``, a partition of the weight's elements.
        draw: Returns the expert index of the next training forward.

    Attributes:
        draws: Every expert index drawn, in order.
    """

    def __init__(self, experts: list[nn.Linear], masks: torch.Tensor, draw: Callable[[], int]):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.register_buffer("masks", masks)
        self.draw = draw
        self.draws: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, *self.merged_tensors())  # (..., out)
        k = self.draw()
        self.draws.append(k)
        return self.experts[k](x)  # (..., out): the dense expert

    def mask_grads(self) -> None:
        """``grad ← grad ⊙ M_k`` for every expert that holds a gradient; the private biases stay unmasked."""
        for expert, mask in zip(self.experts, self.masks, strict=True):
            if expert.weight.grad is not None:
                expert.weight.grad.mul_(mask)

    def merged_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``MERGE="add"``: ``(1/N) Σ_k W_k`` and ``(1/N) Σ_k b_k``."""
        weight = torch.stack([e.weight for e in self.experts]).mean(0)
        bias = None if self.experts[0].bias is None else torch.stack([e.bias for e in self.experts]).mean(0)
        return weight, bias

    def off_mask(self) -> float:
        """Largest ``|W_k|`` outside ``M_k``: 0 as long as the experts stay inside their masks."""
        return max(float((e.weight.detach() * ~m).abs().max()) for e, m in zip(self.experts, self.masks, strict=True))


def to_reference(
    model: nn.Module, draw: Callable[[], int], partition: str = "same", generator: torch.Generator | None = None
) -> list[NCopyUp]:
    """Replace every split ``up`` of an adaptune ``mosa`` model (``share: down``, private biases, zero ``up`` init)
    by an `NCopyUp`, in place: expert k gets adaptune's bias row k and the mask ``owner == k`` (``partition: same``)
    or a `kthvalue_partition` from ``generator`` (``independent``).

    Args:
        model: An adaptune model with `mosa` injected, before training.
        draw: Returns an expert index; shared by all modules, called once per module per training forward.
        partition: ``same`` or ``independent``.
        generator: CPU generator of the ``independent`` masks.

    Returns:
        The new modules, in model order.

    Raises:
        ValueError: A split other than ``up``, split biases, or a non-zero ``up`` init (where the reference's dense
            copies are not ``W ⊙ M_k``).
    """
    from adaptune.methods.mosa_split import SplitLinear, split_modules

    out = []
    for path, split in list(split_modules(model)):
        parent_path, _, child = path.rpartition(".")
        if child != "up" or not isinstance(split, SplitLinear) or split.bias_owner is not None:
            raise ValueError(f"{path}: the reference variant covers split `up` Linears with private biases only")
        if split.weight.detach().abs().max() > 0:
            raise ValueError(f"{path}: the reference's copies start from the up init; it must be zero (init: lora)")
        n = split.num_experts
        if partition == "same":
            masks = torch.stack([split.owner == k for k in range(n)])
        elif partition == "independent":
            masks = kthvalue_partition(split.weight.shape, n, generator or torch.Generator().manual_seed(0))
        else:
            raise ValueError(f"partition: expected 'same' or 'independent', got {partition!r}")
        experts = []
        for k in range(n):
            linear = nn.Linear(split.in_features, split.out_features, bias=split.bias is not None)
            linear.to(device=split.weight.device, dtype=split.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(split.weight)
                if split.bias is not None:
                    linear.bias.copy_(split.bias[k])
            experts.append(linear.requires_grad_(split.weight.requires_grad))
        module = NCopyUp(experts, masks.to(split.weight.device), draw).train(split.training)
        setattr(model.get_submodule(parent_path), child, module)
        out.append(module)
    return out


def consistency_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The released trainer's loss (methods-core.md §2.7) from two separate forward passes of the same batch.

    Returns:
        (total, logits of pass 1 ``(B, C)``, ``{"ce", "kl"}`` as floats).
    """
    z1 = model(x)  # (B, C)
    ce = F.cross_entropy(z1.float(), y, label_smoothing=label_smoothing)
    if weight == 0.0:
        return ce, z1, {"ce": ce.item()}
    z2 = model(x)  # (B, C), its own draws
    p1, p2 = z1.float(), z2.float()
    kl = 0.5 * (
        F.kl_div(F.log_softmax(p1, -1), F.softmax(p2.detach(), -1), reduction="batchmean")
        + F.kl_div(F.log_softmax(p2, -1), F.softmax(p1.detach(), -1), reduction="batchmean")
    )
    return ce + weight * kl, z1, {"ce": ce.item(), "kl": (weight * kl).item()}


def reference_step(
    model: nn.Module,
    modules: list[NCopyUp],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    weight: float,
    *,
    label_smoothing: float = 0.0,
    clip_grad: float | None = None,
    set_to_none: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One training step of the released trainer: loss, backward, gradient masks, (clip,) step, zero_grad.

    Returns:
        As `consistency_loss`.
    """
    total, z1, terms = consistency_loss(model, x, y, weight, label_smoothing)
    total.backward()
    for m in modules:
        m.mask_grads()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=set_to_none)
    return total.detach(), z1.detach(), terms


# ----------------------------------------------------------------------------------------------------------------
# the two variants


def load(task: str, seed: int, epochs: int) -> Any:
    """The ``quickstart_mosa`` recipe on the accuracy suite's protocol."""
    from adaptune.recipe import load_recipe

    suite = _suite()
    p = suite.Protocol(epochs=epochs)
    return load_recipe(suite.recipe_path(RECIPE), suite.protocol_overrides(task, seed, p))


def run_adaptune(task: str, seed: int, epochs: int, root: Path) -> dict[str, Any]:
    """adaptune's engine on the recipe (or a finished run reused): the accuracy suite's `run_adaptune`."""
    suite = _suite()
    record = suite.run_adaptune(RECIPE, task, seed, suite.Protocol(epochs=epochs), root)
    summary = json.loads((Path(record["run_dir"]) / "summary.json").read_text())
    return {**record, "variant": "adaptune", "train_loss_terms": summary.get("train_loss_terms")}


def _train_mode(model: nn.Module) -> None:
    from torch.nn.modules.batchnorm import _BatchNorm

    model.train()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def _batches(loaders: Any, epoch: int) -> Iterator[Any]:
    loaders.train_sampler.set_epoch(epoch)
    yield from loaders.train


def train_reference(recipe: Any, opts: ReferenceOptions) -> dict[str, Any]:
    """The recipe's model with `NCopyUp` experts, trained with a plain loop on adaptune's batches (module docstring);
    test top-1 of the last (merged) weights."""
    import timm.optim
    import timm.scheduler

    from adaptune import data
    from adaptune.loading import build

    start = time.perf_counter()
    cfg, method = recipe.train, recipe.method
    if not recipe.backbone.train_mode or cfg.grad_accum != 1 or cfg.precision != "fp32" or method.split_lr_scale != 1:
        raise SystemExit("mosa_reference: needs backbone.train_mode, grad_accum 1, fp32 and split_lr_scale 1")
    device = _suite()._device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    b = build(recipe)  # seeds Python and torch with train.seed, exactly as the engine does
    rng = random.Random(cfg.seed)
    n = method.num_experts
    modules = to_reference(
        b.model, lambda: rng.randrange(n), opts.partition, torch.Generator().manual_seed(10_000 + cfg.seed)
    )
    model = b.model.to(device)
    loaders = data.build_loaders(
        recipe.data,
        spec=b.input,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
        seed=cfg.seed,
        num_classes=b.info.num_classes,
        label_smoothing=cfg.label_smoothing,
    )
    loaders.prefill()
    steps_per_epoch = len(loaders.train)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    optimizer = timm.optim.create_optimizer_v2(
        model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
        **({"eps": cfg.eps} if cfg.optimizer == "adamw" else {"momentum": cfg.momentum}),
    )  # fmt: skip
    scheduler = timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=max(1, total - warmup), lr_min=cfg.lr if cfg.schedule == "constant" else cfg.min_lr,
        warmup_t=warmup, warmup_lr_init=cfg.warmup_lr, warmup_prefix=True, t_in_epochs=False,
    )  # fmt: skip
    scheduler.step_update(0)
    step, epoch, sums, seen = 0, 0, {}, 0
    while step < total:
        _train_mode(model)
        sums, seen = {}, 0
        for batch in _batches(loaders, epoch):
            x, y = batch.inputs.to(device), batch.targets.to(device)
            _, _, terms = reference_step(
                model, modules, optimizer, x, y, method.consistency_weight,
                label_smoothing=cfg.label_smoothing, clip_grad=cfg.clip_grad, set_to_none=opts.set_to_none,
            )  # fmt: skip
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(y)
            seen += len(y)
            step += 1
            scheduler.step_update(step)
            if step >= total:
                break
        epoch += 1
    top1 = _accuracy(model, loaders.test, device)
    counts = [[m.draws.count(k) for k in range(n)] for m in modules]
    return {
        "variant": "reference-none" if opts.set_to_none else "reference",
        "test_top1": top1,
        "wall_time_s": time.perf_counter() - start,
        "steps": step,
        "train_loss_terms": {k: v / max(seen, 1) for k, v in sums.items()},
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "max_off_mask": max(m.off_mask() for m in modules),
        "draw_counts": counts,
    }


def _accuracy(model: nn.Module, loader: Any, device: torch.device) -> float:
    """Top-1 (%) in eval mode (the merged experts)."""
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for batch in loader:
            logits = model(batch.inputs.to(device))  # (B, C)
            correct += int((logits.argmax(1).cpu() == batch.labels).sum())
            seen += len(batch)
    return 100.0 * correct / seen


def run_reference(task: str, seed: int, epochs: int, opts: ReferenceOptions, root: Path) -> dict[str, Any]:
    """Train the reference (or reuse a finished run); its record."""
    recipe = load(task, seed, epochs)
    key = _suite()._digest([recipe.to_dict(), asdict(opts), FORMAT])
    run_dir = root / task / f"reference-{key}-s{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        result = train_reference(recipe, opts)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**result, "options": asdict(opts), "recipe": recipe.to_dict()}, indent=2))
        tmp.replace(result_file)
    keep = ("variant", "test_top1", "wall_time_s", "trainable_params", "max_off_mask", "train_loss_terms")
    return {"task": task, "seed": seed, **{k: result[k] for k in keep}, "run_dir": str(run_dir)}


# ----------------------------------------------------------------------------------------------------------------
# the table


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def compare(records: list[dict[str, Any]], tasks: list[str], variants: list[str]) -> dict[str, Any]:
    """Per task and reference variant: both means ± std over seeds, the difference of the means, its standard error
    ``sqrt(sd_a²/n_a + sd_r²/n_r)`` and whether it is within 2 SE; also the per-seed (paired) differences."""
    table: dict[str, Any] = {}
    for task in tasks:
        by_seed = {v: {r["seed"]: r["test_top1"] for r in records if r["task"] == task and r["variant"] == v}
                   for v in variants}  # fmt: skip
        runs = {v: list(by_seed[v].values()) for v in variants}
        rows = {}
        for v in variants[1:]:
            (ma, sa), (mr, sr) = _stats(runs["adaptune"]), _stats(runs[v])
            se = math.sqrt(sa**2 / len(runs["adaptune"]) + sr**2 / len(runs[v]))
            paired = [by_seed[v][s] - by_seed["adaptune"][s] for s in by_seed[v] if s in by_seed["adaptune"]]
            pm, ps = _stats(paired)
            rows[v] = {
                "difference": mr - ma,
                "se": se,
                "within_2se": abs(mr - ma) <= 2 * se if se == se else None,
                "paired": paired,
                "paired_mean": pm,
                "paired_se": ps / math.sqrt(len(paired)),
            }
        table[task] = {"runs": runs, "mean_std": {v: _stats(runs[v]) for v in variants}, "vs_adaptune": rows}
    return table


def markdown(table: dict[str, Any], command: str) -> str:
    lines = [
        "| task | variant | seeds | adaptune | reference | difference | SE | within 2 SE | paired difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, t in table.items():
        ma, sa = t["mean_std"]["adaptune"]
        for v, row in t["vs_adaptune"].items():
            mr, sr = t["mean_std"][v]
            within = {True: "yes", False: "**no**", None: "-"}[row["within_2se"]]
            lines.append(
                f"| {task} | {v} | {len(t['runs'][v])} | {ma:.2f} ± {sa:.2f} | {mr:.2f} ± {sr:.2f} | "
                f"{row['difference']:+.2f} | {row['se']:.2f} | {within} | "
                f"{row['paired_mean']:+.2f} ± {row['paired_se']:.2f} |"
            )
    per_seed = [
        f"- {task} {v}: " + ", ".join(f"{x:.2f}" for x in values)
        for task, t in table.items()
        for v, values in t["runs"].items()
    ]
    return (
        "\n".join(lines)
        + "\n\nTest top-1 (%) of the last weights, mean ± std over seeds; difference = reference - adaptune; "
        + "SE = sqrt(sd_a²/n_a + sd_r²/n_r); paired difference: mean ± SE of the per-seed differences (a seed "
        + "fixes the init and batch order of both variants, with --partition same the masks too; the draws "
        + "differ).\nPer seed:\n"
        + "\n".join(per_seed)
        + f"\n\nReproduce: `{command}`\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["orientation-1k"], help="built-in dataset names")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--set-to-none", action="store_true", help="also train the reference with torch >= 2's zero_grad"
    )
    parser.add_argument("--partition", choices=("same", "independent"), default="same", help="the reference's masks")
    parser.add_argument("--out", type=Path, default=Path("runs/mosa_reference"))
    parser.add_argument("--json", type=Path, default=None, help="write the runs and the table here")
    args = parser.parse_args(argv)
    suite = _suite()
    suite._check(args.tasks, [RECIPE])
    if len(args.seeds) < 2:
        print("note: one seed gives no seed noise; the within-2-SE column stays empty", file=sys.stderr)
    root = args.out / suite.Protocol(epochs=args.epochs).tag
    variants = ["adaptune", "reference", *(["reference-none"] if args.set_to_none else [])]
    records = []
    for task in args.tasks:
        for seed in args.seeds:
            for variant in variants:
                if variant == "adaptune":
                    record = run_adaptune(task, seed, args.epochs, root)
                else:
                    opts = ReferenceOptions(set_to_none=variant == "reference-none", partition=args.partition)
                    record = run_reference(task, seed, args.epochs, opts, root)
                records.append(record)
                print(
                    f"{task} {variant} s{seed}: test top-1 {record['test_top1']:.2f}%, {record['wall_time_s']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    table = compare(records, args.tasks, variants)
    command = "python benchmarks/mosa_reference.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(table, command.strip())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args), "runs": records, "table": table}, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
