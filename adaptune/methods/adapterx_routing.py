"""Adapter-X's Sharing Mixture of Adapters (SMoA), the pure math: sub-token split, X-MoE router, top-k dispatch by
gather/scatter, the Switch load-balancing term. The block wrappers and the method live in `adaptune.methods.adapterx`.

For a token u ∈ R^C split into H = C / w sub-tokens v ∈ R^w (a reshape, no parameters):

    z = R_l v                          R_l: (d_r, w), block-specific, no bias
    p = softmax(<z, e_j / ||e_j||> / τ  for j = 1..N)      e: (N, d_r), shared by every block
    out(v) = Σ_{j ∈ topk(p)} p_j · A_j(v)                 A_j: (w -> r -> w) expert, shared by every block

The expert pool stores the N experts as stacked tensors ``down.weight (N, w, r)``, ``up.weight (N, r, w)`` (biases
``(N, r)``, ``(N, w)``). `dispatch` groups the (sub-token, expert) assignments by expert and runs each group through
its own expert only: as one padded batched matmul while the groups are balanced enough (`PAD_LIMIT`), else one small
matmul chain per expert on its contiguous slice (one host sync per call for the group sizes); under tracing (ONNX,
torch.export) with one ``nonzero`` gather per expert, which exports with dynamic shapes. All give the same result.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """One router decision for M sub-tokens.

    Attributes:
        probs: ``(M, N)`` float32 softmax over the experts.
        gate: ``(M, k)`` the chosen experts' probabilities (the combine weights).
        expert: ``(M, k)`` int64 indices of the chosen experts, best first.
    """

    probs: torch.Tensor
    gate: torch.Tensor
    expert: torch.Tensor

    @property
    def num_experts(self) -> int:
        return int(self.probs.shape[-1])

    def counts(self) -> torch.Tensor:
        """``(N,)`` int64: how many (sub-token, expert) assignments each expert received."""
        return torch.bincount(self.expert.reshape(-1), minlength=self.num_experts)


def _full_precision(device_type: str) -> contextlib.AbstractContextManager[None]:
    """Autocast off (router logits in fp32, so the argmax does not depend on bf16 rounding); a no-op without it."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def route(v: torch.Tensor, router: torch.Tensor, embeddings: torch.Tensor, temperature: float, top_k: int) -> Routing:
    """X-MoE routing: project, score against L2-normalised shared expert embeddings, softmax, top-k.

    Args:
        v: ``(M, w)`` sub-tokens.
        router: ``(d_r, w)`` the block's projection R_l.
        embeddings: ``(N, d_r)`` the shared expert embeddings e (normalised here, not in place).
        temperature: τ > 0.
        top_k: Experts per sub-token, 1 <= k <= N.
    """
    with _full_precision(v.device.type):
        z = F.linear(v.float(), router.float())  # (M, d_r)
        e = F.normalize(embeddings.float(), dim=-1)  # (N, d_r)
        probs = (F.linear(z, e) / temperature).softmax(dim=-1)  # (M, N)
        if top_k == 1:
            gate, expert = probs.max(dim=-1, keepdim=True)  # (M, 1), (M, 1)
        else:
            gate, expert = probs.topk(top_k, dim=-1)  # (M, k), (M, k)
    return Routing(probs, gate, expert)


def balance_loss(routing: Routing) -> torch.Tensor:
    """Switch / X-MoE load balancing ``N · Σ_j f_j · P_j`` (without the weight α).

    ``f_j``: fraction of the (sub-token, expert) assignments that went to expert j (no gradient); ``P_j``: mean router
    probability of expert j. 1 when both are uniform, N when one expert takes every sub-token with probability 1.
    """
    n = routing.num_experts
    f = routing.counts().to(routing.probs.dtype) / routing.expert.numel()  # (N,)
    p = routing.probs.mean(dim=0)  # (N,)
    return n * (f * p).sum()


# ----------------------------------------------------------------------------------------------------------------
# the shared expert pool


class StackedLinear(nn.Module):
    """N linear maps stored as one ``weight (N, in, out)`` and ``bias (N, out)``: map j is ``x @ weight[j] + bias[j]``
    (applied by `ExpertPool.experts`)."""

    def __init__(self, num: int, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(num, d_out)) if bias else None

    def extra_repr(self) -> str:
        n, d_in, d_out = self.weight.shape
        return f"num={n}, in={d_in}, out={d_out}, bias={self.bias is not None}"


