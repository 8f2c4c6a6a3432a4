"""From a plan in Hugging Face naming to the GGUF's tensors: names, shapes, types, producers.

Each planned tensor becomes one :class:`OutTensor` (or, for per-expert MoE tensors,
one stacked ``*_exps`` tensor per layer and projection), named by gguf-py's
``TensorNameMap`` for the family's llama.cpp architecture and given its GGML type.
Nothing is read here: each entry carries how to produce its data, with the family's
transforms (:mod:`.families`) applied, so the writer produces one tensor at a time.
Tied embeddings mean no ``output`` tensor; a tensor llama.cpp has no name for is
refused rather than dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ...errors import fail
from ...plan import PlannedTensor
from .config import SEE, head_dim, n_experts, n_layers, rope_type, tied
from .families import Family, Transform
from .quant import own_qtype, qtype_for

#: buffers that are not weights (never written)
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


@dataclass
class OutTensor:
    name: str                       # gguf tensor name
    shape: tuple[int, ...]          # numpy order (HF order)
    qtype: Any                      # gguf.GGMLQuantizationType
    produce: Callable[[], torch.Tensor]
    n_params: int
    # Rows [start, stop) straight from the source, when the tensor is taken as it is:
    # the writer then streams it (the embedding is the largest tensor of most models).
    rows: Callable[[int, int], torch.Tensor] | None = None


def llama3_rope_factors(cfg: dict, rope: dict) -> torch.Tensor:
    """The ``rope_freqs`` tensor llama.cpp's llama graph divides frequencies by for llama3 rope."""
    base = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    dim = head_dim(cfg)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    lo = float(rope.get("low_freq_factor", 1.0))
    hi = float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    lo_wl, hi_wl = old / lo, old / hi
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            smooth = (old / wl - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def producer(p: PlannedTensor, qtype: Any) -> Callable[[], torch.Tensor]:
    """How to read ``p`` for a tensor of GGML type ``qtype``.

    A computed tensor (a LoRA merge) is taken from its float32 result unless ``qtype``
    is the plan dtype's own type, so that F32 keeps the exact merge and a cast or
    quantization rounds once, not twice (as the safetensors sink does, through
    ``produce_exact``).
    """
    if p.produce_f32 is None or qtype == own_qtype(p.dtype):
        return p.produce
    return p.produce_exact


def transforms_for(fam: Family, hf_name: str) -> list[Transform]:
    """The family's transforms of one tensor, in table order (every suffix the name ends with)."""
    return [fn for suffix, fn in fam.transforms.items() if hf_name.endswith(suffix)]


def transformed(fns: list[Transform], cfg: dict, t: torch.Tensor) -> torch.Tensor:
    if not fns:
        return t  # cast chunk by chunk while encoding
    t = t.to(torch.float32)
    for fn in fns:
        t = fn(t, cfg)
    return t


def _n(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) if shape else 1


def _stacked_experts(prefix: str, proj: str, bid: int | None, by_name: dict[str, PlannedTensor], n_exp: int,
                     fam: Family, tmap: Any, gguf_type: str, is_tied: bool) -> OutTensor | None:
    """One layer's per-expert tensors of one projection as a ``[E, out, in]`` tensor (None: no GGUF name)."""
    members = [by_name.get(f"{prefix}.{e}.{proj}.weight") for e in range(n_exp)]
    if any(m is None for m in members):
        missing = [f"{prefix}.{e}.{proj}.weight" for e, m in enumerate(members) if m is None]
        raise fail(f"write GGUF: expert tensors are missing from the plan ({missing[0]} ...)",
                   "export every expert of every MoE layer", SEE)
    gname = tmap.get_name(fam.expert_name.format(bid=bid, proj=proj), try_suffixes=(".weight",))
    if gname is None:
        return None
    shape = (n_exp, *members[0].shape)  # type: ignore[union-attr]
    qt = qtype_for(gname, shape, gguf_type, is_tied)

    def produce_group(fns=[producer(m, qt) for m in members]):  # type: ignore[arg-type]
        ts = [f() for f in fns]
        if len({t.dtype for t in ts}) > 1:
            ts = [t.to(torch.float32) for t in ts]
        return torch.stack(ts, dim=0)

    return OutTensor(gname, shape, qt, produce_group, _n(shape))


def _fused_experts(p: PlannedTensor, bid: int, tmap: Any, gguf_type: str, is_tied: bool) -> tuple[list[OutTensor], bool]:
    """transformers' in-memory fused experts ([E, 2*ff, hidden] / [E, hidden, ff]); (tensors, all named)."""
    outs: list[OutTensor] = []
    if p.name.endswith("gate_up_proj"):
        E, two_ff, hid = p.shape
        ff = two_ff // 2
        for idx, proj in enumerate(("gate_proj", "up_proj")):
            gname = tmap.get_name(f"model.layers.{bid}.mlp.experts.{proj}.weight", try_suffixes=(".weight",))
            if gname is None:
                return outs, False
            shape = (E, ff, hid)

            def produce_half(p=p, idx=idx, ff=ff):
                return p.produce()[:, idx * ff:(idx + 1) * ff, :].contiguous()

            outs.append(OutTensor(gname, shape, qtype_for(gname, shape, gguf_type, is_tied), produce_half, _n(shape)))
        return outs, True
    gname = tmap.get_name(f"model.layers.{bid}.mlp.experts.down_proj.weight", try_suffixes=(".weight",))
    if gname is None:
        return outs, False
    shape = tuple(p.shape)
    outs.append(OutTensor(gname, shape, qtype_for(gname, shape, gguf_type, is_tied), lambda p=p: p.produce(), _n(shape)))
    return outs, True


def build_outputs(plan: list[PlannedTensor], hf_config: dict, fam: Family, gguf_type: str) -> list[OutTensor]:
    """The GGUF's tensors, in plan order; refuses unnamed, missing or colliding tensors."""
    import gguf

    cfg = hf_config
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[fam.arch]
    tmap = gguf.get_tensor_name_map(arch_enum, n_layers(cfg))
    is_tied = tied(cfg)
    n_exp = n_experts(cfg)

    by_name = {p.name: p for p in plan}
    outs: list[OutTensor] = []
    seen_groups: set[str] = set()
    unknown: list[str] = []

    full_rope, _ = fam.rope(cfg)
    if "llama3" in fam.rope_types and rope_type(full_rope) == "llama3":
        factors = llama3_rope_factors(cfg, full_rope)
        outs.append(OutTensor("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32,
                              lambda f=factors: f, 0))
    for gname, extra in (fam.extra_tensors(cfg) if fam.extra_tensors is not None else []):
        outs.append(OutTensor(gname, tuple(extra.shape), gguf.GGMLQuantizationType.F32, lambda t=extra: t, 0))

    for p in plan:
        name = p.name
        if name.endswith(SKIPPED_SUFFIXES) or (name == "lm_head.weight" and is_tied):
            continue
        parts = name.split(".")
        if n_exp and ".experts." in name and len(parts) >= 7 and parts[-3].isdigit():
            prefix, proj = ".".join(parts[:-3]), parts[-2]  # model.layers.i.mlp.experts / ...block_sparse_moe.experts
            if f"{prefix}.{proj}" in seen_groups:
                continue
            seen_groups.add(f"{prefix}.{proj}")
            bid = int(parts[2]) if parts[1] == "layers" and parts[2].isdigit() else None
            stacked = _stacked_experts(prefix, proj, bid, by_name, n_exp, fam, tmap, gguf_type, is_tied)
            if stacked is None:
                unknown.append(name)
            else:
                outs.append(stacked)
            continue
        if n_exp and name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            fused, named = _fused_experts(p, int(parts[2]), tmap, gguf_type, is_tied)
            outs.extend(fused)
            if not named:
                unknown.append(name)
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            unknown.append(name)
            continue
        shape = tuple(p.shape)
        qt = qtype_for(gname, shape, gguf_type, is_tied)
        read = producer(p, qt)
        fns = transforms_for(fam, name)
        as_is = len(shape) == 2 and read is p.produce and not fns
        outs.append(OutTensor(gname, shape, qt, lambda f=read, fns=fns: transformed(fns, cfg, f()), _n(shape),
                              p.produce_rows if as_is else None))

    if unknown:
        raise fail(
            f"write GGUF: {len(unknown)} tensor(s) have no llama.cpp {fam.arch} name ({', '.join(unknown[:3])}"
            f"{' ...' if len(unknown) > 3 else ''})",
            "export with --format hf; these tensors would be dropped and the GGUF would not compute the same model", SEE,
        )
    names = [o.name for o in outs]
    if "token_embd.weight" not in names:
        raise fail("write GGUF: the plan has no model.embed_tokens.weight", "export a complete checkpoint", SEE)
    if not is_tied and "output.weight" not in names:
        raise fail("write GGUF: the plan has no lm_head.weight and tie_word_embeddings is false",
                   "export a complete checkpoint, or set tie_word_embeddings in the config", SEE)
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise fail(f"write GGUF: several tensors map to {sorted(dup)[0]}", "export a checkpoint without duplicate tensors",
                   SEE)
    return outs
