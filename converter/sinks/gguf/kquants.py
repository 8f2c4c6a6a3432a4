"""The K-quant files as llama.cpp's ``llama_model_quantize`` makes them: tensor order, type mix, key order.

``q4_k_m``, ``q5_k_m`` and ``q6_k`` used to be made by writing an F16 GGUF and handing
it to ``llama_model_quantize``. The sink now writes the same file directly, so the
rules that quantizer applies to the F16 file are replicated here as tables and pure
functions, from ``src/llama-quant.cpp`` of the llama.cpp that llama-cpp-python 0.3.36
ships (``tensor_allows_quantization``, ``tensor_get_category``,
``llama_tensor_get_type_impl``, ``tensor_type_fallback``), for the three file types and
the architectures the sink writes (no falcon, no imatrix, no overrides):

* tensors come out in its loader's order (``weight_name_comparer``: non-layer tensors
  first, then by layer, by name within each);
* each tensor's type starts from the F16 file's (F32 for norms and routers, F16 for the
  rest) and follows its per-category rules; rows not a multiple of the type's block fall
  back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16);
* ``general.quantization_version`` and ``general.file_type`` move to the end of the keys,
  where its ``gguf_set_val_u32`` puts them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

#: llama.cpp's default tensor type of each file type (``llama_ftype_get_default_type``)
DEFAULT_TYPE = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}
#: file types whose attn_v / ffn_down get Q6_K on the layers ``use_more_bits`` picks
MORE_BITS = ("q4_k_m", "q5_k_m")
#: ``tensor_type_fallback``: the 32-block type a 256-block type falls back to
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
#: name parts ``tensor_allows_quantization`` never quantizes (the ones any written architecture can have)
KEPT_AS_IS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight", "attn_rel_b.weight",
    ".position_embd", ".patch_embd", ".patch_merger", ".rel_pos",
)
KEPT_NAMES = ("position_embd.weight", "token_types.weight")
#: ``tensor_get_category``: name part -> category, first match wins (output / token_embd by full name)
CATEGORIES = (
    ("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
)
#: architectures whose 80-layer models llama.cpp types as 70B: (n_layer, n_head, n_head_kv, n_expert) -> bool
IS_70B = {
    "llama": lambda n_layer, n_head, n_head_kv, n_expert: n_expert != 8 and n_layer == 80 and n_head != n_head_kv,
    "qwen2": lambda n_layer, n_head, n_head_kv, n_expert: n_layer == 80,
}

LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class Model:
    """The hyperparameters llama.cpp's type rules read (from the file's keys)."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int  # 0 when dense (llama.cpp reads expert_count <= 1 as 0)

    @property
    def is_70b(self) -> bool:
        rule = IS_70B.get(self.arch)
        return bool(rule and rule(self.n_layer, self.n_head, self.n_head_kv, self.n_expert))


def layer_of(name: str) -> int:
    """``sscanf(name, "blk.%d.")``: the layer a tensor belongs to, -1 for the others."""
    m = LAYER.match(name)
    return int(m.group(1)) if m else -1


def llama_order(names: Sequence[str]) -> list[str]:
    """Tensor names in llama.cpp's loader order: non-layer tensors, then layer by layer, by name within."""
    return sorted(names, key=lambda n: (layer_of(n), n.encode()))


def ggml_dims(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape as ggml counts its dimensions (``ggml_n_dims``): leading 1s dropped, at least one."""
    shape = tuple(int(s) for s in shape) or (1,)
    i = 0
    while i < len(shape) - 1 and shape[i] == 1:
        i += 1
    return shape[i:]


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """``tensor_allows_quantization``: 2-D and 3-D weights, not norms, routers or the listed small tensors."""
    if len(ggml_dims(shape)) < 2 or not name.endswith("weight") or name in KEPT_NAMES:
        return False
    return not any(part in name for part in KEPT_AS_IS)


def category(name: str) -> str:
    """``tensor_get_category``: the broad role a tensor's type rules key on."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((cat for part, cat in CATEGORIES if part in name), "other")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that keep more bits: the first and last eighth, every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fallback(qtype: str, ncols: int, block: dict[str, int]) -> str:
    """``tensor_type_fallback``: a type whose block divides the rows (256-block -> 32-block -> F16)."""
    if ncols % block[qtype] == 0:
        return qtype
    out = FALLBACK.get(qtype, qtype)
    return out if ncols % block[out] == 0 else "F16"


def kquant_types(tensors: Sequence[tuple[str, Sequence[int], str]], gguf_type: str, model: Model,
                 block: dict[str, int]) -> list[str]:
    """Each tensor's type in the ``gguf_type`` file llama.cpp makes from the F16 one.

    ``tensors`` are ``(name, numpy-order shape, type in the F16 file)`` in llama.cpp's
    order (the attn_v / ffn_down counters follow it); types are GGML type names, and
    ``block`` gives each one's block size.
    """
    names = [n for n, _, _ in tensors]
    n_attn_v = sum(category(n) == "attn_v" for n in names)
    tied = "output.weight" not in names  # llama.cpp: tied until it sees output.weight
    i_attn_v = i_ffn_down = 0
    out: list[str] = []
    for name, shape, own in tensors:
        if not allows_quantization(name, shape):
            out.append(own)
            continue
        cat, ncols, new = category(name), int(shape[-1]), DEFAULT_TYPE[gguf_type]
        if cat == "output" or (tied and cat == "token_embd"):
            new = "Q8_0" if ncols % block[new] else "Q6_K"
        elif cat == "attn_v":
            if gguf_type in MORE_BITS and use_more_bits(i_attn_v, n_attn_v):
                new = "Q6_K"
            if model.is_70b and new in ("Q3_K", "Q4_K"):
                new = "Q5_K"
            if model.n_expert == 8:
                new = "Q8_0"
            i_attn_v += 1
        elif cat == "attn_k" and model.n_expert == 8:
            new = "Q8_0"
        elif cat == "ffn_down":
            i_layer = layer_of(name) if model.n_expert > 1 else i_ffn_down
            if gguf_type in MORE_BITS and use_more_bits(i_layer, model.n_layer):
                new = "Q6_K"
            i_ffn_down += 1
        elif cat == "attn_output" and model.n_expert == 8 and gguf_type == "q4_k_m":
            new = "Q5_K"
        out.append(fallback(new, ncols, block))
    return out


def keys_last(kv: dict[str, Any], keys: Sequence[str]) -> None:
    """Move ``keys`` to the end of an ordered key/value map, as llama.cpp's ``gguf_set_val_*`` does on a rewrite."""
    for k in keys:
        if k in kv:
            kv[k] = kv.pop(k)
