"""BitFit: train only the backbone's bias terms (Ben Zaken et al., ACL 2022, https://arxiv.org/abs/2106.10199).

    y = W x + b,   W frozen, b trained   (for every Linear, Conv2d and norm layer with a bias; plus the new head)

Nothing is added to the model: the biases are declared through ``MethodSpec.trainable_backbone``, so checkpoints hold
exactly them and the head, and a merged file is the plain timm ``state_dict`` with the trained biases (``fold`` has
nothing to do). On ViT-B/16 the biases of qkv, proj, fc1, fc2, norm1, norm2 (x 12), the patch embedding and the final
norm make 102,912 parameters (spec methods-others §7.5).

Deviations from the reference (V-PETL Bench ``train/train_model_bitfit.py``, which trains every parameter whose name
contains ``bias`` or ``head``):
- Biases are found by module (each module's own ``bias`` parameter), not by key substring; ``targets`` and
  ``exclude`` narrow them by module path.
- The engine's AdamW groups put no weight decay on biases; V-PETL decays them (wd 1e-4).
- CNNs: BatchNorm biases train too (``batchnorm: false`` leaves them frozen). The engine keeps every BatchNorm in
  eval mode, so they normalise with the pretrained running statistics in training and inference alike.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from adaptune.config import opt
from adaptune.errors import TargetError
from adaptune.methods.common import match_targets
from adaptune.methods.registry import MethodSpec, register


@dataclass(frozen=True)
class BitFitConfig:
    """Options of ``method: {name: bitfit}``: by default every bias of the backbone trains (not the head's, which
    trains in full anyway)."""

    targets: tuple[str, ...] = opt(
        ("*",),
        "globs over module paths whose own `bias` trains, e.g. `blocks.*.attn.qkv`, `blocks.*.mlp.*`; default: all",
    )
    exclude: tuple[str, ...] = opt((), "globs of module paths whose bias stays frozen even if a target matches")
    batchnorm: bool = opt(True, "train BatchNorm biases too (CNNs; BatchNorm always keeps its pretrained statistics)")

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: empty; list at least one module glob, e.g. ['*']")


def bias_modules(model: nn.Module, cfg: BitFitConfig) -> list[str]:
    """Module paths whose own ``bias`` parameter trains under ``cfg``, in model order.

    Raises:
        TargetError: A glob matches nothing (with close names), or no matched module has a bias.
    """
    from adaptune.backbone import head_path

    matched = match_targets(model, cfg.targets)
    if cfg.exclude:
        match_targets(model, cfg.exclude)  # an exclude glob that matches nothing is a typo: say so
    head = head_path(model)
    chosen = []
    for path in matched:
        module = model.get_submodule(path)
        bias = module._parameters.get("bias")
        if bias is None or (head and (path == head or path.startswith(head + "."))):
            continue
        if any(fnmatch.fnmatchcase(path, g) for g in cfg.exclude):
            continue
        if isinstance(module, _BatchNorm) and not cfg.batchnorm:
            continue
        chosen.append(path)
    if not chosen:
        raise TargetError(
            f"method.targets: {list(cfg.targets)} (minus method.exclude {list(cfg.exclude)}) holds no module with a "
            "bias; widen the targets, e.g. ['*']"
        )
    return chosen


def inject(model: nn.Module, cfg: BitFitConfig) -> list[str]:
    """Add nothing (`trainable_backbone` names the biases).

    Returns:
        The modules whose bias will train (what ``--dry-run`` lists).
    """
    return bias_modules(model, cfg)


def trainable_backbone(model: nn.Module, cfg: BitFitConfig) -> list[str]:
    """``<module>.bias`` for every module `bias_modules` selects (102,912 parameters on ViT-B/16)."""
    return [f"{path}.bias" if path else "bias" for path in bias_modules(model, cfg)]


register(
    MethodSpec(
        name="bitfit",
        reported_vtab1k=(65.22, "V-PETL Bench, BitFit"),
        summary="BitFit: train the backbone's biases only; merged files are plain timm weights",
        config_cls=BitFitConfig,
        inject=inject,
        trainable_backbone=trainable_backbone,
        fold=lambda model: None,  # nothing was added: the trained biases already sit in timm's own keys
    )
)
