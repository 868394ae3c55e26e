"""The training loop: one loop for every method.

Read top to bottom: build (backbone, method, data, optimizer, schedule) -> maybe resume -> epochs of steps with
evaluation -> final test of the best and last weights -> summary. Methods plug in through their `MethodSpec`
(``training_loss`` for MoSA's consistency term); everything else is shared.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune import artifacts
from adaptune.errors import AdaptuneError, ArtifactError, DivergenceError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from adaptune.methods.registry import MethodSpec
    from adaptune.recipe import Recipe


class Interrupted(AdaptuneError):
    """Ctrl-C or SIGTERM: ``last`` was saved; ``adaptune train --resume RUN_DIR`` continues."""

    exit_code = 130


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


@dataclass
class Built:
    """A model ready to train: the backbone with the method injected, and what the dry run reports."""

    model: nn.Module
    spec: MethodSpec
    touched: list[str]
    info: Any  # data.DatasetInfo
    trainable: int
    total: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def build(recipe: Recipe) -> Built:
    """Backbone + method, seeded by ``train.seed``; cheap data description only (no images decoded)."""
    import torch

    from adaptune import data
    from adaptune.backbone import count_parameters, create_backbone, input_spec
    from adaptune.methods.registry import get_method

    info = data.describe(recipe.data)
    _seed_everything(recipe.train.seed)
    model = create_backbone(recipe.backbone, info.num_classes)
    spec = get_method(recipe.method_name)
    touched = spec.inject(model, recipe.method)
    model.get_classifier().requires_grad_(True)
    trainable, total = count_parameters(model)
    size, mean, std = input_spec(model, recipe)
    torch.manual_seed(recipe.train.seed)  # the method's draws and dropout start from the same state every run
    return Built(model, spec, touched, info, trainable, total, size, mean, std)


def set_train_mode(model: nn.Module, backbone_train: bool) -> None:
    """Train mode for what trains; frozen BatchNorm always in eval (its running stats must not drift).

    With ``backbone_train`` false the frozen backbone runs in eval mode (no dropout/drop-path) and only the modules a
    method created are in train mode.
    """
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

    from adaptune.methods.common import adapter_modules

    model.train(backbone_train)
    if not backbone_train:
        for _, module in adapter_modules(model):
            module.train()
            base = getattr(module, "base", None)
            if isinstance(base, nn.Module):
                base.eval()
    for m in model.modules():
        if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()


def default_run_dir(recipe: Recipe) -> Path:
    if recipe.output.dir:
        return Path(recipe.output.dir)
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(
    recipe: Recipe,
    out_dir: str | Path | None = None,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Train ``recipe`` into a run directory.

    Args:
        recipe: A validated recipe.
        out_dir: Run directory (default: ``output.dir`` or ``runs/<name>-<timestamp>``).
        resume: Continue the run in ``out_dir`` from its ``last`` checkpoint.
        log: Where progress lines go (None: silent).
        progress: Show a progress bar (on a TTY).
        on_step: Called with the step number after every optimizer step.

    Raises:
        Interrupted: SIGINT/SIGTERM; ``last`` was saved first.
        DivergenceError: Non-finite loss or gradient; the last good checkpoint is kept.
    """
    import torch
    import torch.nn.functional as F

    from adaptune import data, distributed
    from adaptune.backbone import parameter_line
    from adaptune.evaluate import autocast, evaluate

    wall_start = time.perf_counter()
    say = log or (lambda _msg: None)
    dist, device = distributed.setup(recipe.train.device)
    if not dist.is_main:
        say = lambda _msg: None  # noqa: E731
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    run_dir = Path(out_dir) if out_dir else default_run_dir(recipe)
    if resume:
        ckpt = artifacts.find_checkpoint(run_dir, "last")
    elif (run_dir / artifacts.ADAPTER_CONFIG).exists():
        raise ArtifactError(
            f"{run_dir}: already holds a run; continue it with --resume {run_dir} or pick another --out"
        )

    b = build(recipe)
    model, spec, cfg = b.model.to(device), b.spec, recipe.train
    manifest = artifacts.build_manifest(recipe, b.info.num_classes, b.info.class_names, b.trainable, b.touched)
    loaders = data.build_loaders(
        recipe.data,
        img_size=b.input_size,
        mean=b.mean,
        std=b.std,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
        seed=cfg.seed,
        pin_memory=device.type == "cuda",
        rank=dist.rank,
        world_size=dist.world_size,
    )
    train_model: nn.Module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, find_unused_parameters=spec.find_unused_parameters)

    import timm.optim
    import timm.scheduler

    optimizer = timm.optim.create_optimizer_v2(
        model,
        opt=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        **({"eps": cfg.eps} if cfg.optimizer == "adamw" else {"momentum": cfg.momentum}),
    )
    micro_per_epoch = len(loaders.train)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = timm.scheduler.CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - round(cfg.warmup_epochs * steps_per_epoch)),
        lr_min=cfg.lr if cfg.schedule == "constant" else cfg.min_lr,
        warmup_t=round(cfg.warmup_epochs * steps_per_epoch),
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" and device.type == "cuda" else None
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)

    state = {"step": 0, "epoch": 0, "micro": 0, "best_top1": -1.0, "best_epoch": None, "history": []}
    if resume:
        ts = artifacts.load_trainer_state(ckpt)
        tensors, _ = artifacts.load_safetensors(ckpt / artifacts.ADAPTER_WEIGHTS)
        artifacts.load_adapter_state(model, tensors, ckpt)
        optimizer.load_state_dict(ts["optimizer"])
        if scaler is not None and ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        state.update(ts["loop"])
        _set_rng_state(ts["rng"])
        say(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    elif dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        artifacts.atomic_write_text(run_dir / artifacts.RECIPE_FILE, recipe.to_yaml())
        artifacts.write_json(run_dir / artifacts.ADAPTER_CONFIG, manifest)
    scheduler.step_update(state["step"])

    def trainer_state() -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "loop": {k: state[k] for k in ("step", "epoch", "micro", "best_top1", "best_epoch", "history")},
            "rng": _get_rng_state(),
        }

    def save(which: str) -> None:
        if dist.is_main:
            artifacts.save_checkpoint(run_dir / "checkpoints" / which, model, manifest, trainer_state())

    metrics_path = run_dir / "metrics.jsonl"
    reduce = distributed.sum_reducer(dist)

    def log_metrics(record: dict[str, Any]) -> None:
        if dist.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    say(f"{recipe.method_name} on {recipe.backbone.model}: {parameter_line(b.trainable, b.total)}")
    sizes = " / ".join(f"{n} {split}" for split, n in b.info.split_sizes.items())
    say(f"{sizes} images, {b.info.num_classes} classes, {total_steps} steps of batch {cfg.batch_size}")

    stop = _StopFlag()
    data_time, compute_time, images_seen = 0.0, 0.0, 0
    bar = None
    try:
        with stop.installed():
            while state["step"] < total_steps:
                epoch = state["epoch"]
                loaders.train_sampler.set_epoch(epoch)
                loaders.train_sampler.set_start(state["micro"])
                set_train_mode(model, recipe.backbone.train_mode)
                correct, seen, loss_sum = 0, 0, 0.0
                if progress and dist.is_main:
                    from tqdm import tqdm

                    bar = tqdm(
                        total=micro_per_epoch,
                        initial=state["micro"],
                        desc=f"epoch {epoch + 1}/{num_epochs}",
                        leave=False,
                        file=sys.stderr,
                        dynamic_ncols=True,
                    )
                t0 = time.perf_counter()
                for images, targets in loaders.train:
                    t1 = time.perf_counter()
                    data_time += t1 - t0
                    images = images.to(device, non_blocking=True)
                    targets = targets.to(device, non_blocking=True)
                    with autocast(device, cfg.precision):
                        if spec.training_loss is not None:
                            loss, logits = spec.training_loss(train_model, images, targets, loss_fn)
                        else:
                            logits = train_model(images)
                            loss = loss_fn(logits, targets)
                    if not torch.isfinite(loss):
                        raise _divergence(state["step"], optimizer, "loss", loss.item())
                    scaled = loss / cfg.grad_accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    state["micro"] += 1
                    correct += (logits.detach().argmax(1) == targets).sum().item()
                    seen += targets.numel()
                    loss_sum += loss.item() * targets.numel()
                    images_seen += targets.numel()
                    if bar is not None:
                        bar.update(1)
                    if state["micro"] % cfg.grad_accum == 0 or state["micro"] == micro_per_epoch:
                        if scaler is not None:
                            scaler.unscale_(optimizer)
                        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad or float("inf"))
                        if not torch.isfinite(norm) and scaler is None:
                            raise _divergence(state["step"], optimizer, "gradient norm", norm.item())
                        if scaler is not None:
                            scaler.step(optimizer)
                            scaler.update()
                        else:
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        state["step"] += 1
                        scheduler.step_update(state["step"])
                        if on_step is not None:
                            on_step(state["step"])
                        if state["step"] % cfg.log_every == 0:
                            lr = optimizer.param_groups[0]["lr"]
                            line = f"step {state['step']}/{total_steps} loss {loss.item():.4f} lr {lr:.2e}"
                            if bar is not None:
                                bar.set_postfix_str(line.split(" ", 2)[2])
                            else:
                                say(line)
                            log_metrics({"step": state["step"], "epoch": epoch, "loss": loss.item(), "lr": lr})
                        if stop.requested:
                            save("last")
                            raise Interrupted(
                                f"interrupted at step {state['step']}; last checkpoint saved; continue with: "
                                f"adaptune train --resume {run_dir}"
                            )
                        if state["step"] >= total_steps:
                            break
                    compute_time += time.perf_counter() - t1
                    t0 = time.perf_counter()
                if bar is not None:
                    bar.close()
                    bar = None
                tot = torch.tensor([correct, seen, loss_sum], dtype=torch.float64, device=device)
                tot = (reduce(tot) if reduce else tot).tolist()
                train_top1 = 100.0 * tot[0] / max(tot[1], 1)
                record: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "step": state["step"],
                    "train_loss": tot[2] / max(tot[1], 1),
                    "train_top1": train_top1,
                }
                if epoch == 0 and train_top1 < 150.0 / b.info.num_classes and b.info.num_classes > 2:
                    say(
                        f"warning: training accuracy {train_top1:.1f}% is near chance after the first epoch; if it "
                        "stays there, lower train.lr"
                    )
                last_epoch = state["step"] >= total_steps
                if loaders.val is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
                    val = evaluate(model, loaders.val, device, b.info.num_classes, cfg.precision, False, reduce)
                    record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
                    if val["top1"] > state["best_top1"] and recipe.output.save_best:
                        state["best_top1"], state["best_epoch"] = val["top1"], epoch + 1
                        record["best"] = True
                state["epoch"], state["micro"] = epoch + 1, 0
                state["history"].append(record)
                log_metrics(record)
                say(_epoch_line(record, num_epochs))
                if record.get("best"):
                    save("best")
                save("last")
    finally:
        if bar is not None:
            bar.close()

    summary = _finish(recipe, model, loaders, device, b, state, run_dir, manifest, dist, reduce, say)
    summary.update(
        wall_time_s=time.perf_counter() - wall_start,
        train_images_per_s=images_seen / compute_time if compute_time else None,
        data_time_fraction=data_time / (data_time + compute_time) if compute_time else None,
        peak_memory_mb=_peak_memory_mb(device),
    )
    if dist.is_main:
        artifacts.write_json(run_dir / "summary.json", summary)
    distributed.teardown(dist)
    return RunResult(run_dir, summary)