class ExpertPool(nn.Module):
    """N bottleneck experts ``A_j(v) = s · up_j(Dropout(act(down_j(v))))`` over sub-tokens of width w.

    Initialised as AdaptFormer's ``lora`` option: ``down`` uniform(±1/√w) (= ``nn.Linear``'s kaiming-uniform(a=√5)),
    ``up`` and both biases 0, so every expert outputs 0 at init.

    Args:
        num_experts: N.
        dim: Sub-token width w.
        bottleneck: r.
        activation: timm activation name (gelu, relu, ...).
        dropout: After the activation.
        scale: The constant s.
        bias: Biases on down and up.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        bottleneck: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        scale: float = 1.0,
        bias: bool = True,
    ):
        super().__init__()
        from timm.layers import get_act_layer

        self.down = StackedLinear(num_experts, dim, bottleneck, bias)
        self.up = StackedLinear(num_experts, bottleneck, dim, bias)
        self.act = get_act_layer(activation)()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = float(scale)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(dim)
            self.down.weight.uniform_(-bound, bound)
            self.up.weight.zero_()

    @property
    def num_experts(self) -> int:
        return int(self.down.weight.shape[0])

    def expert(self, j: int, v: torch.Tensor) -> torch.Tensor:
        """Expert j on its sub-tokens ``v (n, w)`` -> ``(n, w)``; n may be 0 (the expert then gets a zero gradient)."""
        return self.experts()[j](v)

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """Expert j on row block ``x[j]``: ``(N, n, w) -> (N, n, w)`` as two batched matmuls."""
        down, up = self.down, self.up
        h = x @ down.weight if down.bias is None else torch.baddbmm(down.bias.unsqueeze(1), x, down.weight)  # (N,n,r)
        h = self.dropout(self.act(h))
        y = h @ up.weight if up.bias is None else torch.baddbmm(up.bias.unsqueeze(1), h, up.weight)  # (N, n, w)
        return y * self.scale if self.scale != 1.0 else y

    def experts(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The N experts as functions ``(n, w) -> (n, w)``. The stacked tensors are unbound once, so backward
        stacks the N gradients in one step instead of accumulating N full-size ones."""
        n = self.num_experts
        down_w, up_w = self.down.weight.unbind(0), self.up.weight.unbind(0)  # N x (w, r), N x (r, w)
        down_b = self.down.bias.unbind(0) if self.down.bias is not None else (None,) * n
        up_b = self.up.bias.unbind(0) if self.up.bias is not None else (None,) * n

        def make(j: int) -> Callable[[torch.Tensor], torch.Tensor]:
            def run(v: torch.Tensor) -> torch.Tensor:
                h = v @ down_w[j] if down_b[j] is None else torch.addmm(down_b[j], v, down_w[j])  # (n, r)
                h = self.dropout(self.act(h))
                y = h @ up_w[j] if up_b[j] is None else torch.addmm(up_b[j], h, up_w[j])  # (n, w)
                return y * self.scale if self.scale != 1.0 else y

            return run

        return [make(j) for j in range(n)]

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class ExpertEmbeddings(nn.Module):
    """The shared expert embeddings ``weight (N, d_r)``: orthogonal init with gain 0.32 (X-MoE); only their
    direction matters (the router normalises them)."""

    def __init__(self, num_experts: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        if not self.weight.is_meta:  # parameter counting builds on the meta device, where QR does not run
            nn.init.orthogonal_(self.weight, gain=0.32)


# ----------------------------------------------------------------------------------------------------------------
# dispatch


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


PAD_LIMIT = 4.0  # padded batched matmul while N · (largest group) <= PAD_LIMIT · assignments; else per-expert slices


def dispatch(v: torch.Tensor, routing: Routing, pool: ExpertPool, mode: str = "auto") -> torch.Tensor:
    """``Σ_{j ∈ chosen} gate_j · A_j(v)`` for each sub-token, running each sub-token through its chosen experts only.

    Modes (all give the same result):

    - ``padded``: sort the assignments by expert, scatter them into an ``(N, largest group, w)`` buffer and run the N
      experts as one batched matmul; padding rows are computed and dropped, so it is used only while the buffer holds
      at most `PAD_LIMIT` times the assignments (at most 4/N of running every expert on every sub-token; the experts
      are about 1% of a ViT block's FLOPs, and one batched call beats N small ones).
    - ``sliced``: sort, cut into N contiguous slices, one small matmul chain per expert.
    - ``masked``: one ``nonzero`` gather and scatter per expert; exports with dynamic shapes (ONNX, torch.export).
    - ``auto``: ``masked`` under tracing, else ``padded`` when balanced enough, else ``sliced`` (one host sync for
      the group sizes).

    Args:
        v: ``(M, w)`` sub-tokens.
        routing: The router's decision for them.
        pool: The experts.
        mode: See above.

    Returns:
        ``(M, w)``.
    """
    m, k = routing.expert.shape
    flat = routing.expert.reshape(-1)  # (A = M*k,): the assignments, sub-token-major
    src = v if k == 1 else v.unsqueeze(1).expand(m, k, v.shape[-1]).reshape(-1, v.shape[-1])  # (A, w)
    if mode not in ("auto", "padded", "sliced", "masked"):
        raise ValueError(f"dispatch: unknown mode {mode!r}; use auto, padded, sliced or masked")
    if mode == "auto" and _tracing():
        mode = "masked"
    if mode == "masked":
        out = _masked(src, flat, pool.experts())
    else:
        order = torch.argsort(flat, stable=True)  # (A,) assignments grouped by expert
        counts = torch.bincount(flat, minlength=pool.num_experts)  # (N,)
        sizes = counts.tolist()  # the one host sync
        if mode == "auto":
            mode = "padded" if pool.num_experts * max(sizes) <= PAD_LIMIT * flat.numel() else "sliced"
        if mode == "padded":
            out = _padded(src, flat, order, counts, max(sizes), pool)
        else:
            chunks = src.index_select(0, order).split(sizes)  # N slices (n_j, w)
            ys = torch.cat([f(c) for f, c in zip(pool.experts(), chunks, strict=True)])  # (A, w), sorted order
            out = torch.zeros_like(ys).index_copy(0, order, ys)  # back to assignment order
    out = out.reshape(m, k, -1) * routing.gate.unsqueeze(-1).to(out.dtype)  # (M, k, w)
    return out.sum(dim=1) if k > 1 else out[:, 0]


def _padded(
    src: torch.Tensor, flat: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, cap: int, pool: ExpertPool
) -> torch.Tensor:
    """The assignments' outputs ``(A, w)`` from one batched pass over an ``(N, cap, w)`` buffer: assignment i goes to
    row ``expert_i · cap + (its rank among expert_i's assignments)``."""
    starts = counts.cumsum(0) - counts  # (N,) first sorted position of each expert
    rank = torch.arange(flat.numel(), device=flat.device) - starts.index_select(0, flat.index_select(0, order))
    row = torch.empty_like(flat).index_copy_(0, order, rank) + flat * cap  # (A,) buffer row, assignment order
    w = src.shape[-1]
    buffer = src.new_zeros(pool.num_experts * cap, w).index_copy(0, row, src)  # (N*cap, w), zero padding
    y = pool.batched(buffer.view(pool.num_experts, cap, w))  # (N, cap, w)
    return y.reshape(-1, w).index_select(0, row)  # (A, w), assignment order


def _masked(
    src: torch.Tensor, flat: torch.Tensor, experts: list[Callable[[torch.Tensor], torch.Tensor]]
) -> torch.Tensor:
    out = src.new_zeros(src.shape)  # (A, w)
    for j, expert in enumerate(experts):
        rows = (flat == j).nonzero().squeeze(1)  # (n_j,)
        out = out.index_put((rows,), expert(src.index_select(0, rows)).to(out.dtype))
    return out


def smoa(
    u: torch.Tensor,
    width: int,
    router: torch.Tensor,
    embeddings: torch.Tensor,
    pool: ExpertPool,
    temperature: float,
    top_k: int,
) -> tuple[torch.Tensor, Routing]:
    """The SMoA branch over the last dim of ``u``: multi-head split, route, dispatch, multi-head merge.

    Args:
        u: ``(..., C)`` with C divisible by ``width``.
        width: Sub-token width w (H = C / w sub-tokens per token).
        router, embeddings, temperature, top_k: See `route`.
        pool: The shared experts (width w).

    Returns:
        (``(..., C)`` output, the routing of the ``M = numel / w`` sub-tokens).
    """
    v = u.reshape(-1, width)  # (M, w): "multi-head split"
    routing = route(v, router, embeddings, temperature, top_k)
    out = dispatch(v, routing, pool)  # (M, w)
    return out.reshape(u.shape), routing  # "multi-head merge": concatenation back to (..., C)
