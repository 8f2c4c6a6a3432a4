"""The currency of the pipeline: planned tensors.

A sink never sees the source. It receives an ordered list of
:class:`PlannedTensor`, each knowing its final name, shape and dtype *before* any
data is read (so a file header can be planned up front) and a ``produce`` callable
that reads the few source tensors it needs, transforms them and returns the
result. Memory therefore stays bounded by the largest tensor group being produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where it goes, what it will look like, how to make it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    # For computed tensors (LoRA merges): the float32 result before its cast to ``dtype``,
    # so a later cast or quantization rounds once, not twice.
    produce_f32: Callable[[], torch.Tensor] | None = None
    # For tensors taken as they are: rows [start, stop) read on their own, so a sink can
    # stream a large tensor (the embedding) in pieces instead of holding all of it.
    produce_rows: Callable[[int, int], torch.Tensor] | None = None

    def produce_exact(self) -> torch.Tensor:
        return self.produce_f32() if self.produce_f32 is not None else self.produce()

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize


TensorPlan = list[PlannedTensor]


def numel(shape: Iterable[int]) -> int:
    """Element count of a shape (1 for a scalar)."""
    return math.prod(shape)


def plan_nbytes(plan: Iterable[PlannedTensor]) -> int:
    """Total bytes the plan will produce (upper bound for quantized state blobs)."""
    return sum(p.nbytes for p in plan)
