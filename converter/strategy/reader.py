"""What a planner may read from a source: names, shapes, dtypes, and tensors through a small cache."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from ..source.safetensors import TensorSource


class Reader:
    """What a planner may use from a source: names, shapes, dtypes, and a small read cache.

    The cache keeps the last few tensors read, so a shared MLP base that every expert
    of a layer merges with is read once, not once per expert.
    """

    def __init__(self, names: list[str], shape: Callable[[str], tuple[int, ...]],
                 dtype: Callable[[str], torch.dtype], get: Callable[[str], torch.Tensor], cache: int = 3,
                 get_rows: Callable[[str, int, int], torch.Tensor] | None = None,
                 exact_names: frozenset[str] = frozenset(),
                 get_exact: Callable[[str], torch.Tensor] | None = None) -> None:
        self.names, self.shape, self.dtype, self._get = names, shape, dtype, get
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._size = cache
        # rows [start, stop) of a source tensor, uncached (see PlannedTensor.produce_rows)
        self.get_rows = get_rows
        # names a merging reader computes (a PEFT adapter): get_exact gives their float32 result
        self.exact_names, self.get_exact = exact_names, get_exact

    @classmethod
    def of(cls, source: TensorSource) -> "Reader":
        return cls(source.names, source.shape, source.dtype, source.get, get_rows=source.get_rows)

    def get(self, name: str) -> torch.Tensor:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        t = self._get(name)
        self._cache[name] = t
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return t
