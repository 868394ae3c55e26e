"""Bottleneck adapters on any timm block: AdaptFormer, Pfeiffer, Houlsby and Adapter+ placements.

Papers: Houlsby et al. 2019 (https://arxiv.org/abs/1902.00751), Pfeiffer et al. 2021 (https://arxiv.org/abs/2005.00247),
AdaptFormer (Chen et al. 2022, https://arxiv.org/abs/2205.13535), Adapter+ ("Adapters Strike Back", Steitz & Roth,
CVPR 2024, https://arxiv.org/abs/2406.06820).

The adapter, over the channel dim of a channels-last tensor (NCHW tensors are moved to channels-last and back, the
same math as 1x1 convs):

    A(z) = s ⊙ DropPath( up( Dropout( act( down( LN_a(z) ) ) ) ) )      down: C -> r,  up: r -> C

``s`` is a constant, a learned scalar or a learned per-channel vector (init 1). Placements (``style``), relative to
timm's ViT ``Block`` with ``a(x) = drop_path1(ls1(attn(norm1(x))))`` and ``m(x) = drop_path2(ls2(mlp(norm2(x))))``:

    adaptformer  x1 = x + a(x);  out = x1 + m(x1) + A(x1)            parallel to the MLP, reads its input stream
    pfeiffer     x1 = x + a(x);  f = m(x1);  out = x1 + f + A(f)     sequential after the MLP
    houlsby      y = a(x);  h = x + y + A_attn(y);  z = m(h);  out = h + z + A_mlp(z)
    post         o = block(x);  out = o + A(o)                       Adapter+: after the whole block
    parallel     out = block(x) + A(x)                               block level; input and output shapes must match

The first three need a block whose family (`adaptune.families`) knows its attention and MLP branches (timm
``Block``, ``ResPostBlock`` with its post-norm branches, ``SwinTransformerBlock``); ``post`` and ``parallel`` wrap any
module returning one tensor: ViT tokens ``(B, N, C)``, Swin ``(B, H, W, C)``, CNN blocks ``(B, C, H, W)``.

Two registered names share this code: ``adapter`` (identity at init: LoRA-style init with ``up`` = 0) and
``adapter_plus`` (the Adapter+ configuration: post placement, per-channel scale, Houlsby init, drop-path 0.1).

Deviations from the reference code:
- ``houlsby`` follows Adapter+'s ``houlsby`` row (and Houlsby et al.): each adapter reads its sub-block's output before
  the residual add. The MoSA repo's "Houlsby" style reads the residual stream after the add instead.
- ``adaptformer`` is AdaptFormer's placement; AdaptFormer itself uses ReLU, dropout 0.1, s = 0.1, r = 64 and the MoSA
  repo adds an adapter LayerNorm: set ``activation``, ``dropout``, ``scale``, ``bottleneck``, ``norm`` to match.
  Adapter+ calls this placement "parallel"; here ``parallel`` is the block-level one.
- ``pfeiffer`` equals Adapter+'s ``intermediate`` (the adapter reads the MLP output ``f``); Adapter+'s own "pfeiffer"
  is numerically its ``post`` (its spec §2).
- ``init: xavier`` zeroes the biases; NOAH's VTAB adapter draws them from N(0, 1e-6²).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from adaptune.config import opt, with_defaults
from adaptune.methods.adapter_blocks import STYLES, SUBBLOCK_STYLES, check_style, resolve_targets, sub_block_branches
from adaptune.methods.common import replace_module
from adaptune.methods.registry import MethodSpec, register

Style = Literal["adaptformer", "pfeiffer", "houlsby", "post", "parallel"]
Activation = Literal["relu", "gelu", "silu", "quick_gelu", "identity"]
Init = Literal["lora", "houlsby", "bert", "xavier"]
Scale = float | Literal["learned", "channel"]

_HELP = {
    "style": "placement: `post` (after the block, Adapter+; any block), `parallel` (block(x) + A(x); any block that "
    "keeps its shape), `adaptformer` (parallel to the MLP), `pfeiffer` (after the MLP), `houlsby` (after attention "
    "and after the MLP); the last three need transformer blocks",
    "bottleneck": "bottleneck width r of down: C -> r, up: r -> C",
    "activation": "activation between down and up; `identity` makes the adapter linear",
    "dropout": "dropout after the activation",
    "scale": "s: a constant, `learned` (one scalar, init 1) or `channel` (one per channel, init 1)",
    "norm": "a fresh LayerNorm (eps 1e-6, trained) on the adapter input",
    "init": "`lora`: down kaiming-uniform(a=√5), up 0 (identity at init); `houlsby`: both truncated normal std 0.01 "
    "cut at ±2σ; `bert`: both normal std 0.02; `xavier`: both xavier-uniform; biases always 0",
    "bias": "biases on down and up",
    "drop_path": "stochastic depth on the adapter branch (same rate in every block)",
    "targets": "`auto`: the model's repeated residual blocks (timm ViT/DeiT Block, ResPostBlock, SwinTransformerBlock, "
    "ConvNeXtBlock, EfficientNet InvertedResidual/DepthwiseSeparableConv/EdgeResidual, ResNet Bottleneck/BasicBlock); "
    "or globs over module paths, e.g. `blocks.*`, `stages.*.blocks.*`",
}


@dataclass(frozen=True)
class AdapterConfig:
    """Options of ``method: {name: adapter}``. Defaults give identity at init and work on every supported backbone.

    Sources: style ``post`` (Adapter+, the placement that needs nothing from the block), r = 8 (Adapter+, NOAH's VTAB
    adapter), GELU (Adapter+, MoSA), dropout 0, s = 1.0, no adapter LayerNorm, biases (Adapter+ ``base_adapter.yaml``),
    init ``lora`` (AdaptFormer, MoSA; ``up`` = 0 so the untrained model is the backbone), no adapter drop-path
    (AdaptFormer, MoSA).
    """

    style: Style = opt("post", _HELP["style"])
    bottleneck: int = opt(8, _HELP["bottleneck"], ge=1)
    activation: Activation = opt("gelu", _HELP["activation"])
    dropout: float = opt(0.0, _HELP["dropout"], ge=0.0, lt=1.0)
    scale: Scale = opt(1.0, _HELP["scale"])
    norm: bool = opt(False, _HELP["norm"])
    init: Init = opt("lora", _HELP["init"])
    bias: bool = opt(True, _HELP["bias"])
    drop_path: float = opt(0.0, _HELP["drop_path"], ge=0.0, lt=1.0)
    targets: tuple[str, ...] = opt(("auto",), _HELP["targets"])

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: empty; use ['auto'] or list module globs, e.g. ['blocks.*']")
        if "auto" in self.targets and len(self.targets) > 1:
            raise ValueError(f"targets: 'auto' cannot be combined with globs, got {list(self.targets)}; use one")


AdapterPlusConfig = with_defaults(
    AdapterConfig,
    "AdapterPlusConfig",
    doc="""Options of ``method: {name: adapter_plus}``: `AdapterConfig`'s fields with Adapter+'s values as defaults.

    Adapter+ (``conf/adapter/adapter_plus.yaml``): post placement, r = 8, GELU, no dropout, per-channel scale, no
    adapter LayerNorm, Houlsby init (so not identity at init), biases, adapter drop-path 0.1.
    """,
    scale="channel",
    init="houlsby",
    drop_path=0.1,
)


# ----------------------------------------------------------------------------------------------------------------
# the adapter


def init_bottleneck(down: nn.Linear, up: nn.Linear, init: str) -> None:
    """Initialise ``down`` (C -> r) and ``up`` (r -> C) in place; biases become 0.

    ``lora``: down kaiming-uniform(a=√5), up 0. ``houlsby``: both trunc-normal(std 0.01, cut ±0.02). ``bert``: both
    normal(0, 0.02). ``xavier``: both xavier-uniform.
    """
    with torch.no_grad():
        if init == "lora":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        elif init == "houlsby":
            for w in (down.weight, up.weight):
                nn.init.trunc_normal_(w, std=0.01, a=-0.02, b=0.02)
        elif init == "bert":
            for w in (down.weight, up.weight):
                nn.init.normal_(w, std=0.02)
        elif init == "xavier":
            for w in (down.weight, up.weight):
                nn.init.xavier_uniform_(w)
        else:
            raise ValueError(f"method.init: unknown init {init!r}; use lora, houlsby, bert or xavier")
        for b in (down.bias, up.bias):
            if b is not None:
                nn.init.zeros_(b)


class BottleneckAdapter(nn.Module):
    """``A(z) = s ⊙ DropPath(up(Dropout(act(down(LN_a(z))))))`` over the last dim of ``z``.

    ``down`` and ``up`` are ``nn.Linear`` children and are always called as modules, so other methods (MoSA) can
    swap them for their own.

    Args:
        dim: Channels C.
        bottleneck: Width r.
        activation: relu, gelu, silu, quick_gelu or identity.
        dropout: Dropout after the activation.
        scale: A constant, ``"learned"`` (a scalar parameter) or ``"channel"`` (a (C,) parameter), both init 1.
        norm: Apply a fresh LayerNorm(C, eps=1e-6) to the input first.
        init: lora, houlsby, bert or xavier (`init_bottleneck`).
        bias: Biases on ``down`` and ``up``.
        drop_path: Stochastic depth on the branch, before the scale.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int = 8,
        activation: str = "gelu",
        dropout: float = 0.0,
        scale: float | str = 1.0,
        norm: bool = False,
        init: str = "lora",
        bias: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        from timm.layers import DropPath, get_act_layer

        self.norm = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()
        self.down = nn.Linear(dim, bottleneck, bias=bias)
        self.act = get_act_layer(activation)()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(bottleneck, dim, bias=bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.scale: nn.Parameter | float
        if scale == "learned":
            self.scale = nn.Parameter(torch.ones(1))
        elif scale == "channel":
            self.scale = nn.Parameter(torch.ones(dim))
        elif isinstance(scale, int | float) and not isinstance(scale, bool):
            self.scale = float(scale)
        else:
            raise ValueError(f"method.scale: expected a number, 'learned' or 'channel', got {scale!r}")
        init_bottleneck(self.down, self.up, init)

    @classmethod
    def from_config(cls, dim: int, cfg: Any) -> BottleneckAdapter:
        """Build from any config with the `AdapterConfig` fields (read as attributes)."""
        return cls(
            dim,
            bottleneck=cfg.bottleneck,
            activation=cfg.activation,
            dropout=cfg.dropout,
            scale=cfg.scale,
            norm=cfg.norm,
            init=cfg.init,
            bias=cfg.bias,
            drop_path=cfg.drop_path,
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.down(self.norm(z))  # (..., r)
        h = self.up(self.dropout(self.act(h)))  # (..., C)
        return self.drop_path(h) * self.scale

    def adapter_param_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.named_parameters())

    def extra_repr(self) -> str:
        return f"scale={self.scale}" if isinstance(self.scale, float) else ""


class AdapterBlock(nn.Module):
    """A block with bottleneck adapter(s) placed by ``style`` (module docstring); the block itself is ``base``.

    Holds one adapter as ``adapter``, or two as ``adapter_attn`` and ``adapter_mlp`` for ``houlsby``.

    Args:
        base: The wrapped block, unchanged.
        style: One of adaptformer, pfeiffer, houlsby, post, parallel.
        make_adapter: Builds one adapter (called once, or twice for houlsby); it maps channels-last tensors to the
            same shape.
        channels_first: The block's tensors are NCHW; adapters then see them moved to channels-last.
    """

    def __init__(
        self, base: nn.Module, style: str, make_adapter: Callable[[], nn.Module], channels_first: bool = False
    ):
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"method.style: unknown style {style!r}; use one of {', '.join(STYLES)}")
        check_style("", base, style)
        self.base = base
        self.style = style
        self.channels_first = channels_first
        if style == "houlsby":
            self.adapter_attn = make_adapter()
            self.adapter_mlp = make_adapter()
        else:
            self.adapter = make_adapter()
        self._branches = sub_block_branches(base) if style in SUBBLOCK_STYLES else None

    def _adapt(self, adapter: nn.Module, z: torch.Tensor) -> torch.Tensor:
        if not self.channels_first:
            return adapter(z)  # (B, N, C) or (B, H, W, C)
        return adapter(z.movedim(1, -1)).movedim(-1, 1)  # (B, C, H, W) -> (B, H, W, C) -> (B, C, H, W)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._branches is None:  # post, parallel: the block is a black box
            o = self.base(x, *args, **kwargs)  # same layout as x
            return o + self._adapt(self.adapter, o if self.style == "post" else x)
        attn, mlp = self._branches
        if self.style == "houlsby":
            y = attn(self.base, x, args, kwargs)  # (B, N, C) or (B, H, W, C)
            h = x + y + self._adapt(self.adapter_attn, y)
            z = mlp(self.base, h)
            return h + z + self._adapt(self.adapter_mlp, z)
        x1 = x + attn(self.base, x, args, kwargs)  # (B, N, C) or (B, H, W, C)
        f = mlp(self.base, x1)
        return x1 + f + self._adapt(self.adapter, x1 if self.style == "adaptformer" else f)

    def adapter_param_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.named_parameters() if not name.startswith("base."))

    def extra_repr(self) -> str:
        return f"style={self.style}, channels_first={self.channels_first}"


