"""The small types that flow through the engine: `Batch`, `InputSpec` and `Loss`.

- A `Batch` is what every loader yields and what methods, evaluation, merge parity checks and export see: the model
  inputs, the targets, optional per-sample task ids, and room for more fields (``extras``).
- An `InputSpec` says what one model input is (its shape without the batch dimension, dtype, normalisation); it comes
  from the backbone and the data, so parity checks and exports build their dummy inputs from it, never from a
  hard-coded ``(n, 3, size, size)``.
- A `Loss` is what a training step computes: the total to back-propagate, the logits accuracy is measured on, and
  each named term (``ce``, ``kl``, ``balance``), which the loop logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    """One batch.

    Attributes:
        inputs: Model inputs, ``(B, *InputSpec.shape)``: images ``(B, C, H, W)``, spectrograms ``(B, 1, F, T)``.
        targets: Class indices ``(B,)`` int64, or soft targets ``(B, classes)`` (mixup).
        task_ids: Per-sample task index ``(B,)`` int64 for multi-task methods; None for single-task data.
        extras: Further per-sample tensors a source or method adds (``"index"``: the sample's position in its split).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    task_ids: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def _map(self, fn: Any) -> Batch:
        return Batch(
            inputs=fn(self.inputs),
            targets=fn(self.targets),
            task_ids=None if self.task_ids is None else fn(self.task_ids),
            extras={k: fn(v) for k, v in self.extras.items()},
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on ``device`` (tensors already there are not copied)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``: page-locked copies for fast host-to-GPU transfers."""
        return self._map(lambda t: t.pin_memory())

    @property
    def labels(self) -> torch.Tensor:
        """Hard class indices ``(B,)``: the targets, or their argmax when they are soft."""
        return self.targets if self.targets.ndim == 1 else self.targets.argmax(1)


@dataclass(frozen=True)
class InputSpec:
    """One model input: ``shape`` without the batch dimension, its dtype, and the normalisation the data applies.

    Attributes:
        shape: ``(C, H, W)`` for images; any per-sample shape for other inputs.
        mean: Per-channel mean subtracted by the data pipeline (recorded for deployment).
        std: Per-channel std divided by the data pipeline.
        dtype: Input dtype name (``float32``).
        interpolation: Resize interpolation the data used (``bicubic``).
    """

    shape: tuple[int, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    dtype: str = "float32"
    interpolation: str = "bicubic"

    @property
    def channels(self) -> int:
        return int(self.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of an image input."""
        return int(self.shape[-2]), int(self.shape[-1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "dtype": self.dtype,
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """From `to_dict`'s output, or from the ``{"size", "mean", "std"}`` of format_version 1 (square RGB)."""
        if "shape" in d:
            shape = tuple(int(v) for v in d["shape"])
        else:
            shape = (3, int(d["size"]), int(d["size"]))
        return cls(
            shape=shape,
            mean=tuple(d.get("mean") or ()),
            std=tuple(d.get("std") or ()),
            dtype=d.get("dtype", "float32"),
            interpolation=d.get("interpolation", "bicubic"),
        )

    def example(self, n: int, seed: int = 0) -> torch.Tensor:
        """Fixed seeded random inputs ``(n, *shape)`` (already normalised) for parity checks and tracing."""
        import torch

        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, *self.shape, generator=g, dtype=getattr(torch, self.dtype))


@dataclass
class Loss:
    """What one training step computes.

    Attributes:
        total: The scalar to back-propagate (the sum of the terms, each with its weight applied).
        logits: ``(B, classes)`` logits of the batch (MoSA: of its first pass), for the training accuracy.
        terms: Named scalar parts of ``total`` (``ce``, ``kl``, ``balance``), logged by the loop.
    """

    total: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
