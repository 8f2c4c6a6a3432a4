"""The GGUF types efexport writes: their names, labels, file types, and each tensor's GGML type.

``--precision`` names a GGUF type (``q8_0``, ``q4_k_m``, ...); the file then holds
tensors of several GGML types, chosen per tensor by the rules of llama.cpp's
converter (``convert_hf_to_gguf.py``), so the file is what llama.cpp would make. The
K-quant files start from the types of the F16 file llama.cpp's quantizer would read
(:func:`qtype_for`), which :mod:`.kquants` turns into that quantizer's type mix.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

GGUF_TYPES = ("fp32", "fp16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k_m", "q5_k_m", "q6_k")
#: quantized by llama.cpp's own quantizer (``ggml_quantize_chunk``), as ``llama_model_quantize`` makes them from F16
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")

#: file-name label of each type (``<name>-<LABEL>.gguf``)
TYPE_LABELS = {
    "fp32": "F32", "fp16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0",
    "q5_0": "Q5_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K",
}


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


def file_type(gguf_type: str) -> Any:
    """``general.file_type`` of the file written here."""
    import gguf

    F = gguf.LlamaFileType
    return {
        "fp32": F.ALL_F32, "fp16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0, "q5_0": F.MOSTLY_Q5_0,
        "q4_k_m": F.MOSTLY_Q4_K_M, "q5_k_m": F.MOSTLY_Q5_K_M, "q6_k": F.MOSTLY_Q6_K,
    }[gguf_type]


def qtype_for(gname: str, shape: tuple[int, ...], gguf_type: str, tied: bool = False) -> Any:
    """The GGML type of one tensor, following convert_hf_to_gguf.py's rules.

    For the K-quants: its type in the F16 file that ``llama_model_quantize`` would read
    (:mod:`.kquants` gives the final type). For q4_0 / q5_0 the output projection (and
    the embedding when it doubles as the output) is kept at Q8_0: llama.cpp's quantizer
    gives it Q6_K there, a type only llama.cpp's C code makes; Q8_0 is the nearest type
    at least as precise.
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
        # K-quants: the F16 file llama.cpp's quantizer would start from
        "q4_k_m": Q.F16, "q5_k_m": Q.F16, "q6_k": Q.F16,
    }[gguf_type]
    if base in (Q.Q4_0, Q.Q5_0) and (gname == "output.weight" or (tied and gname == "token_embd.weight")):
        base = Q.Q8_0
    if base not in (Q.F32, Q.F16, Q.BF16):
        block, _ = gguf.GGML_QUANT_SIZES[base]
        if shape[-1] % block != 0:
            base = Q.F16  # as the converter does on QuantError
    return base


def is_quantized(qtype: Any) -> bool:
    """Whether a GGML type is a block quantization (not F32/F16/BF16)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    return qtype not in (Q.F32, Q.F16, Q.BF16)


def own_qtype(dtype: torch.dtype) -> Any:
    """The GGML type that stores a torch dtype as it is (None for any other dtype)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    return {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}.get(dtype)


def nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    """Bytes of a tensor of ``shape`` encoded as ``qtype`` (whole blocks: rows are multiples of the block)."""
    import gguf

    block, tsize = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) if shape else 1
    return n // block * tsize
