"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119), shallow and deep.

Learned prompt tokens join the token sequence right after the prefix tokens (CLS, registers), with no positional
embedding; the frozen transformer attends to them like any other token.

```
E = pos_drop(patch_embed(img) + pos_embed)                        (B, P + L, D)   P prefix tokens, L patches
shallow:  Z_0 = [E_prefix, P_0, E_patches]  ->  blocks 0..K-1     (B, P + N + L, D)
deep:     before block i >= 1 the N prompt slots are overwritten:  Z_i = [z_prefix, P_i, z_patches]
head:     prompt slots dropped  ->  norm  ->  timm's own pooling (CLS token, avg, attention pool)  ->  head
P_i ∈ R^{N×D}, init U(-v, v),  v = sqrt(6 / (C_in · p_h · p_w + D))   (C_in = 3, patch 16, D = 768: v ≈ 0.0625)
prompts pass through Dropout(dropout) every time they are used (training only)
```

Modules: ``blocks.0`` becomes a `PromptedBlock` that inserts ``P_0``; with ``deep`` every later block becomes one that
replaces the prompt slots with its own ``P_i`` (K sets in all). The final ``norm`` becomes a `PromptDrop` that removes
the N prompt tokens before the norm (a per-token LayerNorm, so dropping before it equals dropping after it), so
``forward_head`` (CLS token, ``global_pool='avg'``, ``fc_norm``, attention pooling) sees exactly the tokens it sees
without VPT. Prompts change attention, so the method is not the identity at init, and it cannot be folded: the
merged file keeps the prompts (``form: merged``) and ONNX / ``torch.export`` export the prompted graph.

Deviations from the reference code (KMnP/vpt ``src/models/vit_prompt/vit.py``):
- ``v`` uses the model's input channels (3 for RGB, as the reference hard-codes) and its patch size.
- The reference's optional prompt projection (``PROMPT.PROJECT``, off by default), partial-deep prompting and the
  other pooling choices (``VIT_POOL_TYPE``) are not implemented; pooling is the backbone's own.
- Only timm ``VisionTransformer`` models (``blocks`` as ``nn.Sequential``, ``num_prefix_tokens``, ``norm``); the
  reference also prompts Swin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptune.config import opt, with_defaults
from adaptune.errors import TargetError
from adaptune.methods.common import adapter_modules, replace_module
from adaptune.methods.registry import MethodSpec, register


@dataclass(frozen=True)
class VPTConfig:
    """Options of ``method: {name: vpt}`` (VPT-deep by default).

    Sources: deep prompts and prompt dropout 0.0 (KMnP/vpt ``src/configs/config.py`` defaults), N = 10 (spec
    methods-others §10.5; the paper picks N per task, 1 to 200).
    """

    num_prompts: int = opt(10, "prompt tokens N per prompted layer", ge=1)
    deep: bool = opt(True, "deep: a new prompt set before every block; false (shallow): one set at the input only")
    dropout: float = opt(0.0, "dropout on the prompt tokens each time they are used (training only)", ge=0.0, lt=1.0)


VPTShallowConfig = with_defaults(
    VPTConfig,
    "VPTShallowConfig",
    doc="""Options of ``method: {name: vpt_shallow}``: `VPTConfig` with shallow prompts, N = 100 (spec §10.5).""",
    deep=False,
    num_prompts=100,
)


# ----------------------------------------------------------------------------------------------------------------
# pure math


def prompt_init_bound(in_chans: int, patch_size: tuple[int, int], dim: int) -> float:
    """``v = sqrt(6 / (in_chans · p_h · p_w + dim))``: the reference's Xavier-style bound, taken from the patch
    projection's fan-in (``in_chans · p_h · p_w``) and the token width ``dim`` as fan-out."""
    return math.sqrt(6.0 / float(in_chans * patch_size[0] * patch_size[1] + dim))


def with_prompts(x: torch.Tensor, prompts: torch.Tensor, prefix: int, replace: bool) -> torch.Tensor:
    """Put ``prompts`` after the first ``prefix`` tokens of ``x``.

    Args:
        x: Tokens, ``(B, prefix + L, D)`` to insert into, or ``(B, prefix + N + L, D)`` to replace in.
        prompts: ``(N, D)``.
        prefix: Number of prefix tokens (CLS, registers) that stay first.
        replace: Overwrite the N tokens after the prefix instead of inserting.

    Returns:
        ``(B, prefix + N + L, D)``.
    """
    n = prompts.shape[0]
    p = prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, N, D)
    rest = x[:, prefix + n :] if replace else x[:, prefix:]  # (B, L, D)
    return torch.cat([x[:, :prefix], p, rest], dim=1)


