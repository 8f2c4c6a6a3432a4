"""Reading a Hugging Face ``config.json`` the way llama.cpp's converter reads it.

Plain readers with the converter's defaults (absent ``num_key_value_heads`` means as
many as the query heads, absent ``head_dim`` means hidden/heads, ...), shared by the
checks, the tensor renames and the metadata so that all three read one value alike.
Family-specific readings (gemma3's sliding layers) live in :mod:`.families`.
"""

from __future__ import annotations

#: where every GGUF refusal points
SEE = "docs: README.md#formats"
#: how to get llama-cpp-python (K-quants, llama.cpp checks)
EXTRA_HINT = "pip install 'efexport[gguf]'"
#: the way out of most refusals: safetensors has no llama.cpp graph to match
FIX_HF = "export with --format hf (safetensors) instead"


def n_layers(cfg: dict) -> int:
    return int(cfg["num_hidden_layers"])


def n_heads(cfg: dict) -> int:
    return int(cfg["num_attention_heads"])


def n_kv_heads(cfg: dict) -> int:
    return int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])


def head_dim(cfg: dict) -> int:
    hd = cfg.get("head_dim")
    return int(hd) if hd else int(cfg["hidden_size"]) // n_heads(cfg)


def n_experts(cfg: dict) -> int:
    """Experts per MoE layer (Mixtral's ``num_local_experts``, Qwen's ``num_experts``); 0 when dense."""
    for k in ("num_local_experts", "num_experts"):
        if cfg.get(k):
            return int(cfg[k])
    return 0


def tied(cfg: dict) -> bool:
    """Whether lm_head is the embedding (then no ``output`` tensor is written); gemma2/3 tie by default."""
    default = cfg.get("model_type") in ("gemma3_text", "gemma2")
    return bool(cfg.get("tie_word_embeddings", default))


def partial_rotary_factor(cfg: dict) -> float:
    """The fraction of each head that is roped (top level, or inside ``rope_parameters`` since transformers 5)."""
    prf = cfg.get("partial_rotary_factor")
    if prf is None:
        prf = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor")
    return 1.0 if prf is None else float(prf)


def rotary_dims(cfg: dict) -> int:
    """How many dimensions of each head are roped (HF: ``int(head_dim * partial_rotary_factor)``)."""
    return int(head_dim(cfg) * partial_rotary_factor(cfg))


def legacy_rope(cfg: dict) -> dict:
    """Rope parameters of a config that predates ``rope_parameters`` (``rope_scaling`` + ``rope_theta``)."""
    rp = dict(cfg.get("rope_scaling") or {})
    if "rope_type" not in rp and "type" in rp:
        rp["rope_type"] = rp["type"]
    if cfg.get("rope_theta") is not None:
        rp.setdefault("rope_theta", cfg["rope_theta"])
    return rp


def split_rope(rp: dict) -> tuple[dict, dict | None]:
    """``rope_parameters`` as (full-attention parameters, sliding-attention ones or None)."""
    if "full_attention" in rp or "sliding_attention" in rp:
        return dict(rp.get("full_attention") or {}), (dict(rp["sliding_attention"]) if "sliding_attention" in rp else None)
    return dict(rp), None


def plain_rope(cfg: dict) -> tuple[dict, dict | None]:
    """(full-attention rope parameters, sliding-attention ones or None), normalised, for a family
    whose legacy config has one rope for every layer."""
    rp = cfg.get("rope_parameters")
    if rp is None:
        return legacy_rope(cfg), None
    return split_rope(rp)


def rope_type(p: dict) -> str:
    return str(p.get("rope_type") or p.get("type") or "default").lower()
