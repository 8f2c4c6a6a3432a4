"""GGUF sink: stream a tensor plan into one llama.cpp-ready ``.gguf`` file.

The sink receives a plan in the naming of a standard Hugging Face architecture
(``Qwen3ForCausalLM``, ``LlamaForCausalLM``, ``Gemma3ForCausalLM``,
``Qwen3MoeForCausalLM``, ``MixtralForCausalLM``) plus that architecture's config
and writes it the way llama.cpp's own converter (``convert_hf_to_gguf.py``) would:

* every tensor's name, shape and GGML type is registered first, the header, the
  key/value metadata and the tensor infos are written, and only then is each
  tensor produced, transformed, quantized and written, one at a time, so memory
  stays bounded by the largest tensor group (a layer's experts for MoE);
* F32/F16/BF16/Q8_0/Q4_0/Q5_0 are quantized here (``gguf.quants``); the K-quants
  (``q4_k_m``, ``q5_k_m``, ``q6_k``) are made by llama.cpp's own quantizer
  (``llama_model_quantize`` from llama-cpp-python, the ``efexport[gguf]`` extra)
  from an intermediate F16 file written to a temporary folder beside the output;
* what llama.cpp expects is applied while streaming: llama's q/k rows are permuted
  for its rope layout, gemma3 norms are stored as ``1 + w`` and gemma3's query
  scale is folded into ``q_norm`` when ``query_pre_attn_scalar`` differs from what
  llama.cpp hard-codes, experts are stacked into ``*_exps`` tensors, tied
  embeddings mean no ``output`` tensor, 1-D tensors stay F32, rows that are not a
  multiple of the block size fall back to F16;
* the tokenizer is written as llama.cpp's converter writes it: byte-level BPE as
  ``gpt2`` with the pre-tokenizer identified (check-text hash, then the exact
  pre-tokenizer configuration), SentencePiece (``tokenizer.model``) as ``llama``;
  the vocabulary is padded to the config's ``vocab_size`` with ``[PAD{i}]``.

Anything llama.cpp cannot express exactly is refused by :func:`check_gguf_request`
with a three-line :class:`~converter.errors.EfexportError` before any work starts.

llama-cpp-python is imported lazily: this module imports without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from converter.errors import EfexportError
from converter.plan import PlannedTensor

GGUF_TYPES = ("fp32", "fp16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k_m", "q5_k_m", "q6_k")
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")

#: file-name label of each type (``<name>-<LABEL>.gguf``)
TYPE_LABELS = {
    "fp32": "F32", "fp16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0",
    "q5_0": "Q5_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K",
}

SEE_GGUF = "https://github.com/efexport/efexport#gguf"
EXTRA_HINT = "pip install 'efexport[gguf]'"

# HF architecture -> (gguf arch name, family)
_ARCHS = {
    "Qwen3ForCausalLM": ("qwen3", "qwen3"),
    "LlamaForCausalLM": ("llama", "llama"),
    "Gemma3ForCausalLM": ("gemma3", "gemma3"),
    "Qwen3MoeForCausalLM": ("qwen3moe", "qwen3moe"),
    "MixtralForCausalLM": ("llama", "mixtral"),
}
_MODEL_TYPES = {
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}

# llama.cpp identifies a BPE pre-tokenizer by the sha256 of the token ids of this
# text (convert_hf_to_gguf.py, get_vocab_base_pre).
_CHKTXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
    'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
    'កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български '
    '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? '
    '\'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)
# The hashes of the families this project exports (from llama.cpp's converter table).
_PRE_HASHES = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen1.5 .. Qwen3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",      # Qwen3-Embedding
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3 / 3.x
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",      # GPT-2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
}
# The split regexes of the pre-tokenizers llama.cpp implements for these names
# (as they appear in the models' tokenizer.json).
QWEN2_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)



# --------------------------------------------------------------------------- errors


def _err(cannot: str, fix: str, see: str = SEE_GGUF) -> EfexportError:
    return EfexportError(cannot, fix, see)


# --------------------------------------------------------------------------- config helpers


def _arch_of(hf_config: dict) -> tuple[str, str, str]:
    """(hf architecture, gguf arch, family) or raise."""
    archs = hf_config.get("architectures") or []
    hf_arch = archs[0] if archs else _MODEL_TYPES.get(hf_config.get("model_type", ""), "")
    if hf_arch not in _ARCHS:
        raise _err(
            f"write GGUF for architecture {hf_arch or hf_config.get('model_type')!r}: the GGUF sink handles "
            f"{', '.join(sorted(_ARCHS))}",
            "export with --format hf (safetensors), or use an architecture listed above",
        )
    arch, family = _ARCHS[hf_arch]
    return hf_arch, arch, family


def _n_layers(cfg: dict) -> int:
    return int(cfg["num_hidden_layers"])


def _n_heads(cfg: dict) -> int:
    return int(cfg["num_attention_heads"])


def _n_kv_heads(cfg: dict) -> int:
    return int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])


def _head_dim(cfg: dict) -> int:
    hd = cfg.get("head_dim")
    return int(hd) if hd else int(cfg["hidden_size"]) // _n_heads(cfg)


def _n_experts(cfg: dict) -> int:
    for k in ("num_local_experts", "num_experts"):
        if cfg.get(k):
            return int(cfg[k])
    return 0


def _tied(cfg: dict) -> bool:
    default = cfg.get("model_type") == "gemma3_text"
    return bool(cfg.get("tie_word_embeddings", default))


def _rope_params(cfg: dict, family: str) -> tuple[dict, dict | None]:
    """(full-attention rope parameters, sliding-attention ones or None), normalised."""
    rp = cfg.get("rope_parameters")
    if rp is None:
        rp = dict(cfg.get("rope_scaling") or {})
        if "rope_type" not in rp and "type" in rp:
            rp["rope_type"] = rp["type"]
        if cfg.get("rope_theta") is not None:
            rp.setdefault("rope_theta", cfg["rope_theta"])
        if family == "gemma3":
            full = dict(rp)
            full.setdefault("rope_theta", 1_000_000.0)
            local = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
            return full, local
        return rp, None
    if "full_attention" in rp or "sliding_attention" in rp:
        return dict(rp.get("full_attention") or {}), (dict(rp["sliding_attention"]) if "sliding_attention" in rp else None)
    return dict(rp), None


def _rope_type(p: dict) -> str:
    return str(p.get("rope_type") or p.get("type") or "default").lower()


def _gemma3_llama_cpp_attn_scale(cfg: dict) -> float:
    """The query scale llama.cpp's gemma3 graph hard-codes (llama_model_gemma3::load_arch_hparams)."""
    if _n_layers(cfg) == 62:  # llama.cpp's LLM_TYPE_27B
        return 1.0 / math.sqrt(float(int(cfg["hidden_size"]) // _n_heads(cfg)))
    return 1.0 / math.sqrt(float(_head_dim(cfg)))


def _gemma3_q_fold(cfg: dict) -> float:
    """Factor folded into gemma3 q_norm so llama.cpp's fixed scale equals HF's query_pre_attn_scalar**-0.5."""
    qpas = cfg.get("query_pre_attn_scalar")
    if qpas is None:
        qpas = 256  # Gemma3TextConfig's default
    return (float(qpas) ** -0.5) / _gemma3_llama_cpp_attn_scale(cfg)


def _gemma3_swa_layers(cfg: dict) -> list[bool]:
    n = _n_layers(cfg)
    lt = cfg.get("layer_types")
    if lt:
        return [t == "sliding_attention" for t in lt]
    pat = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return [bool((i + 1) % pat) for i in range(n)]


def _check_config(hf_config: dict, family: str) -> None:
    cfg = hf_config
    fix_hf = "export with --format hf (safetensors) instead"
    act = cfg.get("hidden_activation") if family == "gemma3" else cfg.get("hidden_act")
    if family == "gemma3":
        act = act or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise _err(f"write GGUF for gemma3 with activation {act!r}: llama.cpp's gemma3 uses tanh-approximated GELU", fix_hf)
    elif act not in (None, "silu", "swish"):
        raise _err(f"write GGUF for {family} with activation {act!r}: llama.cpp's {family} graph uses SiLU", fix_hf)

    prf = cfg.get("partial_rotary_factor")
    if prf not in (None, 1, 1.0):
        raise _err(f"write GGUF with partial_rotary_factor={prf}: llama.cpp's {family} graph ropes the whole head", fix_hf)

    if family in ("qwen3", "qwen3moe", "gemma3") and cfg.get("attention_bias"):
        raise _err(f"write GGUF for {family} with attention_bias=true: llama.cpp's {family} graph has no attention biases", fix_hf)
    if family in ("qwen3", "qwen3moe") and cfg.get("use_sliding_window"):
        raise _err(f"write GGUF for {family} with use_sliding_window=true: llama.cpp's {family} graph attends to the full context", fix_hf)
    if family != "gemma3" and any(t != "full_attention" for t in cfg.get("layer_types") or []):
        raise _err(f"write GGUF for {family} with sliding-window layers (layer_types): llama.cpp's {family} graph "
                   "attends to the full context", fix_hf)
    if family == "mixtral" and cfg.get("sliding_window"):
        raise _err("write GGUF for Mixtral with sliding_window set: llama.cpp's llama graph has no sliding window", fix_hf)

    if family in ("qwen3moe", "mixtral"):
        if not _n_experts(cfg) or not cfg.get("num_experts_per_tok"):
            raise _err(f"write GGUF for {family}: the config lacks num_experts / num_experts_per_tok", "fix the exported config.json")
    if family == "qwen3moe":
        if cfg.get("norm_topk_prob") is False:
            raise _err(
                "write GGUF for Qwen3-MoE with norm_topk_prob=false: llama.cpp's qwen3moe always renormalises the top-k weights",
                fix_hf,
            )
        if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1) or 1) != 1:
            raise _err(
                "write GGUF for Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step): llama.cpp's qwen3moe expects experts in every layer",
                f"{fix_hf}, or make every layer an MoE layer",
            )
        if cfg.get("shared_expert_intermediate_size"):
            raise _err("write GGUF for Qwen3-MoE with a shared expert: llama.cpp's qwen3moe has none", fix_hf)

    if family == "gemma3":
        if cfg.get("attn_logit_softcapping"):
            raise _err("write GGUF for gemma3 with attn_logit_softcapping: llama.cpp's gemma3 graph has no attention soft-capping", fix_hf)
        if cfg.get("use_bidirectional_attention"):
            raise _err("write GGUF for gemma3 with bidirectional attention: llama.cpp's gemma3 graph is causal", fix_hf)

    # rope
    full, local = _rope_params(cfg, family)
    rt = _rope_type(full)
    supported = {
        "llama": ("default", "linear", "llama3", "yarn"), "mixtral": ("default", "linear", "llama3", "yarn"),
        "qwen3": ("default", "linear", "yarn"), "qwen3moe": ("default", "linear", "yarn"),
        "gemma3": ("default", "linear"),
    }[family]
    if rt not in supported:
        raise _err(
            f"write GGUF with rope scaling {rt!r} for {family}: the GGUF sink writes only {', '.join(supported)} rope exactly "
            "as llama.cpp computes it",
            "remove rope_scaling / rope_parameters scaling from the config (keep rope_theta), or export with --format hf",
        )
    if rt in ("linear", "yarn", "llama3") and not full.get("factor"):
        raise _err(f"write GGUF with {rt} rope scaling without a factor", "set rope_parameters.factor in the config")
    if rt == "yarn":
        _check_yarn(full)
    if local is not None and _rope_type(local) != "default":
        raise _err(
            f"write GGUF with rope scaling {_rope_type(local)!r} on gemma3's sliding layers: llama.cpp scales only the global layers",
            "remove the sliding_attention rope scaling from the config, or export with --format hf",
        )


