"""Strategy transforms: small pure functions from source tensor names to a TensorPlan.

Each planner looks only at names, shapes and dtypes (no data) and returns planned
tensors whose ``produce`` reads just the source tensors it needs. The math lives in
:func:`merge_lora` (W0 + s·B@A in float32, then cast back): dense_lora, the plain
LoRA of moe_expert_lora attention, native-MoE expert materialisation and PEFT adapters
all go through it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable

import torch

from .errors import fail
from .plan import PlannedTensor, TensorPlan
from .run import SEE_LOADING, Injection

LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
MOE_PROJS = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


class Reader:
    """What a planner may use from a source: names, shapes, dtypes, and a small read cache.

    The cache keeps the last few tensors read, so a shared MLP base that every expert
    of a layer merges with is read once, not once per expert.
    """

    def __init__(self, names: list[str], shape: Callable[[str], tuple[int, ...]],
                 dtype: Callable[[str], torch.dtype], get: Callable[[str], torch.Tensor], cache: int = 3,
                 get_rows: Callable[[str, int, int], torch.Tensor] | None = None) -> None:
        self.names, self.shape, self.dtype, self._get = names, shape, dtype, get
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._size = cache
        # rows [start, stop) of a source tensor, uncached (see PlannedTensor.produce_rows)
        self.get_rows = get_rows

    @classmethod
    def of(cls, source) -> "Reader":
        return cls(source.names, source.shape, source.dtype, source.get, get_rows=getattr(source, "get_rows", None))

    def get(self, name: str) -> torch.Tensor:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        t = self._get(name)
        self._cache[name] = t
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return t


def merge_lora_f32(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W0 + s * (B @ A) in float32."""
    return torch.addmm(w0.to(torch.float32), b.to(torch.float32), a.to(torch.float32), alpha=scale)


_MERGE_ROWS = 256


