"""Adapter-X: a Sharing Mixture of Adapters with token routing, a prompt generator and block-specific parts.

Paper: Li et al., "Adapter-X: A Novel General Parameter-Efficient Fine-Tuning Framework for Vision"
(https://arxiv.org/abs/2406.03051). No code has been released; this is reconstructed from the official figure
(leoli646/Adapter-X ``assets/images/pipeline.png``) and the building blocks the paper acknowledges (X-MoE's router,
Switch's balance loss, DAPT's prompt), spec ``methods-core.md`` §3.4 and §6. Two registered names share this code:
``adapterx`` (bottleneck experts) and ``adaptformerx`` (AdaptFormer experts: ReLU, dropout 0.1, scale 0.1).

Per adapted pre-norm transformer block l (timm ``Block``; the branches come from `adaptune.families`)::

    X' = X + Attn(LN1(X))                         frozen
    U  = LN2_l(X')                                the block's own norm2, trained (``block_norm``)
    Y  = X' + MLP(U) + SMoA_l(U)                  SMoA parallel to the frozen MLP
    p  = γ_l ⊙ mean_t(Y) + β_l                    prompt generator (``prompts``; γ ~ N(1, .02), β ~ N(0, .02), DAPT)
    X_{l+1} = [CLS, p, rest of Y]                 one new token right after CLS per block (spec §6)

    SMoA_l(U): each token (C) -> H = C / w sub-tokens (w = ``sub_token_dim``) -> per sub-token v:
        probs = softmax(<R_l v, e_j / ||e_j||> / τ)        R_l: (d_r, w) per block; e: (N, d_r) shared
        out(v) = Σ_{j ∈ top-k} probs_j · A_j(v)            A_j shared by every block
    -> concatenated back to C.

The expert pool (``adaptune_shared.adapterx_experts``) and the expert embeddings
(``adaptune_shared.adapterx_embeddings``) are stored once for all blocks (`methods.common.share`). Trained: experts,
embeddings, per-block routers and prompt generators, the blocks' norm2, the CLS token (``train_cls``) and the head.
Training adds the Switch / X-MoE balance term ``α · N · Σ_j f_j P_j`` (mean over the adapted blocks, as fairseq's
"average"), logged as ``balance``.

Compute: each sub-token runs only its chosen expert(s) (`adapterx_routing.dispatch`: the assignments sorted by expert,
then one padded batched matmul while the groups are balanced enough, else one small matmul per expert; one host sync
per block for the group sizes). Every expert is called every step (on padding or an empty slice when no sub-token chose
it), so every parameter is in the graph: DDP needs no ``find_unused_parameters`` (an unchosen expert gets an exact zero
gradient, so AdamW still applies its momentum and weight decay to it, as in static-capacity MoE).

Other backbones. Swin blocks (pre-norm, tokens ``(B, H, W, C)``): the SMoA and the trained norm2 apply as above; there
is no token sequence for prompts nor a CLS token. Post-norm ``ResPostBlock``: the SMoA reads the MLP's input (there is
no norm before the MLP to train). CNN blocks (EfficientNet, ConvNeXt, ResNet: black boxes to adaptune): the SMoA runs
on spatial positions as tokens, parallel to the whole block, ``out = block(x) + SMoA(x)`` over the channel dim, on the
blocks that keep their shape; shared experts need one sub-token width that divides every block's channels. Options
that have nothing to act on (``block_norm``, ``prompts``, ``train_cls``, ``head``) are one error naming what to set.

Deviations and choices where the sources are silent (all options, spec §3.7):
- N = 28 experts, r = 32, w = 64 (H = 12 on ViT-B, the attention heads' width), router width d_r = 16 (X-MoE), τ = 1,
  top-1, α = 0.01: the largest N with r = 32 under 0.20% of ViT-B/16 (167,744 parameters without the head, 0.196%).
- Top-k > 1 combines with the raw (not renormalised) probabilities; f_j counts all k assignments.
- Only the expert embeddings are L2-normalised (X-MoE's code); torchscale rescales them in place to norm 1.5 each
  forward, which cannot change a normalised score and is not done.
- The prompt goes after all prefix tokens (CLS and any register tokens), so timm's prefix layout is kept; on models
  without registers this is DAPT's "right after CLS". ``prompt_pool: all`` averages every token (DAPT).
- ``head: cls_prompts`` feeds the head the mean of the final-normed CLS and prompt tokens (DAPT concatenates them,
  which would change the head's width); the default is CLS only.
- Router logits run in fp32 under autocast. Sub-tokens are routed in eval as in training (no capacity limit, no
  token dropping, no router noise).
- A block called with ``attn_mask`` would need the mask grown with the prompts; adaptune never passes one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from adaptune.batch import Batch, Loss
from adaptune.config import opt, with_defaults
from adaptune.errors import TargetError
from adaptune.families import family_of
from adaptune.methods.adapter_blocks import auto_block_paths, channel_layout, probe_shapes
from adaptune.methods.adapterx_routing import ExpertEmbeddings, ExpertPool, Routing, balance_loss, smoa
from adaptune.methods.common import SharedRef, adapter_modules, match_targets, replace_module, share
from adaptune.methods.registry import LossFn, MethodSpec, register

COLLAPSE_SHARE = 0.9  # a block where one expert takes more than this share of the sub-tokens gets a warning

_HELP = {
    "num_experts": "N: experts in the pool shared by every block",
    "bottleneck": "r: each expert maps w -> r -> w",
    "sub_token_dim": "w: width of the sub-tokens of the multi-head split (H = channels / w per block; ViT-B: H = 12); "
    "must divide every adapted block's channels",
    "router_dim": "d_r: width of the per-block router projection and of the shared expert embeddings (X-MoE: 16)",
    "temperature": "τ: the router's softmax temperature over cosine-like scores",
    "top_k": "experts per sub-token (the figure: 1)",
    "balance_weight": "α of the Switch load-balancing term α·N·Σ f_j·P_j (0: off)",
    "activation": "the experts' activation",
    "dropout": "dropout inside the experts, after the activation",
    "scale": "s: constant scale of each expert's output (AdaptFormer: 0.1)",
    "bias": "biases in the experts",
    "block_norm": "train each block's own norm before the MLP (norm2), starting from the pretrained one",
    "prompts": "prompt generator: each block appends γ⊙mean(tokens)+β as one new token (transformers only)",
    "prompt_position": "where each new prompt goes: `after_cls` (newest first: CLS, P_l..P_1, patches; spec §6), "
    "`after_prompts` (CLS, P_1..P_l, patches) or `end`",
    "prompt_pool": "tokens the prompt generator averages: `all` (DAPT) or `patches` (neither CLS nor prompts)",
    "train_cls": "train the CLS token",
    "head": "what the head reads: `cls` (the model's own pooling) or `cls_prompts` (mean of the normed CLS and prompt "
    "tokens)",
    "targets": "`auto`: the model's residual blocks (`adaptune families`); or globs over module paths, e.g. `blocks.*`",
}


@dataclass(frozen=True)
class AdapterXConfig:
    """Options of ``method: {name: adapterx}``; every number the paper does not give is an option (spec §3.7).

    Defaults: N = 28, r = 32, w = 64, d_r = 16 (X-MoE), τ = 1, top-1 (figure), α = 0.01 (Switch), bottleneck experts
    with GELU, no dropout, s = 1, biases; trained norm2, prompts after CLS, trained CLS token (figure).
    """

    num_experts: int = opt(28, _HELP["num_experts"], ge=1)
    bottleneck: int = opt(32, _HELP["bottleneck"], ge=1)
    sub_token_dim: int = opt(64, _HELP["sub_token_dim"], ge=1)
    router_dim: int = opt(16, _HELP["router_dim"], ge=1)
    temperature: float = opt(1.0, _HELP["temperature"], gt=0.0)
    top_k: int = opt(1, _HELP["top_k"], ge=1)
    balance_weight: float = opt(0.01, _HELP["balance_weight"], ge=0.0)
    activation: Literal["gelu", "relu", "silu", "quick_gelu", "identity"] = opt("gelu", _HELP["activation"])
    dropout: float = opt(0.0, _HELP["dropout"], ge=0.0, lt=1.0)
    scale: float = opt(1.0, _HELP["scale"])
    bias: bool = opt(True, _HELP["bias"])
    block_norm: bool = opt(True, _HELP["block_norm"])
    prompts: bool = opt(True, _HELP["prompts"])
    prompt_position: Literal["after_cls", "after_prompts", "end"] = opt("after_cls", _HELP["prompt_position"])
    prompt_pool: Literal["all", "patches"] = opt("all", _HELP["prompt_pool"])
    train_cls: bool = opt(True, _HELP["train_cls"])
    head: Literal["cls", "cls_prompts"] = opt("cls", _HELP["head"])
    targets: tuple[str, ...] = opt(("auto",), _HELP["targets"])

    def __post_init__(self) -> None:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} is more than num_experts ({self.num_experts}); lower method.top_k")
        if not self.targets:
            raise ValueError("targets: empty; use ['auto'] or list module globs, e.g. ['blocks.*']")
        if "auto" in self.targets and len(self.targets) > 1:
            raise ValueError(f"targets: 'auto' cannot be combined with globs, got {list(self.targets)}; use one")
        if self.head == "cls_prompts" and not self.prompts:
            raise ValueError("head: 'cls_prompts' needs prompts: true; set method.head: cls")


AdaptFormerXConfig = with_defaults(
    AdapterXConfig,
    "AdaptFormerXConfig",
    doc="""Options of ``method: {name: adaptformerx}``: `AdapterXConfig` with AdaptFormer's experts as defaults.

    AdaptFormer (spec §1.2): ``s · Up(Dropout_0.1(ReLU(Down(v))))`` with s = 0.1, Up zero-initialised.
    """,
    activation="relu",
    dropout=0.1,
    scale=0.1,
)


# ----------------------------------------------------------------------------------------------------------------
# the modules


class AdapterXBlock(nn.Module):
    """One block with its SMoA branch, router and (optionally) prompt generator; the block itself is ``base``.

    Args:
        base: The wrapped block, unchanged.
        kind: ``pre_norm`` (SMoA on norm2's output, beside the MLP), ``sub_blocks`` (post-norm: on the MLP's input)
            or ``parallel`` (any block that keeps its shape: ``block(x) + SMoA(x)``).
        channels: The block's width C.
        pool: The shared `ExpertPool`.
        embeddings: The shared `ExpertEmbeddings`.
        cfg: `AdapterXConfig`.
        channels_first: The block's tensors are NCHW (``parallel`` on CNN blocks).
        prefix: The model's prefix tokens (CLS + registers), for prompts.
        prompt_index: Prompts already in this block's input sequence.
        factory: ``device`` and ``dtype`` of the new parameters.
    """

    def __init__(
        self,
        base: nn.Module,
        kind: str,
        channels: int,
        pool: ExpertPool,
        embeddings: ExpertEmbeddings,
        cfg: Any,
        channels_first: bool = False,
        prefix: int = 1,
        prompt_index: int = 0,
        factory: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.base = base
        self.kind = kind
        self.channels_first = channels_first
        self.width, self.temperature, self.top_k = cfg.sub_token_dim, cfg.temperature, cfg.top_k
        self.pool = SharedRef(pool)
        self.embeddings = SharedRef(embeddings)
        factory = factory or {}
        self.adapterx_router = nn.Linear(cfg.sub_token_dim, cfg.router_dim, bias=False, **factory)
        self.prompts = bool(cfg.prompts)
        self.prompt_position, self.prompt_pool = cfg.prompt_position, cfg.prompt_pool
        self.prefix, self.prompt_index = prefix, prompt_index
        if self.prompts:
            self.adapterx_prompt_scale = nn.Parameter(torch.empty(channels, **factory))  # γ_l
            self.adapterx_prompt_shift = nn.Parameter(torch.empty(channels, **factory))  # β_l
            with torch.no_grad():
                nn.init.normal_(self.adapterx_prompt_scale, 1.0, 0.02)
                nn.init.normal_(self.adapterx_prompt_shift, 0.0, 0.02)
        self._family = family_of(base) if kind != "parallel" else None
        self.path = ""  # set by inject, for diagnostics
        self._sinks: list[list[tuple[str, Routing]]] = []  # lists `recording` contexts collect into

    def _smoa(self, u: torch.Tensor) -> torch.Tensor:
        router, embeddings = self.adapterx_router.weight, self.embeddings().weight
        s, routing = smoa(u, self.width, router, embeddings, self.pool(), self.temperature, self.top_k)  # (..., C)
        for sink in self._sinks:
            sink.append((self.path, routing))
        return s

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind == "parallel":
            o = self.base(x, *args, **kwargs)  # same shape as x
            u = x.movedim(1, -1) if self.channels_first else x  # (B, H, W, C) or (..., C): positions as tokens
            s = self._smoa(u)
            y = o + (s.movedim(-1, 1) if self.channels_first else s)
        else:
            family = self._family
            x1 = x + family.attn(self.base, x, args, kwargs)  # (B, T, C) or (B, H, W, C)
            if self.kind == "pre_norm":
                u = family.mlp_norm(self.base, x1)  # norm2, trained
                f = family.mlp_ffn(self.base, u)
            else:
                u, f = x1, family.mlp(self.base, x1)
            y = x1 + f + self._smoa(u)
        return self._add_prompt(y) if self.prompts else y

    def _add_prompt(self, y: torch.Tensor) -> torch.Tensor:
        """``y (B, T, C)`` -> ``(B, T + 1, C)`` with ``γ ⊙ mean(tokens) + β`` inserted."""
        t = y.shape[1]
        if self.prompt_pool == "all":
            pooled = y.mean(dim=1)  # (B, C)
        elif self.prompt_position == "end":
            pooled = y[:, self.prefix : t - self.prompt_index].mean(dim=1)
        else:
            pooled = y[:, self.prefix + self.prompt_index :].mean(dim=1)
        p = (pooled * self.adapterx_prompt_scale + self.adapterx_prompt_shift).unsqueeze(1)  # (B, 1, C)
        where = {"after_cls": self.prefix, "after_prompts": self.prefix + self.prompt_index, "end": t}
        at = where[self.prompt_position]
        return torch.cat([y[:, :at], p, y[:, at:]], dim=1)

    def adapter_param_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.named_parameters() if not name.startswith("base."))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, width={self.width}, top_k={self.top_k}, prompts={self.prompts}"


class AdapterXHeadPool(nn.Module):
    """``head: cls_prompts``: wraps the final norm; token 0 becomes the mean of the normed CLS and prompt tokens.

    Args:
        base: The model's final norm (``model.norm``).
        start: Index of the first prompt in the final sequence (from the end if negative).
        count: Number of prompts.
    """

    def __init__(self, base: nn.Module, start: int, count: int):
        super().__init__()
        self.base, self.start, self.count = base, start, count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, C)
        prompts = y[:, self.start :] if self.start < 0 else y[:, self.start : self.start + self.count]  # (B, P, C)
        pooled = torch.cat([y[:, :1], prompts], dim=1).mean(dim=1, keepdim=True)  # (B, 1, C)
        return torch.cat([pooled, y[:, 1:]], dim=1)

    def adapter_param_names(self) -> tuple[str, ...]:
        return ()

    def extra_repr(self) -> str:
        return f"start={self.start}, count={self.count}"


# ----------------------------------------------------------------------------------------------------------------
# targets


@dataclass(frozen=True)
class _Target:
    path: str
    kind: str
    channels: int
    channels_first: bool


def _kind(module: nn.Module) -> str:
    family = family_of(module)
    if family is None or not family.has_sub_blocks:
        return "parallel"
    return "pre_norm" if family.pre_norm else "sub_blocks"


def resolve(model: nn.Module, targets: tuple[str, ...]) -> list[_Target]:
    """The blocks to adapt, with how (`AdapterXBlock` ``kind``), their width and layout.

    ``auto`` takes the families' blocks (`adaptune.families`) and, among black-box (CNN) blocks, only those that keep
    their shape. Explicit globs may name any module; a black-box one must keep its shape.

    Raises:
        TargetError: No block, an adapted or nested target, a shape-changing black-box target.
    """
    auto = tuple(targets) == ("auto",)
    paths = auto_block_paths(model) if auto else match_targets(model, targets)
    owners = [name for name, _ in adapter_modules(model)]
    for p in paths:
        if any(p == o or p.startswith(o + ".") for o in owners) or any(p.startswith(q + ".") for q in paths):
            raise TargetError(f"method.targets: {p} is already adapted or lies inside another target; inject once")
    shapes = probe_shapes(model, paths)
    out = []
    for p in paths:
        kind, (shape_in, shape_out) = _kind(model.get_submodule(p)), shapes[p]
        if kind == "parallel" and shape_in != shape_out:
            if auto:
                continue
            raise TargetError(
                f"method.targets: {p} ({type(model.get_submodule(p)).__name__}) maps {shape_in} to {shape_out}; the "
                "SMoA runs parallel to a CNN block and needs one that keeps its shape (stride 1, same channels)"
            )
        out.append(_Target(p, kind, *channel_layout(p, shape_out, model)))
    if not out:
        raise TargetError(f"method.targets: no block of {type(model).__name__} keeps its shape; adapt other blocks")
    return out


def check_targets(model: nn.Module, targets: list[_Target], cfg: Any) -> None:
    """Raise one `TargetError` for everything the options ask of blocks that cannot give it."""
    name = type(model).__name__
    messages = []
    problems = []
    classes = ", ".join(sorted({type(model.get_submodule(t.path)).__name__ for t in targets}))
    if cfg.block_norm and any(
        t.kind != "pre_norm" or not family_of(model.get_submodule(t.path)).norm2 for t in targets
    ):
        problems.append(("block_norm", "no norm before an MLP for the SMoA to read"))
    tokens = all(t.kind != "parallel" and family_of(model.get_submodule(t.path)).tokens for t in targets)
    if cfg.prompts and not (tokens and getattr(model, "global_pool", None) == "token"):
        problems.append(("prompts", "no token sequence with CLS pooling to add prompts to"))
    if cfg.train_cls and not isinstance(getattr(model, "cls_token", None), nn.Parameter):
        problems.append(("train_cls", f"{name} has no CLS token"))
    if cfg.head == "cls_prompts" and not isinstance(getattr(model, "norm", None), nn.Module):
        problems.append(("head", f"{name} has no final `norm` to pool after"))
    if problems:
        keys = ", ".join(f"method.{k}" for k, _ in problems)
        fix = ", ".join(f"method.{k}: {'cls' if k == 'head' else 'false'}" for k, _ in problems)
        messages.append(
            f"{keys}: {name}'s blocks ({classes}) have {'; '.join(why for _, why in problems)}; set {fix} (the "
            "SMoA itself runs on any block, with spatial positions as tokens on CNNs)"
        )
    widths = sorted({t.channels for t in targets})
    if any(c % cfg.sub_token_dim for c in widths):
        messages.append(
            f"method.sub_token_dim: {cfg.sub_token_dim} does not divide every adapted block's channels "
            f"({', '.join(map(str, widths))}); the shared experts need one sub-token width: use a divisor of "
            f"{math.gcd(*widths)}"
        )
    if messages:
        raise TargetError("; and ".join(messages))


# ----------------------------------------------------------------------------------------------------------------
# inject, trainable backbone parts


def inject(model: nn.Module, cfg: Any) -> list[str]:
    """Share one expert pool and one set of expert embeddings, and wrap each target in an `AdapterXBlock`.

    Returns:
        The wrapped module paths in model order (plus ``norm`` for ``head: cls_prompts``).

    Raises:
        TargetError: See `resolve` and `check_targets`.
    """
    targets = resolve(model, cfg.targets)
    check_targets(model, targets, cfg)
    ref = next(p for p in model.parameters() if p.is_floating_point())
    to = {"device": ref.device, "dtype": ref.dtype}
    pool = ExpertPool(
        cfg.num_experts, cfg.sub_token_dim, cfg.bottleneck, cfg.activation, cfg.dropout, cfg.scale, cfg.bias
    )
    pool = share(model, "adapterx_experts", pool.to(**to).requires_grad_(True))
    embeddings = ExpertEmbeddings(cfg.num_experts, cfg.router_dim).to(**to).requires_grad_(True)
    embeddings = share(model, "adapterx_embeddings", embeddings)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    for i, t in enumerate(targets):
        base = model.get_submodule(t.path)
        wrapper = AdapterXBlock(base, t.kind, t.channels, pool, embeddings, cfg, t.channels_first, prefix, i, to)
        wrapper.path, wrapper.training = t.path, base.training
        replace_module(model, t.path, wrapper)
    touched = [t.path for t in targets]
    if cfg.head == "cls_prompts":
        n = len(targets)
        start = -n if cfg.prompt_position == "end" else prefix
        replace_module(model, "norm", AdapterXHeadPool(model.norm, start, n))
        touched.append("norm")
    return touched


def trainable_backbone(model: nn.Module, cfg: Any) -> list[str]:
    """The adapted blocks' own norm2 parameters (``block_norm``) and ``cls_token`` (``train_cls``)."""
    names = []
    for path, m in model.named_modules():
        if isinstance(m, AdapterXBlock) and cfg.block_norm:
            norm = m._family.norm2
            names += [f"{path}.base.{norm}.{n}" for n, _ in m.base.get_submodule(norm).named_parameters()]
    if cfg.train_cls:
        names.append("cls_token")
    return names


