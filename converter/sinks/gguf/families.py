"""The model families the GGUF sink writes, as data: one :class:`Family` entry each.

An entry says what llama.cpp's graph for that family expects and the sink must check
or apply: which activation and rope types it computes, which configurations it
refuses, which tensors it transforms on the way (llama's rope permutation, gemma's
``1 + w`` norms and folded query scale), how a layer's experts are named once stacked,
which tensors it adds (phi3's LongRoPE factors) and which hyperparameters it adds
(soft-capping, sliding windows, rope attention factors). The functions an entry names are pure
(``(cfg, family) -> None`` checks, ``(tensor, cfg) -> tensor`` transforms, ``(writer,
cfg)`` metadata), so adding a family is one table entry plus a few such functions;
:mod:`.checks`, :mod:`.tensors` and :mod:`.metadata` only read the table.

HF tensor names map to GGUF names through gguf-py's own ``TensorNameMap``; what a
family adds here is what that map does not cover. See docs/artifact-format.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ...errors import fail
from .config import FIX_HF, SEE, head_dim, legacy_rope, n_experts, n_heads, n_kv_heads, n_layers, plain_rope, split_rope

#: ``(hf_config, family name)``; raises an EfexportError for what llama.cpp cannot compute
Check = Callable[[dict, str], None]
#: ``(float32 tensor, hf_config) -> tensor`` applied while streaming
Transform = Callable[[torch.Tensor, dict], torch.Tensor]
#: ``(gguf.GGUFWriter, hf_config)``: the family's own hyperparameters
HParams = Callable[[Any, dict], None]
#: ``hf_config -> (full-attention rope parameters, sliding-attention ones or None)``
Rope = Callable[[dict], tuple[dict, dict | None]]
#: ``hf_config -> [(gguf name, float32 tensor)]``: tensors the family adds (phi3's LongRoPE factors)
Extra = Callable[[dict], list[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class Family:
    """What one llama.cpp architecture expects from a Hugging Face checkpoint."""

    name: str                                   # the family, as messages name it
    arch: str                                   # llama.cpp's architecture (general.architecture)
    activation: Check                           # checked first
    checks: tuple[Check, ...]                   # then partial rotary, then these in order, then rope
    rope_types: tuple[str, ...]                 # rope scaling types llama.cpp computes exactly here
    rope: Rope = plain_rope
    # tensor-name suffix -> transform, applied in this order to every name ending so
    transforms: dict[str, Transform] = field(default_factory=dict)
    # one layer's per-expert tensors, stacked, under the HF-style name gguf's name map knows
    expert_name: str = "model.layers.{bid}.mlp.experts.{proj}.weight"
    rope_dimension_count: bool = False          # write {arch}.rope.dimension_count
    context_length: int = 4096                  # when the config has no max_position_embeddings
    rope_theta: float = 10000.0                 # when the config has no rope_theta
    hparams: HParams | None = None              # written after the rope keys
    add_space_prefix: bool | None = None        # SentencePiece only; None: tokenizer_config's add_prefix_space
    partial_rotary: bool = False                # the graph ropes only the first rotary_dims of a head
    extra_tensors: Extra | None = None          # written before the plan's tensors


# --------------------------------------------------------------------------- checks


def silu_only(cfg: dict, family: str) -> None:
    act = cfg.get("hidden_act")
    if act not in (None, "silu", "swish"):
        raise fail(f"write GGUF for {family} with activation {act!r}: llama.cpp's {family} graph uses SiLU", FIX_HF, SEE)


def gelu_tanh_only(cfg: dict, family: str) -> None:
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise fail(f"write GGUF for {family} with activation {act!r}: llama.cpp's {family} uses tanh-approximated GELU",
                   FIX_HF, SEE)


def no_attention_bias(cfg: dict, family: str) -> None:
    if cfg.get("attention_bias"):
        raise fail(f"write GGUF for {family} with attention_bias=true: llama.cpp's {family} graph has no attention biases",
                   FIX_HF, SEE)


def no_qwen_sliding_window(cfg: dict, family: str) -> None:
    if cfg.get("use_sliding_window"):
        raise fail(f"write GGUF for {family} with use_sliding_window=true: llama.cpp's {family} graph attends to the "
                   "full context", FIX_HF, SEE)


def full_attention_layers(cfg: dict, family: str) -> None:
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        raise fail(f"write GGUF for {family} with sliding-window layers (layer_types): llama.cpp's {family} graph "
                   "attends to the full context", FIX_HF, SEE)


def no_mixtral_sliding_window(cfg: dict, family: str) -> None:
    if cfg.get("sliding_window"):
        raise fail("write GGUF for Mixtral with sliding_window set: llama.cpp's llama graph has no sliding window",
                   FIX_HF, SEE)


def window_covers_context(cfg: dict, family: str) -> None:
    """A sliding window shorter than the context changes attention; llama.cpp's llama and phi3 graphs have none."""
    sw, ctx = cfg.get("sliding_window"), cfg.get("max_position_embeddings")
    if sw and (not ctx or int(sw) < int(ctx)):
        raise fail(
            f"write GGUF for {family} with sliding_window={sw} (max_position_embeddings={ctx}): llama.cpp's {family} "
            "graph attends to the full context, which differs beyond the window",
            f"set sliding_window to null in config.json if full attention is meant, or {FIX_HF}", SEE,
        )


