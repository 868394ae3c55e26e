"""MoSA: Mixture of Sparse Adapters, "Split & Merge" (Zhang et al., https://arxiv.org/abs/2312.02923).

Split a standard adapter into N element-disjoint sparse modules, activate one at random per step, merge them after
tuning. Two registered methods share this code: ``mosa`` (on a bottleneck adapter, the paper's method) and
``mosa_lora`` (on LoRA; the released code's "MoSL").

The adapter (AdaptFormer style, MoSA defaults; any `adapter` style works) with ``share: down``:

    x1 = x + Attn(LN1(x))
    h  = Dropout(GELU(W_down LN_a(x1) + b_down))                     dense, shared by every expert
    y  = (W_up ⊙ M_k) h + b_up[k],   k ~ U{0..N-1}, one draw per module per forward
    x2 = x1 + MLP(LN2(x1)) + s · y

``M_0..M_{N-1}`` partition the elements of ``W_up`` (a uniformly random permutation cut into N near-equal chunks,
fixed for the run); ``b_up`` holds one private bias row per expert. Merge (eval and `consolidate`):

    W_up ← W_up / N,   b_up ← mean_k b_up[k]       = E_k[(W_up ⊙ M_k) h + b_up[k]]  exactly

so the merged model is a plain `adapter` with the same options: same structure, parameter count and FLOPs. With a
split ``down`` (``share: up`` / ``none``) the merge is the exact expectation of the down projection's output but not
of the adapter's (the activation sits between): the usual weight-averaging approximation, as in the reference. For
``mosa_lora`` it is exact in every ``share`` mode: ``B_k A_j x`` is bilinear and j, k are drawn independently.

Training loss (spec §2.7), with two stochastic passes z1, z2 of the same batch (their own expert draws and dropout),
computed as one forward of the doubled batch (`mosa_groups`):

    L = CE(z1, y) + λ · ½ [KL(sg(p2) ‖ p1) + KL(sg(p1) ‖ p2)]          λ = consistency_weight, p = softmax(z)
      + λ · 0.01 / L_b · Σ_{l < L_b/2} MSE(h_l^(1), h_l^(2))          only with deepreg

``deepreg`` generalises the reference's "first 6 of 12 blocks, /12": the first half (at least one) of the L_b adapted
blocks, scaled by 0.01 / L_b.

"Hierarchical sparse strategy": the paper's definition could not be read (spec §2.11). The released code has two
mechanisms beyond split/activate/merge, both here: ``share`` (one projection stays dense and sees every sample, the
other is sparse: down dense for VTAB, up dense for Stanford Cars, both split for multi-task) and the two-pass
consistency (+ ``deepreg``). A depth-varying N is not offered: no source defines one, and any schedule would be ours.

Deviations from the reference code (``Theia-4869/MoSA``), and why:

- One dense tensor per split projection with an owner map (uint8 buffer) instead of N full-size expert copies and
  ``param.mask`` attributes; the forward uses ``W ⊙ M_k`` instead of the dense expert tensor with a masked gradient.
  For split ``up`` (the default) the two are identical at every step: the reference's up experts start at zero and
  only ever learn inside their mask, so expert k *is* ``W_up ⊙ M_k`` (tested exactly against an N-copy model under
  SGD). For split ``down`` (``share: up`` / ``none``) the reference's experts are overlapping full copies of the
  Kaiming init whose off-mask entries never train (only decay); here the experts are disjoint (``W_down ⊙ M_k``, the
  paper's "non-overlapping modules"), and the merge ``W_down / N`` is their exact expectation.
- Optimizer semantics: ``W`` always receives a gradient (exact zeros outside the drawn expert), so AdamW updates every
  element every step: an inactive expert keeps moving on its momentum and, where the weight-decay group applies,
  decays. That is the reference on torch 1.11 (``zero_grad`` kept zero tensors, ``set_to_none=False``) once every
  expert has been drawn at least once, and it is exact then (tested: equal to an N-copy model whose experts all
  hold gradient tensors from step 1). Two residual differences from a cold torch 1.11 run: Adam's bias-correction
  step count starts at the first step for every expert, not at the expert's first draw, and a split ``down`` expert
  not yet drawn is already decayed. It is *not* the torch ≥ 2.0 default (``set_to_none=True``), under which the
  reference's inactive experts are skipped entirely (tested to differ).
- Each split module draws from its own generator (method seed + module index) instead of Python's global ``random``:
  same distribution, reproducible on resume and identical on every process.
- Per-expert biases are one ``(N, out)`` parameter; the training loop must keep it out of weight decay (its name
  ends in ``bias``), as the reference's "bias" parameter group does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import adaptune.methods.adapter as adapter
import adaptune.methods.lora as lora
from adaptune.batch import Batch, Loss
from adaptune.config import opt, with_defaults
from adaptune.methods.adapter import AdapterBlock, AdapterConfig, BottleneckAdapter
from adaptune.methods.lora import LoRAConfig
from adaptune.methods.mosa_split import (
    MAX_EXPERTS,
    SplitConv2d,
    SplitLinear,
    consolidate_splits,
    mosa_groups,
    split_module,
)
from adaptune.methods.registry import LossFn, MethodSpec, register

SPLIT_TYPES = (SplitLinear, SplitConv2d)

_MOSA_HELP = {
    "num_experts": "N: sparse modules each split projection is partitioned into (reference EXPERT_NUM)",
    "consistency_weight": "λ of the two-pass symmetric-KL consistency (reference REG_WEIGHT); 0: one pass, no KL",
    "split_lr_scale": "learning-rate factor of the split tensors and per-expert biases (each element trains in 1/N of "
    "the steps); not in the paper, 1: as the paper",
    "seed": "seed of the owner maps and expert draws; null: drawn from torch's global generator at inject (the "
    "trainer seeds it from train.seed before building the model, identically on every process)",
}


_MoSAAdapterConfig = with_defaults(
    AdapterConfig, "_MoSAAdapterConfig", style="adaptformer", bottleneck=16, dropout=0.1, scale=0.1, norm=True
)


@dataclass(frozen=True)
class MoSAConfig(_MoSAAdapterConfig):
    """Options of ``method: {name: mosa}``: every `AdapterConfig` field, with MoSA's values as defaults, plus the split.

    Defaults from the released VTAB scripts (spec §2.9): AdaptFormer style with the extra trainable adapter LayerNorm,
    r = 16, GELU, dropout 0.1, s = 0.1, lora init (up = 0, so identity at init), biases, N = 4, dense shared down.
    (GELU, lora init and biases are `AdapterConfig`'s defaults too.)
    """

    num_experts: int = opt(4, _MOSA_HELP["num_experts"], ge=1, le=MAX_EXPERTS)
    share: Literal["down", "up", "none"] = opt(
        "down", "projection that stays dense and shared by all experts; the other is split (`none`: both split)"
    )
    split_bias: bool = opt(
        False, "partition the split projections' biases like their weights; false: each expert owns a full bias row"
    )
    consistency_weight: float = opt(1.0, _MOSA_HELP["consistency_weight"], ge=0.0)
    split_lr_scale: float = opt(1.0, _MOSA_HELP["split_lr_scale"], gt=0.0)
    deepreg: bool = opt(
        False, "also pull the two passes' outputs of the first half of the blocks together (MSE, 0.01/blocks)"
    )
    seed: int | None = opt(None, _MOSA_HELP["seed"])


@dataclass(frozen=True)
class MoSALoRAConfig(LoRAConfig):
    """Options of ``method: {name: mosa_lora}``: every `LoRAConfig` field plus the split.

    Default ``share: a``: A (the Kaiming-initialised input factor, like the adapter's down) stays dense and shared, B
    (zero-initialised, like up) is split, so the model is the backbone at init and the merge is exact.
    """

    num_experts: int = opt(4, _MOSA_HELP["num_experts"], ge=1, le=MAX_EXPERTS)
    share: Literal["a", "b", "none"] = opt(
        "a", "LoRA factor that stays dense and shared: `a` (split B), `b` (split A) or `none` (split both)"
    )
    consistency_weight: float = opt(1.0, _MOSA_HELP["consistency_weight"], ge=0.0)
    split_lr_scale: float = opt(1.0, _MOSA_HELP["split_lr_scale"], gt=0.0)
    seed: int | None = opt(None, _MOSA_HELP["seed"])


# ----------------------------------------------------------------------------------------------------------------
# losses (pure)


def symmetric_kl(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``½ [KL(sg(p2) ‖ p1) + KL(sg(p1) ‖ p2)]`` with batch-mean reduction; each side stops its target's gradient.

    Args:
        z1: Logits of pass 1, ``(B, C)``.
        z2: Logits of pass 2, ``(B, C)``.
    """
    z1, z2 = z1.float(), z2.float()
    kl_12 = F.kl_div(F.log_softmax(z1, -1), F.softmax(z2.detach(), -1), reduction="batchmean")
    kl_21 = F.kl_div(F.log_softmax(z2, -1), F.softmax(z1.detach(), -1), reduction="batchmean")
    return 0.5 * (kl_12 + kl_21)


def deepreg_loss(block_outputs: list[torch.Tensor], num_blocks: int) -> torch.Tensor:
    """``0.01 / num_blocks · Σ MSE(h^(1), h^(2))`` over doubled-batch block outputs ``(2B, ...)``, halves compared."""
    total = sum(F.mse_loss(*h.float().chunk(2)) for h in block_outputs)
    return 0.01 / num_blocks * total


# ----------------------------------------------------------------------------------------------------------------
# inject


def _base_seed(seed: int | None) -> int:
    return seed if seed is not None else int(torch.randint(2**62, (1,), device="cpu"))


def _splitter(num_experts: int, seed: int | None, split_bias: bool) -> Callable[[nn.Module, str, str], nn.Module]:
    """``split(parent, child, path)``: replace ``parent.<child>`` by a split module with the next draw seed."""
    base = _base_seed(seed)
    generator = torch.Generator().manual_seed(base)  # owner maps, in creation order
    count = [0]

    def split(parent: nn.Module, child: str, path: str) -> nn.Module:
        count[0] += 1
        module = split_module(getattr(parent, child), num_experts, generator, split_bias, base + count[0], path)
        setattr(parent, child, module)
        return module

    return split


def inject(model: nn.Module, cfg: MoSAConfig) -> list[str]:
    """Add `adapter` adapters (same options), then split the non-shared projection(s) of each into N experts.

    Returns:
        The wrapped block paths, in model order.

    Raises:
        TargetError: As `adapter.inject` (targets, styles).
    """
    names = {"down": ("up",), "up": ("down",), "none": ("down", "up")}[cfg.share]
    split = _splitter(cfg.num_experts, cfg.seed, cfg.split_bias)

    def make_adapter(dim: int, c: Any) -> nn.Module:
        a = BottleneckAdapter.from_config(dim, c)
        for child in names:
            split(a, child, child).requires_grad_(True)
        return a

    return adapter.inject(model, cfg, make_adapter)


def inject_lora(model: nn.Module, cfg: MoSALoRAConfig) -> list[str]:
    """Add `lora` pairs (same options), then split the non-shared factor(s) of every pair into N experts.

    Returns:
        The wrapped module paths, in model order.

    Raises:
        TargetError: As `lora.inject`.
    """
    paths = lora.inject(model, cfg)
    names = {"a": ("lora_b",), "b": ("lora_a",), "none": ("lora_a", "lora_b")}[cfg.share]
    split = _splitter(cfg.num_experts, cfg.seed, split_bias=False)
    for path in paths:
        wrapper = model.get_submodule(path)
        for key, pair in wrapper.pairs.items():
            for child in names:
                split(pair, child, f"{path}.pairs.{key}.{child}").requires_grad_(True)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# loop hook, consolidate, fold


def training_loss(model: nn.Module, cfg: MoSAConfig | MoSALoRAConfig, batch: Batch, loss_fn: LossFn) -> Loss:
    """MoSA's training loss (module docstring): one forward of the doubled batch in groups mode, CE on pass 1 plus
    λ · symmetric KL (plus deepreg). With λ = 0 it is one plain pass.

    Returns:
        `Loss` with terms ``ce``, ``kl`` (and ``deepreg``); its logits are those of pass 1.
    """
    weight = cfg.consistency_weight
    if weight == 0.0:
        logits = model(batch.inputs)
        ce = loss_fn(logits, batch.targets)
        return Loss(ce, logits, {"ce": ce})

    blocks = [m for m in model.modules() if isinstance(m, AdapterBlock)] if getattr(cfg, "deepreg", False) else []
    hooked = blocks[: max(1, len(blocks) // 2)] if blocks else []
    outputs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in hooked]
    try:
        with mosa_groups(model, 2):
            logits = model(torch.cat([batch.inputs, batch.inputs]))  # (2B, classes): pass 1, pass 2
    finally:
        for h in handles:
            h.remove()
    z1, z2 = logits.chunk(2)
    ce = loss_fn(z1, batch.targets)
    terms = {"ce": ce, "kl": weight * symmetric_kl(z1, z2)}
    if outputs:
        terms["deepreg"] = weight * deepreg_loss(outputs, len(blocks))
    return Loss(sum(terms.values()), z1, terms)


def lr_scales(model: nn.Module, cfg: MoSAConfig | MoSALoRAConfig) -> dict[str, float]:
    """``split_lr_scale`` for every parameter of a split module (weights and per-expert biases); the dense shared
    projection, norms and head keep ``train.lr``."""
    if cfg.split_lr_scale == 1.0:
        return {}
    return {
        f"{path}.{name}": cfg.split_lr_scale
        for path, module in model.named_modules()
        if isinstance(module, SPLIT_TYPES)
        for name, _ in module.named_parameters(recurse=False)
    }


def consolidate(model: nn.Module) -> None:
    """Merge every split module into one plain module (``W / N``, mean bias), in place.

    After it a ``mosa`` model has exactly the structure and parameter count of ``adapter`` with the same options, and
    a ``mosa_lora`` model that of ``lora``.
    """
    consolidate_splits(model)


def fold_lora(model: nn.Module) -> None:
    """Consolidate, then fold LoRA into the backbone: the result has exactly the plain timm ``state_dict`` keys."""
    consolidate(model)
    lora.fold(model)


register(
    MethodSpec(
        name="mosa",
        reported_vtab1k=(71.4, "SNELL's table; the MoSA paper was not reachable"),
        summary="MoSA: adapter split into N sparse experts, one drawn per step, merged by averaging (+ consistency)",
        config_cls=MoSAConfig,
        inject=inject,
        consolidate=consolidate,
        training_loss=training_loss,
        lr_scales=lr_scales,
        identity_at_init=True,
    )
)

register(
    MethodSpec(
        name="mosa_lora",
        summary="MoSA on LoRA (MoSL): LoRA factors split into N sparse experts, merged, then foldable",
        config_cls=MoSALoRAConfig,
        inject=inject_lora,
        consolidate=consolidate,
        fold=fold_lora,
        training_loss=training_loss,
        lr_scales=lr_scales,
        identity_at_init=True,
    )
)
