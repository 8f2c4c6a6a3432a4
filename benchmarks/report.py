"""Tables, chart and the one-line JSON summary from benchmarks/results/<size>.jsonl.

    python benchmarks/report.py                                        # benchmarks/results
    python benchmarks/report.py benchmarks/results benchmarks/results_parity   # + the parity rows
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from resultfile import read_size_results  # noqa: E402
from tasks import TASKS  # noqa: E402

GIB = 2**30
SIZE_ORDER = ["tiny", "0.6b", "1.7b"]

# name -> (numerator task, denominator task, metric, limit, sizes the target applies to, text)
RATIO_TARGETS = [
    ("bf16_wall_vs_peft", "efx_bf16", "peft_bf16", "wall_s", 0.5, None, "bf16 export wall <= 0.5x PEFT path"),
    ("bf16_wall_vs_cp", "efx_bf16", "cp", "wall_s", 2.0, None, "bf16 export wall <= 2x cp -r"),
    ("bf16_wall_vs_cp_sync", "efx_bf16", "cp_sync", "wall_s", 2.0, ("1.7b",), "bf16 export wall <= 2x cp -r && sync (at 1.7B)"),
    ("bf16_parity_wall_vs_noverify", "efx_bf16_parity", "efx_bf16", "wall_s", 1.5, None,
     "bf16 export with parity wall <= 1.5x --no-verify"),
    ("int4_parity_wall_vs_noverify", "efx_int4_parity", "efx_int4", "wall_s", 1.5, None,
     "int4 export with parity wall <= 1.5x --no-verify"),
    ("int8_wall_vs_tf", "efx_int8", "tf_int8", "wall_s", 0.5, None, "int8 export wall <= 0.5x transformers"),
    ("int8_rss_vs_tf", "efx_int8", "tf_int8", "peak_rss_mib", 0.25, None, "int8 export peak RSS <= 0.25x transformers"),
    ("gguf_q8_0_parity_wall_vs_noverify", "efx_gguf_q8_0_parity", "efx_gguf_q8_0", "wall_s", 1.5, None,
     "GGUF q8_0 export with llama.cpp parity wall <= 1.5x --no-verify"),
    ("gguf_q4_k_m_rss_vs_q8_0", "efx_gguf_q4_k_m", "efx_gguf_q8_0", "peak_rss_mib", 1.0, None,
     "GGUF q4_k_m export peak RSS <= q8_0's"),
    ("bf16_rss_vs_peft", "efx_bf16", "peft_bf16", "peak_rss_mib", 0.25, ("1.7b",), "bf16 export peak RSS <= 0.25x PEFT path (at 1.7B)"),
    ("int4_wall_vs_tf", "efx_int4", "tf_int4", "wall_s", 0.5, None, "int4 export wall <= 0.5x transformers"),
    ("int4_rss_vs_tf", "efx_int4", "tf_int4", "peak_rss_mib", 0.25, None, "int4 export peak RSS <= 0.25x transformers"),
    ("load_bf16_vs_from_pretrained", "load_artifact_bf16", "from_pretrained_bf16", "wall_s", 1.1, None,
     "load_artifact <= 1.1x from_pretrained (bf16 artifact, process wall)"),
    ("load_int4_vs_from_pretrained", "load_artifact_int4", "from_pretrained_int4", "wall_s", 1.1, None,
     "load_artifact <= 1.1x from_pretrained (int4 artifact, process wall)"),
    # GGUF (bench_export.py --gguf): against PEFT merge + llama.cpp's convert_hf_to_gguf.py (+ quantize)
    ("gguf_q8_0_wall_vs_llamacpp", "efx_gguf_q8_0", "llamacpp_q8_0", "wall_s", 1.0, None,
     "GGUF q8_0 export wall <= the PEFT + convert_hf_to_gguf.py path"),
    ("gguf_q8_0_rss_vs_llamacpp", "efx_gguf_q8_0", "llamacpp_q8_0", "peak_rss_mib", 0.5, None,
     "GGUF q8_0 export peak RSS far under (<= 0.5x) the PEFT + convert path"),
    ("gguf_q4_k_m_wall_vs_llamacpp", "efx_gguf_q4_k_m", "llamacpp_q4_k_m", "wall_s", 1.0, None,
     "GGUF q4_k_m export wall <= the PEFT + convert + llama_model_quantize path"),
    ("gguf_q4_k_m_rss_vs_llamacpp", "efx_gguf_q4_k_m", "llamacpp_q4_k_m", "peak_rss_mib", 0.5, None,
     "GGUF q4_k_m export peak RSS far under (<= 0.5x) the PEFT + convert + quantize path"),
]
FLAT_TASKS = {"efx_bf16": "bf16", "efx_int4": "int4", "efx_gguf_q8_0": "GGUF q8_0", "efx_gguf_q4_k_m": "GGUF q4_k_m",
              "efx_bf16_parity": "bf16 with parity", "efx_int4_parity": "int4 with parity"}
FLAT_LIMIT = 1.25  # "about flat": efexport's peak RSS grows at most 25% from 0.6B to 1.7B (the model grows 2.9x)


def load_results(*folders: Path) -> dict[str, dict]:
    """Per-size results; with several folders, a later folder adds the tasks an earlier one lacks
    (e.g. benchmarks/results + benchmarks/results_parity)."""
    out: dict[str, dict] = {}
    for folder in folders or (HERE / "results",):
        for f in sorted(Path(folder).glob("*.jsonl")):
            if f.name.startswith("profile_"):
                continue
            d = read_size_results(f)
            if d is None:  # e.g. results_gguf/parity.jsonl (gguf_parity.py)
                continue
            if d["size"] not in out:
                out[d["size"]] = d
                continue
            base = out[d["size"]]
            for task, med in d["median"].items():
                if task not in base["median"]:
                    base["median"][task] = med
                    base["reps"][task] = d["reps"][task]
                    base.setdefault("merged_from", {})[task] = str(folder)
    return {k: out[k] for k in sorted(out, key=lambda s: SIZE_ORDER.index(s) if s in SIZE_ORDER else 99)}


def _med(r: dict, task: str, metric: str) -> float | None:
    m = r["median"].get(task)
    return None if m is None else m.get(metric)


def _phase(r: dict, task: str, phase: str) -> float | None:
    m = r["median"].get(task) or {}
    return (m.get("phases") or {}).get(phase)


def targets(results: dict[str, dict]) -> list[dict]:
    rows = []
    for size, r in results.items():
        bound = (r["largest_source_shard_bytes"] + GIB) / 2**20
        for task in ("efx_bf16", "efx_int4", "efx_bf16_parity", "efx_int4_parity", "efx_gguf_q8_0_parity"):
            v = _med(r, task, "peak_rss_mib")
            if v is not None:
                rows.append({"size": size, "target": f"{task}_rss_vs_shard_bound",
                             "text": f"{TASKS[task][1]}: peak RSS <= largest shard + 1 GiB",
                             "value": round(v / bound, 3), "limit": 1.0, "detail": f"{v:.0f} MiB vs {bound:.0f} MiB",
                             "met": v <= bound})
        for name, num, den, metric, limit, only, text in RATIO_TARGETS:
            a, b = _med(r, num, metric), _med(r, den, metric)
            if a is None or b is None:
                continue
            unit = "s" if metric == "wall_s" else " MiB"
            rows.append({"size": size, "target": name, "text": text, "value": round(a / b, 3), "limit": limit,
                         "detail": f"{a:.1f}{unit} vs {b:.1f}{unit}", "met": a / b <= limit,
                         "applies": only is None or size in only})
    if "0.6b" in results and "1.7b" in results:
        for task, label in FLAT_TASKS.items():
            a, b = _med(results["1.7b"], task, "peak_rss_mib"), _med(results["0.6b"], task, "peak_rss_mib")
            if a is not None and b is not None:
                rows.append({"size": "0.6b->1.7b", "target": f"{task}_rss_flat",
                             "text": f"{label} export peak RSS about flat 0.6B -> 1.7B (<= {FLAT_LIMIT}x)",
                             "value": round(a / b, 3), "limit": FLAT_LIMIT, "detail": f"{b:.0f} -> {a:.0f} MiB",
                             "met": a / b <= FLAT_LIMIT})
    for row in rows:
        row.setdefault("applies", True)
        if row["size"] == "tiny":  # a smoke run: process start-up and imports dominate, no target applies
            row["applies"] = False
    return rows


def figures(results: dict[str, dict]) -> dict:
    """The one-line JSON: medians per size and task, ratios, targets."""
    any_r = next(iter(results.values()), {})
    m = any_r.get("machine", {})
    out = {"bench": "efexport-export", "version": 1,
           "machine": {"cpu": m.get("cpu"), "cores": m.get("cores"), "ram_gib": m.get("ram_gib"),
                       "efexport": (m.get("versions") or {}).get("efexport_git"),
                       "converter_sha256": (m.get("versions") or {}).get("converter_sha256")},
           "sizes": {}, "targets": {}}
    for size, r in results.items():
        out["sizes"][size] = {
            "params": r["num_parameters"], "reps": min(v["n"] for v in r["median"].values()),
            "largest_shard_mib": round(r["largest_source_shard_bytes"] / 2**20, 1),
            "wall_s": {t: v["wall_s"] for t, v in r["median"].items()},
            "peak_rss_mib": {t: v["peak_rss_mib"] for t, v in r["median"].items()},
            "cpu_s": {t: v["cpu_s"] for t, v in r["median"].items()},
            "load_call_s": {t: _phase(r, t, "load") for t in r["median"] if _phase(r, t, "load") is not None},
        }
    for row in targets(results):
        if row["applies"]:
            out["targets"][f"{row['size']}:{row['target']}"] = {"value": row["value"], "limit": row["limit"],
                                                                 "met": bool(row["met"])}
    return out


def markdown(results: dict[str, dict]) -> str:
    lines = []
    for size, r in results.items():
        lines.append(f"### {size}: {r['num_parameters'] / 1e9:.2f}B parameters, checkpoint {r['checkpoint_bytes'] / 1e9:.2f} GB, "
                     f"largest shard {r['largest_source_shard_bytes'] / 2**20:.0f} MiB, median of {min(v['n'] for v in r['median'].values())}")
        lines.append("")
        lines.append("| task | wall s (min-max) | CPU s | peak RSS MiB | of which anon | other load | in-process phases (s) |")
        lines.append("|---|---:|---:|---:|---:|---:|---|")
        for task, v in r["median"].items():
            ph = v.get("phases") or {}
            phs = ", ".join(f"{k} {x:.1f}" for k, x in ph.items() if k != "params")
            lines.append(f"| {TASKS[task][1]} | {v['wall_s']:.1f} ({v['wall_s_min']:.1f}-{v['wall_s_max']:.1f}) | "
                         f"{v['cpu_s']:.1f} | {v['peak_rss_mib']:.0f} | {v['peak_rss_anon_mib']:.0f} | "
                         f"{100 * v['foreign_cpu_frac']:.0f}% | {phs} |")
        lines.append("")
        for gtype, c in (r.get("gguf_compare") or {}).items():
            lines.append(f"- {gtype}, efexport's file vs llama.cpp's converter's: {c['summary']}")
        if r.get("gguf_compare"):
            lines.append("")
    lines.append("| size | target | measured | ratio | limit | |")
    lines.append("|---|---|---|---:|---:|---|")
    for row in targets(results):
        verdict = ("met" if row["met"] else "**missed**") if row["applies"] else "(n/a at this size)"
        lines.append(f"| {row['size']} | {row['text']} | {row['detail']} | {row['value']:.2f} | {row['limit']} | {verdict} |")
    return "\n".join(lines)


def make_chart(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = {k: v for k, v in results.items() if k != "tiny"} or results
    xs = [r["num_parameters"] / 1e9 for r in real.values()]
    series = [
        ("efx_bf16", "efexport bf16 (--no-verify)", "C0", "-", "o"),
        ("efx_bf16_parity", "efexport bf16 (with parity)", "C0", ":", "o"),
        ("peft_bf16", "PEFT merge + save_pretrained", "C3", "-", "s"),
        ("efx_int4", "efexport int4 (--no-verify)", "C2", "-", "^"),
        ("efx_int4_parity", "efexport int4 (with parity)", "C2", ":", "^"),
        ("tf_int4", "transformers bnb nf4 + save_pretrained", "C1", "-", "v"),
        ("efx_gguf_q8_0", "efexport GGUF q8_0", "C4", "-", "D"),
        ("llamacpp_q8_0", "PEFT merge + convert_hf_to_gguf.py q8_0", "C5", "-", "d"),
        ("efx_gguf_q4_k_m", "efexport GGUF q4_k_m", "C4", ":", "D"),
        ("llamacpp_q4_k_m", "PEFT merge + convert + llama_model_quantize q4_k_m", "C5", ":", "d"),
        ("quantize_only_q4_k_m", "llama_model_quantize alone (f16 -> q4_k_m)", "C8", "-.", "*"),
        ("cp", "cp -r", "C7", "-", "x"),
    ]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for task, label, color, ls, mk in series:
        ys = [_med(r, task, "peak_rss_mib") for r in real.values()]
        if all(y is not None for y in ys):
            ax.plot(xs, [y / 1024 for y in ys], color=color, linestyle=ls, marker=mk, label=label)
    bound = [(r["largest_source_shard_bytes"] + GIB) / GIB for r in real.values()]
    ax.plot(xs, bound, color="k", linestyle="--", linewidth=1, label="target: largest shard + 1 GiB")
    ax.set_xlabel("model parameters (billions), Qwen3 shapes, bf16")
    ax.set_ylabel("peak RSS of the process tree (GiB)")
    ax.set_xticks(xs, [f"{k}\n{x:.2f}B" for k, x in zip(real, xs)])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    m = next(iter(real.values())).get("machine", {})
    ax.set_title(f"Export peak RSS, median of {min(v['n'] for r in real.values() for v in r['median'].values())} "
                 f"({m.get('cores')} cores, {m.get('ram_gib')} GiB)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", type=Path, default=[HERE / "results"],
                    help="result folders, merged in order (default benchmarks/results)")
    ap.add_argument("--chart", type=Path, default=HERE / "peak_rss.png")
    args = ap.parse_args()
    res = load_results(*args.folders)
    try:
        make_chart(res, args.chart)
    except ImportError as exc:
        print(f"(no chart: {exc})", file=sys.stderr)
    print(markdown(res))
    print(json.dumps(figures(res), separators=(",", ":")))
