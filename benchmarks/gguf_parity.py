"""GGUF parity table: efexport's own llama.cpp check, for every layout and GGUF type.

    python benchmarks/gguf_parity.py [--out benchmarks/results_gguf]     # ~5 min on 2 cores

Builds tiny EulerForge runs with the test suite's fixture builder (tests/fixtures/runs.py:
seeded random weights, the fixture's byte-level BPE tokenizer), 256 wide so that every
row is a whole number of K-quant super-blocks (narrower rows make llama.cpp fall back to
other types), exports each through ``converter.export`` exactly as ``efexport RUN --format
gguf --precision T`` does, and collects the parity figures that the export measured in
llama.cpp and wrote to efexport.json: max |Δlogit| against the source run's float32
logits (through efexport's loader) and top-1 agreement, over two 12-token probe prompts.

Writes parity.json and parity.md to --out; prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from fixtures.runs import make_run  # noqa: E402

from converter.errors import EfexportError  # noqa: E402
from converter.export import ExportOptions, export  # noqa: E402

TYPES = ["fp32", "fp16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0"]
CASES = [  # (backbone, strategy); the GGUF architecture they go to is read back from the export
    ("qwen3", "none"), ("qwen3", "dense_lora"), ("qwen3", "moe_expert_lora"),
    ("llama", "none"), ("llama", "dense_lora"), ("llama", "moe_expert_lora"),
    ("gemma3", "none"), ("gemma3", "dense_lora"),
]
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results_gguf")
    args = ap.parse_args()
    import llama_cpp

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for backbone, strategy in CASES:
            run = make_run(tmp / f"{backbone}_{strategy}", backbone, strategy, config_overrides=WIDE)
            for gtype in TYPES:
                out = tmp / f"out_{backbone}_{strategy}_{gtype}"
                t = time.perf_counter()
                try:
                    record = export(ExportOptions(run=str(run.path), out=out, fmt="gguf", precision=gtype, progress=False))
                except EfexportError as exc:
                    rows.append({"backbone": backbone, "strategy": strategy, "type": gtype, "refused": str(exc)})
                    continue
                parity = record["parity"]
                rows.append({"backbone": backbone, "strategy": strategy, "type": gtype, "arch": record["gguf"]["arch"],
                             "max_abs_logit_diff": parity["max_abs_logit_diff"], "max_abs_logit": parity["max_abs_logit"],
                             "top1_agreement": parity["top1_agreement"], "engine": parity["engine"],
                             "file_bytes": sum(f["size"] for n, f in record["files"].items() if n.endswith(".gguf")),
                             "seconds": round(time.perf_counter() - t, 2)})
                print(f"{backbone:7s} {strategy:16s} {gtype:7s} {rows[-1]['max_abs_logit_diff']:.3g} "
                      f"top1 {rows[-1]['top1_agreement']:.2f}", file=sys.stderr, flush=True)
    table = markdown(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parity.json").write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__, "width": WIDE,
                                                      "rows": rows}, indent=1) + "\n")
    (args.out / "parity.md").write_text(table + "\n")
    print(table)


def markdown(rows: list[dict]) -> str:
    cases = list(dict.fromkeys((r["backbone"], r["strategy"]) for r in rows))
    lines = ["| backbone | strategy | GGUF arch | " + " | ".join(TYPES) + " |",
             "|---|---|---|" + "---:|" * len(TYPES)]
    for backbone, strategy in cases:
        cells, arch = [], ""
        for gtype in TYPES:
            r = next(x for x in rows if (x["backbone"], x["strategy"], x["type"]) == (backbone, strategy, gtype))
            if "refused" in r:
                cells.append("refused")
                continue
            arch = r["arch"]
            cells.append(f"{r['max_abs_logit_diff']:.2g} ({r['top1_agreement']:.2f})")
        lines.append(f"| {backbone} | {strategy} | {arch} | " + " | ".join(cells) + " |")
    scale = max((r["max_abs_logit"] for r in rows if "max_abs_logit" in r), default=0)
    lines.append("")
    lines.append(f"max |Δlogit| vs the source run in float32 (top-1 agreement), measured in llama.cpp by the export "
                 f"itself; max |logit| up to {scale:.1f}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
