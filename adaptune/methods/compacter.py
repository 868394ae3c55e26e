"""Compacter: adapters made of parameterised hypercomplex multiplication (PHM) layers (Mahabadi et al., NeurIPS 2021,
https://arxiv.org/abs/2106.04647), as in VL-Adapter (Sung et al., CVPR 2022, https://arxiv.org/abs/2112.06825;
reference code ylsung/VL_adapter ``src/adapters/hypercomplex/``).

A PHM layer ``in -> out`` with n | in and n | out:

    H = Σ_{i<n} A_i ⊗ B_i ∈ R^{in×out},   A_i ∈ R^{n×n} (the "slow" rule),   B_i ∈ R^{(in/n)×(out/n)}
    y = x H + b
    factorized (Compacter's low-rank "fast" weights):  B_i = s_i t_i,  s_i ∈ R^{(in/n)×k},  t_i ∈ R^{k×(out/n)}
    shared rule: the A_i are one (n, n, n) parameter for every PHM layer of the model (``adaptune_shared.phm_rule``)

The adapter (VL-Adapter §3.1, no adapter LayerNorms): ``A(z) = PHM_up(σ(PHM_down(z)))``, ``d -> d/ρ -> d``, σ =
``gelu_tanh`` (HF's ``gelu_new``), placed by `adaptune.methods.adapter` (``style``); the default ``houlsby`` is
VL-Adapter's placement, one adapter on each sub-layer's output before its residual add:

    y = Attn(LN1 x);  h = x + y + A_attn(y);  z = MLP(LN2 h);  out = h + z + A_mlp(z)

Parameters per PHM layer: ``k·(in + out) + out`` (factorized) or ``in·out/n + out``, plus ``n³`` once (shared) or per
layer. ViT-B/16 defaults (ρ = 8, n = 4, k = 1, 24 adapters): 24 · (960 + 1,632) + 64 = 62,272.

Init (kept from the reference; PHM layers are not ``nn.Linear``, so VL-BART's N(0, 0.02) re-init never reached
them, spec §12): s, t (or B) Xavier-uniform with gain √2 per i; A ~ N(0, ``phm_init_range``²); b = 0. So the
untrained adapter is not the identity (tiny but non-zero output). Not foldable (non-linear bottleneck).

Deviations from the reference: defaults are the CLI's Compacter (n = 4, shared rule, factorized, k = 1), not the
released VL-Adapter scripts' "hdiv2+noshare+nofac" (n = 2, per-layer rule, full B): set ``phm_dim: 2,
shared_rule: false, factorized: false`` for those. VL-Adapter also trains every LayerNorm of the language model
(``--unfreeze_layer_norms``); here the backbone stays frozen. The shared rule is one tensor for the whole model
(VL-BART keeps one per encoder/decoder stack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

import adaptune.methods.adapter as adapter
from adaptune.config import opt
from adaptune.errors import TargetError
from adaptune.methods.adapter_blocks import resolve_targets
from adaptune.methods.common import SharedRef, share
from adaptune.methods.registry import MethodSpec, register

SHARED_NAME = "phm_rule"


@dataclass(frozen=True)
class CompacterConfig:
    """Options of ``method: {name: compacter}``. Defaults: VL-Adapter's Compacter CLI defaults (spec §3.4)."""

    style: adapter.Style = opt(
        "houlsby",
        "placement (as `adapter`): `houlsby` (after attention and after the MLP, VL-Adapter), `pfeiffer`, "
        "`adaptformer`, `post`, `parallel`",
    )
    reduction_factor: int = opt(8, "ρ: the bottleneck is channels/ρ (VL-Adapter --reduction_factor)", ge=1)
    phm_dim: int = opt(4, "n: number of Kronecker terms; channels and bottleneck must be divisible by n", ge=1)
    phm_rank: int = opt(1, "k: rank of the factorized fast weights s_i t_i", ge=1)
    factorized: bool = opt(True, "B_i = s_i t_i (low-rank Compacter); false: full B_i (PHM adapter)")
    shared_rule: bool = opt(True, "one (n, n, n) rule A for every PHM layer of the model; false: one per layer")
    phm_init_range: float = opt(0.01, "std of the normal init of the rule A", gt=0.0)
    activation: Literal["gelu_tanh", "gelu", "relu", "silu", "quick_gelu"] = opt(
        "gelu_tanh", "activation between the PHM layers (`gelu_tanh` = HF's gelu_new, the reference)"
    )
    targets: tuple[str, ...] = opt(
        ("auto",), "`auto`: the model's repeated residual blocks; or globs over module paths, e.g. `blocks.*`"
    )

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: empty; use ['auto'] or list module globs, e.g. ['blocks.*']")
        if "auto" in self.targets and len(self.targets) > 1:
            raise ValueError(f"targets: 'auto' cannot be combined with globs, got {list(self.targets)}; use one")


