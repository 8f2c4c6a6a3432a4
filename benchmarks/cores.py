"""What a second thread buys on this machine: compute throughput at 1 and 2 threads, side by side.

    python benchmarks/cores.py [--results benchmarks/results_v3/cores.jsonl]

Every figure here assumes the two cores the machine reports can each compute. This measures it
directly, best of 5 after a warm-up, in one process on an otherwise idle machine:

- ``matmul``: float32 2048 x 2048 @ 2048 x 2048 (torch / MKL), GFLOPS;
- ``linear_f32`` / ``linear_bf16``: a [24, 2048] x [6144, 2048]^T ``F.linear``, the parity check's
  shape (one probe prompt through a 1.7B MLP projection), GFLOPS;
- ``nf4`` / ``int8``: efexport's encoders on a 6144 x 2048 float32 matrix, Mparam/s;
- ``merge``: ``merge_lora`` (bf16 W0 + rank-16 LoRA, float32 sum), Mparam/s;
- ``sha256``: hashlib over 256 MiB (one thread by nature; listed for scale), MB/s.

One JSON line per (kernel, threads); the table goes to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def best_of(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=HERE / "results_v3" / "cores.jsonl")
    args = ap.parse_args()
    import torch
    from torch.nn import functional as F

    from converter.encoders import encode_int8, encode_nf4, torch_threads
    from converter.strategy.lora import merge_lora

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    x, w = torch.randn(24, 2048, generator=g), torch.randn(6144, 2048, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    la, lb = (torch.randn(16, 2048, generator=g) * 0.01).bfloat16(), (torch.randn(6144, 16, generator=g) * 0.01).bfloat16()
    blob = os.urandom(256 << 20)
    kernels: dict[str, tuple[str, float, Callable[[int], object]]] = {
        "matmul": ("GFLOPS", 2 * 2048**3 / 1e9, lambda n: a @ b),
        "linear_f32": ("GFLOPS", 2 * 24 * 6144 * 2048 / 1e9, lambda n: F.linear(x, w)),
        "linear_bf16": ("GFLOPS", 2 * 24 * 6144 * 2048 / 1e9, lambda n: F.linear(xb, wb)),
        "nf4": ("Mparam/s", w.numel() / 1e6, lambda n: encode_nf4(w, n)),
        "int8": ("Mparam/s", w.numel() / 1e6, lambda n: encode_int8(wb, n)),
        "merge": ("Mparam/s", w.numel() / 1e6, lambda n: merge_lora(wb, la, lb, 2.0)),
        "sha256": ("MB/s", len(blob) / 1e6, lambda n: hashlib.sha256(blob).digest()),
    }
    rows = []
    print("| kernel | unit | 1 thread | 2 threads | 2 / 1 |\n|---|---|---:|---:|---:|")
    for name, (unit, work, fn) in kernels.items():
        rates = {}
        for n in (1, 2):
            with torch_threads(n):
                rates[n] = round(work / best_of(lambda: fn(n)), 1)
            rows.append({"kernel": name, "unit": unit, "threads": n, "rate": rates[n]})
        print(f"| {name} | {unit} | {rates[1]} | {rates[2]} | {rates[2] / rates[1]:.2f} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))


if __name__ == "__main__":
    main()