def gemma2_softcaps(cfg: dict, family: str) -> None:
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if not cfg.get(key):
            raise fail(f"write GGUF for gemma2 without {key}: llama.cpp's gemma2 graph always soft-caps (with its "
                       "default when the file has no value)", f"set {key} in config.json, or {FIX_HF}", SEE)


def expert_counts(cfg: dict, family: str) -> None:
    if not n_experts(cfg) or not cfg.get("num_experts_per_tok"):
        raise fail(f"write GGUF for {family}: the config lacks num_experts / num_experts_per_tok",
                   "fix the exported config.json", SEE)


def qwen3moe_routing(cfg: dict, family: str) -> None:
    if cfg.get("norm_topk_prob") is False:
        raise fail(
            "write GGUF for Qwen3-MoE with norm_topk_prob=false: llama.cpp's qwen3moe always renormalises the top-k weights",
            FIX_HF, SEE,
        )
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1) or 1) != 1:
        raise fail(
            "write GGUF for Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step): llama.cpp's qwen3moe "
            "expects experts in every layer",
            f"{FIX_HF}, or make every layer an MoE layer", SEE,
        )
    if cfg.get("shared_expert_intermediate_size"):
        raise fail("write GGUF for Qwen3-MoE with a shared expert: llama.cpp's qwen3moe has none", FIX_HF, SEE)


def gemma3_attention(cfg: dict, family: str) -> None:
    if cfg.get("attn_logit_softcapping"):
        raise fail("write GGUF for gemma3 with attn_logit_softcapping: llama.cpp's gemma3 graph has no attention "
                   "soft-capping", FIX_HF, SEE)
    if cfg.get("use_bidirectional_attention"):
        raise fail("write GGUF for gemma3 with bidirectional attention: llama.cpp's gemma3 graph is causal", FIX_HF, SEE)


# --------------------------------------------------------------------------- gemma3 readings


def gemma3_rope(cfg: dict) -> tuple[dict, dict | None]:
    """Gemma3's two ropes; a legacy config gives the sliding layers ``rope_local_base_freq``."""
    rp = cfg.get("rope_parameters")
    if rp is not None:
        return split_rope(rp)
    full = legacy_rope(cfg)
    full.setdefault("rope_theta", 1_000_000.0)
    return full, {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}


