"""llama.cpp's own quantizer, ``ggml_quantize_chunk`` of libggml-base, called through ctypes on row blocks.

llama-cpp-python ships the ggml library that ``llama_model_quantize`` calls, a range of
rows at a time, after converting the F16 file's rows to float32. Calling the same
function on row blocks of each tensor as it streams, from the same float32 values
(rounded to float16 first, as the F16 file held them), makes the same bytes without
that file and without a whole tensor in float32. Without an importance matrix every row
is quantized on its own, so any split into blocks gives the same bytes; blocks run on a
thread pool (ctypes releases the GIL during the C call), a bounded number in flight.

The library is found beside the installed ``llama_cpp`` package (or in
``LLAMA_CPP_LIB_PATH``, as llama-cpp-python itself honours) and loaded on first use:
this package imports without llama-cpp-python.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from ...errors import fail
from .config import EXTRA_HINT, SEE

#: file names of libggml-base per platform, as llama-cpp-python's own loader spells them
LIBRARY_NAMES = {
    "linux": ("libggml-base.so",), "freebsd": ("libggml-base.so",),
    "darwin": ("libggml-base.dylib", "libggml-base.so"), "win32": ("ggml-base.dll", "libggml-base.dll"),
}
#: the C functions used: name -> (return type, argument types)
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    # size_t ggml_quantize_chunk(type, const float * src, void * dst, int64 start, int64 nrows, int64 n_per_row,
    #                            const float * imatrix)
    "ggml_quantize_chunk": (ctypes.c_size_t, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                              ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]),
    "ggml_quantize_init": (None, [ctypes.c_int]),
    "ggml_quantize_requires_imatrix": (ctypes.c_bool, [ctypes.c_int]),
    "ggml_row_size": (ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]),
    "ggml_blck_size": (ctypes.c_int64, [ctypes.c_int]),
    "ggml_validate_row_data": (ctypes.c_bool, [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]),
}
#: row blocks in flight per thread (each holds its rows until quantized, then its output until written)
IN_FLIGHT_PER_THREAD = 2
#: each quantizer thread's float32 / float16 buffers
SCRATCH = threading.local()


def library_dir() -> Path | None:
    """Where llama-cpp-python keeps its shared libraries (None: the package is not installed)."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


@functools.lru_cache(maxsize=1)
def ggml_base() -> ctypes.CDLL:
    """libggml-base, with the signatures above declared; a three-line error when it cannot be found."""
    where = library_dir()
    platform = next((p for p in LIBRARY_NAMES if sys.platform.startswith(p)), "linux")
    found = [where / n for n in LIBRARY_NAMES[platform] if where is not None and (where / n).is_file()]
    if not found:
        raise fail(f"make K-quants: llama.cpp's ggml library ({LIBRARY_NAMES[platform][0]}) was not found"
                   f"{f' in {where}' if where else ''}", f"{EXTRA_HINT} (or choose q8_0, q4_0 or q5_0)", SEE)
    try:
        lib = ctypes.CDLL(str(found[0]))
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError) as e:
        raise fail(f"make K-quants with {found[0]}: {e}",
                   f"reinstall llama-cpp-python ({EXTRA_HINT}), or choose q8_0, q4_0 or q5_0", SEE) from e
    return lib


def quantize_rows(qtype: int, rows: np.ndarray) -> np.ndarray:
    """Float32 rows ``[n, k]`` as GGML ``qtype`` bytes, by ``ggml_quantize_chunk``, checked as llama.cpp checks them."""
    lib = ggml_base()
    n, k = rows.shape
    if k % lib.ggml_blck_size(qtype) or lib.ggml_quantize_requires_imatrix(qtype):  # ggml would abort the process
        raise RuntimeError(f"GGML type {qtype}: rows of {k} are not whole blocks, or it needs an importance matrix")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.empty(n * lib.ggml_row_size(qtype, k), dtype=np.uint8)
    size = lib.ggml_quantize_chunk(qtype, rows.ctypes.data, out.ctypes.data, 0, n, k, None)
    if size != out.nbytes or not lib.ggml_validate_row_data(qtype, out.ctypes.data, size):
        import gguf

        raise fail(f"quantize to {gguf.GGMLQuantizationType(qtype).name}: llama.cpp's check of the quantized rows "
                   "failed (the weights hold NaN or infinite values, or values beyond float16's range)",
                   "export --precision bf16 or fp32 (--format hf keeps them as they are)", SEE)
    return out


def scratch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's float32 and float16 buffers of at least ``n`` values, reused block after block.

    Fresh buffers for every block leave the allocator's freed pages resident (about 50 MB
    more per thread at 0.6B); the pool's threads keep theirs until they end.
    """
    bufs = getattr(SCRATCH, "bufs", None)
    if bufs is None or bufs[0].numel() < n:
        SCRATCH.bufs = bufs = (torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float16))
    return bufs


def block_bytes(rows: torch.Tensor, qtype: Any, via: Any) -> np.ndarray:
    """One row block: to float32 (through float16 when ``via`` is F16, as the F16 file held it), then quantized.

    torch's casts round to nearest even, subnormals and overflow included, as numpy's
    ``astype(float16)`` that wrote the F16 file does (the byte-identity tests cover both
    bfloat16 and float32 sources), at several times its speed.
    """
    import gguf

    n = rows.numel()
    f32, f16 = scratch(n)
    if via == gguf.GGMLQuantizationType.F16:  # the F16 file's values, read back as llama.cpp reads them
        rows = f16[:n].view(rows.shape).copy_(rows)
    return quantize_rows(int(qtype), f32[:n].view(rows.shape).copy_(rows).numpy())


class RowQuantizer:
    """Row blocks quantized by ggml on ``threads`` threads, returned in order with a bounded number in flight."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ggml-quantize")
        self.window = IN_FLIGHT_PER_THREAD * self.threads

    def encoder(self, qtype: Any, via: Any) -> Callable[[Iterable[torch.Tensor]], Iterator[np.ndarray]]:
        """The encoder of one tensor's row blocks as ``qtype``, from values stored as ``via`` in the F16 file."""
        return functools.partial(self.encode, qtype=qtype, via=via)

    def encode(self, blocks: Iterable[torch.Tensor], qtype: Any, via: Any) -> Iterator[np.ndarray]:
        """The bytes of each block of rows, in order; at most ``window`` blocks are held at once."""
        ggml_base().ggml_quantize_init(int(qtype))  # a no-op for the K-quants; llama.cpp calls it first too
        pending: deque[Future] = deque()
        for rows in blocks:
            pending.append(self.pool.submit(block_bytes, rows, qtype, via))
            if len(pending) >= self.window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "RowQuantizer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
