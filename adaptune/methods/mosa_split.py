"""The MoSA split primitive: one dense weight, a fixed owner map, one expert drawn per forward call.

A split projection keeps one dense tensor ``W`` (the shape of the projection it replaces) and a fixed ``owner`` map
(a uint8 buffer of the same shape) that assigns every element of ``W`` to exactly one of N experts, drawn as a uniformly
random permutation of the elements cut into N near-equal contiguous chunks (the reference's ``kthvalue`` thresholds
over ``rand_like`` scores, ``methods-core.md`` §2.4). With ``M_k = (owner == k)``:

    train, expert k drawn:   y = W ⊙ M_k · x + b_k            (F.linear / F.conv2d with the masked weight)
    eval and consolidation:  y = (W / N) · x + mean_k b_k     = E_k[train output], k ~ U{0..N-1}

The gradient of ``W ⊙ M_k`` w.r.t. ``W`` is the output gradient masked to ``M_k``, so only expert k's elements
learn, with no hooks, no gradient masks and no unused parameters (DDP needs no unused-parameter search). Biases: by
default (the reference's ``BIAS=True``) every expert owns a full private bias row, stored as one ``(N, out)``
parameter whose rows start equal to the original bias; with ``split_bias`` the bias is one ``(out,)`` vector
partitioned by its own owner map like ``W``.

Draws come from an `ExpertSampler` child module: a dedicated CPU ``torch.Generator`` per split module, seeded from the
method's seed plus a per-module offset, so every process draws the same experts and no device sync is needed. Its state
is the module's extra state (a uint8 tensor), so it lives in ``state_dict`` and survives save/resume in safetensors.
`mosa_groups` switches every sampler to draw G experts per call for a batch of G stacked copies, so MoSA's two
stochastic passes cost one forward of a doubled batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from adaptune.errors import TargetError
from adaptune.methods.common import replace_module

MAX_EXPERTS = 255  # owner maps are uint8

# ----------------------------------------------------------------------------------------------------------------
# pure math


def partition(shape: torch.Size | tuple[int, ...], num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """Owner map of a random element-wise partition into ``num_experts`` near-equal parts.

    A uniformly random permutation of the ``n`` elements is cut into chunks ``[⌊i·n/N⌋, ⌊(i+1)·n/N⌋)``: exactly
    the chunks the reference cuts with ``kthvalue`` over uniform scores. Chunk sizes differ by at most one.

    Args:
        shape: Shape of the tensor to split.
        num_experts: N, at most 255.
        generator: CPU generator for the permutation.

    Returns:
        uint8 tensor of ``shape`` (CPU) with values in ``[0, N)``.
    """
    n = int(torch.Size(shape).numel())
    cpu = torch.device("cpu")  # owner maps are made on the CPU, also while a model is built on the meta device
    bounds = torch.tensor([i * n // num_experts for i in range(num_experts + 1)], device=cpu)
    by_rank = torch.repeat_interleave(torch.arange(num_experts, dtype=torch.uint8, device=cpu), bounds.diff())  # (n,)
    owner = torch.empty(n, dtype=torch.uint8, device=cpu)
    owner[torch.randperm(n, generator=generator, device=cpu)] = by_rank
    return owner.view(shape)


def expert_weight(weight: torch.Tensor, owner: torch.Tensor, k: int) -> torch.Tensor:
    """Expert k's sparse weight ``W ⊙ M_k``, same shape as ``weight``."""
    return weight * (owner == k)


