"""Accuracy suite: every shipped quickstart-family recipe and a plain timm + PEFT LoRA peer on VTAB-1k-style tasks.

Protocol (issue 11): the built-in tasks at ``--img-size`` 64 px, ``--epochs`` 10, batch 32, trained on train + val
(``data.train_split: trainval``, ``data.val_split: null``), tested on test with the last weights, no augmentation
(``data.hflip: false``), the real ImageNet EfficientNet-Lite0 (``backbone.pretrained: package:efficientnet-lite0``).
Each adaptune recipe keeps everything else it sets (method, learning rate, warmup, weight decay); the protocol's keys
are applied as ``--set`` overrides through `adaptune.recipe.load_recipe` and trained with `adaptune.train.train`.

The peer, ``peft-lora``, is what a user would write with timm and PEFT alone (see `train_reference`): PEFT
``LoraConfig(r=8, lora_alpha=8)`` on every pointwise (1x1, groups 1) conv of the same pretrained weights, a new head,
torchvision transforms, timm's AdamW and cosine schedule, a plain loop.

Every run is stored under ``--out``/<protocol>/<task>/<recipe>-<config hash>-s<seed>/; a finished run is reused when
the suite is run again (an interrupted adaptune run resumes from its last checkpoint), and a changed recipe gets a
new directory. Writes ``results.json`` and ``results.md`` (test top-1 per task, mean over tasks, trainable
parameters, wall time per run) into ``--out``/<protocol>/ and prints the table.

    python benchmarks/accuracy_suite.py                                   # everything (hours on CPU)
    python benchmarks/accuracy_suite.py --tasks count-1k digits-1k --recipes quickstart peft-lora --epochs 2
    python benchmarks/accuracy_suite.py --seeds 0 1 2 --out runs/suite
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

REFERENCE = "peft-lora"
TASKS = (
    "digits-1k",
    "fashion-mnist-1k",
    "shapes-1k",
    "count-1k",
    "orientation-1k",
    "location-1k",
    "distance-1k",
    "elevation-1k",
)
WEIGHTS = "package:efficientnet-lite0"
MODEL = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class Protocol:
    """The settings every entry of the suite shares."""

    epochs: int = 10
    img_size: int = 64
    batch_size: int = 32
    data_seed: int = 0  # data.builtin.seed: which instance of the generated tasks
    device: str = "auto"
    threads: int | None = None

    @property
    def tag(self) -> str:
        return f"e{self.epochs}-px{self.img_size}-b{self.batch_size}-d{self.data_seed}"


@dataclass(frozen=True)
class ReferenceConfig:
    """The plain PEFT LoRA peer's settings (the schedule matches the quickstart recipes')."""

    rank: int = 8
    alpha: float = 8.0  # PEFT's default lora_alpha; alpha / r = 1 as adaptune's LoRA default
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    batchnorm: str = "eval"  # frozen BatchNorm kept in eval mode ("train": model.train() as is)


# ----------------------------------------------------------------------------------------------------------------
# recipes


def shipped_recipes() -> list[str]:
    """Names of the shipped quickstart-family recipes (``adaptune/recipes/quickstart*.yaml``), sorted."""
    folder = resources.files("adaptune").joinpath("recipes")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.startswith("quickstart"))


def recipe_path(name: str) -> Path:
    """A shipped recipe's file, or ``name`` itself as a path."""
    shipped = Path(str(resources.files("adaptune").joinpath("recipes", f"{name}.yaml")))
    return shipped if shipped.exists() else Path(name)