def _finish(recipe, model, loaders, device, b, state, run_dir, manifest, dist, reduce, say) -> dict[str, Any]:
    """Test the last and the best weights; write the selected weights as the run's ``adapter_model.safetensors``."""
    from adaptune import distributed
    from adaptune.evaluate import evaluate

    cfg = recipe.train
    test_last = test_best = None
    if loaders.test is not None:
        test_last = evaluate(model, loaders.test, device, b.info.num_classes, cfg.precision, False, reduce)["top1"]
    selected = "last"
    if state["best_epoch"] is not None:  # the same on every process: validation metrics are summed over all
        selected = "best"
        distributed.barrier(dist)  # rank 0 wrote the best checkpoint
        if state["best_epoch"] == state["epoch"]:  # the last weights are the best ones: no second test pass
            test_best = test_last
        else:
            best = artifacts.find_checkpoint(run_dir, "best")
            tensors, _ = artifacts.load_safetensors(best / artifacts.ADAPTER_WEIGHTS)
            artifacts.load_adapter_state(model, tensors, best)
            if loaders.test is not None:
                test_best = evaluate(model, loaders.test, device, b.info.num_classes, cfg.precision, False, reduce)
                test_best = test_best["top1"]
    if dist.is_main:
        artifacts.save_safetensors(
            artifacts.adapter_state_dict(model),
            run_dir / artifacts.ADAPTER_WEIGHTS,
            {**manifest, "checkpoint": selected},
        )
    summary = {
        "method": recipe.method_name,
        "backbone": recipe.backbone.model,
        "run_dir": str(run_dir),
        "epochs": state["epoch"],
        "steps": state["step"],
        "best_val_top1": state["best_top1"] if state["best_epoch"] is not None else None,
        "best_val_epoch": state["best_epoch"],
        "test_top1_best": test_best,
        "test_top1_last": test_last,
        "final_weights": selected,
        "trainable_params": b.trainable,
        "total_params": b.total,
    }
    say(_summary_line(summary))
    return summary


