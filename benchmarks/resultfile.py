"""The result files: JSON Lines, one compact line per task, no absolute paths.

``<results>/<size>.jsonl`` (bench_export.py writes it, report.py reads it):

    {"record":"run","size":"1.7b","config":{...},"num_parameters":...,"machine":{...},"date":...,"work":...}
    {"record":"gguf_compare","type":"q8_0",...}          (--gguf runs: compare_gguf.py's result)
    {"record":"task","task":"efx_bf16","command":"...","median":{...},"reps":[{...},...],
     "timeline_rep":1,"timeline":[[t s, RSS MiB, anon MiB],...]}

``reps`` holds every repetition's figures (measure.py's, without the RSS timeline);
``timeline`` is the RSS timeline of one repetition only (``timeline_rep``, the one with the
median peak RSS), down-sampled to at most TIMELINE_POINTS points: from each of that many
equal slices of the run the sample with the highest RSS, so the peak is always in it.
Paths in commands are written relative to the repository, and paths inside the work folder
as ``$WORK/...`` (the work folder itself, e.g. benchmarks/_work or a folder in /tmp, is
recorded as ``work`` when it lies inside the repository).

profile_export.py and gguf_parity.py write JSON Lines the same way (one line per
measurement or per export; see there).
"""

from __future__ import annotations

import json
from pathlib import Path

TIMELINE_POINTS = 50


def downsample(points: list, n: int = TIMELINE_POINTS, key: int = 1) -> list:
    """At most ``n`` points of a timeline of [t, value, ...] rows, in order: the time span cut
    into ``n`` equal slices, from each the row with the highest ``row[key]``."""
    points = [list(p) for p in points]
    if len(points) <= n:
        return points
    t0, t1 = points[0][0], points[-1][0]
    span = (t1 - t0) or 1.0
    best: dict[int, list] = {}
    for p in points:
        i = min(n - 1, int((p[0] - t0) / span * n))
        if i not in best or p[key] > best[i][key]:
            best[i] = p
    return [best[i] for i in sorted(best)]


def portable(text: str, repo: Path, work: Path | None = None, bindir: Path | None = None) -> str:
    """``text`` (a command line, a path) without this machine's absolute paths: the work
    folder becomes ``$WORK``, the repository the current folder, the Python environment's
    bin/ folder (when outside the repository) nothing (``efexport``, ``python3``)."""
    if work is not None:
        text = text.replace(str(Path(work).resolve()) + "/", "$WORK/").replace(str(work) + "/", "$WORK/")
    text = text.replace(str(Path(repo).resolve()) + "/", "")
    if bindir is not None:
        text = text.replace(str(bindir) + "/", "")
    return text


def write_jsonl(path: Path, records: list[dict]) -> None:
    Path(path).write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _median_rep(reps: list[dict]) -> int:
    order = sorted(range(len(reps)), key=lambda i: reps[i]["peak_rss_mib"])
    return order[(len(order) - 1) // 2]


def size_records(info: dict) -> list[dict]:
    """bench_export.py's per-size result (reps with their timelines) -> the lines of <size>.jsonl."""
    head = {"record": "run"}
    head.update({k: v for k, v in info.items() if k not in ("commands", "reps", "median", "gguf_compare")})
    records = [head]
    for gtype, cmp in (info.get("gguf_compare") or {}).items():
        records.append({"record": "gguf_compare", "type": gtype, **cmp})
    for task, reps in info["reps"].items():
        rec = {"record": "task", "task": task, "command": info.get("commands", {}).get(task)}
        if task in info.get("median", {}):
            rec["median"] = info["median"][task]
        rec["reps"] = [{k: v for k, v in r.items() if k != "timeline"} for r in reps]
        if reps and any(r.get("timeline") for r in reps):
            i = _median_rep(reps)
            rec["timeline_rep"] = i
            rec["timeline"] = downsample(reps[i].get("timeline") or [])
        records.append(rec)
    return records


def write_size_results(path: Path, info: dict) -> None:
    write_jsonl(path, size_records(info))


def read_size_results(path: Path) -> dict | None:
    """<size>.jsonl -> the dict bench_export.py measured (size, ..., commands, reps, median,
    gguf_compare); the one kept timeline sits on its repetition. None for other JSONL files."""
    records = read_jsonl(path)
    if not records or records[0].get("record") != "run" or "size" not in records[0]:
        return None
    info = {k: v for k, v in records[0].items() if k != "record"}
    info.update({"commands": {}, "reps": {}, "median": {}})
    for rec in records[1:]:
        if rec["record"] == "gguf_compare":
            cmp = {k: v for k, v in rec.items() if k not in ("record", "type")}
            info.setdefault("gguf_compare", {})[rec["type"]] = cmp
        elif rec["record"] == "task":
            task = rec["task"]
            info["commands"][task] = rec.get("command")
            reps = [dict(r) for r in rec["reps"]]
            if "timeline" in rec:
                reps[rec["timeline_rep"]]["timeline"] = rec["timeline"]
            info["reps"][task] = reps
            if "median" in rec:
                info["median"][task] = rec["median"]
    return info