def without_prompts(x: torch.Tensor, prefix: int, num_prompts: int) -> torch.Tensor:
    """``(B, prefix + N + L, D) -> (B, prefix + L, D)``: drop the N prompt tokens after the prefix."""
    return torch.cat([x[:, :prefix], x[:, prefix + num_prompts :]], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# modules


class PromptedBlock(nn.Module):
    """A transformer block whose input gets prompt tokens: inserted (the first block) or replaced (deep, later).

    Args:
        base: The frozen timm block.
        prompts: Initial prompts, ``(N, D)``; become the parameter ``prompts``.
        prefix: The model's ``num_prefix_tokens``.
        replace: Overwrite the prompt slots the first block created instead of inserting new ones.
        dropout: Dropout on the prompts.
    """

    def __init__(self, base: nn.Module, prompts: torch.Tensor, prefix: int, replace: bool, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.prompts = nn.Parameter(prompts)
        self.prefix = prefix
        self.replace = replace
        self.prompt_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise ValueError("vpt: attention masks are not supported; the prompts change the sequence length")
        x = with_prompts(x, self.prompt_dropout(self.prompts), self.prefix, self.replace)  # (B, P + N + L, D)
        return self.base(x, *args, **kwargs)  # (B, P + N + L, D)

    def adapter_param_names(self) -> tuple[str, ...]:
        return ("prompts",)

    def extra_repr(self) -> str:
        n, d = self.prompts.shape
        return f"prompts=({n}, {d}), prefix={self.prefix}, replace={self.replace}"


class PromptDrop(nn.Module):
    """The final norm, applied after the prompt tokens are removed, so the head pools exactly as without VPT.

    Args:
        base: The model's ``norm`` (LayerNorm, or Identity for models that norm after pooling).
        prefix: The model's ``num_prefix_tokens``.
        num_prompts: N.
    """

    def __init__(self, base: nn.Module, prefix: int, num_prompts: int):
        super().__init__()
        self.base = base
        self.prefix = prefix
        self.num_prompts = num_prompts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(without_prompts(x, self.prefix, self.num_prompts))  # (B, P + L, D)

    def adapter_param_names(self) -> tuple[str, ...]:
        return ()

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}, num_prompts={self.num_prompts}"


# ----------------------------------------------------------------------------------------------------------------
# method contract


def _check_backbone(model: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer) or not isinstance(getattr(model, "blocks", None), nn.Sequential):
        raise TargetError(
            f"method.name: vpt prompts timm VisionTransformer models (blocks, num_prefix_tokens, norm); "
            f"{type(model).__name__} is not one: use a ViT/DeiT backbone, or a method such as lora or adapter"
        )
    if any(True for _ in adapter_modules(model)):
        raise TargetError("method.name: vpt: the model already carries adapter modules; inject once")


def inject(model: nn.Module, cfg: VPTConfig) -> list[str]:
    """Wrap ``blocks.0`` (and with ``deep`` every later block) in a `PromptedBlock`, and ``norm`` in `PromptDrop`.

    Prompts take the patch embedding's device and dtype and are drawn from the global RNG, U(-v, v) (module
    docstring).

    Returns:
        The wrapped module paths: the prompted blocks, then ``norm``.

    Raises:
        TargetError: The model is not a timm VisionTransformer, or already carries adapters.
    """
    _check_backbone(model)
    proj = model.patch_embed.proj
    patch = tuple(proj.kernel_size) if isinstance(proj, nn.Conv2d) else tuple(model.patch_embed.patch_size)
    in_chans = proj.in_channels if isinstance(proj, nn.Conv2d) else 3
    dim = model.embed_dim
    bound = prompt_init_bound(in_chans, patch, dim)  # type: ignore[arg-type]
    ref = model.pos_embed if model.pos_embed is not None else proj.weight
    prefix = model.num_prefix_tokens
    depth = len(model.blocks) if cfg.deep else 1
    touched = []
    for i in range(depth):
        prompts = torch.empty(cfg.num_prompts, dim, device=ref.device, dtype=ref.dtype)
        nn.init.uniform_(prompts, -bound, bound)
        base = model.blocks[i]
        block = PromptedBlock(base, prompts, prefix, replace=i > 0, dropout=cfg.dropout)
        block.training = base.training
        model.blocks[i] = block
        touched.append(f"blocks.{i}")
    drop = PromptDrop(model.norm, prefix, cfg.num_prompts)
    drop.training = model.norm.training
    replace_module(model, "norm", drop)
    return [*touched, "norm"]


register(
    MethodSpec(
        name="vpt",
        reported_vtab1k=(71.97, "V-PETL Bench / NOAH Table 1, VPT-deep (per-task N)"),
        summary="VPT: learned prompt tokens after CLS, deep (every layer) by default; not foldable",
        config_cls=VPTConfig,
        inject=inject,
        identity_at_init=False,
    )
)

register(
    MethodSpec(
        name="vpt_shallow",
        reported_vtab1k=(67.82, "V-PETL Bench, VPT-shallow (per-task N)"),
        summary="VPT-shallow: learned prompt tokens after CLS at the input only; not foldable",
        config_cls=VPTShallowConfig,
        inject=inject,
        identity_at_init=False,
    )
)