def protocol_overrides(task: str, seed: int, p: Protocol) -> list[str]:
    """The ``--set`` overrides that put a recipe on the suite's protocol."""
    return [
        f"backbone.pretrained={WEIGHTS}",
        "data.source=builtin",
        f"data.builtin.name={task}",
        f"data.builtin.seed={p.data_seed}",
        f"data.img_size={p.img_size}",
        "data.hflip=false",
        "data.train_split=trainval",
        "data.val_split=null",
        "data.test_split=test",
        f"train.epochs={p.epochs}",
        "train.max_steps=null",
        f"train.batch_size={p.batch_size}",
        f"train.seed={seed}",
        f"train.device={p.device}",
        *([f"train.threads={p.threads}"] if p.threads else []),
    ]


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def stale_keys(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys of two resolved recipes that both have and that differ (``name`` and ``output`` ignored): a finished run
    is reused when there are none. Keys only one side has are options added to (or removed from) adaptune since the
    run, at their defaults, so they do not count."""
    a, b = _flat(stored), _flat(current)
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k] and not k.startswith(("name", "output.")))


def _settings(recipe: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe's flat keys that decide its training (all but ``name`` and ``output``)."""
    return {k: v for k, v in _flat(recipe).items() if k.split(".")[0] not in ("name", "output")}


def same_finished_run(task_dir: Path, current: dict[str, Any]) -> Path | None:
    """A finished run of ``task_dir`` whose stored recipe resolves to ``current`` (``name`` and ``output`` ignored):
    a recipe that only changed its file (a shipped recipe now spelling out what a tried one set) trains the same."""
    import yaml

    for stored_file in sorted(task_dir.glob("*/recipe.yaml")):
        finished = (stored_file.parent / "summary.json").exists()
        if finished and _settings(yaml.safe_load(stored_file.read_text())) == _settings(current):
            return stored_file.parent
    return None


def run_adaptune(name: str, task: str, seed: int, p: Protocol, root: Path) -> dict[str, Any]:
    """Train recipe ``name`` on ``task`` (or reuse a finished run); the run's suite record.

    The run directory is keyed by the recipe file's text and the overrides; a finished run there is reused unless
    its stored recipe differs from today's resolution on a shared key (a default that changed), in which case the run
    is trained again next to it, keyed also by the resolved recipe.
    """
    import yaml

    from adaptune.recipe import load_recipe
    from adaptune.train import train

    path, overrides = recipe_path(name), protocol_overrides(task, seed, p)
    recipe = load_recipe(path, overrides)
    current = recipe.to_dict()
    run_dir = root / task / f"{path.stem}-{_digest([path.read_text(), overrides])}-s{seed}"
    stored_file = run_dir / "recipe.yaml"
    if stored_file.exists() and stale_keys(yaml.safe_load(stored_file.read_text()), current):
        run_dir = run_dir.with_name(f"{run_dir.name.rsplit('-s', 1)[0]}-{_digest(current)}-s{seed}")
    if not (run_dir / "summary.json").exists():
        run_dir = same_finished_run(root / task, current) or run_dir
    summary_file = run_dir / "summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
    else:
        summary = train(recipe, out_dir=run_dir, resume=run_dir.exists()).summary
    return {
        "task": task,
        "recipe": path.stem,
        "seed": seed,
        "method": summary["method"],
        "test_top1": summary["test_top1_last"],
        "wall_time_s": summary["wall_time_s"],
        "trainable_params": summary["trainable_params"],
        "warnings": summary.get("warnings", []),
        "run_dir": str(run_dir),
    }


# ----------------------------------------------------------------------------------------------------------------
# the plain timm + PEFT reference


def reference_inputs(task: str, split: str, p: Protocol, mean: tuple, std: tuple, interpolation: str) -> tuple:
    """A split as float32 inputs (N, 3, S, S) and int64 labels (N,), the way a torchvision user prepares them:
    ``Resize((S, S))`` with the model's interpolation, RGB, ``ToTensor``, ``Normalize(mean, std)``.

    The uint8 arrays are adaptune's built-in ones (the same images every entry trains on).
    """
    import torch
    from torchvision import transforms

    from adaptune.data.sources import open_source
    from adaptune.data.sources.builtin import BuiltinConfig
    from adaptune.recipe import DataConfig

    source = open_source(DataConfig(source="builtin", options=BuiltinConfig(name=task, seed=p.data_seed)))
    data = source.load(split, "suite")
    modes = {"bicubic": transforms.InterpolationMode.BICUBIC, "bilinear": transforms.InterpolationMode.BILINEAR}
    tf = transforms.Compose(
        [
            transforms.Resize((p.img_size, p.img_size), interpolation=modes[interpolation]),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    images = [tf(data.images.read(i).convert("RGB")) for i in range(len(data.labels))]
    return torch.stack(images), torch.as_tensor(data.labels, dtype=torch.int64)


def reference_model(num_classes: int, cfg: ReferenceConfig) -> Any:
    """timm EfficientNet-Lite0 on the same ImageNet weights, zero-initialised head, PEFT LoRA on every 1x1 conv."""
    import peft
    import timm
    import torch
    from torch import nn

    from adaptune.backbone import _package_weights

    weights = _package_weights(WEIGHTS, MODEL, None)  # the package's weights under timm's key names
    model = timm.create_model(
        MODEL, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, num_classes=num_classes
    )
    with torch.no_grad():
        for param in model.get_classifier().parameters():
            param.zero_()  # as adaptune's backbone.head_init: zeros
    targets = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
    ]
    config = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=targets, modules_to_save=["classifier"]
    )
    return peft.get_peft_model(model, config)


def _train_mode(model: Any, batchnorm: str) -> None:
    from torch.nn.modules.batchnorm import _BatchNorm

    model.train()
    if batchnorm == "eval":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_reference(task: str, seed: int, p: Protocol, cfg: ReferenceConfig) -> dict[str, Any]:
    """Plain timm + PEFT LoRA, trained with a plain loop on the suite's protocol; test top-1 of the last weights.

    Same as adaptune: the uint8 images, the resize (direct, no crop) and normalisation (the model's own mean/std,
    0.5/0.5 for this model; checked equal in tests/test_structured_data.py), the weights, a zero head, batch size and
    steps (the last short batch kept), AdamW with no decay on biases (timm's ``create_optimizer_v2``), per-step linear
    warmup from ``warmup_lr`` then cosine to ``min_lr`` (timm's ``CosineLRScheduler``), fp32, cross-entropy without
    label smoothing. Different: the adapter is PEFT's LoRA (r=8, alpha=8, on all 32 pointwise convs including
    ``conv_head``, so every block, where the quickstart recipes adapt only the last three stages); the shuffling is
    ``torch.randperm`` from the seed (not adaptune's sampler, so the batch order differs); no validation, no
    checkpoints, no divergence checks. BatchNorm: eval mode (``ReferenceConfig.batchnorm``; adaptune keeps frozen
    BatchNorm in eval too), every other module in train mode (this model has no dropout or drop-path here).
    """
    import timm.data
    import torch

    from adaptune.data.sources import open_source
    from adaptune.data.sources.builtin import BuiltinConfig
    from adaptune.recipe import DataConfig

    start = time.perf_counter()
    device = _device(p.device)
    if p.threads:
        torch.set_num_threads(p.threads)
    torch.manual_seed(seed)  # the LoRA A initialisation
    num_classes = len(open_source(DataConfig(source="builtin", options=BuiltinConfig(name=task))).class_names)
    model = reference_model(num_classes, cfg).to(device)
    data_cfg = timm.data.resolve_data_config({}, model=model.get_base_model())
    prep = (p, data_cfg["mean"], data_cfg["std"], data_cfg["interpolation"])
    train_set = reference_inputs(task, "trainval", *prep)
    test_set = reference_inputs(task, "test", *prep)
    last_loss = _fit(model, train_set, seed, p, cfg, device)
    return {
        "method": REFERENCE,
        "test_top1": _accuracy(model, test_set, 2 * p.batch_size, device),
        "wall_time_s": time.perf_counter() - start,
        "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad),
        "final_train_loss": last_loss,
    }


def _fit(model: Any, train_set: tuple, seed: int, p: Protocol, cfg: ReferenceConfig, device: Any) -> float:
    """The plain loop: shuffled batches, cross-entropy, AdamW, the schedule stepped after every step."""
    import timm.optim
    import timm.scheduler
    import torch
    import torch.nn.functional as F

    x_train, y_train = train_set
    steps_per_epoch = math.ceil(len(y_train) / p.batch_size)
    total = p.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=max(1, total - warmup), lr_min=cfg.min_lr, warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr, warmup_prefix=True, t_in_epochs=False,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    step, loss = 0, torch.zeros(())
    for _ in range(p.epochs):
        _train_mode(model, cfg.batchnorm)
        for idx in torch.randperm(len(y_train), generator=generator).split(p.batch_size):
            loss = F.cross_entropy(model(x_train[idx].to(device)), y_train[idx].to(device))  # (B, C) logits
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step_update(step)
    return float(loss.item())


def _accuracy(model: Any, test_set: tuple, batch_size: int, device: Any) -> float:
    """Top-1 (%) in eval mode."""
    import torch

    x_test, y_test = test_set
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in zip(x_test.split(batch_size), y_test.split(batch_size), strict=True):
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return 100.0 * correct / len(y_test)


def run_reference(task: str, seed: int, p: Protocol, cfg: ReferenceConfig, root: Path) -> dict[str, Any]:
    """Train the reference on ``task`` (or reuse a finished run); the run's suite record."""
    run_dir = root / task / f"{REFERENCE}-{_digest(asdict(cfg) | {'task': task})}-s{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        result = train_reference(task, seed, p, cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**result, "config": asdict(cfg), "protocol": asdict(p)}, indent=2))
        tmp.replace(result_file)
    record = {k: result[k] for k in _RECORD}
    return {"task": task, "recipe": REFERENCE, "seed": seed, **record, "warnings": [], "run_dir": str(run_dir)}


_RECORD = ("method", "test_top1", "wall_time_s", "trainable_params")


# ----------------------------------------------------------------------------------------------------------------
# the table


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def summarize(records: list[dict[str, Any]], tasks: list[str], recipes: list[str]) -> dict[str, Any]:
    """Per recipe: mean test top-1 per task (over seeds), the mean over tasks, parameters and time per run."""
    table: dict[str, Any] = {}
    for recipe in recipes:
        mine = [r for r in records if r["recipe"] == Path(recipe).stem]
        per_task = {t: [r["test_top1"] for r in mine if r["task"] == t] for t in tasks}
        seeds = sorted({r["seed"] for r in mine})
        by_seed = [statistics.mean(r["test_top1"] for r in mine if r["seed"] == s) for s in seeds]  # task means
        table[Path(recipe).stem] = {
            "method": mine[0]["method"] if mine else None,
            "per_task": {t: statistics.mean(v) if v else None for t, v in per_task.items()},
            "per_task_runs": per_task,
            "mean": statistics.mean(by_seed) if by_seed else None,
            "mean_runs": by_seed,
            "trainable_params": sorted({r["trainable_params"] for r in mine}),
            "wall_time_s_per_run": statistics.mean(r["wall_time_s"] for r in mine) if mine else None,
        }
    return table


def markdown(table: dict[str, Any], tasks: list[str], command: str, records: Sequence[dict[str, Any]] = ()) -> str:
    head = (
        "| recipe | method | " + " | ".join(t.removesuffix("-1k") for t in tasks) + " | mean | trainable | time/run |"
    )
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for recipe, row in table.items():
        cells = [_cell(row["per_task_runs"][t]) for t in tasks]
        params = "/".join(f"{n:,}" for n in row["trainable_params"]) or "-"
        seconds = "-" if row["wall_time_s_per_run"] is None else f"{row['wall_time_s_per_run']:.0f} s"
        mean = _cell(row["mean_runs"])
        lines.append(f"| `{recipe}` | {row['method']} | {' | '.join(cells)} | {mean} | {params} | {seconds} |")
    notes = [f"- {r['task']} `{r['recipe']}` seed {r['seed']}: {w}" for r in records for w in r.get("warnings", [])]
    text = "\n".join(lines) + f"\n\nTest top-1 (%), last weights. Reproduce: `{command}`\n"
    return text + ("\nWarnings:\n" + "\n".join(notes) + "\n" if notes else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="built-in dataset names")
    parser.add_argument("--recipes", nargs="+", default=None, help=f"recipe names or files, and {REFERENCE}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=Protocol.epochs)
    parser.add_argument("--img-size", type=int, default=Protocol.img_size)
    parser.add_argument("--batch-size", type=int, default=Protocol.batch_size)
    parser.add_argument("--data-seed", type=int, default=Protocol.data_seed, help="data.builtin.seed of the tasks")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--reference-lr", type=float, default=ReferenceConfig.lr)
    parser.add_argument("--reference-bn", choices=("eval", "train"), default="eval", help="BatchNorm mode of the peer")
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy_suite"))
    args = parser.parse_args(argv)
    recipes = args.recipes or [*shipped_recipes(), REFERENCE]
    _check(args.tasks, recipes)
    p = Protocol(args.epochs, args.img_size, args.batch_size, args.data_seed, args.device, args.threads)
    ref = ReferenceConfig(lr=args.reference_lr, batchnorm=args.reference_bn)
    root = args.out / p.tag
    records = []
    for task in args.tasks:
        for recipe in recipes:
            for seed in args.seeds:
                if recipe == REFERENCE:
                    record = run_reference(task, seed, p, ref, root)
                else:
                    record = run_adaptune(recipe, task, seed, p, root)
                records.append(record)
                print(
                    f"{task} {record['recipe']} s{seed}: test top-1 {record['test_top1']:.2f}%, "
                    f"{record['trainable_params']:,} trainable, {record['wall_time_s']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    table = summarize(records, args.tasks, recipes)
    command = "python benchmarks/accuracy_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(table, args.tasks, command.strip(), records)
    root.mkdir(parents=True, exist_ok=True)
    out = {"protocol": asdict(p), "reference": asdict(ref), "command": command, "runs": records, "table": table}
    (root / "results.json").write_text(json.dumps(out, indent=2))
    (root / "results.md").write_text(text)
    print(text)


def _check(tasks: list[str], recipes: list[str]) -> None:
    """Fail before any training on an unknown task or recipe."""
    from adaptune.data.sources.builtin import list_datasets

    known = {d.name for d in list_datasets()}
    bad = [t for t in tasks if t not in known]
    if bad:
        raise SystemExit(
            f"--tasks: unknown built-in dataset(s) {', '.join(bad)}; available: {', '.join(sorted(known))}"
        )
    missing = [r for r in recipes if r != REFERENCE and not recipe_path(r).exists()]
    if missing:
        raise SystemExit(
            f"--recipes: no such recipe {', '.join(missing)}; shipped: {', '.join(shipped_recipes())}, or {REFERENCE}"
        )


if __name__ == "__main__":
    main()
