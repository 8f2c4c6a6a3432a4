"""Where efexport's export time and memory go, per function of converter/.

    python benchmarks/profile_export.py --size 1.7b --precision bf16 [--verify]

Needs the synthetic run of that size (bench_export.py --keep, or make_synthetic_run.py
--out benchmarks/_work/SIZE). Two measurements of the same CLI export:

1. time: ``py-spy record`` (pip install py-spy) samples the ``efexport`` CLI subprocess
   at 50 Hz, idle time included (I/O waits, fsync); the main thread's samples are
   summed per converter function (inclusive) and per leaf line;
2. memory: the same export run in-process (the ``efexport`` console script's entry point,
   looked up in the installed package's metadata) with a thread that
   every 20 ms records the process RSS (anonymous and file-backed, /proc/self/status)
   and the innermost converter/ frame of the main thread; per function it reports the
   seconds spent and the highest RSS seen while it ran, and draws the RSS timeline to
   benchmarks/profile_<size>_<precision>.png.

The tables go to stdout (Markdown) and benchmarks/results/profile_<size>_<precision>.jsonl:
one JSON line per measurement, ``{"record": "pyspy", ...}`` and ``{"record": "memory", ...}``
(the memory line's RSS timeline down-sampled to resultfile.TIMELINE_POINTS points, the peak
kept; the chart is drawn from the full one).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")


def _short(path: str) -> str:
    """No absolute paths in the results: relative to site-packages or the repository, else
    from the last ``converter/`` on (e.g. a snapshot in a work folder elsewhere)."""
    path = path.split("site-packages/")[-1].replace(str(REPO) + "/", "")
    if path.startswith("/") and "/converter/" in path:
        path = "converter/" + path.rsplit("/converter/", 1)[1]
    return path


def pyspy_profile(cmd: list[str], raw_out: Path, rate: int = 50) -> dict:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    t = time.perf_counter()
    subprocess.run([pyspy, "record", "-r", str(rate), "--idle", "--format", "raw", "-o", str(raw_out), "--", *cmd],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    inclusive: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    workers: collections.Counter = collections.Counter()
    total = 0
    for line in raw_out.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        n = int(n)
        if not frames or "threading.py" in frames[0]:  # worker threads (writer, hashing, tqdm monitor)
            text = stack
            if "sha256" in text:
                kind = "sha256"
            elif frames[-1].startswith("_WorkItem.run"):  # a builtin called by the pool: the writer's fh.write
                kind = "write (file.write of tensor bytes)"
            elif any(w in frames[-1] for w in ("wait", "get (queue", "_worker", "acquire")):
                kind = "idle (waiting for work)"
            else:
                kind = frames[-1] or "(native)"
            workers[kind] += n
            continue
        total += n
        seen = set()
        parsed = [FRAME.match(f) for f in frames]
        for m in parsed:
            if m and "converter/" in m["file"]:
                key = f"{_short(m['file'])}:{m['func']}"
                if key not in seen:
                    inclusive[key] += n
                    seen.add(key)
        if any(m and "importlib" in m["file"] for m in parsed):
            inclusive["(imports, anywhere)"] += n
        m = parsed[-1]
        leaf[f"{_short(m['file'])}:{m['line']} {m['func']}" if m else frames[-1] or "(native)"] += n
    sec = lambda n: round(n / rate, 2)  # noqa: E731
    return {"wall_s": round(wall, 2), "main_thread_s": sec(total),
            "inclusive": [(k, sec(v), round(v / total, 3)) for k, v in inclusive.most_common(40)],
            "leaf": [(k, sec(v), round(v / total, 3)) for k, v in leaf.most_common(20)],
            "worker_threads": [(k, sec(v)) for k, v in workers.most_common(8)]}


# --------------------------------------------------------------------------- in-process memory sampler
def _rss() -> tuple[int, int, int]:
    vals = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                k, v = line.split(":", 1)
                vals[k] = int(v.split()[0]) // 1024
    return vals.get("VmRSS", 0), vals.get("RssAnon", 0), vals.get("RssFile", 0)


def memory_profile(cli_args: list[str], interval: float = 0.02) -> dict:
    main_id = threading.get_ident()
    samples: list[tuple[float, int, int, int, str]] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def where() -> str:
        frame = sys._current_frames().get(main_id)
        inner = None
        while frame is not None:
            fn = frame.f_code.co_filename
            if "/converter/" in fn and inner is None:
                inner = f"{_short(fn)}:{frame.f_code.co_name}"
            frame = frame.f_back
        return inner or "(outside converter: imports, click)"

    def sample() -> None:
        while not stop.is_set():
            rss, anon, file_ = _rss()
            samples.append((time.perf_counter() - t0, rss, anon, file_, where()))
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    from importlib.metadata import entry_points

    (efexport,) = entry_points(group="console_scripts", name="efexport")  # the command a user runs
    argv = sys.argv
    sys.argv = ["efexport", *cli_args]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its "Wrote <absolute path>" line: not in the tables
            efexport.load()()  # exits (SystemExit) only on an error
    finally:
        sys.argv = argv
        stop.set()
        th.join()
    wall = time.perf_counter() - t0
    per: dict[str, dict] = {}
    for i, (t, rss, anon, file_, fn) in enumerate(samples):
        dt = (samples[i + 1][0] - t) if i + 1 < len(samples) else interval
        d = per.setdefault(fn, {"seconds": 0.0, "peak_rss_mib": 0, "peak_anon_mib": 0, "peak_file_mib": 0})
        d["seconds"] += dt
        d["peak_rss_mib"] = max(d["peak_rss_mib"], rss)
        d["peak_anon_mib"] = max(d["peak_anon_mib"], anon)
        d["peak_file_mib"] = max(d["peak_file_mib"], file_)
    peak = max(samples, key=lambda s: s[1]) if samples else None
    return {"wall_s": round(wall, 2),
            "peak": {"t": round(peak[0], 2), "rss_mib": peak[1], "anon_mib": peak[2], "file_mib": peak[3], "in": peak[4]} if peak else None,
            "per_function": sorted(({"function": k, **{kk: round(vv, 2) for kk, vv in v.items()}} for k, v in per.items()),
                                   key=lambda d: -d["seconds"]),
            "timeline": [(round(t, 2), r, a, f, fn) for t, r, a, f, fn in samples[:: max(1, len(samples) // 1500)]]}


def records(result: dict) -> list[dict]:
    """profile_<tag>.jsonl: one line per measurement, the RSS timeline down-sampled."""
    from resultfile import downsample

    head = {k: result[k] for k in ("size", "precision", "verify")}
    out = []
    if "pyspy" in result:
        out.append({"record": "pyspy", **head, **result["pyspy"]})
    if "memory" in result:
        mem = dict(result["memory"])
        mem["timeline"] = downsample(mem["timeline"])
        out.append({"record": "memory", **head, **mem})
    return out


def chart(mem: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = mem["timeline"]
    t = [x[0] for x in tl]
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=110)
    ax.stackplot(t, [x[2] / 1024 for x in tl], [x[3] / 1024 for x in tl], labels=["anonymous", "file-backed (mmap)"],
                 colors=["C0", "C9"], alpha=0.8)
    # label the phases: where the innermost converter function changes for long enough
    last, start = None, 0.0
    for x in tl + [(t[-1] if t else 0, 0, 0, 0, None)]:
        fn = x[4].split(":")[-1] if x[4] else None
        if fn != last:
            if last and x[0] - start > 0.06 * (t[-1] if t else 1):
                ax.annotate(last, (start + (x[0] - start) / 2, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                            fontsize=6.5, ha="center", va="bottom")
            last, start = fn, x[0]
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (GiB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1.7b")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--verify", action="store_true", help="profile with the parity check (default: --no-verify)")
    ap.add_argument("--work", type=Path, default=HERE / "_work")
    ap.add_argument("--skip-pyspy", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import make_synthetic_run as synth
    from resultfile import write_jsonl

    run = args.work / args.size / "run"
    if not (run / "resolved_config.json").is_file():
        raise SystemExit(f"no synthetic run at {run}; run make_synthetic_run.py --size {args.size} --out {run.parent}")
    out = args.work / args.size / "profile_out"
    common = [str(run), "--out", str(out), "--precision", args.precision, "--max-shard-size",
              synth.SHARD_SIZE[args.size], "--quiet"] + ([] if args.verify else ["--no-verify"])
    tag = f"{args.size}_{args.precision}" + ("_parity" if args.verify else "")
    result: dict = {"size": args.size, "precision": args.precision, "verify": args.verify}
    if not args.skip_pyspy:
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["sync"])
        result["pyspy"] = pyspy_profile([str(Path(sys.executable).with_name("efexport")), *common],
                                        args.work / f"pyspy_{tag}.txt")
    if not args.skip_memory:
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["sync"])
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        result["memory"] = memory_profile(common)
        try:
            chart(result["memory"], HERE / f"profile_{tag}.png",
                  f"efexport {args.size} --precision {args.precision}{'' if args.verify else ' --no-verify'}: RSS over time "
                  f"(innermost converter function labelled)")
        except ImportError:
            pass
    shutil.rmtree(out, ignore_errors=True)
    (HERE / "results").mkdir(exist_ok=True)
    write_jsonl(HERE / "results" / f"profile_{tag}.jsonl", records(result))
    if "pyspy" in result:
        p = result["pyspy"]
        print(f"## py-spy: {tag}, wall {p['wall_s']} s, main thread {p['main_thread_s']} s\n")
        print("| converter function (inclusive) | s | share |\n|---|---:|---:|")
        for k, s, f in p["inclusive"][:25]:
            print(f"| {k} | {s} | {100 * f:.0f}% |")
        print("\n| leaf line | s | share |\n|---|---:|---:|")
        for k, s, f in p["leaf"][:12]:
            print(f"| {k} | {s} | {100 * f:.0f}% |")
        print("\n| worker threads (all of them together) | s |\n|---|---:|")
        for k, s in p.get("worker_threads", []):
            print(f"| {k} | {s} |")
    if "memory" in result:
        m = result["memory"]
        print(f"\n## memory: {tag}, wall {m['wall_s']} s, peak {m['peak']}\n")
        print("| innermost converter function | s | peak RSS MiB | anon | file |\n|---|---:|---:|---:|---:|")
        for d in m["per_function"][:20]:
            print(f"| {d['function']} | {d['seconds']} | {d['peak_rss_mib']} | {d['peak_anon_mib']} | {d['peak_file_mib']} |")


if __name__ == "__main__":
    main()
