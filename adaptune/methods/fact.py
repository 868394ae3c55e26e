"""FacT: Factor-Tuning, every weight update of the ViT as one factorised tensor (Jie & Deng, AAAI 2023,
https://arxiv.org/abs/2212.03145; reference code JieShibo/PETL-ViT ``FacT/``).

Two factors are shared by the whole model (stored once, ``adaptune_shared.fact``): ``U: d -> r`` (kaiming-uniform, as
``nn.Linear``) and ``V: r -> d`` (zero, so the untrained model is the backbone). A wrapped Linear whose input is ``a``
slices of width d and whose output is ``b`` slices of width d gets ``a·b`` cores ``Σ_ij`` (r × r) and

    y_i = base(x)_i + s · V( Dropout_0.1( Σ_j Σ_ij U x_j ) )        i < b (output slices), j < a (input slices)

On a timm ViT-B (d = 768): ``attn.qkv`` has a = 1, b = 3 (cores q, k, v added to the fused output's slices),
``attn.proj`` a = b = 1 (core o, on the attention output before proj), ``mlp.fc1`` a = 1, b = 4 (the 3072 outputs as
4 slices of 768) and ``mlp.fc2`` a = 4, b = 1 (the 3072 inputs as 4 slices, each through U, cores summed): 12 cores
per block, the spec's (methods-others §7.7) ``Σ_q, Σ_k, Σ_v, Σ_o, Σ_fc1 (r -> 4r), Σ_fc2 (4r -> r)``.

    fact_tt  (tensor-train): each block owns its cores.   params 2·d·r + 12·L·r²        (r = 8: 21,504 on ViT-B)
    fact_tk  (Tucker):       Σ_m = Σ_k C[:, :, k] · P[k, m] for the m-th of the model's 12·L cores, with C (r×r×r)
                             and P (r × 12·L) shared, Xavier-uniform.  params 2·d·r + r³ + 12·L·r  (r = 32: 86,528)

Because the update is linear, `fold` adds ``ΔW[i·d:(i+1)·d, j·d:(j+1)·d] = s · V Σ_ij U`` into each weight (dropout is
off at inference) and the result has exactly timm's keys.

Deviations from the reference code:
- The reference monkey-patches ``Attention.forward`` / ``Mlp.forward`` of timm 0.4.12 and is ViT-B specific (768,
  144 cores); here the four Linear layers are wrapped, so any timm attention/MLP with these module names works, and
  widths and slice counts come from the layers (``test_vit``'s MLP ratio 3 gives 3 fc1/fc2 slices).
- FacT-TK, fc1/fc2: the reference reshapes the (r, r, 4) Tucker cores of fc1 to (r, 4r) (and fc2's to (r, 4r)ᵀ),
  which interleaves the four Tucker slots across the output slices. Here slice i uses exactly Tucker core m (the
  spec's definition, §7.7): same parameters and counts, another (equally expressive per slot) arrangement.
- Cores act as ``Σ u`` (an ``nn.Linear`` weight); the reference's TK cores act as ``u Σ`` (the transpose). Both are
  learned from random inits, so only the naming of C's first two modes differs.
- TT core init: uniform(±1/√(a·r)), which is the reference's ``nn.Linear`` default init (fan-in r, 4r for fc2).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from adaptune.config import opt, with_defaults
from adaptune.errors import TargetError
from adaptune.methods.common import SHARED_ATTR, SharedRef, adapter_modules, match_targets, replace_module, share
from adaptune.methods.registry import MethodSpec, register

SHARED_NAME = "fact"
VIT_TARGETS = ("*.attn.qkv", "*.attn.proj", "*.mlp.fc1", "*.mlp.fc2")


@dataclass(frozen=True)
class FacTConfig:
    """Options of ``method: {name: fact_tt}``. Defaults: the reference's CIFAR-100 config (r = 8, s = 1)."""

    rank: int = opt(8, "r: width of the shared factors U (d -> r), V (r -> d) and of each core", ge=1)
    scale: float = opt(1.0, "s: scale of every update (the reference tunes it per task: 0.01 ... 100)")
    dropout: float = opt(0.1, "dropout on the r-dim code after each core (training only)", ge=0.0, lt=1.0)
    targets: tuple[str, ...] = opt(
        VIT_TARGETS,
        "globs over Linear layers whose input and output widths are multiples of the model width d (one of them "
        "equal to d); default: q/k/v (fused qkv slices), proj, fc1, fc2 of every ViT block",
    )
    exclude: tuple[str, ...] = opt((), "globs of module paths to leave out even if a target glob matches them")

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: empty; list at least one Linear glob, e.g. ['*.attn.qkv']")


FacTTKConfig = with_defaults(
    FacTConfig,
    "FacTTKConfig",
    doc="""Options of ``method: {name: fact_tk}``: `FacTConfig`'s fields; r = 32 (the reference's largest TK rank,
    used on 12 of the 19 VTAB-1k tasks; its CIFAR-100 config is r = 32, s = 0.1).""",
    rank=32,
)


# ----------------------------------------------------------------------------------------------------------------
# pure math