def gemma3_llama_cpp_attn_scale(cfg: dict) -> float:
    """The query scale llama.cpp's gemma3 graph hard-codes (llama_model_gemma3::load_arch_hparams)."""
    if n_layers(cfg) == 62:  # llama.cpp's LLM_TYPE_27B
        return 1.0 / math.sqrt(float(int(cfg["hidden_size"]) // n_heads(cfg)))
    return 1.0 / math.sqrt(float(head_dim(cfg)))


def gemma3_q_fold(cfg: dict) -> float:
    """Factor folded into q_norm so llama.cpp's fixed scale equals HF's query_pre_attn_scalar**-0.5."""
    qpas = cfg.get("query_pre_attn_scalar")
    if qpas is None:
        qpas = 256  # Gemma3TextConfig's default
    return (float(qpas) ** -0.5) / gemma3_llama_cpp_attn_scale(cfg)


def gemma3_swa_layers(cfg: dict) -> list[bool]:
    """Which layers attend through the sliding window (``layer_types``, else the legacy pattern)."""
    lt = cfg.get("layer_types")
    if lt:
        return [t == "sliding_attention" for t in lt]
    pat = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return [bool((i + 1) % pat) for i in range(n_layers(cfg))]


def gemma2_swa_layers(cfg: dict) -> list[bool]:
    """Gemma2's sliding layers (``layer_types``, else every even layer); none without a window."""
    lt = cfg.get("layer_types")
    swa = [t == "sliding_attention" for t in lt] if lt else [not i % 2 for i in range(n_layers(cfg))]
    return [s and bool(cfg.get("sliding_window")) for s in swa]


def gemma2_q_fold(cfg: dict) -> float:
    """Factor folded into q_proj so llama.cpp's fixed query scale equals HF's query_pre_attn_scalar**-0.5.

    llama.cpp's gemma2 scales by (hidden/heads)**-0.5 for its 27B (46 layers), else head_dim**-0.5
    (llama_model_gemma2::load_arch_hparams); Gemma2 has no q_norm, and the rope is linear, so the
    factor goes into the q projection rows.
    """
    qpas = float(cfg.get("query_pre_attn_scalar") or 256)  # Gemma2Config's default
    fixed = int(cfg["hidden_size"]) // n_heads(cfg) if n_layers(cfg) == 46 else head_dim(cfg)
    return (qpas ** -0.5) / (float(fixed) ** -0.5)


# --------------------------------------------------------------------------- phi3 readings


def longrope(cfg: dict, rope: dict) -> tuple[int, float]:
    """LongRoPE's (original context, attention factor) as transformers computes them (_compute_longrope_parameters)."""
    orig = int(rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or 0)
    factor = rope.get("factor") or (int(cfg["max_position_embeddings"]) / orig)
    af = rope.get("attention_factor")
    if af is None:
        af = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return orig, float(af)


def phi3_rope_factors(cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """LongRoPE's per-frequency divisors; llama.cpp uses the long ones when n_ctx exceeds the original context."""
    full, _ = plain_rope(cfg)
    if str(full.get("rope_type") or full.get("type") or "").lower() != "longrope":
        return []
    return [(f"rope_factors_{k}.weight", torch.tensor(full[f"{k}_factor"], dtype=torch.float32)) for k in ("long", "short")]


# --------------------------------------------------------------------------- tensor transforms


def permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: HF rotate-half rows -> interleaved rope rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_q(t: torch.Tensor, cfg: dict) -> torch.Tensor:
    return permute(t, n_heads(cfg), n_heads(cfg))


def permute_k(t: torch.Tensor, cfg: dict) -> torch.Tensor:
    return permute(t, n_heads(cfg), n_kv_heads(cfg))


def shift_norm(t: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Gemma's RMSNorm multiplies by ``1 + w``; llama.cpp's by the stored weight."""
    return t + 1.0


def fold_q_scale(t: torch.Tensor, cfg: dict) -> torch.Tensor:
    q_fold = gemma3_q_fold(cfg)
    return t * q_fold if q_fold != 1.0 else t


def fold_q_proj_scale(t: torch.Tensor, cfg: dict) -> torch.Tensor:
    q_fold = gemma2_q_fold(cfg)
    return t * q_fold if q_fold != 1.0 else t


def llama_rope_transforms() -> dict[str, Transform]:
    """llama.cpp's llama graph ropes interleaved pairs: q and k rows (and biases) are permuted."""
    return {"q_proj.weight": permute_q, "q_proj.bias": permute_q, "k_proj.weight": permute_k, "k_proj.bias": permute_k}


# --------------------------------------------------------------------------- hyperparameters


def moe_hparams(w: Any, cfg: dict) -> None:
    w.add_expert_count(n_experts(cfg))
    w.add_expert_used_count(int(cfg["num_experts_per_tok"]))


def qwen3moe_hparams(w: Any, cfg: dict) -> None:
    moe_hparams(w, cfg)
    w.add_expert_feed_forward_length(int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]))


def gemma3_hparams(w: Any, cfg: dict) -> None:
    _, local = gemma3_rope(cfg)
    swa = gemma3_swa_layers(cfg)
    if cfg.get("sliding_window") and any(swa):
        w.add_sliding_window(int(cfg["sliding_window"]))
        w.add_sliding_window_pattern([bool(x) for x in swa])
        local_theta = (local or {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
        w.add_rope_freq_base_swa(float(local_theta))
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))


def gemma2_hparams(w: Any, cfg: dict) -> None:
    w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
    w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    if cfg.get("sliding_window"):
        w.add_sliding_window(int(cfg["sliding_window"]))
    w.add_sliding_window_pattern(gemma2_swa_layers(cfg))


def phi3_hparams(w: Any, cfg: dict) -> None:
    full, _ = plain_rope(cfg)
    if str(full.get("rope_type") or full.get("type") or "").lower() == "longrope":
        orig, af = longrope(cfg, full)
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(af)
    w.add_sliding_window(int(cfg.get("sliding_window") or 0))  # llama.cpp's phi3 ignores it (checked shorter than context)


# --------------------------------------------------------------------------- the table

QWEN_CHECKS: tuple[Check, ...] = (no_attention_bias, no_qwen_sliding_window, full_attention_layers)

FAMILIES: dict[str, Family] = {
    "qwen3": Family("qwen3", "qwen3", silu_only, QWEN_CHECKS, ("default", "linear", "yarn")),
    "qwen3moe": Family("qwen3moe", "qwen3moe", silu_only, (*QWEN_CHECKS, expert_counts, qwen3moe_routing),
                       ("default", "linear", "yarn"), hparams=qwen3moe_hparams),
    "llama": Family("llama", "llama", silu_only, (full_attention_layers,), ("default", "linear", "llama3", "yarn"),
                    transforms=llama_rope_transforms(), rope_dimension_count=True),
    "mixtral": Family("mixtral", "llama", silu_only, (full_attention_layers, no_mixtral_sliding_window, expert_counts),
                      ("default", "linear", "llama3", "yarn"), transforms=llama_rope_transforms(),
                      expert_name="layers.{bid}.feed_forward.experts.{proj}.weight", rope_dimension_count=True,
                      hparams=moe_hparams),
    "gemma3": Family("gemma3", "gemma3", gelu_tanh_only, (no_attention_bias, gemma3_attention), ("default", "linear"),
                     rope=gemma3_rope, transforms={"norm.weight": shift_norm, "self_attn.q_norm.weight": fold_q_scale},
                     context_length=131072, rope_theta=1_000_000.0, hparams=gemma3_hparams, add_space_prefix=False),
    "qwen2": Family("qwen2", "qwen2", silu_only, (no_qwen_sliding_window, full_attention_layers),
                    ("default", "linear", "yarn")),
    "mistral": Family("mistral", "llama", silu_only, (no_attention_bias, full_attention_layers, window_covers_context),
                      ("default", "linear", "llama3", "yarn"), transforms=llama_rope_transforms(),
                      rope_dimension_count=True),
    "gemma2": Family("gemma2", "gemma2", gelu_tanh_only, (no_attention_bias, gemma2_softcaps), ("default",),
                     transforms={"norm.weight": shift_norm, "self_attn.q_proj.weight": fold_q_proj_scale},
                     context_length=8192, hparams=gemma2_hparams, add_space_prefix=False),
    "phi3": Family("phi3", "phi3", silu_only, (no_attention_bias, window_covers_context), ("default", "longrope"),
                   rope_dimension_count=True, hparams=phi3_hparams, partial_rotary=True, extra_tensors=phi3_rope_factors),
}

#: Hugging Face architecture -> family
ARCHS = {
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma3",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
}
#: config ``model_type`` -> Hugging Face architecture, for configs without ``architectures``
MODEL_TYPES = {
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def family_of(hf_config: dict) -> Family:
    """The family of a config's architecture, or a refusal naming the ones the sink writes."""
    archs = hf_config.get("architectures") or []
    hf_arch = archs[0] if archs else MODEL_TYPES.get(hf_config.get("model_type", ""), "")
    if hf_arch not in ARCHS:
        raise fail(
            f"write GGUF for architecture {hf_arch or hf_config.get('model_type')!r}: the GGUF sink handles "
            f"{', '.join(sorted(ARCHS))}",
            "export with --format hf (safetensors), or use an architecture listed above", SEE,
        )
    return FAMILIES[ARCHS[hf_arch]]
