"""The training loop: one loop for every method.

Read top to bottom: `train` starts a `Run` (backbone, method, data, optimizer, schedule; resumed or fresh), runs epochs
of steps (`_train_epoch`), closes each epoch with an evaluation and checkpoints (`_end_epoch`), then tests the best
and last weights (`_finish`). Methods plug in through their `MethodSpec` (``forward``, ``training_loss`` with its named
loss terms, ``diagnostics``); everything else is shared.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune import artifacts
from adaptune.errors import AdaptuneError, ArtifactError, DivergenceError, RecipeError
from adaptune.files import to_json

if TYPE_CHECKING:
    import torch
    from torch import nn

    from adaptune.batch import Batch, Loss
    from adaptune.data import Loaders
    from adaptune.distributed import Dist
    from adaptune.loading import Built
    from adaptune.recipe import Recipe


class Interrupted(AdaptuneError):
    """Ctrl-C or SIGTERM: ``last`` was saved; ``adaptune train --resume RUN_DIR`` continues."""

    exit_code = 130


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint, so a resumed run continues exactly here."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # micro-batches done in the current epoch
    best_top1: float = -1.0
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # said once each, kept in the summary


@dataclass
class EpochStats:
    """Sums over the micro-batches of one epoch on this process: accuracy, loss, and each loss term."""

    correct: int = 0
    seen: int = 0
    loss: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)

    def add(self, loss: Loss, batch: Batch) -> None:
        n = len(batch)
        self.correct += int((loss.logits.detach().argmax(1) == batch.labels).sum())
        self.seen += n
        self.loss += loss.total.item() * n
        for name, value in loss.terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value.detach().item() * n

    def means(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None, device: torch.device) -> dict[str, float]:
        """``train_loss``, ``train_top1`` and ``train_<term>`` over the whole epoch (summed over processes)."""
        import torch

        names = sorted(self.terms)
        totals = torch.tensor(
            [self.correct, self.seen, self.loss, *(self.terms[n] for n in names)], dtype=torch.float64, device=device
        )
        totals = (reduce(totals) if reduce else totals).tolist()
        seen = max(totals[1], 1)
        out = {"train_loss": totals[2] / seen, "train_top1": 100.0 * totals[0] / seen}
        out.update({f"train_{n}": v / seen for n, v in zip(names, totals[3:], strict=True)})
        return out


@dataclass
class Timing:
    data: float = 0.0
    compute: float = 0.0
    images: int = 0


@dataclass
class Run:
    """Everything one training run holds."""

    recipe: Recipe
    dir: Path
    dist: Dist
    device: torch.device
    built: Built
    train_model: nn.Module  # the model, or its DDP wrapper
    loaders: Loaders
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    manifest: dict[str, Any]
    steps_per_epoch: int
    total_steps: int
    say: Callable[[str], None]
    state: LoopState = field(default_factory=LoopState)
    timing: Timing = field(default_factory=Timing)
    prefix: Any = None  # an adaptune.prefix.PrefixCache when the frozen prefix is cached
    ema: Any = None  # a timm ModelEmaV3 with train.ema
    tracker: Any = None  # adaptune.tracking.Tracker: output.report_to

    def forwarding(self, model: nn.Module | None = None) -> contextlib.AbstractContextManager[None]:
        """The context a forward of ``model`` runs in: from cached features when the prefix cache is on."""
        if self.prefix is None:
            return contextlib.nullcontext()
        return self.prefix.active(model if model is not None else self.model)

    @property
    def model(self) -> nn.Module:
        """The model that trains."""
        return self.built.model

    @property
    def selected(self) -> nn.Module:
        """The weights a run validates, selects and keeps: the EMA's with ``train.ema`` (and ``ema_final``)."""
        return self.ema.module if self.ema is not None and self.recipe.train.ema_final else self.model

    @property
    def other(self) -> tuple[str, nn.Module] | None:
        """With EMA, the other weights and their name (``raw`` or ``ema``): checkpointed and validated beside."""
        if self.ema is None:
            return None
        return ("raw", self.model) if self.recipe.train.ema_final else ("ema", self.ema.module)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        if targets.ndim == 2:  # soft targets (mixup / cutmix): smoothing is already folded in
            return F.cross_entropy(logits.float(), targets)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.recipe.train.label_smoothing)

    def reducer(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        from adaptune import distributed

        return distributed.sum_reducer(self.dist)

    def log_metrics(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(to_json(record) + "\n")
            if self.tracker is not None:
                self.tracker.log(record)

    def save(self, which: str) -> None:
        if self.dist.is_main:
            trainer_state = {
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "loop": asdict(self.state),
                "rng": _get_rng_state(),
                "recipe": self.recipe.to_dict(),  # resume refuses a recipe.yaml edited since
            }
            if self.other is not None:  # the weights not in adapter_model.safetensors, for --resume
                name, model = self.other
                trainer_state[f"{name}_weights"] = artifacts.adapter_state_dict(model)
            artifacts.save_checkpoint(self.dir / "checkpoints" / which, self.selected, self.manifest, trainer_state)

    def load(self, ckpt: Path) -> dict[str, Any]:
        """Load a checkpoint's weights (and the other weights of an EMA run); return its trainer state."""
        ts = artifacts.load_trainer_state(ckpt)
        tensors, _ = artifacts.load_safetensors(ckpt / artifacts.ADAPTER_WEIGHTS)
        artifacts.load_adapter_state(self.selected, tensors, ckpt)
        if self.other is not None:
            name, model = self.other
            if f"{name}_weights" not in ts:
                raise ArtifactError(f"{ckpt}: no {name} weights in the trainer state; it was saved without train.ema")
            artifacts.load_adapter_state(model, ts[f"{name}_weights"], ckpt)
        return ts


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
        resume: Continue the run in ``out_dir`` from its ``last`` checkpoint (with no checkpoint yet: start it again).
        log: Where progress lines go (None: silent).
        progress: Show a progress bar (on a TTY).
        on_step: Called with the step number after every optimizer step.

    Raises:
        Interrupted: SIGINT/SIGTERM at any time; the message says what was saved.
        DivergenceError: Non-finite loss, gradient or validation loss; the last finite checkpoint is kept.
        ArtifactError: The run directory is in use by another process, holds something else, or (resume) was
            trained with another recipe or has finished.
    """
    from adaptune import distributed

    wall_start = time.perf_counter()
    run_dir = Path(out_dir) if out_dir else default_run_dir(recipe)
    say = log or (lambda _msg: None)
    stop = _StopFlag()
    with stop.installed(), _run_lock(run_dir, resume):
        run = _start(recipe, run_dir, resume, say, stop)
        try:
            while run.state.step < run.total_steps:
                stats = _train_epoch(run, stop, progress, on_step)
                _end_epoch(run, stats)
            summary = _finish(run)
        finally:
            if run.prefix is not None:
                run.prefix.close()  # memory-mapped feature files go away with the run
            if run.tracker is not None:
                run.tracker.close()
        stop.check("while testing the final weights", f"the last checkpoint is saved; finish with: {_resume_cmd(run)}")
        summary.update(
            wall_time_s=time.perf_counter() - wall_start,
            train_images_per_s=run.timing.images / run.timing.compute if run.timing.compute else None,
            data_time_fraction=run.timing.data / (run.timing.data + run.timing.compute) if run.timing.compute else None,
            peak_memory_mb=_peak_memory_mb(run.device),
        )
        if run.dist.is_main:
            artifacts.write_json(run.dir / "summary.json", summary)
    distributed.teardown(run.dist)
    return RunResult(run.dir, summary)


@contextlib.contextmanager
def _run_lock(run_dir: Path, resume: bool) -> Iterator[None]:
    """Hold the run directory's lock for the run's life (rank 0 only: the other processes write nothing).

    A directory created here and still empty when the run fails (bad data, bad options) is removed again.
    """
    import os

    from adaptune.files import DirectoryLock

    if os.environ.get("RANK", "0") != "0":
        yield
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise ArtifactError(f"--out: {str(run_dir)!r} is a file; give the name of a new or empty directory")
    if resume and not run_dir.is_dir():
        raise ArtifactError(f"--resume: no such run directory {str(run_dir)!r}")
    created = not run_dir.exists()
    lock = DirectoryLock(run_dir)
    try:
        with lock:
            yield
    except BaseException:
        if not artifacts.is_run_dir(run_dir):  # refused before it held a run: leave no trace
            lock.path.unlink(missing_ok=True)
            if created and not any(run_dir.iterdir()):
                run_dir.rmdir()
        raise


def _resume_cmd(run: Run) -> str:
    return f"adaptune train --resume {run.dir}"


# ----------------------------------------------------------------------------------------------------------------
# start


def _start(recipe: Recipe, run_dir: Path, resume: bool, say: Callable[[str], None], stop: _StopFlag) -> Run:
    """Build everything a run needs and decode the data; then restore the ``last`` checkpoint or write the run's
    first files. Nothing is written before every check has passed."""
    import torch

    from adaptune import data, distributed
    from adaptune.backbone import parameter_line
    from adaptune.loading import build

    dist, device = distributed.setup(recipe.train.device)
    if not dist.is_main:
        say = lambda _msg: None  # noqa: E731
    cfg = recipe.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = _checkpoint_to_resume(run_dir, recipe, say) if resume else _check_new_run_dir(run_dir, say)
    if dist.is_main:
        from adaptune import tracking

        tracking.check(recipe.output.report_to)  # a missing package fails before anything is written
    b = build(recipe)
    b.model.to(device)
    loaders = data.build_loaders(
        recipe.data,
        spec=b.input,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
        seed=cfg.seed,
        pin_memory=device.type == "cuda",
        rank=dist.rank,
        world_size=dist.world_size,
        num_classes=b.info.num_classes,
        label_smoothing=cfg.label_smoothing,
    )
    loaders.prefill()  # a broken image fails now, before the run directory holds anything
    cache, loaders = _prefix_cache(recipe, b, loaders, run_dir, say)
    stop.check("during start-up", "nothing was saved; run the same command again")
    steps_per_epoch = math.ceil(len(loaders.train) / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scales = b.spec.lr_scales(b.model, recipe.method) if b.spec.lr_scales is not None else {}
    optimizer, scheduler = _optimizer_and_schedule(b.model, recipe, steps_per_epoch, total_steps, scales)
    run = Run(
        recipe=recipe,
        dir=run_dir,
        dist=dist,
        device=device,
        built=b,
        train_model=_training_model(b, dist, recipe),
        loaders=loaders,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and device.type == "cuda"),
        manifest=artifacts.build_manifest(
            recipe, b.info.num_classes, b.info.class_names, b.trainable, b.touched, b.input
        ),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        say=say,
        prefix=cache,
        ema=_ema(b.model, cfg),
    )
    if ckpt is not None:
        _restore(run, ckpt)
    elif dist.is_main:
        _write_new_run(run)
    if dist.is_main and recipe.output.report_to:
        from adaptune import tracking

        run.tracker = tracking.open_trackers(
            recipe.output.report_to,
            run_dir,
            recipe.to_dict(),
            resume=ckpt is not None,
            resume_step=run.state.step if ckpt is not None else None,
            say=say,
        )
    scheduler.step_update(run.state.step)
    say(f"{recipe.method_name} on {recipe.backbone.model}: {parameter_line(b.trainable, b.total)}")
    sizes = " / ".join(f"{n} {split}" for split, n in b.info.split_sizes.items())
    say(f"{sizes} images, {b.info.num_classes} classes, {total_steps} steps of batch {cfg.batch_size}")
    return run


def _ema(model: nn.Module, cfg: Any) -> Any:
    """timm's ModelEmaV3 of the model (with its warm-up of the decay), or None without ``train.ema``."""
    if not cfg.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)


def _prefix_cache(recipe: Recipe, b: Built, loaders: Loaders, run_dir: Path, say: Callable[[str], None]) -> Any:
    """(cache or None, loaders): cached frozen-prefix features where that cannot change a result (`adaptune.prefix`)."""
    from adaptune import prefix

    cfg = recipe.train
    if cfg.prefix_cache == "off":
        return None, loaders
    p, why = prefix.plan(b.model)
    if p is not None and recipe.data.augment.active:
        p, why = None, "data.augment transforms every image before the frozen layers"
    if p is not None:
        example = b.input.example(2).to(next(b.model.parameters()).device)
        why = prefix.check(b.model, p, example, lambda m: set_train_mode(m, recipe.backbone.train_mode))
    if p is None or why:
        say(f"prefix cache: off ({why})")
        return None, loaders
    run_dir.mkdir(parents=True, exist_ok=True)
    cache, cached = prefix.build(
        b.model,
        p,
        loaders,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
        hflip=recipe.data.hflip,
        dtype=cfg.prefix_cache_dtype,
        budget_bytes=cfg.prefix_cache_gb * 2**30,
        spill_dir=run_dir,
    )
    say(cache.describe(cfg.epochs))
    return cache, cached


def _write_new_run(run: Run) -> None:
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "metrics.jsonl").unlink(missing_ok=True)  # a restarted run that never saved a checkpoint
    artifacts.atomic_write_text(run.dir / artifacts.RECIPE_FILE, run.recipe.to_yaml())
    artifacts.write_json(run.dir / artifacts.RUN_MANIFEST, run.manifest)


