"""Compare two GGUF files: efexport's and llama.cpp's converter's, of the same run.

    python benchmarks/compare_gguf.py A.gguf B.gguf

Prints one JSON line: whether both hold the same tensors (name, GGML type, shape), how many
are byte-identical, the largest difference of the dequantized values where they are not
(each path merges LoRA in its own precision: efexport in float32, PEFT in bf16), and the
metadata keys that only one file has or that differ. A benchmark that compares speed should
first show that both tools made the same thing.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def _kv(reader: GGUFReader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except Exception:  # a type gguf-py cannot render: compare the raw bytes
            value = b"".join(bytes(p) for p in field.parts).hex()
        out[key] = value
    return out


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def compare(path_a: str, path_b: str) -> dict:
    a, b = GGUFReader(path_a), GGUFReader(path_b)
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    sig = lambda t: (t.tensor_type.name, [int(x) for x in t.shape])  # noqa: E731
    same_layout = ta.keys() == tb.keys() and all(sig(ta[n]) == sig(tb[n]) for n in ta)
    layout_diff = {n: [sig(ta[n]) if n in ta else None, sig(tb[n]) if n in tb else None]
                   for n in sorted(ta.keys() | tb.keys()) if n not in ta or n not in tb or sig(ta[n]) != sig(tb[n])}
    identical, differing = [], {}
    for name in sorted(ta.keys() & tb.keys()):
        x, y = ta[name], tb[name]
        if sig(x) != sig(y):
            continue
        if np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            identical.append(name)
            continue
        dx = dequantize(np.asarray(x.data), x.tensor_type).astype(np.float32)
        dy = dequantize(np.asarray(y.data), y.tensor_type).astype(np.float32)
        differing[name] = {"max_abs_diff": float(np.max(np.abs(dx - dy))), "max_abs": float(np.max(np.abs(dy)))}
    kva, kvb = _kv(a), _kv(b)
    only_a, only_b = sorted(kva.keys() - kvb.keys()), sorted(kvb.keys() - kva.keys())
    value_diff = {k: [_short(kva[k]), _short(kvb[k])] for k in sorted(kva.keys() & kvb.keys()) if kva[k] != kvb[k]}
    worst = max(differing.values(), key=lambda d: d["max_abs_diff"], default=None)
    summary = (f"{'same' if same_layout else 'DIFFERENT'} tensors ({len(ta)} vs {len(tb)}; names, types, shapes), "
               f"{len(identical)} byte-identical, {len(differing)} differ"
               + (f" (max |dequantized diff| {worst['max_abs_diff']:.3g} at max |w| {worst['max_abs']:.3g})" if worst else "")
               + f"; metadata: {len(only_a)} keys only in the first, {len(only_b)} only in the second, "
               f"{len(value_diff)} differ")
    return {"files": [path_a, path_b], "same_tensor_layout": same_layout, "layout_diff": layout_diff,
            "tensors": len(ta), "byte_identical": len(identical), "differing": differing,
            "kv_only_in_first": {k: _short(kva[k]) for k in only_a}, "kv_only_in_second": {k: _short(kvb[k]) for k in only_b},
            "kv_differ": value_diff, "summary": summary}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(json.dumps(compare(sys.argv[1], sys.argv[2])))
