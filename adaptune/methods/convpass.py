"""Convpass: convolutional bypasses on the patch grid of a ViT (Jie & Deng, tech report 2022,
https://arxiv.org/abs/2207.07039; reference code JieShibo/PETL-ViT ``convpass/vtab/convpass.py``).

Beside attention and beside the MLP of every block, reading the same normed input:

    x1  = x  + DP(Attn(LN1 x))  + s · DP(C_attn(LN1 x))
    out = x1 + DP(MLP(LN2 x1)) + s · DP(C_mlp(LN2 x1))          (placement `attn`: only the first)

    C(u):  z = QuickGELU(W_down u + b_down)                                   (B, N, C) -> (B, N, r), Xavier, b = 0
           patches: z[:, P:] as a (B, r, H, W) map -> Conv2d(r, r, 3, padding 1)
           prefix tokens (CLS): each z[:, p] as a 1×1 map through the same conv (only its centre tap and bias act)
           z = Dropout_0.1(QuickGELU([prefix ; patches]))
           C(u) = W_up z + b_up                                               (r -> C), zero init: identity at init

QuickGELU(t) = t · σ(1.702 t). The conv starts as zeros with the identity at the centre tap (``conv_init: identity``)
or Xavier-uniform (``xavier``); its bias is 0. Not foldable (the conv sits between two non-linearities); exports
through ONNX as it is.

Deviations from the reference code:
- The reference monkey-patches timm 0.4.12's ``Block.forward``; here the block is wrapped and its own attention and
  MLP branches come from the backbone-family registry, so LayerScale (when a ViT has it) scales the backbone branch
  only, like the reference's unscaled adapter. ``norm1(x)`` is computed twice (once inside the attention branch),
  the reference does the same.
- The grid and the number of prefix tokens come from the model (``patch_embed.grid_size``, ``num_prefix_tokens``)
  instead of the hard-coded 14 × 14 and one CLS; register/distillation tokens are treated like CLS (1×1 maps).
- ``kernel_size`` is an option (3 in the reference; odd sizes only, so the centre tap exists).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from adaptune.config import opt
from adaptune.errors import TargetError
from adaptune.families import family_of
from adaptune.methods.adapter_blocks import probe_shapes
from adaptune.methods.common import adapter_modules, match_targets, replace_module
from adaptune.methods.registry import MethodSpec, register


@dataclass(frozen=True)
class ConvpassConfig:
    """Options of ``method: {name: convpass}``. Defaults from the reference: r = 8, identity-centre conv, dropout
    0.1, both placements; s = 1 (the reference tunes it per task: 0.01 ... 100)."""

    bottleneck: int = opt(8, "r: channels of the bypass (down: C -> r, conv r -> r, up: r -> C)", ge=1)
    scale: float = opt(1.0, "s: scale of the bypass output (per task in the reference: 0.01 ... 100)")
    placement: Literal["both", "attn"] = opt(
        "both", "`both`: beside attention and beside the MLP (Convpass); `attn`: beside attention only (Convpass-attn)"
    )
    conv_init: Literal["identity", "xavier"] = opt(
        "identity",
        "init of the conv: zeros with the identity at the centre tap, or xavier-uniform (the reference's "
        "per-task `xavier_init`)",
    )
    kernel_size: int = opt(3, "conv kernel size on the patch grid (odd)", ge=1)
    dropout: float = opt(0.1, "dropout before the up projection", ge=0.0, lt=1.0)
    targets: tuple[str, ...] = opt(
        ("auto",), "`auto`: every pre-norm ViT block (timm Block); or globs over module paths, e.g. `blocks.*`"
    )

    def __post_init__(self) -> None:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: {self.kernel_size} is even; use an odd size such as 3")
        if not self.targets:
            raise ValueError("targets: empty; use ['auto'] or list block globs, e.g. ['blocks.*']")
        if "auto" in self.targets and len(self.targets) > 1:
            raise ValueError(f"targets: 'auto' cannot be combined with globs, got {list(self.targets)}; use one")


# ----------------------------------------------------------------------------------------------------------------
# modules


def quick_gelu(t: torch.Tensor) -> torch.Tensor:
    """``t · σ(1.702 t)`` (CLIP's QuickGELU, the reference's activation)."""
    return t * torch.sigmoid(1.702 * t)


class ConvpassAdapter(nn.Module):
    """``C(u)`` of the module docstring, on tokens ``(B, P + H·W, C)`` with P prefix tokens first.

    Args:
        dim: Channels C.
        bottleneck: r.
        grid: ``(H, W)`` of the patch tokens (row-major, as timm's patch embedding flattens them).
        prefix: P, the tokens before the patches (CLS, registers).
        conv_init: ``identity`` or ``xavier``.
        kernel_size: Odd conv kernel size.
        dropout: Dropout before the up projection.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        grid: tuple[int, int],
        prefix: int,
        conv_init: str = "identity",
        kernel_size: int = 3,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.grid = grid
        self.prefix = prefix
        self.down = nn.Linear(dim, bottleneck)
        self.conv = nn.Conv2d(bottleneck, bottleneck, kernel_size, padding=kernel_size // 2)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            if conv_init == "identity":
                nn.init.zeros_(self.conv.weight)
                c = kernel_size // 2
                self.conv.weight[:, :, c, c] = torch.eye(bottleneck)
            elif conv_init == "xavier":
                nn.init.xavier_uniform_(self.conv.weight)
            else:
                raise ValueError(f"method.conv_init: unknown init {conv_init!r}; use identity or xavier")
            nn.init.zeros_(self.conv.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        b, n, _ = u.shape
        (h, w), p = self.grid, self.prefix
        if n != p + h * w:
            raise ValueError(
                f"convpass: {n} tokens do not form {p} prefix tokens + the {h}x{w} patch grid the bypass was built "
                "for; evaluate at the trained size (backbone.img_size)"
            )
        z = quick_gelu(self.down(u))  # (B, N, r)
        patches = z[:, p:].reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, r, H, W)
        patches = self.conv(patches).flatten(2).transpose(1, 2)  # (B, H·W, r)
        c = self.conv.kernel_size[0] // 2
        prefix = F.linear(z[:, :p], self.conv.weight[:, :, c, c], self.conv.bias)  # (B, P, r): a 1×1 map's output
        z = self.dropout(quick_gelu(torch.cat([prefix, patches], dim=1)))  # (B, N, r)
        return self.up(z)  # (B, N, C)

    def adapter_param_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.named_parameters())

    def extra_repr(self) -> str:
        return f"grid={self.grid}, prefix={self.prefix}"


class ConvpassBlock(nn.Module):
    """A pre-norm transformer block with Convpass beside attention (and beside the MLP); the block is ``base``.

    Args:
        base: The wrapped block (a family with tokens and a pre-norm MLP branch, and ``norm1``).
        adapter_attn: The bypass beside attention.
        adapter_mlp: The bypass beside the MLP, or None (placement ``attn``).
        scale: s.
    """

    def __init__(self, base: nn.Module, adapter_attn: nn.Module, adapter_mlp: nn.Module | None, scale: float):
        super().__init__()
        family = family_of(base)
        if family is None or not (family.tokens and family.pre_norm) or not hasattr(base, "norm1"):
            raise TargetError(f"convpass: {type(base).__name__} is not a pre-norm ViT block (timm Block)")
        self.base = base
        self.adapter_attn = adapter_attn
        self.adapter_mlp = adapter_mlp
        self.scale = scale
        self._family = family

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        b, f = self.base, self._family
        dp1 = getattr(b, "drop_path1", nn.Identity())
        x1 = x + f.attn(b, x, args, kwargs) + self.scale * dp1(self.adapter_attn(b.norm1(x)))  # (B, N, C)
        u = f.mlp_norm(b, x1)  # (B, N, C)
        out = x1 + f.mlp_ffn(b, u)
        if self.adapter_mlp is not None:
            out = out + self.scale * getattr(b, "drop_path2", nn.Identity())(self.adapter_mlp(u))
        return out  # (B, N, C)

    def adapter_param_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.named_parameters() if not name.startswith("base."))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