def _check_new_run_dir(run_dir: Path, say: Callable[[str], None]) -> None:
    """A new run may go into a missing or empty directory, or one whose run stopped before its first checkpoint.

    Raises:
        ArtifactError: The directory holds a run with a checkpoint (resume it), or files that are not a run.
    """
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ArtifactError(f"--out: {str(run_dir)!r} is a file; give the name of a new or empty directory")
    artifacts.recover_checkpoints(run_dir)
    entries = [p for p in run_dir.iterdir() if p.name != ".adaptune.lock"]
    if not entries:
        return
    if not artifacts.is_run_dir(run_dir):
        raise ArtifactError(
            f"{run_dir}: not empty and not an adaptune run directory; choose a new or empty directory for --out"
        )
    if (run_dir / "summary.json").exists() or _has_checkpoint(run_dir):
        raise ArtifactError(
            f"{run_dir}: already holds a run; continue it with --resume {run_dir} or pick another --out"
        )
    say(f"{run_dir} holds a run that stopped before its first checkpoint; starting it again")


def _has_checkpoint(run_dir: Path) -> bool:
    try:
        artifacts.find_checkpoint(run_dir, "last")
    except ArtifactError:
        return False
    return True


def _checkpoint_to_resume(run_dir: Path, recipe: Recipe, say: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from; None (start again) for a run that stopped before its first checkpoint.

    Raises:
        ArtifactError: No run there; the run has finished; the checkpoint was trained with another recipe.
    """
    if not artifacts.is_run_dir(run_dir):
        raise ArtifactError(f"{run_dir}: not a run directory (no {artifacts.RUN_MANIFEST}); nothing to resume")
    if (run_dir / "summary.json").exists():
        raise ArtifactError(
            f"{run_dir}: the run has finished (summary.json); nothing to resume: evaluate it with adaptune eval "
            f"{run_dir}, or train a new run with another --out"
        )
    for line in artifacts.recover_checkpoints(run_dir):
        say(line)
    if not _has_checkpoint(run_dir):
        say(f"{run_dir} stopped before its first checkpoint; starting it again")
        return None
    ckpt = artifacts.find_checkpoint(run_dir, "last")
    stored = artifacts.load_trainer_state(ckpt).get("recipe")
    if stored is not None:
        changed = recipe_differences(stored, recipe.to_dict())
        if changed:
            raise ArtifactError(
                f"{run_dir}: {artifacts.RECIPE_FILE} differs from the recipe the checkpoint was trained with "
                f"({', '.join(changed[:6])}); resume trains exactly what was started: restore the file, or train a "
                "new run with another --out"
            )
    return ckpt


def recipe_differences(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ("name",)) -> list[str]:
    """Dotted keys whose values differ between two resolved recipes (plain dicts)."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict) or not d:
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    fa, fb = flat(a), flat(b)
    keys = sorted(k.rstrip(".") for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    return [k for k in keys if not any(k == i or k.startswith(i + ".") for i in ignore)]


def _training_model(b: Built, dist: Dist, recipe: Recipe) -> nn.Module:
    """The model the training forward calls: with the speed switches applied, wrapped in DDP under torchrun, and
    compiled with ``train.compile`` (evaluation runs the eager model)."""
    import torch

    model: nn.Module = b.model
    if recipe.backbone.grad_checkpointing:
        if not callable(getattr(model, "set_grad_checkpointing", None)):
            raise RecipeError([f"backbone.grad_checkpointing: {type(model).__name__} has no set_grad_checkpointing"])
        model.set_grad_checkpointing(True)
    if recipe.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, find_unused_parameters=b.spec.find_unused_parameters)
    if recipe.train.compile:
        model = torch.compile(model)
    return model


def _optimizer_and_schedule(
    model: nn.Module, recipe: Recipe, steps_per_epoch: int, total_steps: int, lr_scales: dict[str, float] | None = None
) -> tuple[torch.optim.Optimizer, Any]:
    """timm's optimizer factory (no weight decay on biases, norms, tokens) and its cosine schedule, stepped per step.

    ``lr_scales`` (parameter name -> factor, from the method's `MethodSpec.lr_scales`) splits timm's weight-decay
    groups further by factor; each scaled group carries timm's ``lr_scale`` key, which the schedule applies.
    """
    import timm.optim
    import timm.scheduler

    cfg = recipe.train
    group_fn = None
    if lr_scales:

        def group_fn(m: nn.Module) -> list[dict[str, Any]]:
            names = {id(p): n for n, p in m.named_parameters()}
            keep = getattr(m, "no_weight_decay", set)()  # what timm's factory excludes without a group function
            groups = []
            for group in timm.optim.param_groups_weight_decay(m, cfg.weight_decay, no_weight_decay_list=keep):
                by_scale: dict[float, list[Any]] = {}
                for p in group["params"]:
                    by_scale.setdefault(float(lr_scales.get(names[id(p)], 1.0)), []).append(p)
                for scale in sorted(by_scale, key=lambda f: f != 1.0):  # unscaled first: group 0's lr is logged
                    groups.append({**group, "params": by_scale[scale], **({"lr_scale": scale} if scale != 1.0 else {})})
            return groups

    optimizer = timm.optim.create_optimizer_v2(
        model,
        opt=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        param_group_fn=group_fn,
        **({"eps": cfg.eps} if cfg.optimizer == "adamw" else {"momentum": cfg.momentum}),
    )
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = timm.scheduler.CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup),
        lr_min=cfg.lr if cfg.schedule == "constant" else cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    return optimizer, scheduler