# ----------------------------------------------------------------------------------------------------------------
# pure math


def phm_weight(rule: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
    """``H = Σ_i A_i ⊗ B_i``.

    Args:
        rule: A, ``(n, n, n)``.
        fast: B, ``(n, in/n, out/n)``.

    Returns:
        ``(in, out)``: ``H[a·p + c, b·q + d] = Σ_i A[i, a, b] · B[i, c, d]`` with p = in/n, q = out/n.
    """
    _, p, q = fast.shape
    return torch.einsum("iab,icd->acbd", rule, fast).reshape(rule.shape[1] * p, rule.shape[2] * q)


def _xavier_per_term(t: torch.Tensor) -> None:
    """Xavier-uniform with gain √2 on each ``t[i]`` (fans from the last two dims), as the reference's glorot init."""
    fan_in, fan_out = t.shape[-2], t.shape[-1]
    bound = math.sqrt(2.0) * math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(t, -bound, bound)


# ----------------------------------------------------------------------------------------------------------------
# modules


class PHMRule(nn.Module):
    """The "slow" weights A, ``phm_rule`` of shape (n, n, n), init N(0, std²)."""

    def __init__(self, n: int, std: float):
        super().__init__()
        self.phm_rule = nn.Parameter(torch.empty(n, n, n))
        nn.init.normal_(self.phm_rule, std=std)


class PHMLinear(nn.Module):
    """``y = x H + b`` with ``H = Σ_i A_i ⊗ B_i`` (`phm_weight`).

    Args:
        in_features: in (divisible by n).
        out_features: out (divisible by n).
        n: Kronecker terms.
        rank: k, for the factorized B.
        factorized: ``B_i = s_i t_i`` (parameters ``phm_s``, ``phm_t``) instead of a full ``phm_w``.
        rule: The shared `PHMRule`, or None for an own ``phm_rule`` parameter.
        init_range: Std of an own rule's init.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int,
        rank: int = 1,
        factorized: bool = True,
        rule: PHMRule | None = None,
        init_range: float = 0.01,
    ):
        super().__init__()
        self.in_features, self.out_features, self.n = in_features, out_features, n
        p, q = in_features // n, out_features // n
        self.factorized = factorized
        if factorized:
            self.phm_s = nn.Parameter(torch.empty(n, p, rank))
            self.phm_t = nn.Parameter(torch.empty(n, rank, q))
            for i in range(n):
                _xavier_per_term(self.phm_s.data[i])
                _xavier_per_term(self.phm_t.data[i])
        else:
            self.phm_w = nn.Parameter(torch.empty(n, p, q))
            for i in range(n):
                _xavier_per_term(self.phm_w.data[i])
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.shared = SharedRef(rule) if rule is not None else None
        if rule is None:
            self.phm_rule = nn.Parameter(torch.empty(n, n, n))
            nn.init.normal_(self.phm_rule, std=init_range)

    def rule(self) -> torch.Tensor:
        return self.shared().phm_rule if self.shared is not None else self.phm_rule

    def fast(self) -> torch.Tensor:
        """B, ``(n, in/n, out/n)``."""
        return self.phm_s @ self.phm_t if self.factorized else self.phm_w

    def weight(self) -> torch.Tensor:
        """H, ``(in, out)``."""
        return phm_weight(self.rule(), self.fast())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight() + self.bias  # (..., in) -> (..., out)

    def extra_repr(self) -> str:
        shared = ", shared rule" if self.shared is not None else ""
        return f"{self.in_features} -> {self.out_features}, n={self.n}, factorized={self.factorized}{shared}"


class CompacterAdapter(nn.Module):
    """``A(z) = PHM_up(σ(PHM_down(z)))`` over the last dim of ``z`` (channels C -> C/ρ -> C).

    ``down`` and ``up`` are submodules called as modules (the `adapter` placements treat this like a bottleneck).
    """

    def __init__(self, dim: int, cfg: CompacterConfig, rule: PHMRule | None):
        super().__init__()
        from timm.layers import get_act_layer

        hidden = dim // cfg.reduction_factor
        kw: dict[str, Any] = {"rank": cfg.phm_rank, "factorized": cfg.factorized, "init_range": cfg.phm_init_range}
        self.down = PHMLinear(dim, hidden, cfg.phm_dim, rule=rule, **kw)
        self.act = get_act_layer(cfg.activation)()
        self.up = PHMLinear(hidden, dim, cfg.phm_dim, rule=rule, **kw)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(z)))  # (..., C) -> (..., C/ρ) -> (..., C)

    def adapter_param_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.named_parameters())


# ----------------------------------------------------------------------------------------------------------------
# method contract


def _check_dims(dim: int, cfg: CompacterConfig) -> None:
    hidden = dim // cfg.reduction_factor
    if hidden < 1 or dim % cfg.reduction_factor:
        raise TargetError(
            f"method.reduction_factor: {cfg.reduction_factor} does not divide a target's {dim} channels; choose a "
            "divisor (8 for ViT-B's 768)"
        )
    n = cfg.phm_dim
    if dim % n or hidden % n:
        raise TargetError(
            f"method.phm_dim: n = {n} must divide the channels ({dim}) and the bottleneck ({dim} / "
            f"{cfg.reduction_factor} = {hidden}); choose a common divisor (e.g. phm_dim: "
            f"{math.gcd(dim, hidden)}) or another reduction_factor"
        )


def inject(model: nn.Module, cfg: CompacterConfig) -> list[str]:
    """Place a `CompacterAdapter` on every target through `adaptune.methods.adapter.inject` (``cfg.style``).

    Every target's channels are checked first (one dummy forward), so a bad option leaves the model unchanged. The
    shared rule is created once, with the first adapter, and registered as ``adaptune_shared.phm_rule``.

    Returns:
        The wrapped module paths, in model order.

    Raises:
        TargetError: As `adapter.inject`; channel counts that ρ or n do not divide.
    """
    for target in resolve_targets(model, cfg.targets, cfg.style):  # check every target before changing the model
        _check_dims(target.channels, cfg)
    shared: list[PHMRule] = []

    def make(dim: int, cfg: CompacterConfig) -> nn.Module:
        if cfg.shared_rule and not shared:
            ref = next(p for p in model.parameters() if p.is_floating_point())
            rule = PHMRule(cfg.phm_dim, cfg.phm_init_range).to(device=ref.device, dtype=ref.dtype)
            shared.append(share(model, SHARED_NAME, rule).requires_grad_(True))
        return CompacterAdapter(dim, cfg, shared[0] if shared else None).requires_grad_(True)

    return adapter.inject(model, cfg, make_adapter=make)


register(
    MethodSpec(
        name="compacter",
        summary="Compacter: PHM adapters Σ A_i ⊗ (s_i t_i), one shared rule A; Houlsby placement (VL-Adapter)",
        config_cls=CompacterConfig,
        inject=inject,
        identity_at_init=False,
    )
)