def _epoch_line(r: dict[str, Any], num_epochs: int) -> str:
    line = f"epoch {r['epoch']}/{num_epochs} train loss {r['train_loss']:.4f} top1 {r['train_top1']:.1f}%"
    if "val_top1" in r:
        line += f" | val loss {r['val_loss']:.4f} top1 {r['val_top1']:.1f}%" + (" (best)" if r.get("best") else "")
    return line


def _summary_line(s: dict[str, Any]) -> str:
    parts = [f"done: {s['steps']} steps"]
    if s["best_val_top1"] is not None:
        parts.append(f"best val top1 {s['best_val_top1']:.2f}% (epoch {s['best_val_epoch']})")
    if s["test_top1_best"] is not None:
        parts.append(f"test top1 {s['test_top1_best']:.2f}% (best weights)")
    if s["test_top1_last"] is not None:
        parts.append(f"{s['test_top1_last']:.2f}% (last weights)")
    return "; ".join(parts)


def _divergence(step: int, optimizer: torch.optim.Optimizer, what: str, value: float) -> DivergenceError:
    lr = optimizer.param_groups[0]["lr"]
    return DivergenceError(
        f"training diverged at step {step + 1}: {what} is {value} at lr {lr:.2e}; the last good checkpoint is kept; "
        "lower train.lr (or set train.clip_grad)"
    )


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _get_rng_state() -> dict[str, Any]:
    import torch

    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    import torch

    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _peak_memory_mb(device: torch.device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each optimizer step; a second signal stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
            yield self
            return
        old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
