"""RepAdapter: a linear adapter re-parameterised into the next layer (Luo et al., "Towards Efficient Visual
Adaption via Structural Re-parameterization", https://arxiv.org/abs/2302.08106).

    RepAdapter(u) = u + s · ( W_B · Dropout( W_A u + b_A ) + b_B )      no non-linearity
    W_A: C -> r (Xavier-uniform, b_A = 0);   W_B: r -> C grouped (g groups, zero init, b_B = 0)

Placement ("repblock", the reference default): before the attention and before the MLP of every block,

    x = x + DP(Attn( RepAdapter_attn(LN1 x) ));    x = x + DP(MLP( RepAdapter_mlp(LN2 x) ))

Attention and MLP use their input only through ``attn.qkv`` and ``mlp.fc1``, so adaptune wraps those two Linears and
adapts their input: ``targets: ["*.attn.qkv", "*.mlp.fc1"]`` (``["*.attn.qkv"]`` is the reference's "repattn").

Groups: W_B is a grouped 1x1 conv (Conv1d(r, C, 1, groups=g)): hidden units ``[k·r/g, (k+1)·r/g)`` feed output
channels ``[k·C/g, (k+1)·C/g)`` only; its dense form is block-diagonal. Parameters per adapter ``C·r + r + C·r/g + C``:
ViT-B/16, r = 8, g = 2: 24 · 9,992 = 239,808 (spec methods-others §7.8; the reported 0.22 M counts weights only).

Folding (the paper's point, zero inference cost): the adapter is the affine map ``u -> M u + c`` with

    M = I + s · W_B W_A   (C, C),      c = s · (W_B b_A + b_B)   (C,)

so the next Linear ``y = W u + b`` becomes ``W' = W M``, ``b' = W c + b``, with exactly timm's keys.

Deviations from the reference code (luogen1996/RepAdapter ``repadapter.py``): the reference replaces ``Block.forward``
and applies the adapter to the whole sub-block input; adaptune wraps the first Linear of each sub-block, which is the
same function for timm's ``Attention`` and ``Mlp``. Adapter weights are stored as Linear-style tensors (``down.weight``
``(r, C)``, ``up.weight`` ``(C, r/g)``), not Conv1d's ``(·, ·, 1)``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from adaptune.config import opt
from adaptune.errors import TargetError
from adaptune.methods.common import adapter_modules, match_targets, replace_module
from adaptune.methods.registry import MethodSpec, register


@dataclass(frozen=True)
class RepAdapterConfig:
    """Options of ``method: {name: repadapter}``. Defaults: the reference's (r = 8, g = 2, dropout 0.1, biases,
    "repblock" placement); the scale is per task in the reference (0.1 to 10), 1.0 here."""

    bottleneck: int = opt(8, "hidden width r of W_A: C -> r", ge=1)
    groups: int = opt(2, "groups g of W_B: r -> C (block-diagonal); r and C must be divisible by g", ge=1)
    scale: float = opt(1.0, "s: the adapter adds s · W_B(W_A u); the reference tunes it per task (0.1 to 10)")
    dropout: float = opt(0.1, "dropout on the hidden code W_A u + b_A (training only)", ge=0.0, lt=1.0)
    bias: bool = opt(True, "biases b_A and b_B (false: 221,184 parameters on ViT-B/16, as the reported 0.22 M)")
    targets: tuple[str, ...] = opt(
        ("*.attn.qkv", "*.mlp.fc1"),
        "globs over Linear layers whose input is adapted (the first Linear of a sub-block): `*.attn.qkv` and "
        "`*.mlp.fc1` is the reference's repblock, `*.attn.qkv` alone its repattn",
    )
    exclude: tuple[str, ...] = opt((), "globs of module paths to leave out even if a target matches them")

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: empty; list Linear globs, e.g. ['*.attn.qkv', '*.mlp.fc1']")
        if self.bottleneck % self.groups:
            raise ValueError(
                f"groups: bottleneck {self.bottleneck} is not divisible by groups {self.groups}; pick a divisor"
            )


# ----------------------------------------------------------------------------------------------------------------
# pure math


def grouped_dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Dense ``(C, r)`` block-diagonal matrix of a grouped ``r -> C`` map stored as ``(C, r/g)``."""
    c, rg = weight.shape
    blocks = weight.reshape(groups, c // groups, rg)  # (g, C/g, r/g)
    return torch.block_diag(*blocks)  # (C, r)


def adapter_affine(
    w_a: torch.Tensor, b_a: torch.Tensor | None, w_b: torch.Tensor, b_b: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter ``u -> u + s · (W_B (W_A u + b_A) + b_B)`` as ``u -> M u + c``.

    Args:
        w_a: W_A, ``(r, C)``.
        b_a: b_A, ``(r,)`` or None.
        w_b: Dense W_B, ``(C, r)`` (`grouped_dense`).
        b_b: b_B, ``(C,)`` or None.
        scale: s.

    Returns:
        ``M = I + s W_B W_A`` ``(C, C)`` and ``c = s (W_B b_A + b_B)`` ``(C,)``.
    """
    eye = torch.eye(w_a.shape[1], dtype=w_a.dtype, device=w_a.device)
    m = eye + scale * (w_b @ w_a)
    c = torch.zeros(w_b.shape[0], dtype=w_a.dtype, device=w_a.device)
    if b_a is not None:
        c = c + w_b @ b_a
    if b_b is not None:
        c = c + b_b
    return m, scale * c


def reparameterize(
    weight: torch.Tensor, bias: torch.Tensor | None, m: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = W (M u + c) + b`` as one Linear: ``(W M (out, C), W c + b (out,))``."""
    new_bias = weight @ c
    return weight @ m, new_bias if bias is None else new_bias + bias


def _wide(t: torch.Tensor) -> torch.Tensor:
    """A detached copy in fp32 (fp64 if ``t`` already is): fold math never runs in half precision."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


# ----------------------------------------------------------------------------------------------------------------
# modules


class GroupedLinear(nn.Module):
    """``r -> C`` with ``g`` groups (a grouped 1x1 Conv1d over the last dim): weight ``(C, r/g)``, bias ``(C,)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // groups, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = self.groups
        hg = h.unflatten(-1, (g, -1))  # (..., g, r/g)
        w = self.weight.unflatten(0, (g, -1))  # (g, C/g, r/g)
        y = torch.einsum("...gi,goi->...go", hg, w).flatten(-2)  # (..., C)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        c, rg = self.weight.shape
        return f"in_features={rg * self.groups}, out_features={c}, groups={self.groups}, bias={self.bias is not None}"


class RepAdapter(nn.Module):
    """``u + s · up(dropout(down(u)))`` over the last dim; ``down`` a Linear C -> r, ``up`` a `GroupedLinear`.

    Args:
        dim: Channels C.
        bottleneck: r.
        groups: g of ``up``.
        scale: s.
        dropout: Dropout on the hidden code.
        bias: Biases on ``down`` and ``up``.
        device: Where the weights live.
        dtype: Their dtype.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int = 8,
        groups: int = 2,
        scale: float = 1.0,
        dropout: float = 0.1,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, bias=bias, device=device, dtype=dtype)
        self.up = GroupedLinear(bottleneck, dim, groups, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)  # as Conv1d(C, r, 1): fan_in C, fan_out r
            if self.down.bias is not None:
                nn.init.zeros_(self.down.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.down(u))  # (..., r)
        return u + self.scale * self.up(h)  # (..., C)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, c)`` of this adapter in fp32 (`adapter_affine`)."""
        b_a = None if self.down.bias is None else _wide(self.down.bias)
        b_b = None if self.up.bias is None else _wide(self.up.bias)
        w_b = grouped_dense(_wide(self.up.weight), self.up.groups)
        return adapter_affine(_wide(self.down.weight), b_a, w_b, b_b, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class RepAdapterLinear(nn.Module):
    """``base(RepAdapter(x))``: a frozen Linear whose input is adapted first.

    Args:
        base: The frozen Linear (``attn.qkv``, ``mlp.fc1``).
        adapter: The `RepAdapter` on its input.
    """

    def __init__(self, base: nn.Linear, adapter: RepAdapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(self.adapter(x))  # (..., C) -> (..., C) -> (..., out)

    def adapter_param_names(self) -> tuple[str, ...]:
        return tuple(f"adapter.{n}" for n, _ in self.adapter.named_parameters())

    def folded(self) -> nn.Linear:
        """The base Linear with ``W' = W M``, ``b' = W c + b`` (new tensors, cast once to the base's dtype)."""
        base = self.base
        m, c = self.adapter.affine()
        bias = None if base.bias is None else _wide(base.bias)
        weight, new_bias = reparameterize(_wide(base.weight), bias, m, c)
        base.weight = nn.Parameter(weight.to(base.weight.dtype), requires_grad=base.weight.requires_grad)
        if base.bias is not None:
            base.bias = nn.Parameter(new_bias.to(base.bias.dtype), requires_grad=base.bias.requires_grad)
        return base


# ----------------------------------------------------------------------------------------------------------------
# method contract


def _targets(model: nn.Module, cfg: RepAdapterConfig) -> list[str]:
    from adaptune.backbone import head_path

    paths = match_targets(model, cfg.targets, kinds=(nn.Linear,))
    if cfg.exclude:
        match_targets(model, cfg.exclude)  # an exclude glob that matches nothing is a typo: say so
    roots = [r for r in (head_path(model), *(n for n, _ in adapter_modules(model))) if r]
    paths = [p for p in paths if not any(p == r or p.startswith(r + ".") for r in roots)]
    paths = [p for p in paths if not any(fnmatch.fnmatchcase(p, g) for g in cfg.exclude)]
    if not paths:
        raise TargetError(
            f"method.targets: {list(cfg.targets)} leaves no Linear to adapt after the head, method.exclude and "
            "existing adapters; widen the targets"
        )
    for p in paths:
        linear = model.get_submodule(p)
        if linear.in_features % cfg.groups:
            raise TargetError(
                f"method.groups: {p} has {linear.in_features} input channels, not divisible by groups {cfg.groups}"
            )
        if linear.bias is None and cfg.bias:
            raise TargetError(
                f"method.bias: {p} has no bias to fold the adapter's bias terms into; set method.bias: false"
            )
    return paths


def inject(model: nn.Module, cfg: RepAdapterConfig) -> list[str]:
    """Wrap every target Linear in a `RepAdapterLinear` (new adapter on its input; the adapter requires grad).

    Returns:
        The wrapped module paths, in model order.

    Raises:
        TargetError: A glob matches no Linear, nothing is left after the head and ``exclude``, a target's input
            channels are not divisible by ``groups``, or a target without a bias where ``bias`` is on.
    """
    paths = _targets(model, cfg)
    for path in paths:
        base = model.get_submodule(path)
        w = base.weight
        adapter = RepAdapter(
            base.in_features, cfg.bottleneck, cfg.groups, cfg.scale, cfg.dropout, cfg.bias, w.device, w.dtype
        )
        wrapper = RepAdapterLinear(base, adapter.requires_grad_(True).train(base.training))
        wrapper.training = base.training
        replace_module(model, path, wrapper)
    return paths


def fold(model: nn.Module) -> None:
    """Re-parameterise every adapter into the Linear after it and put that Linear back, in place: the model's
    ``state_dict`` then has exactly the plain timm keys and the inference cost of the plain model."""
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, RepAdapterLinear)]
    for path, wrapper in wrappers:
        replace_module(model, path, wrapper.folded())


register(
    MethodSpec(
        name="repadapter",
        reported_vtab1k=(76.09, "V-PETL Bench, RepAdapter"),
        summary="RepAdapter: linear grouped adapter before attention and MLP, re-parameterised into qkv/fc1 (folds)",
        config_cls=RepAdapterConfig,
        inject=inject,
        fold=fold,
    )
)
