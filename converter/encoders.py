"""NF4 (double quant) and LLM.int8 encoders: bitsandbytes' CPU bytes, on every core.

Written from bitsandbytes' public, documented behaviour (its ``quantize_4bit`` with
``compress_statistics=True``, ``quantize_blockwise`` and ``int8_vectorwise_quant`` on CPU)
and its published code books, copied here as data; no bitsandbytes import. Tests compare
every output byte with bitsandbytes itself (tests/test_encoders.py).

Why faster: a tensor is cut into cache-sized chunks of whole 64-value blocks that a pool of
workers encodes side by side (torch kernels release the GIL), each worker's kernels on that
worker alone; block maxima are integer maxima of bit patterns; and the NF4 code of a value,
which bitsandbytes finds with ``torch.bucketize`` (a binary search per value), is read from
two tables indexed by the value's top 16 bits, plus one comparison. Only the double
quantization of the block maxima (1/64 of the values) runs on the calling thread.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterator

import torch

# bitsandbytes.functional.get_4bit_type("nf4"): the 16 NF4 values (QLoRA), sorted.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# bitsandbytes.functional.create_dynamic_map() (signed, 8 bits): its 127 positive values
# below 1.0 as float32; the map is 0, 1.0 and these values with both signs, sorted.
DYNAMIC_POSITIVE = (
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001,
    0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501,
    0.0012812499, 0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503,
    0.00578125, 0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875,
    0.01140625, 0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375,
    0.03390625, 0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375,
    0.05640625, 0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375,
    0.07890625, 0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375,
    0.107031256, 0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874,
    0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873,
    0.33203125, 0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874,
    0.44453126, 0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875,
    0.5570313, 0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876,
    0.6695312, 0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688,
    0.78203124, 0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687,
    0.89453125, 0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874,
)
BLOCKSIZE = 64  # NF4 block (transformers' default)
NESTED_BLOCKSIZE = 256  # blocks of absmax values in double quantization
LUT_BINS = 65536  # bitsandbytes' CPU quantize_blockwise: [-1, 1] in 65536 bins, each mapped to a code
CHUNK_ELEMENTS = 131072  # values a worker encodes per step: its temporaries stay in cache


def nf4_code() -> torch.Tensor:
    """The NF4 ``quant_map`` every 4-bit weight carries (a fresh tensor: each is saved on its own)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32)


def dynamic_code() -> torch.Tensor:
    """The ``nested_quant_map``: bitsandbytes' signed 8-bit dynamic code, 256 sorted values."""
    pos = torch.tensor(DYNAMIC_POSITIVE, dtype=torch.float32)
    return torch.cat([-pos.flip(0), torch.zeros(1), pos, torch.ones(1)])


@lru_cache(maxsize=1)
def nf4_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """(base, candidate) per float32 top half (sign, exponent, 7 mantissa bits), read as int16 + 32768.

    bitsandbytes' NF4 code of x is the number of midpoints between neighbouring code values
    strictly below x (``bucketize`` on the midpoints). The floats sharing their top 16 bits
    form an interval holding at most one midpoint, so code = base + (x > candidate): base
    counts the midpoints below the interval, candidate is the one inside it (or +inf).
    """
    code = nf4_code()
    mids = ((code[:-1] + code[1:]) / 2).double()
    top = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int64) << 16
    ends = torch.stack([top, top | 0xFFFF]).to(torch.int32).view(torch.float32).double()
    ends = torch.where(ends.isnan(), ends.flip(0), ends)  # +-inf's interval also holds NaNs (never met)
    lo, hi = ends.amin(0), ends.amax(0)
    below = (mids[None, :] < lo[:, None]).sum(1)
    inside = (mids[None, :] >= lo[:, None]) & (mids[None, :] <= hi[:, None])
    cand = torch.where(inside, mids[None, :], torch.inf).amin(1)
    return below.to(torch.uint8), cand.float()