def _restore(run: Run, ckpt: Path) -> None:
    """Load the checkpoint's weights, optimizer, scaler, loop position and RNG state."""
    ts = run.load(ckpt)
    try:
        run.optimizer.load_state_dict(ts["optimizer"])
        if ts.get("scaler"):
            run.scaler.load_state_dict(ts["scaler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise ArtifactError(
            f"{ckpt / artifacts.TRAINER_STATE}: the optimizer state does not fit this model ({e}); the checkpoint "
            "is damaged or from another recipe"
        ) from None
    run.state = LoopState(**ts["loop"])
    _set_rng_state(ts["rng"])
    run.say(f"resuming {run.dir} at epoch {run.state.epoch + 1}, step {run.state.step}")


# ----------------------------------------------------------------------------------------------------------------
# steps


def _to_device(run: Run, batch: Batch) -> Batch:
    import torch

    batch = batch.to(run.device, non_blocking=True)
    if run.recipe.train.channels_last and batch.inputs.ndim == 4:
        batch.inputs = batch.inputs.contiguous(memory_format=torch.channels_last)
    return batch


def _compute_loss(run: Run, batch: Batch) -> Loss:
    """The method's training loss, or cross-entropy on its forward's logits."""
    from adaptune.batch import Loss
    from adaptune.evaluate import autocast, model_forward

    spec, cfg = run.built.spec, run.recipe.method
    with autocast(run.device, run.recipe.train.precision), run.forwarding():
        if spec.training_loss is not None:
            return spec.training_loss(run.train_model, cfg, batch, run.loss_fn)
        logits = model_forward(spec, cfg)(run.train_model, batch)
        ce = run.loss_fn(logits, batch.targets)
        return Loss(ce, logits, {"ce": ce})


def _train_epoch(run: Run, stop: _StopFlag, progress: bool, on_step: Callable[[int], None] | None) -> EpochStats:
    """The rest of the current epoch: forward, backward, and an optimizer step every ``grad_accum`` micro-batches."""
    import torch

    state, cfg = run.state, run.recipe.train
    run.loaders.train_sampler.set_epoch(state.epoch)
    run.loaders.train_sampler.set_start(state.micro)
    set_train_mode(run.model, run.recipe.backbone.train_mode)
    micro_per_epoch = len(run.loaders.train) + state.micro
    stats = EpochStats()
    with _progress_bar(run, micro_per_epoch, progress) as bar:
        t0 = time.perf_counter()
        for batch in run.loaders.train:
            t1 = time.perf_counter()
            run.timing.data += t1 - t0
            batch = _to_device(run, batch)
            loss = _compute_loss(run, batch)
            if not torch.isfinite(loss.total):
                raise _divergence(run, "loss", loss.total.item())
            run.scaler.scale(loss.total / cfg.grad_accum).backward()
            state.micro += 1
            stats.add(loss, batch)
            run.timing.images += len(batch)
            bar.update(1)
            if state.micro % cfg.grad_accum == 0 or state.micro == micro_per_epoch:
                _optimizer_step(run)
                if on_step is not None:
                    on_step(state.step)
                if state.step % cfg.log_every == 0:
                    _log_step(run, loss, bar)
                if stop.requested:
                    run.save("last")
                    raise Interrupted(
                        f"interrupted at step {state.step}; last checkpoint saved; continue with: {_resume_cmd(run)}"
                    )
                if state.step >= run.total_steps:
                    break
            run.timing.compute += time.perf_counter() - t1
            t0 = time.perf_counter()
    return stats


def _optimizer_step(run: Run) -> None:
    """Unscale, clip (or just measure) the gradient norm, step, zero the gradients, advance the schedule."""
    import torch

    run.scaler.unscale_(run.optimizer)
    params = [p for p in run.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, run.recipe.train.clip_grad or float("inf"))
    if not torch.isfinite(norm) and not run.scaler.is_enabled():  # the fp16 scaler skips such steps itself
        raise _divergence(run, "gradient norm", norm.item())
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    run.scheduler.step_update(run.state.step)
    if run.ema is not None:
        run.ema.update(run.model, step=run.state.step)


def _log_step(run: Run, loss: Loss, bar: Any) -> None:
    lr = run.optimizer.param_groups[0]["lr"]
    terms = {name: value.detach().item() for name, value in loss.terms.items()}
    shown = "" if list(terms) == ["ce"] else " (" + ", ".join(f"{k} {v:.4f}" for k, v in terms.items()) + ")"
    line = f"step {run.state.step}/{run.total_steps} loss {loss.total.item():.4f}{shown} lr {lr:.2e}"
    if bar.active:
        bar.set_postfix_str(line.split(" ", 2)[2])
    else:
        run.say(line)
    run.log_metrics({"step": run.state.step, "epoch": run.state.epoch, "loss": loss.total.item(), **terms, "lr": lr})


class _NoBar:
    active = False

    def update(self, n: int) -> None: ...

    def set_postfix_str(self, s: str) -> None: ...


@contextlib.contextmanager
def _progress_bar(run: Run, total: int, progress: bool) -> Iterator[Any]:
    if not (progress and run.dist.is_main):
        yield _NoBar()
        return
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        initial=run.state.micro,
        desc=f"epoch {run.state.epoch + 1}/{run.num_epochs}",
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    bar.active = True
    try:
        yield bar
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------------------------
# end of an epoch, end of the run


def _evaluate(run: Run, loader: Any, model: nn.Module | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (default: the run's selected weights) on ``loader``."""
    from adaptune.evaluate import evaluate

    model = model if model is not None else run.selected
    with run.forwarding(model):
        return evaluate(
            model,
            loader,
            run.device,
            run.built.info.num_classes,
            run.recipe.train.precision,
            confusion=False,
            reduce=run.reducer(),
            method=run.built.spec,
            method_cfg=run.recipe.method,
        )


def _end_epoch(run: Run, stats: EpochStats) -> None:
    """Training means, validation (every ``eval_every`` epochs and after the last), best/last checkpoints."""
    state, num_classes = run.state, run.built.info.num_classes
    record: dict[str, Any] = {"epoch": state.epoch + 1, "step": state.step, **stats.means(run.reducer(), run.device)}
    last_epoch = state.step >= run.total_steps
    if run.loaders.val is not None and ((state.epoch + 1) % run.recipe.train.eval_every == 0 or last_epoch):
        val = _evaluate(run, run.loaders.val)
        record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
        if not math.isfinite(val["loss"]):
            run.log_metrics(record)  # the record of what happened; no checkpoint of these weights
            raise _divergence(run, "the validation loss", val["loss"])
        if run.other is not None:
            name, model = run.other
            record[f"val_top1_{name}"] = _evaluate(run, run.loaders.val, model)["top1"]
        if "diagnostics" in val:
            record["val_diagnostics"] = {k: v for k, v in val["diagnostics"].items() if k != "warnings"}
            for warning in val["diagnostics"].get("warnings", []):
                run.say(f"warning: {warning}")
        if val["top1"] > state.best_top1 and run.recipe.output.save_best:
            state.best_top1, state.best_epoch = val["top1"], state.epoch + 1
            record["best"] = True
    state.epoch, state.micro = state.epoch + 1, 0
    state.history.append(record)
    run.log_metrics(record)
    run.say(_epoch_line(record, run.num_epochs))
    _warn_if_stuck(run, record, num_classes)
    if record.get("best"):
        run.save("best")
    run.save("last")


def _warn_if_stuck(run: Run, record: dict[str, Any], num_classes: int) -> None:
    """Say (once, in the log and the summary) when a run sits at chance after warm-up: the loss has not fallen from
    where a zero head starts (log of the class count) and accuracy is at chance, the usual sign of a learning rate
    too high for the frozen features (PEFT's LoRA at lr 3e-3 collapsed this way on two of six small tasks)."""
    # judge only an epoch that ran wholly after warm-up: an epoch's mean training loss and top-1 include its warm-up
    # steps, where a healthy run still sits at chance (every trainval run with one warm-up epoch was flagged so)
    warmup_steps = round(run.recipe.train.warmup_epochs * run.steps_per_epoch)
    warmup_done = run.state.step - run.steps_per_epoch >= warmup_steps
    if not warmup_done or num_classes < 3:
        return
    chance = 100.0 / num_classes
    top1, split = (record["val_top1"], "validation") if "val_top1" in record else (record["train_top1"], "training")
    at_chance = top1 < 1.5 * chance and record["train_loss"] > 0.9 * math.log(num_classes)
    said = [i for i, w in enumerate(run.state.warnings) if w.startswith("stuck at chance")]
    if said:  # a run that leaves chance later says so, in the log and in the summary's warning
        i = said[0]
        if not at_chance and "; left chance" not in run.state.warnings[i]:
            run.state.warnings[i] += f"; left chance at epoch {record['epoch']} ({split} top-1 {top1:.1f}%)"
            run.say(f"note: left chance level at epoch {record['epoch']}: {split} top-1 {top1:.1f}%")
        return
    if at_chance:
        warning = (
            f"stuck at chance after epoch {record['epoch']}: {split} top-1 {top1:.1f}% (chance {chance:.1f}%), "
            f"training loss {record['train_loss']:.3f} (log of the {num_classes} classes: "
            f"{math.log(num_classes):.3f}); lower train.lr (now {run.recipe.train.lr:g}), e.g. by 3x"
        )
        run.state.warnings.append(warning)
        run.say(f"warning: {warning}")


def _finish(run: Run) -> dict[str, Any]:
    """Test the last and the best weights; write the selected weights as the run's ``adapter_model.safetensors``."""
    from adaptune import distributed

    state = run.state
    test_last = test_best = None
    if run.loaders.test is not None:
        test_last = _evaluate(run, run.loaders.test)["top1"]
    selected = "last"
    if state.best_epoch is not None:  # the same on every process: validation metrics are summed over all
        selected = "best"
        distributed.barrier(run.dist)  # rank 0 wrote the best checkpoint
        if state.best_epoch == state.epoch:  # the last weights are the best ones: no second test pass
            test_best = test_last
        else:
            run.load(artifacts.find_checkpoint(run.dir, "best"))
            if run.loaders.test is not None:
                test_best = _evaluate(run, run.loaders.test)["top1"]
    if run.dist.is_main:
        artifacts.save_safetensors(
            artifacts.adapter_state_dict(run.selected),
            run.dir / artifacts.ADAPTER_WEIGHTS,
            {**run.manifest, "checkpoint": selected},
        )
    last = state.history[-1] if state.history else {}
    summary = {
        "method": run.recipe.method_name,
        "backbone": run.recipe.backbone.model,
        "run_dir": str(run.dir),
        "epochs": state.epoch,
        "steps": state.step,
        "best_val_top1": state.best_top1 if state.best_epoch is not None else None,
        "best_val_epoch": state.best_epoch,
        "test_top1_best": test_best,
        "test_top1_last": test_last,
        "final_weights": selected,
        "ema_weights": run.ema is not None and run.recipe.train.ema_final,  # the kept weights are the EMA's
        "train_loss_terms": {k.removeprefix("train_"): v for k, v in last.items() if _is_term(k)},
        "warnings": list(state.warnings),
        "trainable_params": run.built.trainable,
        "total_params": run.built.total,
    }
    run.say(_summary_line(summary))
    return summary


def _is_term(key: str) -> bool:
    return key.startswith("train_") and key not in ("train_loss", "train_top1")


def _epoch_line(r: dict[str, Any], num_epochs: int) -> str:
    line = f"epoch {r['epoch']}/{num_epochs} train loss {r['train_loss']:.4f}"
    terms = {k.removeprefix("train_"): v for k, v in r.items() if _is_term(k)}
    if list(terms) != ["ce"]:
        line += " (" + ", ".join(f"{k} {v:.4f}" for k, v in terms.items()) + ")"
    line += f" top1 {r['train_top1']:.1f}%"
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


def _divergence(run: Run, what: str, value: float) -> DivergenceError:
    """The one-line message, truthful about what exists: nothing diverged is ever saved."""
    lr = run.optimizer.param_groups[0]["lr"]
    if _has_checkpoint(run.dir):
        loop = artifacts.load_trainer_state(artifacts.find_checkpoint(run.dir, "last"))["loop"]
        kept = f"the last checkpoint (epoch {loop['epoch']}, step {loop['step']}) is kept"
    else:
        kept = "no checkpoint was saved yet (the same command starts the run again)"
    return DivergenceError(
        f"training diverged at step {run.state.step + 1}: {what} is {value} at lr {lr:.2e}; {kept}; lower train.lr "
        "(or set train.clip_grad)"
    )


# ----------------------------------------------------------------------------------------------------------------
# modes, RNG, memory, signals


def set_train_mode(model: nn.Module, backbone_train: bool) -> None:
    """Train mode for what trains; BatchNorm always in eval (its running statistics must not drift).

    With ``backbone_train`` false the frozen backbone runs in eval mode (no dropout/drop-path) and only the modules a
    method created are in train mode. BatchNorm layers normalise with their stored statistics for every method, also
    where their affine parameters train (BitFit, norm tuning, full fine-tuning): the statistics are not part of the
    trained state a run saves, and batch statistics of VTAB-sized data would make training and inference differ.
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
        if isinstance(m, _BatchNorm):
            m.eval()


def _get_rng_state() -> dict[str, Any]:
    import torch

    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    import torch

    python = rng["python"]  # a list after a round trip through torch.save's restricted unpickler
    random.setstate((python[0], tuple(python[1]), python[2]))
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

    def check(self, when: str, saved: str) -> None:
        """Raise `Interrupted` if a signal arrived; ``saved`` says what exists and how to go on."""
        if self.requested:
            raise Interrupted(f"interrupted {when}; {saved}")

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