def _check_yarn(rope: dict) -> None:
    """YaRN as llama.cpp computes it: HF's defaults only (checked against llama.cpp's logits).

    llama.cpp's generic graph uses beta_fast=32, beta_slow=1 and the attention factor
    0.1*ln(factor)+1; other values, DeepSeek-style mscale and truncate=false are refused.
    """
    fix = "remove the rope scaling from the config (keep rope_theta), or export with --format hf"
    factor = float(rope["factor"])
    if not rope.get("original_max_position_embeddings"):
        raise _err("write GGUF with yarn rope scaling without original_max_position_embeddings",
                   "set rope_parameters.original_max_position_embeddings in the config")
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
        raise _err(f"write GGUF with yarn rope scaling using {', '.join(odd)}: llama.cpp's yarn would compute different positions", fix)


# --------------------------------------------------------------------------- tokenizer


@dataclass
class _VocabInfo:
    kind: str            # "gpt2" | "llama"
    pre: str             # tokenizer.ggml.pre
    path: Path


def _load_tokenizer_json(tokenizer_dir: Path) -> dict | None:
    p = Path(tokenizer_dir) / "tokenizer.json"
    if not p.is_file():
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def _pre_by_hash(tokenizer_dir: Path) -> str | None:
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        return None
    try:
        tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        ids = tok.encode(_CHKTXT).ids
    except Exception:
        return None
    return _PRE_HASHES.get(hashlib.sha256(str(ids).encode()).hexdigest())


