"""GGUF parity table: efexport's own llama.cpp check, for every layout and GGUF type.

    python benchmarks/gguf_parity.py [--out benchmarks/results_gguf]     # ~5 min on 2 cores

Builds tiny EulerForge runs with the test suite's fixture builder (tests/fixtures/runs.py:
seeded random weights, the fixture's byte-level BPE tokenizer), 256 wide so that every
row is a whole number of K-quant super-blocks (narrower rows make llama.cpp fall back to
other types), exports each with ``efexport RUN --format gguf --precision T --json`` (the
console script, run in this process through its entry point so that torch and llama.cpp are
imported once), and collects the parity figures that the export measured in llama.cpp and
wrote to efexport.json (the record --json prints): max |Δlogit| against the source run's
float32 logits (through efexport's loader) and top-1 agreement, over two 12-token probe prompts.

Writes parity.jsonl (a ``{"record": "run", ...}`` line, then one ``{"record": "export", ...}``
line per layout and type) and parity.md to --out; prints the Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from fixtures.runs import make_run  # noqa: E402
from resultfile import write_jsonl  # noqa: E402

TYPES = ["fp32", "fp16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0"]
CASES = [  # (backbone, strategy); the GGUF architecture they go to is read back from the export
    ("qwen3", "none"), ("qwen3", "dense_lora"), ("qwen3", "moe_expert_lora"),
    ("llama", "none"), ("llama", "dense_lora"), ("llama", "moe_expert_lora"),
    ("gemma3", "none"), ("gemma3", "dense_lora"),
]
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64}


def efexport(*args: str) -> tuple[dict | None, str]:
    """``efexport ARGS --quiet --json`` in this process: (the record it prints, "") or, when
    efexport refuses (exit 2), (None, its message)."""
    (ep,) = entry_points(group="console_scripts", name="efexport")
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["efexport", *args, "--quiet", "--json"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            ep.load()()
    except SystemExit as exc:
        if exc.code != 2:
            raise SystemExit(f"efexport {' '.join(args)} failed ({exc.code}):\n{err.getvalue()}") from None
        return None, err.getvalue().strip()
    finally:
        sys.argv = argv
    return json.loads(out.getvalue()), ""


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
                record, refused = efexport(str(run.path), "--out", str(out), "--format", "gguf", "--precision", gtype)
                if record is None:
                    rows.append({"backbone": backbone, "strategy": strategy, "type": gtype, "refused": refused})
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
    write_jsonl(args.out / "parity.jsonl", [{"record": "run", "llama_cpp_python": llama_cpp.__version__, "width": WIDE}]
                + [{"record": "export", **row} for row in rows])
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