@lru_cache(maxsize=1)
def dynamic_lut() -> torch.Tensor:
    """bitsandbytes' CPU lookup table: bin i (value -1 + 2i/65535 in float32) -> code index."""
    code = dynamic_code()
    mids = (code[:-1] + code[1:]) * 0.5
    twice = torch.arange(LUT_BINS, dtype=torch.float32) * 2
    value = torch.div(twice, torch.full_like(twice, LUT_BINS - 1)) - 1.0
    return torch.searchsorted(mids, value).to(torch.uint8)  # midpoints strictly below the value


def nf4_codes(x: torch.Tensor) -> torch.Tensor:
    """NF4 code (uint8, 0-15) of each float32 in ``x``: bucketize on the code's midpoints."""
    base, cand = nf4_tables()
    top = (x.view(torch.int32) >> 16).add_(1 << 15)  # the top half as int16, + 32768: 0..65535
    q = torch.index_select(base, 0, top)
    return q.add_(torch.gt(x, torch.index_select(cand, 0, top)).view(torch.uint8))


def abs_max_rows(a: torch.Tensor) -> torch.Tensor:
    """Max |a| per row of a 16-bit float matrix, exactly: the largest bit pattern without its sign.

    For floats of one sign, bit patterns sort like values; an integer max is several times faster.
    """
    return (a.view(torch.int16) & 0x7FFF).amax(1).view(a.dtype)


def workers(threads: int | None) -> int:
    """Threads to encode with: ``threads``, else torch's own count (what --threads sets)."""
    return max(1, threads if threads is not None else torch.get_num_threads())


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``--threads N``: torch's thread count (so the encoders' workers) for a block, restored after."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def serial_kernels() -> None:
    """Pool initializer: the worker's torch kernels run on the worker alone, never on a nested team
    of torch threads (N workers x N threads would oversubscribe the cores, and stall under load)."""
    torch.get_num_threads()  # torch's own per-thread set-up first, so that it cannot undo the next line
    torch.set_num_threads(1)


def in_chunks(fn: Callable[[int, int], None], total: int, step: int, threads: int | None) -> None:
    """Call ``fn(start, stop)`` over ``range(total)`` in steps, on a pool of workers when there are several.

    A worker's ``torch.set_num_threads(1)`` is its own for torch's OpenMP threads, but it is
    also what threads started later begin with: the caller's count is set back afterwards.
    """
    starts = range(0, total, step)
    n = min(workers(threads), len(starts))
    if n <= 1:
        for s in starts:
            fn(s, min(total, s + step))
        return
    caller = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(n, thread_name_prefix="efexport-encode", initializer=serial_kernels) as pool:
            for f in [pool.submit(fn, s, min(total, s + step)) for s in starts]:
                f.result()
    finally:
        torch.set_num_threads(caller)