# ----------------------------------------------------------------------------------------------------------------
# inject


def inject(model: nn.Module, cfg: Any, make_adapter: Callable[[int, Any], nn.Module] | None = None) -> list[str]:
    """Wrap each target of ``cfg.targets`` in an `AdapterBlock` placed by ``cfg.style``.

    Channel counts and layouts come from one dummy forward (`adapter_blocks.resolve_targets`). With ``targets:
    auto`` and ``style: parallel``, blocks that change shape (stride 2, channel change) are skipped. New adapters
    take the device, dtype and train/eval mode of the block they wrap and require grad; nothing else changes its
    ``requires_grad``.

    Args:
        model: An unmodified, frozen timm model.
        cfg: `AdapterConfig`, `AdapterPlusConfig` or any config with their fields (MoSA's), read as attributes.
        make_adapter: ``make_adapter(channels, cfg)`` builds one adapter; default `BottleneckAdapter.from_config`.

    Returns:
        The wrapped module paths, in model order.

    Raises:
        TargetError: No target, an unsupported style for a target, a glob that matches nothing.
    """
    make = make_adapter or BottleneckAdapter.from_config
    targets = resolve_targets(model, cfg.targets, cfg.style)
    for t in targets:
        base = model.get_submodule(t.path)
        ref = next((p for p in base.parameters() if p.is_floating_point()), None)
        to = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}

        def new_adapter(dim: int = t.channels, to: dict[str, Any] = to, mode: bool = base.training) -> nn.Module:
            return make(dim, cfg).to(**to).train(mode)

        wrapper = AdapterBlock(base, cfg.style, new_adapter, t.channels_first)
        wrapper.training = base.training  # the wrapper alone: base's own submodules keep their modes
        replace_module(model, t.path, wrapper)
    return [t.path for t in targets]


register(
    MethodSpec(
        name="adapter",
        reported_vtab1k=(73.86, "V-PETL Bench / NOAH Adapter-8, sequential after the MLP"),
        summary="bottleneck adapter (post / parallel on any block; AdaptFormer, Pfeiffer, Houlsby in transformers)",
        config_cls=AdapterConfig,
        inject=inject,
    )
)

register(
    MethodSpec(
        name="adapter_plus",
        reported_vtab1k=(77.6, "Adapter+ paper, via ComBo"),
        summary="Adapter+: post-block bottleneck adapter, channel-wise scale, Houlsby init, drop-path 0.1",
        config_cls=AdapterPlusConfig,
        inject=inject,
        identity_at_init=False,
    )
)