def fact_delta(u: torch.Tensor, v: torch.Tensor, cores: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense update of one wrapped Linear weight.

    Args:
        u: U, ``(r, d)`` (``fact_u.weight``).
        v: V, ``(d, r)`` (``fact_v.weight``).
        cores: ``(b, a, r, r)``: core ``Σ_ij`` maps input slice j's code to output slice i's.
        scale: s.

    Returns:
        ``(b·d, a·d)``; block ``(i, j)`` is ``s · V Σ_ij U``.
    """
    b, a = cores.shape[:2]
    d = u.shape[1]
    blocks = torch.einsum("pr,ijrs,sq->ipjq", v, cores, u)  # (b, d, a, d)
    return scale * blocks.reshape(b * d, a * d)


def tucker_cores(core: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """FacT-TK cores ``Σ_m = Σ_k C[:, :, k] · P[k, m]``.

    Args:
        core: C, ``(r, r, r)``.
        slots: The columns of P for the wanted cores, ``(r, n)``.

    Returns:
        ``(n, r, r)``.
    """
    r = core.shape[0]
    return (core.reshape(r * r, r) @ slots).t().reshape(-1, r, r)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """A detached fp32 (or fp64) copy: merge math never runs in half precision."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


# ----------------------------------------------------------------------------------------------------------------
# modules


class FacTFactors(nn.Module):
    """The model-wide factors: ``fact_u`` (d -> r), ``fact_v`` (r -> d, zero) and for TK ``fact_c``, ``fact_p``.

    Args:
        dim: d.
        rank: r.
        num_cores: For TK, the number of cores in the model (columns of P); 0 for TT.
    """

    def __init__(self, dim: int, rank: int, num_cores: int = 0):
        super().__init__()
        self.fact_u = nn.Linear(dim, rank, bias=False)  # default init: kaiming-uniform(a=√5), as the reference
        self.fact_v = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.fact_v.weight)
        self.tucker = num_cores > 0
        if self.tucker:
            self.fact_c = nn.Parameter(torch.empty(rank, rank, rank))
            self.fact_p = nn.Parameter(torch.empty(rank, num_cores))
            nn.init.xavier_uniform_(self.fact_c)
            nn.init.xavier_uniform_(self.fact_p)


class FacTLinear(nn.Module):
    """``y = base(x) + s · V(Dropout(Σ U x))`` per output slice (module docstring).

    Args:
        base: The frozen Linear; ``in = a·d``, ``out = b·d``.
        factors: The shared `FacTFactors` (held by reference, stored once at the model's root).
        scale: s.
        dropout: Dropout on the code.
        first_core: For TK, the index of this layer's first core among P's columns; None for TT (own cores).
    """

    def __init__(
        self, base: nn.Linear, factors: FacTFactors, scale: float, dropout: float, first_core: int | None = None
    ):
        super().__init__()
        self.base = base
        self.factors = SharedRef(factors)
        self.dim = factors.fact_u.in_features
        self.rank = factors.fact_u.out_features
        self.a = base.in_features // self.dim
        self.b = base.out_features // self.dim
        self.scale = scale
        self.first_core = first_core
        self.fact_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if first_core is None:
            w = base.weight
            self.fact_cores = nn.Parameter(torch.empty(self.b, self.a, self.rank, self.rank, device=w.device))
            bound = 1.0 / math.sqrt(self.a * self.rank)  # nn.Linear's default for a core with fan-in a·r
            nn.init.uniform_(self.fact_cores, -bound, bound)

    def cores(self) -> torch.Tensor:
        """This layer's cores ``(b, a, r, r)``: its own (TT) or its columns of the shared Tucker product (TK)."""
        if self.first_core is None:
            return self.fact_cores
        f = self.factors()
        n = self.a * self.b
        slots = f.fact_p[:, self.first_core : self.first_core + n]  # (r, a·b)
        return tucker_cores(f.fact_c, slots).reshape(self.b, self.a, self.rank, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factors()
        y = self.base(x)  # (..., b·d)
        u = f.fact_u(x.unflatten(-1, (self.a, self.dim)))  # (..., a, r)
        mix = self.cores().permute(1, 3, 0, 2).reshape(self.a * self.rank, self.b * self.rank)  # (a·r, b·r)
        code = (u.flatten(-2) @ mix).unflatten(-1, (self.b, self.rank))  # (..., b, r)
        delta = f.fact_v(self.fact_dropout(code))  # (..., b, d)
        return y + self.scale * delta.flatten(-2)  # (..., b·d)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in fp32 (fp64 for an fp64 base), ``(out, in)``."""
        f = self.factors()
        return fact_delta(_wide(f.fact_u.weight), _wide(f.fact_v.weight), _wide(self.cores()), self.scale)

    def adapter_param_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.named_parameters() if not n.startswith("base."))

    def extra_repr(self) -> str:
        kind = "tt" if self.first_core is None else f"tk, cores {self.first_core}..{self.first_core + self.a * self.b}"
        return f"slices in={self.a} out={self.b}, rank={self.rank}, scale={self.scale}, {kind}"