def expert_bias(bias: torch.Tensor | None, bias_owner: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """Expert k's bias: row k of ``(N, out)`` private biases, or ``b ⊙ M_k`` for a split ``(out,)`` bias."""
    if bias is None:
        return None
    return bias[k] if bias_owner is None else bias * (bias_owner == k)


def merged_weight(weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``E_k[W ⊙ M_k] = W / N``: the M_k partition W, so their sum is W (spec §2.8, ``MERGE="add"``)."""
    return weight / num_experts


def merged_bias(bias: torch.Tensor | None, bias_owner: torch.Tensor | None, num_experts: int) -> torch.Tensor | None:
    """``E_k[b_k]``: the mean of the ``(N, out)`` rows, or ``b / N`` for a split ``(out,)`` bias."""
    if bias is None:
        return None
    return bias.mean(0) if bias_owner is None else bias / num_experts


# ----------------------------------------------------------------------------------------------------------------
# modules


class ExpertSampler(nn.Module):
    """Uniform expert draws for one split module, from its own generator.

    Args:
        num_experts: N.
        seed: Seed of the dedicated CPU generator (the method's seed plus this module's offset).

    Attributes:
        groups: Experts drawn per call: 1 normally, G inside `mosa_groups` (one per stacked copy of the batch).
        last_draw: The experts drawn by the latest call, one per group.
    """

    def __init__(self, num_experts: int, seed: int):
        super().__init__()
        self.num_experts = num_experts
        self.groups = 1
        self.last_draw: list[int] = []
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def draw(self) -> list[int]:
        """One uniform expert index per group. G draws in one call equal G successive single-draw calls."""
        draws = [
            torch.randint(self.num_experts, (1,), generator=self.generator, device="cpu") for _ in range(self.groups)
        ]
        self.last_draw = [int(k) for k in draws]
        return self.last_draw

    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()  # uint8, so safetensors checkpoints can hold it

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state.detach().to("cpu", torch.uint8).contiguous())

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, groups={self.groups}"


def _init_split(
    module: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_experts: int,
    generator: torch.Generator,
    split_bias: bool,
    draw_seed: int | None,
) -> None:
    """Shared set-up of `SplitLinear` and `SplitConv2d`: parameters, owner maps and sampler."""
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")
    module.num_experts = num_experts
    module.weight = nn.Parameter(weight.detach().clone())
    module.register_buffer("owner", partition(weight.shape, num_experts, generator).to(weight.device))
    module.register_parameter("bias", None)
    module.register_buffer("bias_owner", None)
    if bias is not None and split_bias:
        module.bias = nn.Parameter(bias.detach().clone())
        module.bias_owner = partition(bias.shape, num_experts, generator).to(bias.device)
    elif bias is not None:
        module.bias = nn.Parameter(bias.detach().clone().expand(num_experts, -1).contiguous())  # (N, out)
    if draw_seed is None:
        draw_seed = int(torch.randint(2**62, (1,), generator=generator, device="cpu"))
    module.sampler = ExpertSampler(num_experts, draw_seed)


def _group_biases(module: SplitLinear | SplitConv2d, ks: list[int]) -> list[torch.Tensor | None]:
    return [expert_bias(module.bias, module.bias_owner, k) for k in ks]


class SplitLinear(nn.Module):
    """A Linear split into N element-disjoint experts; one drawn per training forward, their mean in eval.

    Build it with `SplitLinear.from_linear`; `merged` gives the consolidated ``nn.Linear``.

    Args:
        weight: Initial ``W``, ``(out, in)``; copied.
        bias: Initial bias ``(out,)`` or None; copied (into every expert row unless ``split_bias``).
        num_experts: N.
        generator: CPU generator for the owner maps (and the draw seed when ``draw_seed`` is None).
        split_bias: Partition the bias like ``W`` instead of giving each expert a private bias row.
        draw_seed: Seed of this module's expert draws.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        num_experts: int,
        generator: torch.Generator,
        split_bias: bool = False,
        draw_seed: int | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        _init_split(self, weight, bias, num_experts, generator, split_bias, draw_seed)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        num_experts: int,
        generator: torch.Generator,
        split_bias: bool = False,
        draw_seed: int | None = None,
    ) -> SplitLinear:
        """Split an existing Linear; all experts start from its values (the reference deep-copies expert 0)."""
        return cls(linear.weight, linear.bias, num_experts, generator, split_bias, draw_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, merged_weight(self.weight, self.num_experts), self.merged_bias())  # (..., out)
        ks = self.sampler.draw()
        if len(ks) == 1:
            w, b = expert_weight(self.weight, self.owner, ks[0]), expert_bias(self.bias, self.bias_owner, ks[0])
            return F.linear(x, w, b)  # (..., out)
        g = len(ks)
        xg = _grouped(x, g).reshape(g, -1, self.in_features)  # (G, B/G · ..., in)
        w = torch.stack([expert_weight(self.weight, self.owner, k) for k in ks]).transpose(1, 2)  # (G, in, out)
        biases = _group_biases(self, ks)
        if biases[0] is None:
            y = torch.bmm(xg, w)
        else:
            y = torch.baddbmm(torch.stack(biases).unsqueeze(1), xg, w)  # (G, B/G · ..., out)
        return y.reshape(*x.shape[:-1], self.out_features)  # (..., out)

    def merged_bias(self) -> torch.Tensor | None:
        return merged_bias(self.bias, self.bias_owner, self.num_experts)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The consolidated ``nn.Linear``: weight ``W / N``, bias ``E_k[b_k]``, same device, dtype and requires_grad."""
        w = self.weight
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype
        )
        linear.weight.copy_(merged_weight(w, self.num_experts))
        if linear.bias is not None:
            linear.bias.copy_(self.merged_bias())
        linear.requires_grad_(w.requires_grad)
        return linear

    def extra_repr(self) -> str:
        split = "split" if self.bias_owner is not None else ("per-expert" if self.bias is not None else "none")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"bias={split}"
        )


class SplitConv2d(nn.Module):
    """A Conv2d split into N element-disjoint experts (MoSA on LoRA's conv factors); see `SplitLinear`.

    Supports ``nn.Conv2d`` with zero padding and timm's ``Conv2dSame``; `merged` rebuilds the same class.

    Args:
        conv: The Conv2d whose weight, bias and geometry are copied.
        num_experts: N.
        generator: CPU generator for the owner maps (and the draw seed when ``draw_seed`` is None).
        split_bias: Partition the bias like the weight instead of private per-expert rows.
        draw_seed: Seed of this module's expert draws.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        num_experts: int,
        generator: torch.Generator,
        split_bias: bool = False,
        draw_seed: int | None = None,
    ):
        super().__init__()
        from timm.layers import Conv2dSame

        self.conv_cls = type(conv)
        self.same = isinstance(conv, Conv2dSame)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.conv_groups = conv.dilation, conv.groups
        _init_split(self, conv.weight, conv.bias, num_experts, generator, split_bias, draw_seed)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.same:
            from timm.layers.conv2d_same import conv2d_same

            return conv2d_same(x, weight, bias, self.stride, self.padding, self.dilation, self.conv_groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.conv_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._conv(x, merged_weight(self.weight, self.num_experts), self.merged_bias())  # (B, out, H', W')
        ks = self.sampler.draw()
        chunks = _grouped(x, len(ks)).chunk(len(ks))  # G × (B/G, in, H, W)
        outs = [
            self._conv(xc, expert_weight(self.weight, self.owner, k), b)
            for xc, k, b in zip(chunks, ks, _group_biases(self, ks), strict=True)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # (B, out, H', W')

    def merged_bias(self) -> torch.Tensor | None:
        return merged_bias(self.bias, self.bias_owner, self.num_experts)

    @torch.no_grad()
    def merged(self) -> nn.Conv2d:
        """The consolidated conv of the original class: weight ``W / N``, bias ``E_k[b_k]``."""
        w = self.weight
        conv = self.conv_cls(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.conv_groups,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        conv.weight.copy_(merged_weight(w, self.num_experts))
        if conv.bias is not None:
            conv.bias.copy_(self.merged_bias())
        conv.requires_grad_(w.requires_grad)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"num_experts={self.num_experts}"
        )


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    if x.shape[0] % groups:
        raise ValueError(f"mosa_groups({groups}): the batch dimension {x.shape[0]} is not a multiple of {groups}")
    return x


SPLIT_TYPES = (SplitLinear, SplitConv2d)


# ----------------------------------------------------------------------------------------------------------------
# model-level helpers


def split_module(
    module: nn.Module, num_experts: int, generator: torch.Generator, split_bias: bool, draw_seed: int, path: str
) -> SplitLinear | SplitConv2d:
    """Split a Linear or Conv2d (plain or timm ``Conv2dSame``).

    Raises:
        TargetError: ``path`` is another kind of module, or a conv with non-zero padding mode.
    """
    from timm.layers import Conv2dSame

    if type(module) is nn.Linear:
        return SplitLinear.from_linear(module, num_experts, generator, split_bias, draw_seed)
    if type(module) in (nn.Conv2d, Conv2dSame) and module.padding_mode == "zeros":
        return SplitConv2d(module, num_experts, generator, split_bias, draw_seed)
    raise TargetError(
        f"method: {path!r} is a {type(module).__name__}; MoSA splits only nn.Linear and zero-padded nn.Conv2d "
        f"projections; pick another `share` so it stays dense, or another target"
    )


def split_modules(model: nn.Module) -> Iterator[tuple[str, SplitLinear | SplitConv2d]]:
    """Every split module of ``model`` (through DDP or compile wrappers too), with its path."""
    for name, module in model.named_modules():
        if isinstance(module, SPLIT_TYPES):
            yield name, module


def consolidate_splits(model: nn.Module) -> list[str]:
    """Replace every split module by its consolidated plain module, in place; returns the paths replaced."""
    paths = [name for name, _ in split_modules(model)]
    for path in paths:
        replace_module(model, path, model.get_submodule(path).merged())
    return paths


@contextmanager
def mosa_groups(model: nn.Module, groups: int) -> Iterator[None]:
    """Inside, each split module treats its input batch as ``groups`` stacked copies and draws one expert per copy.

    ``model(torch.cat([x, x]))`` under ``mosa_groups(model, 2)`` equals ``torch.cat([model(x), model(x)])`` with the
    same draws (dropout aside), at the cost of one forward. The batch must be the outermost dimension of every split
    module's input (true for timm ViT, Swin and CNN tensors).
    """
    samplers = [m for m in model.modules() if isinstance(m, ExpertSampler)]
    before = [s.groups for s in samplers]
    for s in samplers:
        s.groups = groups
    try:
        yield
    finally:
        for s, g in zip(samplers, before, strict=True):
            s.groups = g