def blockwise_nested(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU ``quantize_blockwise(values, blocksize=256)``: (uint8 codes, float32 absmax).

    Its native kernel: absmax per block of 256, ``v = clamp(x * (1/absmax), -1, 1)``, bin
    ``trunc(fma((v + 1) * 0.5, 65535, 0.5))`` of its lookup table; all-zero blocks give 0.
    The fma is exact here in float64 ((v + 1) * 0.5 is a multiple of 2**-25), rounded once.
    """
    n = values.numel()
    blocks = -(-n // NESTED_BLOCKSIZE)
    x = torch.zeros(blocks * NESTED_BLOCKSIZE, dtype=torch.float32)
    x[:n] = values
    x = x.view(blocks, NESTED_BLOCKSIZE)
    absmax = x.abs().amax(1)
    v = (x * torch.reciprocal(absmax)[:, None]).clamp_(-1.0, 1.0)
    half = (v + 1.0) * 0.5
    bins = (half.double() * (LUT_BINS - 1) + 0.5).float().to(torch.int32)
    zero = (absmax == 0)[:, None]
    bins = bins.masked_fill_(zero, 0).clamp_(0, LUT_BINS - 1)
    q = torch.index_select(dynamic_lut(), 0, bins.view(-1)).view(blocks, NESTED_BLOCKSIZE)
    return q.masked_fill_(zero, 0).view(-1)[:n].clone(), absmax


def encode_nf4(weight: torch.Tensor, threads: int | None = None) -> dict[str, torch.Tensor]:
    """NF4 + double quant of ``weight`` rounded to bfloat16, as transformers saves it.

    Keys are the suffixes after the weight's name ("" is the packed weight), in
    ``QuantState.as_dict(packed=True)`` order.
    """
    shape = tuple(weight.shape)
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % BLOCKSIZE
    blocks = full // BLOCKSIZE
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // BLOCKSIZE), dtype=torch.float32)

    def chunk(b0: int, b1: int) -> None:  # all the per-value work, on a worker
        a = flat[b0 * BLOCKSIZE:b1 * BLOCKSIZE].to(torch.bfloat16).view(-1, BLOCKSIZE)
        am = absmax[b0:b1].copy_(abs_max_rows(a))
        x = (a * am.clamp(min=1e-38).reciprocal_()[:, None]).view(-1)  # as bnb: float(a) * (1 / clamp(absmax))
        pairs = nf4_codes(x).view(torch.int16)  # little-endian: (odd << 8) | even
        packed[b0 * BLOCKSIZE // 2:b1 * BLOCKSIZE // 2] = (pairs << 4).bitwise_or_(pairs >> 8)  # low byte

    in_chunks(chunk, blocks, CHUNK_ELEMENTS // BLOCKSIZE, threads)
    if full < n:  # the last, partial block: bnb divides by its absmax (clamped, and stored clamped)
        tail = flat[full:].to(torch.bfloat16).float()
        am = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        x = torch.cat([torch.clamp(tail / am, -1, 1), torch.zeros((n - full) % 2)])
        q = nf4_codes(x)
        packed[full // 2:] = q[1::2] + q[0::2] * 16
    offset = absmax.mean()  # torch's own float32 mean, as bnb takes it (its last bit follows torch's threads)
    qabsmax, nested_absmax = blockwise_nested(absmax - offset)
    state = {"quant_type": "nf4", "blocksize": BLOCKSIZE, "dtype": "bfloat16", "shape": list(shape),
             "nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": offset.item()}
    blob = torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8)
    return {"": packed.unsqueeze(1), ".absmax": qabsmax, ".quant_map": nf4_code(), ".nested_absmax": nested_absmax,
            ".nested_quant_map": dynamic_code(), ".quant_state.bitsandbytes__nf4": blob}


def encode_int8(weight: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 of a 2-D ``weight`` rounded to bfloat16 then float16: (int8 weight, SCB).

    Per row: SCB = max |w| (float32), codes ``round(w * (1/SCB * 127))`` in float32, as
    bnb's ``int8_vectorwise_quant`` computes ``A * (127.0 / row_stats)``.
    """
    rows, cols = weight.shape
    cb = torch.empty((rows, cols), dtype=torch.int8)
    scb = torch.empty(rows, dtype=torch.float32)

    def chunk(r0: int, r1: int) -> None:
        a = weight[r0:r1].to(torch.bfloat16).to(torch.float16)
        stats = scb[r0:r1].copy_(abs_max_rows(a))
        cb[r0:r1] = (a * (stats.reciprocal() * 127.0)[:, None]).round_()  # f16 * f32 -> f32

    in_chunks(chunk, rows, max(1, CHUNK_ELEMENTS // max(1, cols)), threads)
    return cb, scb


# precision -> encoder (what precision.py applies; benchmarks time them against bitsandbytes)
ENCODERS: dict[str, Callable[..., object]] = {"int4": encode_nf4, "int8": encode_int8}