# ----------------------------------------------------------------------------------------------------------------
# method contract


def _is_vit_block(module: nn.Module) -> bool:
    family = family_of(module)
    return family is not None and family.tokens and family.pre_norm and hasattr(module, "norm1")


def _targets(model: nn.Module, cfg: ConvpassConfig) -> list[str]:
    if tuple(cfg.targets) == ("auto",):
        paths = [n for n, m in model.named_modules() if n and _is_vit_block(m)]
        if not paths:
            raise TargetError(
                f"method.targets: convpass needs pre-norm ViT blocks (timm Block) on a patch grid, and "
                f"{type(model).__name__} has none; use a ViT backbone, or another method (adapter, lora) for it"
            )
    else:
        paths = match_targets(model, cfg.targets)
        for p in paths:
            if not _is_vit_block(model.get_submodule(p)):
                raise TargetError(
                    f"method.targets: {p} ({type(model.get_submodule(p)).__name__}) is not a pre-norm ViT block "
                    "(timm Block); convpass wraps whole blocks, e.g. targets: ['blocks.*']"
                )
    owners = [n for n, _ in adapter_modules(model)]
    for p in paths:
        if any(p == o or p.startswith(o + ".") for o in owners):
            raise TargetError(f"method.targets: {p} is already part of an adapter module; inject once")
    return paths