# ----------------------------------------------------------------------------------------------------------------
# balance loss, expert use


@contextmanager
def recording(model: nn.Module) -> Iterator[list[tuple[str, Routing]]]:
    """Collect ``(block path, Routing)`` of every SMoA forward inside the context (``model`` may be a DDP wrapper;
    contexts nest)."""
    blocks = [m for m in model.modules() if isinstance(m, AdapterXBlock)]
    records: list[tuple[str, Routing]] = []
    for b in blocks:
        b._sinks.append(records)
    try:
        yield records
    finally:
        for b in blocks:
            b._sinks.remove(records)


def training_loss(model: nn.Module, cfg: Any, batch: Batch, loss_fn: LossFn) -> Loss:
    """``ce + α · mean over blocks of N·Σ_j f_j·P_j``, with the terms ``ce`` and ``balance``."""
    with recording(model) as records:
        logits = model(batch.inputs)
    ce = loss_fn(logits, batch.targets)
    if cfg.balance_weight == 0 or not records:
        return Loss(ce, logits, {"ce": ce})
    balance = cfg.balance_weight * torch.stack([balance_loss(r) for _, r in records]).mean()
    return Loss(ce + balance, logits, {"ce": ce, "balance": balance})


@contextmanager
def expert_use(model: nn.Module, cfg: Any) -> Iterator[dict[str, Any]]:
    """Yield a dict filled on exit with ``expert_use`` (block path -> fraction of its sub-token assignments per
    expert, over every forward inside) and ``warnings`` for blocks where one expert takes over 90%."""
    report: dict[str, Any] = {}
    with recording(model) as records:
        yield report
    totals: dict[str, torch.Tensor] = {}
    for path, routing in records:
        counts = routing.counts().cpu()
        totals[path] = totals[path] + counts if path in totals else counts
    if not totals:
        return
    use = {path: (c.double() / max(1, int(c.sum()))).tolist() for path, c in totals.items()}
    report["expert_use"] = {path: [round(f, 4) for f in fractions] for path, fractions in use.items()}
    report["warnings"] = [
        f"{path}: expert {max(range(len(f)), key=f.__getitem__)} takes {100 * max(f):.1f}% of the sub-tokens "
        "(router collapse); raise method.balance_weight or method.temperature"
        for path, f in use.items()
        if max(f) > COLLAPSE_SHARE
    ]


_COMMON: dict[str, Any] = {
    "inject": inject,
    "trainable_backbone": trainable_backbone,
    "training_loss": training_loss,
    "diagnostics": expert_use,
    "identity_at_init": False,  # the prompt tokens change every token's attention from the first step
    "find_unused_parameters": False,  # every expert runs every step, on an empty slice if unchosen
}

register(
    MethodSpec(
        name="adapterx",
        summary="Adapter-X: routed sub-tokens over bottleneck experts shared by all blocks, prompts, trained norm2/CLS",
        config_cls=AdapterXConfig,
        reported_vtab1k=(74.2, "Adapter-X paper, read off its teaser figure (±0.1; no table published)"),
        **_COMMON,
    )
)

register(
    MethodSpec(
        name="adaptformerx",
        summary="AdaptFormer-X: Adapter-X with AdaptFormer experts (ReLU, dropout 0.1, scale 0.1)",
        config_cls=AdaptFormerXConfig,
        reported_vtab1k=(76.2, "Adapter-X paper, read off its teaser figure (±0.1; no table published)"),
        **_COMMON,
    )
)
