"""llama.cpp itself, through llama-cpp-python (the ``efexport[gguf]`` extra), imported lazily.

The written file is checked by loading it in llama.cpp (logits, tokenization); the
K-quants call llama.cpp's quantizer in its ggml library directly (:mod:`.ggml`). This
module imports without llama-cpp-python; only these calls need it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...errors import fail
from .config import EXTRA_HINT, SEE


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _load_llama(gguf_file: Path, **kw: Any) -> Any:
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise fail("check the GGUF with llama.cpp: llama-cpp-python is not installed", EXTRA_HINT, SEE) from e
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
    return llama_cpp_tokenize_all(gguf_file, [text], add_special=add_special, parse_special=parse_special)[0]


def llama_cpp_tokenize_all(gguf_file: Path, texts: Sequence[str], *, add_special: bool = True,
                           parse_special: bool = True) -> list[list[int]]:
    """Tokenize several texts with one load of the vocabulary (a real one takes a moment to load)."""
    llm = _load_llama(Path(gguf_file), vocab_only=True)
    try:
        return [list(llm.tokenize(t.encode("utf-8"), add_bos=add_special, special=parse_special)) for t in texts]
    finally:
        llm.close()