def _pre_by_config(tj: dict) -> str | None:
    """Identify the pre-tokenizer from its exact configuration in tokenizer.json."""
    pre = tj.get("pre_tokenizer") or {}
    norm = tj.get("normalizer")
    model = tj.get("model") or {}
    ignore_merges = bool(model.get("ignore_merges", False))
    norm_type = (norm or {}).get("type")

    def bytelevel_ok(p: dict, use_regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False) and bool(p.get("use_regex", True)) == use_regex

    if pre.get("type") == "ByteLevel":
        if bytelevel_ok(pre, True) and norm is None and not ignore_merges:
            return "gpt-2"
        return None
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if len(parts) != 2:
            return None
        split, bl = parts
        if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert", False):
            return None
        if not bytelevel_ok(bl, False):
            return None
        regex = (split.get("pattern") or {}).get("Regex")
        if regex == QWEN2_PRETOKENIZER_REGEX and norm_type in (None, "NFC") and not ignore_merges:
            return "qwen2"
        if regex == LLAMA3_PRETOKENIZER_REGEX and norm is None and ignore_merges:
            return "llama-bpe"
    return None


def _identify_vocab(tokenizer_dir: Path) -> _VocabInfo:
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / "tokenizer.model").is_file():
        try:
            _read_sentencepiece_model(tokenizer_dir / "tokenizer.model")
        except Exception as e:
            raise _err(
                f"read the SentencePiece tokenizer {tokenizer_dir.name}/tokenizer.model ({e})",
                "check that the checkpoint's tokenizer.model is a SentencePiece model file",
            ) from e
        return _VocabInfo("llama", "default", tokenizer_dir)
    tj = _load_tokenizer_json(tokenizer_dir)
    if tj is None:
        raise _err(
            f"write the GGUF vocabulary: {tokenizer_dir.name or tokenizer_dir} has neither tokenizer.json nor tokenizer.model",
            "save the tokenizer next to the checkpoint (tokenizer.save_pretrained(DIR))",
        )
    model = tj.get("model") or {}
    pre = tj.get("pre_tokenizer") or {}
    is_byte_level = model.get("type") == "BPE" and not model.get("byte_fallback", False) and (
        pre.get("type") == "ByteLevel" or any(p.get("type") == "ByteLevel" for p in pre.get("pretokenizers") or [])
    )
    if not is_byte_level:
        raise _err(
            f"write the GGUF vocabulary from tokenizer.json with model {model.get('type')!r}: only byte-level BPE "
            "(tokenizer.json) and SentencePiece (tokenizer.model) are written",
            "provide the model's tokenizer.model (SentencePiece) or a byte-level BPE tokenizer.json",
        )
    res = _pre_by_hash(tokenizer_dir) or _pre_by_config(tj)
    if res is None:
        raise _err(
            "identify the BPE pre-tokenizer of tokenizer.json: it matches none that llama.cpp implements for this "
            "export (qwen2, llama-bpe, gpt-2)",
            "use the base model's own tokenizer (Qwen2/Qwen3, Llama 3 or GPT-2 pre-tokenizer) or export with --format hf",
        )
    return _VocabInfo("gpt2", res, tokenizer_dir)


def _read_sentencepiece_model(path: Path) -> tuple[list[tuple[str, float, int]], bool | None]:
    """Minimal protobuf reader for sentencepiece ``ModelProto``: pieces and add_dummy_prefix.

    Returns ``([(piece, score, type)], add_dummy_prefix)``; types follow
    sentencepiece (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte),
    the same numbering as ``gguf.TokenType``. No sentencepiece/protobuf needed.
    """
    data = Path(path).read_bytes()

    def varint(buf: bytes, i: int) -> tuple[int, int]:
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result, i
            shift += 7

    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            fno, wt = key >> 3, key & 7
            if wt == 0:
                v, i = varint(buf, i)
            elif wt == 1:
                v, i = buf[i:i + 8], i + 8
            elif wt == 2:
                ln, i = varint(buf, i)
                v, i = buf[i:i + ln], i + ln
            elif wt == 5:
                v, i = buf[i:i + 4], i + 4
            else:
                raise ValueError(f"unsupported protobuf wire type {wt}")
            yield fno, wt, v

    pieces: list[tuple[str, float, int]] = []
    add_dummy_prefix: bool | None = None
    for fno, wt, v in fields(data):
        if fno == 1 and wt == 2:
            piece, score, typ = "", 0.0, 1
            for f2, w2, v2 in fields(v):
                if f2 == 1 and w2 == 2:
                    piece = v2.decode("utf-8")
                elif f2 == 2 and w2 == 5:
                    score = float(np.frombuffer(v2, dtype="<f4")[0])
                elif f2 == 3 and w2 == 0:
                    typ = int(v2)
            pieces.append((piece, score, typ))
        elif fno == 3 and wt == 2:  # normalizer_spec
            for f2, w2, v2 in fields(v):
                if f2 == 3 and w2 == 0:
                    add_dummy_prefix = bool(v2)
    if not pieces:
        raise ValueError("no pieces found")
    return pieces, add_dummy_prefix


def _looks_special(tok: str) -> bool:
    return (
        tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (tok.startswith("<|") and tok.endswith("|>"))
        or (tok.startswith("<｜") and tok.endswith("｜>"))
        or (tok.startswith("<unused") and tok.endswith(">"))
    )


