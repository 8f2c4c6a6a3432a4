"""The 8B-shaped run: does the default export (parity on) complete on this 24 GiB machine, and at what peak?

Generates the synthetic Qwen3-8B-shaped run once (``make_synthetic_run.py --size 8b --run-only``,
~16 GB of bfloat16 in 4 GB shards, untied head as Qwen3-8B has), then measures, one after the
other, ``efexport RUN --out DIR --precision bf16`` with ``--no-verify`` and with the default parity
check, and ``load_artifact`` vs ``from_pretrained`` on the artifact. One repetition each: every
command reads and writes ~16 GB, and the disk holds source + one artifact (check ``df`` first).

    python benchmarks/bench_8b.py [--work benchmarks/_work] [--keep] [--tasks efx_bf16_parity] [--name 8b_v3]

Results: ``benchmarks/results_8b/<name>.jsonl`` (default ``8b``; the resultfile format, one line per command).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import resultfile  # noqa: E402
from measure import run_measured, wait_quiet  # noqa: E402

PY = sys.executable
EFEXPORT = str(Path(PY).with_name("efexport"))
BASELINES = str(HERE / "baselines.py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "_work")
    ap.add_argument("--results", type=Path, default=HERE / "results_8b")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic run for a later call")
    ap.add_argument("--tasks", default=None, help="comma-separated subset of: efx_bf16, efx_bf16_parity, "
                    "load_artifact_bf16, from_pretrained_bf16 (default: all; the load tasks need efx_bf16_parity)")
    ap.add_argument("--name", default="8b", help="results file name, without .jsonl")
    args = ap.parse_args()
    root = args.work / "8b"
    run = root / "run"
    if not (root / ".complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([PY, str(HERE / "make_synthetic_run.py"), "--size", "8b", "--out", str(root), "--run-only"],
                       check=True)
        (root / ".complete").write_text("8b")
    out, art = root / "out", root / "artifact"
    free = shutil.disk_usage(root).free
    need = 2 * sum(p.stat().st_size for p in (run / "final").iterdir())
    print(f"disk: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed (an artifact and its staging)")
    tasks = {
        "efx_bf16": [EFEXPORT, str(run), "--out", str(out), "--precision", "bf16", "--quiet", "--no-verify"],
        "efx_bf16_parity": [EFEXPORT, str(run), "--out", str(art), "--precision", "bf16", "--quiet"],
        "load_artifact_bf16": [PY, BASELINES, "load-artifact", str(art)],
        "from_pretrained_bf16": [PY, BASELINES, "from-pretrained", str(art)],
    }
    if args.tasks:
        tasks = {k: v for k, v in tasks.items() if k in args.tasks.split(",")}
    records = [{"record": "run", "size": "8b", "date": time.strftime("%Y-%m-%d"), "reps": 1,
                "checkpoint_gb": round(need / 2e9, 2), "work": resultfile.portable(str(args.work), REPO)}]
    for task, cmd in tasks.items():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        wait_quiet(120)
        log = root / f"{task}.log"
        m = run_measured(cmd, cwd=REPO, log_path=log)
        timeline = m.pop("timeline")
        print(task, json.dumps(m))
        if m["rc"] != 0:
            print(log.read_text(errors="replace")[-3000:])
        records.append({"record": "task", "task": task,
                        "command": resultfile.portable(" ".join(cmd), REPO, args.work, Path(PY).parent),
                        "median": m, "reps": [m],
                        "timeline": resultfile.downsample([[round(t, 1), round(r / 1024), round(a / 1024)]
                                                           for t, r, a in timeline])})
    if (art / "efexport.json").is_file():
        records[0]["parity"] = {k: v for k, v in json.loads((art / "efexport.json").read_text())["parity"].items()
                                if k not in ("artifact_fingerprint", "probe_ids")}
    args.results.mkdir(parents=True, exist_ok=True)
    resultfile.write_jsonl(args.results / f"{args.name}.jsonl", records)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(art, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
