"""Refusals before any work: a GGUF is written only when llama.cpp computes the same model.

Anything llama.cpp cannot express exactly (an activation, rope scaling or attention
variant its graph lacks, a tokenizer it cannot reproduce) is refused here with a
three-line :class:`~converter.errors.EfexportError`, before a tensor is read. The
per-family rules are data in :mod:`.families`; the rope rules below are shared.
"""

from __future__ import annotations

import math
from pathlib import Path

from ...errors import fail
from .config import EXTRA_HINT, FIX_HF, SEE, partial_rotary_factor, rope_type, rotary_dims
from .families import Family, family_of
from .llama_cpp import llama_cpp_available
from .quant import GGUF_TYPES, K_QUANTS
from .tokenizer import TokenizerFiles, tokenizer_files
from .vocab import identify_vocab

REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


def check_yarn(rope: dict) -> None:
    """YaRN as llama.cpp computes it: HF's defaults only (checked against llama.cpp's logits).

    llama.cpp's generic graph uses beta_fast=32, beta_slow=1 and the attention factor
    0.1*ln(factor)+1; other values, DeepSeek-style mscale and truncate=false are refused.
    """
    fix = "remove the rope scaling from the config (keep rope_theta), or export with --format hf"
    factor = float(rope["factor"])
    if not rope.get("original_max_position_embeddings"):
        raise fail("write GGUF with yarn rope scaling without original_max_position_embeddings",
                   "set rope_parameters.original_max_position_embeddings in the config", SEE)
    odd = []
    if float(rope.get("beta_fast", 32.0)) != 32.0 or float(rope.get("beta_slow", 1.0)) != 1.0:
        odd.append("beta_fast/beta_slow other than 32/1")
    af = rope.get("attention_factor")
    if af is not None and abs(float(af) - (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)) > 1e-6:
        odd.append(f"attention_factor={af}")
    if rope.get("mscale") not in (None, 1, 1.0) or rope.get("mscale_all_dim") not in (None, 0, 0.0):
        odd.append("mscale / mscale_all_dim")
    if rope.get("truncate") is False:
        odd.append("truncate=false")
    if odd:
        raise fail(f"write GGUF with yarn rope scaling using {', '.join(odd)}: llama.cpp's yarn would compute "
                   "different positions", fix, SEE)


def check_longrope(cfg: dict, rope: dict) -> None:
    """LongRoPE as llama.cpp's phi3 computes it: long and short factors for every roped frequency."""
    n = rotary_dims(cfg) // 2
    for k in ("long_factor", "short_factor"):
        if len(rope.get(k) or []) != n:
            raise fail(f"write GGUF with longrope rope scaling: {k} has {len(rope.get(k) or [])} values, the roped "
                       f"head dimensions need {n}", "fix rope_parameters in the config, or export with --format hf", SEE)
    if not (rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")):
        raise fail("write GGUF with longrope rope scaling without original_max_position_embeddings",
                   "set rope_parameters.original_max_position_embeddings in the config", SEE)


def check_rope(cfg: dict, fam: Family) -> None:
    """The rope types llama.cpp computes exactly for the family; sliding layers unscaled."""
    full, local = fam.rope(cfg)
    rt = rope_type(full)
    if rt not in fam.rope_types:
        raise fail(
            f"write GGUF with rope scaling {rt!r} for {fam.name}: the GGUF sink writes only "
            f"{', '.join(fam.rope_types)} rope exactly as llama.cpp computes it",
            "remove rope_scaling / rope_parameters scaling from the config (keep rope_theta), or export with --format hf",
            SEE,
        )
    if rt in ("linear", "yarn", "llama3") and not full.get("factor"):
        raise fail(f"write GGUF with {rt} rope scaling without a factor", "set rope_parameters.factor in the config", SEE)
    if rt == "yarn":
        check_yarn(full)
    if rt == "longrope":
        check_longrope(cfg, full)
    if local is not None and rope_type(local) != "default":
        raise fail(
            f"write GGUF with rope scaling {rope_type(local)!r} on gemma3's sliding layers: llama.cpp scales only "
            "the global layers",
            "remove the sliding_attention rope scaling from the config, or export with --format hf", SEE,
        )


def check_config(cfg: dict, fam: Family) -> None:
    """Every refusal of the config, in a fixed order: activation, partial rotary, family rules, rope."""
    fam.activation(cfg, fam.name)
    prf = partial_rotary_factor(cfg)
    if prf != 1.0 and not fam.partial_rotary:
        raise fail(f"write GGUF with partial_rotary_factor={prf}: llama.cpp's {fam.name} graph ropes the whole head",
                   FIX_HF, SEE)
    for check in fam.checks:
        check(cfg, fam.name)
    check_rope(cfg, fam)


def check_type(gguf_type: str) -> None:
    """A ``--precision`` GGUF can store (bitsandbytes types point at their GGUF counterpart)."""
    t = str(gguf_type).lower()
    if t in ("int8", "int4"):
        alt = "q8_0" if t == "int8" else "q4_k_m"
        raise fail(
            f"use --precision {t} with --format gguf: {t} is bitsandbytes quantization, which GGUF does not store",
            f"use --precision {alt} (llama.cpp's {'8-bit' if t == 'int8' else '4-bit'} format) for GGUF, "
            f"or keep {t} with --format hf", SEE,
        )
    if t not in GGUF_TYPES:
        raise fail(
            f"use --precision {gguf_type!r} with --format gguf: unknown GGUF type",
            f"use one of {', '.join(GGUF_TYPES)} (or leave --precision out to keep the source dtype)", SEE,
        )
    if t in K_QUANTS and not llama_cpp_available():
        raise fail(
            f"make {t} without llama-cpp-python: K-quants come from llama.cpp's own quantizer",
            f"{EXTRA_HINT} (or choose q8_0, q4_0 or q5_0, which need no extra)", SEE,
        )


def check_model(hf_config: dict, gguf_type: str | None) -> Family:
    """Everything but the tokenizer: the type, the architecture, the config. Returns the family."""
    if gguf_type is not None:
        check_type(gguf_type)
    fam = family_of(hf_config)
    for k in REQUIRED_KEYS:
        if k not in hf_config:
            raise fail(f"write GGUF: the config has no {k!r}", "export from a complete Hugging Face config.json", SEE)
    check_config(hf_config, fam)
    return fam


def check_gguf_request(hf_config: dict, gguf_type: str | None, tokenizer_dir: Path | TokenizerFiles) -> str:
    """Validate a GGUF export before any work; return the llama.cpp architecture name.

    ``gguf_type`` None means "keep the source dtype" (fp32/fp16/bf16, resolved later).
    Raises :class:`EfexportError` (Cannot / Fix / See) for anything that cannot be
    written exactly.
    """
    fam = check_model(hf_config, gguf_type)
    identify_vocab(tokenizer_files(tokenizer_dir))
    return fam.arch