def _bpe_vocab(tokenizer_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    tj = _load_tokenizer_json(tokenizer_dir)
    assert tj is not None
    reverse: dict[int, str] = {i: t for t, i in (tj["model"].get("vocab") or {}).items()}
    added: dict[int, dict] = {}
    for at in tj.get("added_tokens") or []:
        reverse[int(at["id"])] = at["content"]
        added[int(at["id"])] = at
    if reverse and max(reverse) >= vocab_size:
        raise _err(
            f"write the GGUF vocabulary: the tokenizer has token id {max(reverse)} but the config's vocab_size is {vocab_size}",
            "resize the model's embeddings to the tokenizer (model.resize_token_embeddings) before exporting",
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if i in added:
            if added[i].get("special") or _looks_special(tok):
                types.append(gguf.TokenType.CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    return tokens, types


def _sp_vocab(tokenizer_dir: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int], bool | None]:
    """SentencePiece vocabulary as llama.cpp's converter builds it (_create_vocab_sentencepiece)."""
    pieces, add_dummy_prefix = _read_sentencepiece_model(Path(tokenizer_dir) / "tokenizer.model")
    UNUSED, USER, CONTROL = 5, 4, 3
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i, (piece, score, typ) in enumerate(pieces):
        if i >= vocab_size:
            break
        tokens[i] = piece.encode("utf-8")
        scores[i] = score
        types[i] = typ if typ in (1, 2, 3, 4, 5, 6) else 1
    added_file = Path(tokenizer_dir) / "added_tokens.json"
    if added_file.is_file():
        for key, tid in json.loads(added_file.read_text(encoding="utf-8")).items():
            if tid < vocab_size:
                tokens[tid] = key.encode("utf-8")
                scores[tid] = -1000.0
                types[tid] = USER
    tc_file = Path(tokenizer_dir) / "tokenizer_config.json"
    if tc_file.is_file():
        tc = json.loads(tc_file.read_text(encoding="utf-8"))
        for tid_s, data in (tc.get("added_tokens_decoder") or {}).items():
            tid = int(tid_s)
            if tid >= vocab_size:
                continue
            tok = data["content"]
            if data.get("special") or _looks_special(tok):
                types[tid] = CONTROL
            else:
                tok = tok.replace("\u2581", " ")
                types[tid] = USER
            scores[tid] = -1000.0
            tokens[tid] = tok.encode("utf-8")
    return tokens, scores, types, add_dummy_prefix


def _add_vocab(writer, info: _VocabInfo, hf_config: dict, family: str) -> None:
    import gguf

    vocab_size = int(hf_config["vocab_size"])
    if info.kind == "gpt2":
        tokens, types = _bpe_vocab(info.path, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(info.pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(info.path, load_merges=True, n_vocab=vocab_size)
    else:
        tokens_b, scores, types, _add_dummy_prefix = _sp_vocab(info.path, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens_b)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        if family == "gemma3":
            writer.add_add_space_prefix(False)
        else:
            tc_file = info.path / "tokenizer_config.json"
            tc = json.loads(tc_file.read_text(encoding="utf-8")) if tc_file.is_file() else {}
            if isinstance(tc.get("add_prefix_space"), bool):
                writer.add_add_space_prefix(tc["add_prefix_space"])
        special = gguf.SpecialVocab(info.path, n_vocab=vocab_size)
        # without tokenizer.json SpecialVocab cannot resolve tokenizer_config's token strings: use the pieces
        tc_file = info.path / "tokenizer_config.json"
        tc = json.loads(tc_file.read_text(encoding="utf-8")) if tc_file.is_file() else {}
        index = {t: i for i, t in reversed(list(enumerate(tokens_b)))}
        for typ in ("bos", "eos", "unk", "pad"):
            entry = tc.get(f"{typ}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(content, str) and typ not in special.special_token_ids and content.encode() in index:
                special.special_token_ids[typ] = index[content.encode()]
    # ids the tokenizer files do not name come from the model config
    for typ in ("bos", "eos", "pad", "unk"):
        tid = hf_config.get(f"{typ}_token_id")
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if typ not in special.special_token_ids and isinstance(tid, int) and 0 <= tid < vocab_size:
            special.special_token_ids[typ] = tid
    special.add_to_gguf(writer, quiet=True)


# --------------------------------------------------------------------------- tensors


@dataclass
class _Out:
    name: str                       # gguf tensor name
    shape: tuple[int, ...]          # numpy order (HF order)
    qtype: Any                      # gguf.GGMLQuantizationType
    produce: Callable[[], torch.Tensor]
    n_params: int
    # Rows [start, stop) straight from the source, when the tensor is taken as it is:
    # the writer then streams it (the embedding is the largest tensor of most models).
    rows: Callable[[int, int], torch.Tensor] | None = None


def _permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: HF rotate-half rows -> interleaved rope rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(cfg: dict, rope: dict) -> torch.Tensor:
    base = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    dim = _head_dim(cfg)
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


def _qtype_for(gname: str, shape: tuple[int, ...], gguf_type: str, tied: bool = False):
    """The GGML type of one tensor, following convert_hf_to_gguf.py's rules.

    For q4_0 / q5_0 the output projection (and the embedding when it doubles as
    the output) is kept at Q8_0: llama.cpp's quantizer gives it Q6_K there, a type
    only llama.cpp's C code makes; Q8_0 is the nearest type at least as precise.
    """
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gname.endswith("_norm.weight"):
        return Q.F32
    if ".ffn_gate_inp." in gname or not gname.endswith(".weight"):
        return Q.F32
    base = {
        "fp32": Q.F32, "fp16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0,
        "q4_0": Q.Q4_0, "q5_0": Q.Q5_0,
        # K-quants: an F16 intermediate that llama.cpp's quantizer reads
        "q4_k_m": Q.F16, "q5_k_m": Q.F16, "q6_k": Q.F16,
    }[gguf_type]
    if base in (Q.Q4_0, Q.Q5_0) and (gname == "output.weight" or (tied and gname == "token_embd.weight")):
        base = Q.Q8_0
    if base not in (Q.F32, Q.F16, Q.BF16):
        block, _ = gguf.GGML_QUANT_SIZES[base]
        if shape[-1] % block != 0:
            base = Q.F16  # as the converter does on QuantError
    return base


def _producer(p: PlannedTensor, qtype) -> Callable[[], torch.Tensor]:
    """How to read ``p`` for a tensor of GGML type ``qtype``.

    A computed tensor (a LoRA merge) is taken from its float32 result unless ``qtype``
    is the plan dtype's own type, so that F32 keeps the exact merge and a cast or
    quantization rounds once, not twice (as the safetensors sink does, through
    ``produce_exact``).
    """
    import gguf

    Q = gguf.GGMLQuantizationType
    own = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}.get(p.dtype)
    if p.produce_f32 is None or qtype == own:
        return p.produce
    return p.produce_exact


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, tsize = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) if shape else 1
    return n // block * tsize


_CHUNK_ELEMS = 4 * 1024 * 1024  # rows are encoded in chunks of about 16 MB of float32


class _EncodedTensor:
    """One tensor's GGML bytes, encoded and written chunk by chunk.

    ``GGUFWriter.write_tensor_data`` only needs ``nbytes`` and ``tofile``; handing it
    this object instead of a full array means neither the whole float32 copy nor the
    whole encoded array has to exist next to the source tensor. Given a reader of source
    rows (``_Out.rows``) not even the source tensor is held whole: each chunk is read,
    encoded and written in turn.
    """

    def __init__(self, rows: Callable[[int, int], torch.Tensor], shape: tuple[int, ...], qtype) -> None:
        self.rows, self.qtype = rows, qtype
        self.n_rows, self.row_len = shape[0], int(np.prod(shape[1:]))  # 2-D: a tensor's rows or `of`'s flat view
        self.nbytes = _nbytes(shape, qtype)

    @classmethod
    def of(cls, t: torch.Tensor, qtype) -> "_EncodedTensor":
        """A tensor already in memory, encoded in chunks of its innermost rows all the same."""
        t = t.detach().to("cpu")
        flat = t.reshape(-1, t.shape[-1]) if t.ndim else t.reshape(1, 1)
        return cls(lambda a, b: flat[a:b], tuple(flat.shape), qtype)

    def _chunks(self) -> Iterable[np.ndarray]:
        import gguf

        Q = gguf.GGMLQuantizationType
        step = max(1, _CHUNK_ELEMS // max(1, self.row_len))
        for r0 in range(0, self.n_rows, step):
            chunk = self.rows(r0, min(self.n_rows, r0 + step)).reshape(-1, self.row_len)
            if self.qtype == Q.BF16:
                yield chunk.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
                continue
            arr = chunk.to(torch.float32).contiguous().numpy()
            if self.qtype == Q.F32:
                yield arr
            elif self.qtype == Q.F16:
                yield arr.astype(np.float16)
            else:
                yield gguf.quants.quantize(arr, self.qtype)

    def tofile(self, fout) -> None:
        written = 0
        for c in self._chunks():
            c.tofile(fout)
            written += c.nbytes
        if written != self.nbytes:  # pragma: no cover - would be a bug in the type rules
            raise RuntimeError(f"encoded {written} bytes, planned {self.nbytes}")


def _build_outputs(plan: list[PlannedTensor], hf_config: dict, arch: str, family: str,
                   gguf_type: str, *, skip_permute: bool = False, skip_norm_shift: bool = False) -> list[_Out]:
    import gguf

    cfg = hf_config
    n_layers = _n_layers(cfg)
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    tmap = gguf.get_tensor_name_map(arch_enum, n_layers)
    n_head, n_kv = _n_heads(cfg), _n_kv_heads(cfg)
    tied = _tied(cfg)
    n_exp = _n_experts(cfg)
    q_fold = _gemma3_q_fold(cfg) if family == "gemma3" else 1.0

    by_name = {p.name: p for p in plan}
    outs: list[_Out] = []
    seen_groups: set[str] = set()
    unknown: list[str] = []

    full_rope, _ = _rope_params(cfg, family)
    if family in ("llama", "mixtral") and _rope_type(full_rope) == "llama3":
        factors = _llama3_rope_factors(cfg, full_rope)
        outs.append(_Out("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32,
                         lambda f=factors: f, 0))

    def needs_transform(hf_name: str) -> bool:
        return (family in ("llama", "mixtral") and hf_name.endswith(
            ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"))) or (
            family == "gemma3" and hf_name.endswith("norm.weight"))

    def transform(hf_name: str, t: torch.Tensor) -> torch.Tensor:
        if not needs_transform(hf_name):
            return t  # cast chunk by chunk while encoding
        t = t.to(torch.float32)
        if family in ("llama", "mixtral") and not skip_permute:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                t = _permute(t, n_head, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                t = _permute(t, n_head, n_kv)
        if family == "gemma3" and hf_name.endswith("norm.weight"):
            if not skip_norm_shift:
                t = t + 1.0
            if hf_name.endswith("self_attn.q_norm.weight") and q_fold != 1.0:
                t = t * q_fold
        return t

    for p in plan:
        name = p.name
        if name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")):
            continue
        if name == "lm_head.weight" and tied:
            continue
        parts = name.split(".")
        # per-expert tensors -> one stacked [E, out, in] tensor per layer and projection
        if n_exp and ".experts." in name and len(parts) >= 7 and parts[-3].isdigit():
            prefix = ".".join(parts[:-3])          # model.layers.i.mlp.experts / ...block_sparse_moe.experts
            proj = parts[-2]
            group = f"{prefix}.{proj}"
            if group in seen_groups:
                continue
            seen_groups.add(group)
            members = [by_name.get(f"{prefix}.{e}.{proj}.weight") for e in range(n_exp)]
            if any(m is None for m in members):
                missing = [f"{prefix}.{e}.{proj}.weight" for e, m in enumerate(members) if m is None]
                raise _err(f"write GGUF: expert tensors are missing from the plan ({missing[0]} ...)",
                           "export every expert of every MoE layer")
            bid = int(parts[2]) if parts[1] == "layers" and parts[2].isdigit() else None
            if family == "mixtral":
                merged = f"layers.{bid}.feed_forward.experts.{proj}.weight"
            else:
                merged = f"model.layers.{bid}.mlp.experts.{proj}.weight"
            gname = tmap.get_name(merged, try_suffixes=(".weight",))
            if gname is None:
                unknown.append(name)
                continue
            shape = (n_exp, *members[0].shape)
            qt = _qtype_for(gname, shape, gguf_type, tied)

            def produce_group(fns=[_producer(m, qt) for m in members]):
                ts = [f() for f in fns]
                if len({t.dtype for t in ts}) > 1:
                    ts = [t.to(torch.float32) for t in ts]
                return torch.stack(ts, dim=0)

            outs.append(_Out(gname, shape, qt, produce_group, int(np.prod(shape))))
            continue
        if n_exp and name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            # fused 3-D experts (transformers' in-memory layout): [E, 2*ff, hidden] / [E, hidden, ff]
            bid = int(parts[2])
            if name.endswith("gate_up_proj"):
                E, two_ff, hid = p.shape
                ff = two_ff // 2
                for idx, proj in enumerate(("gate_proj", "up_proj")):
                    gname = tmap.get_name(f"model.layers.{bid}.mlp.experts.{proj}.weight", try_suffixes=(".weight",))
                    if gname is None:
                        unknown.append(name)
                        break
                    shape = (E, ff, hid)

                    def produce_half(p=p, idx=idx, ff=ff):
                        return p.produce()[:, idx * ff:(idx + 1) * ff, :].contiguous()

                    outs.append(_Out(gname, shape, _qtype_for(gname, shape, gguf_type, tied), produce_half, int(np.prod(shape))))
            else:
                gname = tmap.get_name(f"model.layers.{bid}.mlp.experts.down_proj.weight", try_suffixes=(".weight",))
                if gname is None:
                    unknown.append(name)
                    continue
                shape = tuple(p.shape)
                outs.append(_Out(gname, shape, _qtype_for(gname, shape, gguf_type, tied),
                                 lambda p=p: p.produce(), int(np.prod(shape))))
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            unknown.append(name)
            continue
        shape = tuple(p.shape)
        qt = _qtype_for(gname, shape, gguf_type, tied)
        producer = _producer(p, qt)
        as_is = len(shape) == 2 and producer is p.produce and not needs_transform(name)
        outs.append(_Out(gname, shape, qt, lambda f=producer, n=name: transform(n, f()),
                         int(np.prod(shape)) if shape else 1, p.produce_rows if as_is else None))

    if unknown:
        raise _err(
            f"write GGUF: {len(unknown)} tensor(s) have no llama.cpp {arch} name ({', '.join(unknown[:3])}"
            f"{' ...' if len(unknown) > 3 else ''})",
            "export with --format hf; these tensors would be dropped and the GGUF would not compute the same model",
        )
    names = [o.name for o in outs]
    if "token_embd.weight" not in names:
        raise _err("write GGUF: the plan has no model.embed_tokens.weight", "export a complete checkpoint")
    if not tied and "output.weight" not in names:
        raise _err("write GGUF: the plan has no lm_head.weight and tie_word_embeddings is false",
                   "export a complete checkpoint, or set tie_word_embeddings in the config")
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise _err(f"write GGUF: several tensors map to {sorted(dup)[0]}", "export a checkpoint without duplicate tensors")
    return outs


# --------------------------------------------------------------------------- metadata


def _file_type(gguf_type: str):
    import gguf

    F = gguf.LlamaFileType
    return {
        "fp32": F.ALL_F32, "fp16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0, "q5_0": F.MOSTLY_Q5_0,
        "q4_k_m": F.MOSTLY_F16, "q5_k_m": F.MOSTLY_F16, "q6_k": F.MOSTLY_F16,  # intermediate
    }[gguf_type]


def _add_hparams(w, hf_config: dict, arch: str, family: str, file_type) -> None:
    import gguf

    cfg = hf_config
    n_layers = _n_layers(cfg)
    w.add_block_count(n_layers)
    w.add_context_length(int(cfg.get("max_position_embeddings") or (131072 if family == "gemma3" else 4096)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(_n_heads(cfg))
    w.add_head_count_kv(_n_kv_heads(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_key_length(_head_dim(cfg))
    w.add_value_length(_head_dim(cfg))
    w.add_vocab_size(int(cfg["vocab_size"]))
    if family in ("llama", "mixtral"):
        w.add_rope_dimension_count(_head_dim(cfg))

    full, local = _rope_params(cfg, family)
    theta = full.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        theta = 1_000_000.0 if family == "gemma3" else 10000.0
    w.add_rope_freq_base(float(theta))
    if _rope_type(full) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    elif _rope_type(full) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(full["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(full["original_max_position_embeddings"]))

    if family in ("qwen3moe", "mixtral"):
        w.add_expert_count(_n_experts(cfg))
        w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    if family == "qwen3moe":
        w.add_expert_feed_forward_length(int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]))

    if family == "gemma3":
        swa = _gemma3_swa_layers(cfg)
        if cfg.get("sliding_window") and any(swa):
            w.add_sliding_window(int(cfg["sliding_window"]))
            w.add_sliding_window_pattern([bool(x) for x in swa])
            local_theta = (local or {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
            w.add_rope_freq_base_swa(float(local_theta))
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    w.add_file_type(int(file_type))


def _add_general(w, name: str, metadata: dict | None, n_params: int, hf_config: dict) -> None:
    import gguf

    md = dict(metadata or {})
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_quantized_by(str(md.get("quantized_by") or "efexport"))
    if md.get("author"):
        w.add_author(str(md["author"]))
    if md.get("version"):
        w.add_version(str(md["version"]))
    if md.get("finetune"):
        w.add_finetune(str(md["finetune"]))
    if md.get("description"):
        w.add_description(str(md["description"]))
    if md.get("license"):
        w.add_license(str(md["license"]))
    base = md.get("base_model")
    bases = [base] if isinstance(base, str) else list(base or [])
    # Hub ids only: never a local path (absolute, relative, or an existing folder)
    bases = [str(b) for b in bases if b and not os.path.isabs(str(b)) and not str(b).startswith((".", "~"))
             and not os.path.exists(str(b)) and str(b).count("/") <= 1]
    if bases:
        w.add_base_model_count(len(bases))
        for i, b in enumerate(bases):
            w.add_base_model_name(i, str(b).split("/")[-1])
            if "/" in str(b):
                w.add_base_model_organization(i, str(b).split("/")[0])
                w.add_base_model_repo_url(i, f"https://huggingface.co/{b}")
    if md.get("tags"):
        w.add_tags(list(md["tags"]))
    if md.get("languages"):
        w.add_languages(list(md["languages"]))
    if n_params > 0:
        w.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --------------------------------------------------------------------------- public API


def gguf_filename(name: str, gguf_type: str) -> str:
    """``<name>-<TYPE>.gguf`` (TYPE as llama.cpp labels it, e.g. ``Q4_K_M``).

    ``name`` (``--name``, or the run's name) becomes one plain file name: path
    separators, whitespace and characters Windows forbids turn into ``-`` and leading
    dots are dropped, so the file can never land outside (or in a subfolder of) the
    artifact folder. The GGUF's ``general.name`` keeps the name as given.
    """
    safe = re.sub(r'[\\/\s:*?"<>|\x00-\x1f]+', "-", str(name)).strip(".-") or "model"
    return f"{safe}-{TYPE_LABELS[gguf_type]}.gguf"


def default_gguf_type(dtype: torch.dtype | str | None) -> str:
    """The GGUF type that keeps a source dtype (``--precision`` absent)."""
    s = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return {"bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(s, "fp32")


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def check_gguf_request(hf_config: dict, gguf_type: str | None, tokenizer_dir: Path) -> str:
    """Validate a GGUF export before any work; return the llama.cpp architecture name.

    ``gguf_type`` None means "keep the source dtype" (fp32/fp16/bf16, resolved later).
    Raises :class:`EfexportError` (Cannot / Fix / See) for anything that cannot be
    written exactly.
    """
    if gguf_type is not None:
        t = str(gguf_type).lower()
        if t in ("int8", "int4"):
            alt = "q8_0" if t == "int8" else "q4_k_m"
            raise _err(
                f"use --precision {t} with --format gguf: {t} is bitsandbytes quantization, which GGUF does not store",
                f"use --precision {alt} (llama.cpp's {'8-bit' if t == 'int8' else '4-bit'} format) for GGUF, "
                f"or keep {t} with --format hf",
            )
        if t not in GGUF_TYPES:
            raise _err(
                f"use --precision {gguf_type!r} with --format gguf: unknown GGUF type",
                f"use one of {', '.join(GGUF_TYPES)} (or leave --precision out to keep the source dtype)",
            )
        if t in K_QUANTS and not llama_cpp_available():
            raise _err(
                f"make {t} without llama-cpp-python: K-quants come from llama.cpp's own quantizer",
                f"{EXTRA_HINT} (or choose q8_0, q4_0 or q5_0, which need no extra)",
            )
    _hf_arch, arch, family = _arch_of(hf_config)
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if k not in hf_config:
            raise _err(f"write GGUF: the config has no {k!r}", "export from a complete Hugging Face config.json")
    _check_config(hf_config, family)
    _identify_vocab(Path(tokenizer_dir))
    return arch


def _progress_cb(progress) -> Callable[[int], None]:
    if progress is None:
        return lambda n: None
    if hasattr(progress, "update"):
        return lambda n: progress.update(n)
    return progress


def _produced(o: _Out) -> torch.Tensor:
    t = o.produce()
    if tuple(t.shape) != tuple(o.shape):
        raise _err(
            f"write GGUF tensor {o.name}: produced shape {tuple(t.shape)} differs from the planned {tuple(o.shape)}",
            "report this as a bug in the export plan",
        )
    return t


def _write_stream(outs: list[_Out], w, path: Path, progress: Callable[[int], None]) -> None:
    for o in outs:
        w.add_tensor_info(o.name, o.shape, np.dtype(np.float32), _nbytes(o.shape, o.qtype), raw_dtype=o.qtype)
    try:
        w.write_header_to_file(path=path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for o in outs:
            data = _EncodedTensor(o.rows, o.shape, o.qtype) if o.rows is not None else _EncodedTensor.of(_produced(o), o.qtype)
            w.write_tensor_data(data)  # type: ignore[arg-type]  # duck-typed: nbytes + tofile
            progress(int(data.nbytes))
            del data
    finally:
        w.close()


def write_gguf(
    plan: list[PlannedTensor],
    hf_config: dict,
    tokenizer_dir: Path,
    out_file: Path,
    gguf_type: str | None,
    *,
    name: str,
    metadata: dict | None = None,
    progress=None,
    _skip_permute: bool = False,
    _skip_norm_shift: bool = False,
) -> dict:
    """Stream ``plan`` into ``out_file`` as a GGUF of ``gguf_type``; return a small report.

    ``metadata`` may carry ``base_model`` (Hub id or list), ``license``, ``author``,
    ``version``, ``finetune``, ``description``, ``tags``, ``languages``,
    ``quantized_by``. ``progress`` is a callable(n_bytes) or a tqdm. The leading
    underscore flags exist only for the tests' negative controls.
    """
    import gguf

    out_file = Path(out_file)
    if gguf_type is None:
        mats = [p.dtype for p in plan if len(p.shape) >= 2]
        gguf_type = default_gguf_type(mats[0] if mats else torch.float32)
    gguf_type = gguf_type.lower()
    arch = check_gguf_request(hf_config, gguf_type, tokenizer_dir)
    _, _, family = _arch_of(hf_config)
    info = _identify_vocab(Path(tokenizer_dir))
    outs = _build_outputs(plan, hf_config, arch, family, gguf_type,
                          skip_permute=_skip_permute, skip_norm_shift=_skip_norm_shift)
    n_params = sum(o.n_params for o in outs)
    cb = _progress_cb(progress)
    out_file.parent.mkdir(parents=True, exist_ok=True)

    def make_writer(file_type) -> "gguf.GGUFWriter":
        w = gguf.GGUFWriter(path=None, arch=arch)
        _add_general(w, name, metadata, n_params, hf_config)
        _add_hparams(w, hf_config, arch, family, file_type)
        _add_vocab(w, info, hf_config, family)
        return w

    partial = out_file.with_name(out_file.name + ".partial")
    try:
        if gguf_type in K_QUANTS:
            with tempfile.TemporaryDirectory(prefix=".efexport-gguf-", dir=out_file.parent) as tmp:
                inter = Path(tmp) / "intermediate-F16.gguf"
                _write_stream(outs, make_writer(_file_type(gguf_type)), inter, cb)
                _llama_quantize(inter, partial, gguf_type)
        else:
            _write_stream(outs, make_writer(_file_type(gguf_type)), partial, cb)
        os.replace(partial, out_file)
    finally:
        if partial.exists():
            partial.unlink()

    return {
        "arch": arch,
        "gguf_type": gguf_type,
        "file_type": TYPE_LABELS[gguf_type],
        "file": out_file.name,
        "tensor_count": len(outs),
        "file_size": out_file.stat().st_size,
        "n_params": n_params,
        "tokenizer_model": info.kind,
        "tokenizer_pre": info.pre,
        "vocab_size": int(hf_config["vocab_size"]),
    }


def _llama_quantize(src: Path, dst: Path, gguf_type: str) -> None:
    try:
        import llama_cpp
    except ImportError as e:  # checked up front; kept for direct callers
        raise _err(f"make {gguf_type} without llama-cpp-python", EXTRA_HINT) from e
    ftype = {
        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
        "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
        "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    }[gguf_type]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = max(1, os.cpu_count() or 1)
    with _captured_stderr() as log:  # llama.cpp logs every tensor; keep it for the error only
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        tail = " ".join(log.text.strip().splitlines()[-2:])
        raise _err(f"quantize to {gguf_type} with llama.cpp (llama_model_quantize returned {rc}: {tail})",
                   "retry with q8_0, or check the llama-cpp-python installation")


class _captured_stderr:
    """Redirect file descriptor 2 (where llama.cpp logs) to a temporary file; ``.text`` after exit."""

    text = ""

    def __enter__(self):
        import sys

        self._tmp = tempfile.TemporaryFile(mode="w+b")
        self._saved = None
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            os.dup2(self._tmp.fileno(), 2)
        except (OSError, ValueError):  # no usable fd 2: let llama.cpp log through
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode("utf-8", "replace")
        self._tmp.close()
        return False


# --------------------------------------------------------------------------- Ollama


_OLLAMA_TEMPLATES = {
    "chatml": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma": (
        "{{- range .Messages }}{{- if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n"
        "{{- else }}<start_of_turn>user\n{{ .Content }}<end_of_turn>\n{{- end }}\n{{ end }}<start_of_turn>model\n"
    ),
}
_TURN_END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


def _chat_template(tokenizer_dir: Path) -> str | None:
    d = Path(tokenizer_dir)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        ct = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(ct, str):
            return ct
        if isinstance(ct, list):
            for item in ct:
                if item.get("name") == "default":
                    return item.get("template")
    if (d / "chat_template.json").is_file():
        ct = json.loads((d / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        if isinstance(ct, str):
            return ct
    return None


def _template_family(tpl: str | None) -> str | None:
    if not tpl:
        return None
    if "<|im_start|>" in tpl and "<|im_end|>" in tpl:
        return "chatml"
    if "<|start_header_id|>" in tpl and "<|eot_id|>" in tpl:
        return "llama3"
    if "<start_of_turn>" in tpl and "<end_of_turn>" in tpl:
        return "gemma"
    return None


def _stop_tokens(tokenizer_dir: Path, family: str | None) -> list[str]:
    d = Path(tokenizer_dir)
    id_to_content: dict[int, str] = {}
    tj = _load_tokenizer_json(d)
    if tj:
        for at in tj.get("added_tokens") or []:
            id_to_content[int(at["id"])] = at["content"]
    stops: list[str] = []

    def add(tok: Any) -> None:
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str) and tok and tok not in stops:
            stops.append(tok)

    if family:
        add(_TURN_END[family])
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        add(json.loads(tc.read_text(encoding="utf-8")).get("eos_token"))
    gc = d / "generation_config.json"
    if gc.is_file():
        eos = json.loads(gc.read_text(encoding="utf-8")).get("eos_token_id")
        for tid in eos if isinstance(eos, list) else [eos]:
            if isinstance(tid, int) and tid in id_to_content:
                add(id_to_content[tid])
    if tj:
        for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<|eom_id|>"):
            if t in id_to_content.values():
                add(t)
    return stops


def write_modelfile(folder: Path, gguf_filename: str, tokenizer_dir: Path) -> Path:
    """Write an Ollama ``Modelfile``: FROM, TEMPLATE (for ChatML / Llama 3 / Gemma chat templates), stops."""
    folder = Path(folder)
    family = _template_family(_chat_template(Path(tokenizer_dir)))
    lines = [f"FROM ./{gguf_filename}", ""]
    if family:
        lines += [f'TEMPLATE """{_OLLAMA_TEMPLATES[family]}"""', ""]
    for s in _stop_tokens(Path(tokenizer_dir), family):
        lines.append(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}")
    path = folder / "Modelfile"
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- llama.cpp checks


def _load_llama(gguf_file: Path, **kw):
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise _err("check the GGUF with llama.cpp: llama-cpp-python is not installed", EXTRA_HINT) from e
    return Llama(model_path=str(gguf_file), verbose=False, **kw)


def llama_cpp_logits(gguf_file: Path, input_ids: Sequence[int]) -> torch.Tensor:
    """Evaluate ``input_ids`` in llama.cpp (f32 KV cache) and return ``[T, V]`` float32 logits."""
    ids = [int(i) for i in input_ids]
    n = len(ids)
    n_ctx = max(32, 1 << (n + 8 - 1).bit_length())
    llm = _load_llama(
        Path(gguf_file), logits_all=True, type_k=0, type_v=0, n_ctx=n_ctx, n_batch=max(n, 8),
        n_ubatch=max(n, 8), n_threads=max(1, os.cpu_count() or 1), n_gpu_layers=0,
    )
    try:
        llm.eval(ids)
        out = torch.from_numpy(np.array(llm.scores[:n, :], dtype=np.float32, copy=True))
    finally:
        llm.close()
    return out


def llama_cpp_tokenize(gguf_file: Path, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
    """Tokenize ``text`` with the GGUF's own vocabulary in llama.cpp (BOS/EOS per the file's flags)."""
    llm = _load_llama(Path(gguf_file), vocab_only=True)
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special))
    finally:
        llm.close()


__all__ = [
    "GGUF_TYPES", "K_QUANTS", "TYPE_LABELS", "check_gguf_request", "write_gguf", "write_modelfile",
    "llama_cpp_logits", "llama_cpp_tokenize", "gguf_filename", "default_gguf_type", "llama_cpp_available",
]