def merge_lora(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W0 + s * (B @ A), computed in float32 and cast back to W0's dtype.

    A block of rows at a time, cast on the copy into the result: the float32 temporaries
    stay cache-sized instead of two whole-matrix float32 copies (W0 and the sum) beside
    the result, and each element's sum is the same as :func:`merge_lora_f32`'s.
    """
    out = torch.empty(w0.shape, dtype=w0.dtype)
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    for r in range(0, w0.shape[0], _MERGE_ROWS):
        out[r:r + _MERGE_ROWS] = torch.addmm(w0[r:r + _MERGE_ROWS].to(torch.float32), b32[r:r + _MERGE_ROWS], a32,
                                            alpha=scale)
    return out


def _passthrough(r: Reader, name: str, out: str | None = None) -> PlannedTensor:
    """A tensor taken as it is (a PEFT adapter reader may offer its float32 merge too)."""
    exact = r.get_exact if name in getattr(r, "exact_names", ()) else None
    rows = r.get_rows if exact is None and r.shape(name) else None  # None for adapters' readers
    return PlannedTensor(out or name, r.shape(name), r.dtype(name), lambda: r.get(name),
                         (lambda: exact(name)) if exact else None,
                         (lambda start, stop: rows(name, start, stop)) if rows else None)


def _merged(r: Reader, base: str, a: str, b: str, scale: float, out: str) -> PlannedTensor:
    shape = r.shape(base)
    if r.shape(a)[1] != shape[1] or r.shape(b)[0] != shape[0] or r.shape(a)[0] != r.shape(b)[1]:
        raise fail(
            f"merge {out}: base {list(shape)}, lora_A {list(r.shape(a))} and lora_B {list(r.shape(b))} do not fit",
            "the checkpoint is inconsistent; re-save it from the training run.",
            SEE_LOADING,
        )
    exact = lambda: merge_lora_f32(r.get(base), r.get(a), r.get(b), scale)  # noqa: E731
    return PlannedTensor(out, shape, r.dtype(base), lambda: merge_lora(r.get(base), r.get(a), r.get(b), scale), exact)


def plan_plain_lora(r: Reader, scale: float, skip: Callable[[str], bool] = lambda n: False) -> TensorPlan:
    """dense_lora: ``P.base_layer.*`` + ``P.lora_A/B`` -> ``P.*`` merged; everything else as is."""
    names = set(r.names)
    plan: TensorPlan = []
    for name in r.names:
        if skip(name) or name.endswith(LORA_SUFFIXES):
            continue
        if ".base_layer." in name:
            module, leaf = name.split(".base_layer.")
            out = f"{module}.{leaf}"
            a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
            if leaf == "weight" and a in names and b in names:
                plan.append(_merged(r, name, a, b, scale, out))
            else:
                plan.append(_passthrough(r, name, out))
        else:
            plan.append(_passthrough(r, name))
    orphans = [n for n in r.names if n.endswith(LORA_SUFFIXES) and not skip(n)
               and n.rsplit(".lora_", 1)[0] + ".base_layer.weight" not in names]
    if orphans:
        raise fail(
            f"merge LoRA: {orphans[0]} has no matching base_layer.weight ({len(orphans)} such tensors)",
            "the checkpoint is incomplete; re-save it from the training run.",
            SEE_LOADING,
        )
    return plan


def plan_dense(r: Reader, inj: Injection) -> TensorPlan:
    """Layout ``dense`` for strategies none and dense_lora."""
    if inj.strategy == "none":
        return [_passthrough(r, n) for n in r.names]
    return plan_plain_lora(r, inj.scale)


def _is_structure_tensor(name: str) -> bool:
    return bool(re.search(r"\.router\.weight$|\.experts\.\d+\.", name))


def plan_compact(r: Reader, inj: Injection) -> TensorPlan:
    """Layout ``compact``: routers and LoRA experts keep the run's names; plain LoRA is merged."""
    if inj.strategy == "mixture_lora":
        return [_passthrough(r, n) for n in r.names]
    return plan_plain_lora(r, inj.scale, skip=_is_structure_tensor) + [
        _passthrough(r, n) for n in r.names if _is_structure_tensor(n)
    ]


def moe_layers_of(names: list[str]) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.mlp\.router\.weight$", n))})


def plan_native_moe(r: Reader, inj: Injection, family: str) -> TensorPlan:
    """Layout ``moe``: experts materialised as W0 + s·B_e@A_e under Qwen3-MoE or Mixtral names."""
    moe = set(moe_layers_of(r.names))
    s = inj.scale
    plan: TensorPlan = []
    for name in plan_plain_lora(r, s, skip=_is_structure_tensor):
        m = re.match(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$", name.name)
        if not (m and int(m.group(1)) in moe):
            plan.append(name)
    for i in sorted(moe):
        pre = f"model.layers.{i}.mlp"
        for proj in MOE_PROJS:
            if f"{pre}.{proj}.bias" in r.names:
                raise fail(
                    f"write layer {i}'s experts as a native MoE: the MLP has a bias, which "
                    f"{'Mixtral' if family == 'llama' else 'Qwen3-MoE'} cannot hold",
                    "export with --moe-layout compact.",
                    SEE_LOADING,
                )
        gate = f"{pre}.router.weight"
        if family == "qwen3":
            plan.append(_passthrough(r, gate, f"{pre}.gate.weight"))
        else:
            plan.append(_passthrough(r, gate, f"model.layers.{i}.block_sparse_moe.gate.weight"))
        for e in range(inj.num_experts or 0):
            for proj in MOE_PROJS:
                lora = f"{pre}.experts.{e}.{proj}"
                if family == "qwen3":
                    out = f"{pre}.experts.{e}.{proj}.weight"
                else:
                    out = f"model.layers.{i}.block_sparse_moe.experts.{e}.{MIXTRAL_PROJ[proj]}.weight"
                plan.append(_merged(r, f"{pre}.{proj}.weight", f"{lora}.lora_A.weight", f"{lora}.lora_B.weight", s, out))
    return plan