def _grid(model: nn.Module) -> tuple[tuple[int, int], int]:
    embed = getattr(model, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if grid is None:
        raise TargetError(
            f"method.targets: convpass needs a patch grid (timm `patch_embed.grid_size`), which "
            f"{type(model).__name__} does not have; use a ViT backbone"
        )
    return (int(grid[0]), int(grid[1])), int(getattr(model, "num_prefix_tokens", 0))


def inject(model: nn.Module, cfg: ConvpassConfig) -> list[str]:
    """Wrap each target block in a `ConvpassBlock`.

    Returns:
        The wrapped block paths, in model order.

    Raises:
        TargetError: No ViT block, a target that is not one, no patch grid, token counts that do not fit the grid.
    """
    paths = _targets(model, cfg)
    grid, prefix = _grid(model)
    shapes = probe_shapes(model, paths)
    for path in paths:
        shape = shapes[path][1]
        if len(shape) != 3 or shape[1] != prefix + grid[0] * grid[1]:
            raise TargetError(
                f"method.targets: {path} outputs {tuple(shape)}, not {prefix} prefix tokens + a {grid[0]}x{grid[1]} "
                "patch grid; convpass needs the tokens of a plain ViT (no pooling or token pruning in the blocks)"
            )
        base = model.get_submodule(path)
        ref = next(p for p in base.parameters() if p.is_floating_point())
        adapters = [
            ConvpassAdapter(shape[2], cfg.bottleneck, grid, prefix, cfg.conv_init, cfg.kernel_size, cfg.dropout)
            .to(device=ref.device, dtype=ref.dtype)
            .train(base.training)
            .requires_grad_(True)
            for _ in range(2 if cfg.placement == "both" else 1)
        ]
        wrapper = ConvpassBlock(base, adapters[0], adapters[1] if len(adapters) > 1 else None, cfg.scale)
        wrapper.training = base.training
        replace_module(model, path, wrapper)
    return paths


register(
    MethodSpec(
        name="convpass",
        summary="Convpass: 3x3-conv bypasses on the patch grid beside attention and MLP (QuickGELU, zero up); ViT",
        config_cls=ConvpassConfig,
        inject=inject,
        identity_at_init=True,
        reported_vtab1k=(76.56, "Convpass README (JieShibo/PETL-ViT), seed 42, mean of the 3 group means"),
    )
)
