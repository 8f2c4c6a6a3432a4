"""llama.cpp itself, through llama-cpp-python (the ``efexport[gguf]`` extra), imported lazily.

Two uses: the K-quants (``q4_k_m``, ``q5_k_m``, ``q6_k``) are made by llama.cpp's own
quantizer (``llama_model_quantize``) so the file is what llama.cpp would make, and the
written file is checked by loading it in llama.cpp (logits, tokenization). This
module imports without llama-cpp-python; only these calls need it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...errors import fail
from .config import EXTRA_HINT, SEE


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class CapturedStderr:
    """Redirect file descriptor 2 (where llama.cpp logs) to a temporary file; ``.text`` after exit."""

    text = ""

    def __enter__(self) -> "CapturedStderr":
        self._tmp = tempfile.TemporaryFile(mode="w+b")
        self._saved: int | None = None
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            os.dup2(self._tmp.fileno(), 2)
        except (OSError, ValueError):  # no usable fd 2: let llama.cpp log through
            self._saved = None
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode("utf-8", "replace")
        self._tmp.close()
        return False


def llama_quantize(src: Path, dst: Path, gguf_type: str) -> None:
    """Quantize the F16 file ``src`` to the K-quant ``gguf_type`` at ``dst`` with llama.cpp's quantizer."""
    try:
        import llama_cpp
    except ImportError as e:  # checked up front; kept for direct callers
        raise fail(f"make {gguf_type} without llama-cpp-python", EXTRA_HINT, SEE) from e
    ftype = {
        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
        "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
        "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    }[gguf_type]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = max(1, os.cpu_count() or 1)
    with CapturedStderr() as log:  # llama.cpp logs every tensor; keep it for the error only
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        tail = " ".join(log.text.strip().splitlines()[-2:])
        raise fail(f"quantize to {gguf_type} with llama.cpp (llama_model_quantize returned {rc}: {tail})",
                   "retry with q8_0, or check the llama-cpp-python installation", SEE)


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