# ----------------------------------------------------------------------------------------------------------------
# method contract


def _targets(model: nn.Module, cfg: FacTConfig) -> tuple[list[str], int]:
    """The Linear layers to wrap and the shared width d (the first target's input width).

    Raises:
        TargetError: A glob matches nothing, only the head, or a layer whose widths are not multiples of d.
    """
    from adaptune.backbone import head_path

    paths = match_targets(model, cfg.targets, kinds=(nn.Linear,))
    if cfg.exclude:
        match_targets(model, cfg.exclude)  # an exclude glob that matches nothing is a typo
    head = head_path(model)
    owned = [n for n, _ in adapter_modules(model)]
    paths = [
        p
        for p in paths
        if not (head and (p == head or p.startswith(head + ".")))
        and not any(p == o or p.startswith(o + ".") for o in owned)
        and not any(fnmatch.fnmatchcase(p, g) for g in cfg.exclude)
    ]
    if not paths:
        raise TargetError(
            f"method.targets: {list(cfg.targets)} leaves no backbone Linear to adapt (the head, adapted or excluded "
            "layers are skipped); target e.g. ['*.attn.qkv', '*.mlp.fc1']"
        )
    dim = model.get_submodule(paths[0]).in_features
    for p in paths:
        m = model.get_submodule(p)
        if m.in_features % dim or m.out_features % dim or dim not in (m.in_features, m.out_features):
            raise TargetError(
                f"method.targets: {p} maps {m.in_features} -> {m.out_features}, but FacT shares one U, V of width "
                f"{dim} (the input width of {paths[0]}) across all layers: each target needs one side equal to {dim} "
                "and the other a multiple of it; narrow method.targets (e.g. to one stage of a hierarchical model)"
            )
    return paths, dim


def inject(model: nn.Module, cfg: FacTConfig, variant: str = "tt") -> list[str]:
    """Create the shared factors and wrap every target Linear in a `FacTLinear`.

    Args:
        model: An unmodified, frozen timm model.
        cfg: `FacTConfig` (``fact_tt``) or `FacTTKConfig` (``fact_tk``).
        variant: ``tt`` (per-layer cores) or ``tk`` (cores from the shared Tucker product).

    Returns:
        The wrapped module paths, in model order.
    """
    paths, dim = _targets(model, cfg)
    modules = {p: model.get_submodule(p) for p in paths}
    counts = [(modules[p].in_features // dim) * (modules[p].out_features // dim) for p in paths]
    ref = modules[paths[0]].weight
    factors = FacTFactors(dim, cfg.rank, sum(counts) if variant == "tk" else 0).to(device=ref.device, dtype=ref.dtype)
    share(model, SHARED_NAME, factors).requires_grad_(True)
    first = 0
    for path, n in zip(paths, counts, strict=True):
        wrapper = FacTLinear(
            modules[path], factors, cfg.scale, cfg.dropout, first_core=first if variant == "tk" else None
        ).to(dtype=ref.dtype)
        wrapper.training = modules[path].training
        first += n
        for name, p in wrapper.named_parameters():
            if not name.startswith("base."):
                p.requires_grad_(True)
        replace_module(model, path, wrapper)
    return paths


def unshare(model: nn.Module, name: str) -> None:
    """Remove shared module ``name``; drop the container too once it is empty (so only timm's keys remain)."""
    container = getattr(model, SHARED_ATTR, None)
    if container is None or name not in container:
        return
    del container[name]
    if len(container) == 0:
        delattr(model, SHARED_ATTR)


def fold(model: nn.Module) -> None:
    """Add every wrapper's ``ΔW`` into a copy of its base weight, put the plain Linear back, drop the shared factors.

    Afterwards ``model.state_dict()`` has exactly timm's keys. ΔW is computed in fp32 and cast once.
    """
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, FacTLinear)]
    for path, wrapper in wrappers:
        base = wrapper.base
        weight = _wide(base.weight) + wrapper.delta_weight()
        base.weight = nn.Parameter(weight.to(base.weight.dtype), requires_grad=base.weight.requires_grad)
        replace_module(model, path, base)
    unshare(model, SHARED_NAME)


register(
    MethodSpec(
        name="fact_tt",
        summary="FacT-TT: ΔW of qkv/proj/fc1/fc2 as s·V Σ U, U and V shared by all layers, per-layer cores; foldable",
        config_cls=FacTConfig,
        inject=partial(inject, variant="tt"),
        fold=fold,
        identity_at_init=True,
        merge_atol=1e-5,
    )
)

register(
    MethodSpec(
        name="fact_tk",
        summary="FacT-TK: FacT with every core from one shared Tucker product C ×₃ P; foldable",
        config_cls=FacTTKConfig,
        inject=partial(inject, variant="tk"),
        fold=fold,
        identity_at_init=True,
        merge_atol=1e-5,
        reported_vtab1k=(75.55, "V-PETL Bench 'FacT' row (variant not stated; its 0.07 M fits FacT-TK r <= 32)"),
    )
)
