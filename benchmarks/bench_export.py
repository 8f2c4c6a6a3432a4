"""Export speed and memory: efexport against the PEFT and transformers paths, side by side.

    python benchmarks/bench_export.py --size tiny --reps 1          # smoke run (~1-2 min; mostly imports)
    python benchmarks/bench_export.py --size 0.6b --size 1.7b --reps 3

For each size it builds a synthetic Qwen3-shaped dense_lora run plus the same weights as
a base model folder and a PEFT adapter (benchmarks/make_synthetic_run.py), then measures,
one process at a time, each repetition running every task once (interleaved):

  bf16 export   efexport RUN --precision bf16 --no-verify     (and with its parity check)
                PEFT: from_pretrained(base, bf16) + PeftModel.from_pretrained + merge_and_unload + save_pretrained
                cp -r of the checkpoint (the disk floor), and cp -r + sync
  int4 export   efexport RUN --precision int4 --no-verify     (and with its parity check)
                transformers: from_pretrained(merged bf16, BitsAndBytesConfig nf4 + double quant) + save_pretrained
  loading       converter.runtime.load_artifact(ART) vs AutoModelForCausalLM.from_pretrained(ART)

With --gguf (results to benchmarks/results_gguf):

  gguf q8_0     efexport RUN --format gguf --precision q8_0 --no-verify
                the path a user has today: PEFT merge + save_pretrained (bf16, with the tokenizer),
                then llama.cpp's convert_hf_to_gguf.py --outtype q8_0
  gguf q4_k_m   efexport RUN --format gguf --precision q4_k_m --no-verify
                PEFT merge + save, convert_hf_to_gguf.py --outtype f16, llama_model_quantize Q4_K_M
  (both chains delete their intermediate folders and files at the end, as efexport does)
  quantize only llama_model_quantize of an f16 GGUF to Q4_K_M on its own: what llama.cpp's
                K-quant step needs whoever calls it (both paths above include it)

llama.cpp's converter comes from the llama-cpp-python sdist of the installed version
(``pip download --no-binary``, unpacked into the work folder; --llama-cpp to use a tree at
hand); it needs sentencepiece (in the ``bench`` extra). Before measuring, both paths' GGUF
files are compared once (benchmarks/compare_gguf.py: tensor names, types and shapes, the
metadata keys, which tensors are byte-identical) and the comparison is saved with the results.

Every measured process is a fresh subprocess (efexport through its CLI, exactly as a user
runs it), measured by benchmarks/measure.py: wall time, CPU time, peak RSS of the process
tree. Inputs are read once before each measurement (warm page cache for every tool) and
dirty pages are flushed (``sync``) so no tool pays for an earlier tool's writeback.

Per-size results (every repetition; one RSS timeline per task, down-sampled) go to
benchmarks/results/<size>.jsonl (--results), one JSON line per task (benchmarks/resultfile.py;
no absolute paths: the work folder is written as $WORK); the Markdown tables and a chart
(<results>/peak_rss.png) are rebuilt from the result files there (benchmarks/report.py, which
also merges several result folders and draws the chart BENCHMARKS.md shows); the last line
printed is one JSON object of the medians, ratios and targets. The work folder
(benchmarks/_work, git-ignored) is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import make_synthetic_run as synth  # noqa: E402
import resultfile  # noqa: E402
from measure import run_measured, wait_quiet  # noqa: E402
from tasks import GGUF_ORDER, GGUF_TASKS, PARITY_TASKS, TASKS  # noqa: E402

PY = sys.executable
EFEXPORT = str(Path(sys.executable).with_name("efexport"))
BASELINES = str(HERE / "baselines.py")
GEN_VERSION = 1  # bump when make_synthetic_run's output changes

# The synthetic tokenizer is a plain GPT-2 byte-level BPE (tests/fixtures/runs.py) that llama.cpp's
# hash table cannot know; efexport identifies it from its configuration as gpt-2, and the
# converter is told the same (baselines.py convert-gguf --pre). compare_gguf.py checks both agree.
GGUF_PRE = "gpt-2"


def portable(text: str, work: Path) -> str:
    """No absolute paths in the result files: $WORK/... for the work folder, the rest relative
    to the repository (resultfile.portable)."""
    return resultfile.portable(text, REPO, work, Path(PY).parent)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def subprocess_env(snapshot: Path | None = None) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONWARNINGS": "ignore"})
    if snapshot is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(snapshot)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def snapshot_converter(work: Path, source: Path = REPO) -> tuple[Path, str]:
    """Copy converter/ (and its templates) aside and run every efexport process from the copy:
    others edit converter/ while a long benchmark runs, and every repetition must measure the
    same code. Returns (folder for PYTHONPATH, short sha256 of the sources)."""
    import hashlib

    snap = work / "efexport_snapshot"
    shutil.rmtree(snap, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(source / "converter", snap / "converter", ignore=ignore)
    if (source / "templates").is_dir() and not (snap / "converter" / "templates").exists():
        shutil.copytree(source / "templates", snap / "converter" / "templates", ignore=ignore)
    h = hashlib.sha256()
    for f in sorted((snap / "converter").rglob("*")):
        if f.is_file():
            h.update(f.relative_to(snap).as_posix().encode() + b"\0" + f.read_bytes())
    return snap, h.hexdigest()[:12]


def du(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warm(paths: list[Path]) -> None:
    """Read every input file once so that every tool starts from a warm page cache."""
    buf = bytearray(16 * 1024 * 1024)
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def machine_info(work: Path) -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fam = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in lscpu.splitlines() if ":" in l)}
        cpu += f" (family {fam.get('CPU family', '?')}, model {fam.get('Model', '?')}, {fam.get('Hypervisor vendor', 'bare metal')})"
    except OSError:
        pass
    with open("/proc/meminfo") as fh:
        mem = int(fh.readline().split()[1]) * 1024
    # importlib.metadata, not imports: the harness stays a small process (see measure.py).
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "safetensors", "accelerate"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "converter"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        versions["efexport_git"] = rev + ("+dirty" if dirty else "")
    except OSError:
        pass
    fs = subprocess.run(["df", "-hT", str(work)], capture_output=True, text=True).stdout.splitlines()[-1].split()
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**30, 1), "os": platform.platform(),
            "work_fs": f"{fs[1]} on {fs[0]}" if len(fs) > 1 else "?", "versions": versions}


# --------------------------------------------------------------------------- setup
def ensure_synthetic(size: str, root: Path) -> dict[str, Path]:
    marker = root / ".complete"
    paths = {"run": root / "run", "checkpoint": root / "run" / "final", "base": root / "base", "adapter": root / "adapter"}
    if marker.is_file() and json.loads(marker.read_text()) == {"size": size, "version": GEN_VERSION}:
        log(f"[{size}] reusing synthetic run in {root}")
        return paths
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    log(f"[{size}] writing synthetic run, base model and adapter to {root}")
    # A subprocess: torch must never be imported into the harness (see measure.py).
    subprocess.run([PY, str(HERE / "make_synthetic_run.py"), "--size", size, "--out", str(root)], check=True)
    marker.write_text(json.dumps({"size": size, "version": GEN_VERSION}))
    return paths


def setup_artifacts(size: str, root: Path, p: dict[str, Path], shard: str, env: dict, digest: str) -> dict[str, Path]:
    """Unmeasured warm-up runs that also make the inputs of the load and int4 baselines:
    efexport's bf16 and int4 artifacts and the PEFT-merged bf16 model."""
    arts = root / "artifacts"
    stamp = arts / ".converter_sha"
    if arts.exists() and (not stamp.is_file() or stamp.read_text() != digest):
        shutil.rmtree(arts)  # made by other efexport code: make them again
    arts.mkdir(exist_ok=True)
    stamp.write_text(digest)
    want = {
        "art_bf16": [EFEXPORT, str(p["run"]), "--out", str(arts / "bf16"), "--precision", "bf16",
                     "--max-shard-size", shard, "--quiet", "--no-verify"],
        "art_int4": [EFEXPORT, str(p["run"]), "--out", str(arts / "int4"), "--precision", "int4",
                     "--max-shard-size", shard, "--quiet", "--no-verify"],
        "merged": [PY, BASELINES, "peft-merge", "--base", str(p["base"]), "--adapter", str(p["adapter"]),
                   "--out", str(arts / "merged"), "--max-shard-size", shard],
    }
    out = {"art_bf16": arts / "bf16", "art_int4": arts / "int4", "merged": arts / "merged"}
    for key, cmd in want.items():
        if (out[key] / "config.json").is_file():
            continue
        shutil.rmtree(out[key], ignore_errors=True)
        log(f"[{size}] setup (unmeasured warm-up): {key}")
        t = time.time()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
        if r.returncode != 0:
            raise SystemExit(f"setup {key} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        log(f"    {time.time() - t:.1f}s")
    return out


def ensure_llama_cpp(work: Path, given: Path | None) -> Path:
    """llama.cpp's source tree (convert_hf_to_gguf.py, conversion/, gguf-py/) from the sdist of the
    installed llama-cpp-python, so the converter matches the llama.cpp that efexport quantizes with."""
    if given is not None:
        if not (given / "convert_hf_to_gguf.py").is_file():
            raise SystemExit(f"--llama-cpp {given}: no convert_hf_to_gguf.py there")
        return given
    import tarfile
    from importlib.metadata import version

    ver = version("llama_cpp_python")
    tree = work / f"llama.cpp-{ver}"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    sdist = work / "sdist"
    log(f"fetching the llama-cpp-python {ver} sdist for llama.cpp's convert_hf_to_gguf.py")
    subprocess.run([PY, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={ver}", "-d", str(sdist)], check=True)
    archive = next(sdist.glob("llama_cpp_python-*.tar.gz"))
    prefix = f"{archive.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(prefix) and (
            m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith((prefix + "conversion/", prefix + "gguf-py/")))]
        for m in members:
            m.name = m.name[len(prefix):]
        tf.extractall(tree, members=members, filter="data")
    return tree


def gguf_chains(p: dict[str, Path], out: Path, llama_cpp: Path) -> dict[str, list[str]]:
    """The user's path today, one shell line per GGUF type (intermediates removed at the end)."""
    q = lambda x: f'"{x}"'  # noqa: E731
    merged, f16 = out / "merged", out / "model-f16.gguf"
    merge = (f"{q(PY)} {q(BASELINES)} peft-merge --base {q(p['base'])} --adapter {q(p['adapter'])} "
             f"--out {q(merged)} --with-tokenizer")
    convert = f"{q(PY)} {q(BASELINES)} convert-gguf --llama-cpp {q(llama_cpp)} --pre {GGUF_PRE} {q(merged)}"
    return {
        "llamacpp_q8_0": ["sh", "-c", f"mkdir -p {q(out)} && {merge} && {convert} --outtype q8_0 "
                                      f"--outfile {q(out / 'model-Q8_0.gguf')} && rm -rf {q(merged)}"],
        "llamacpp_q4_k_m": ["sh", "-c", f"mkdir -p {q(out)} && {merge} && {convert} --outtype f16 --outfile {q(f16)} && "
                                        f"{q(PY)} {q(BASELINES)} quantize-gguf {q(f16)} {q(out / 'model-Q4_K_M.gguf')} q4_k_m"
                                        f" && rm -rf {q(merged)} {q(f16)}"],
    }


def compare_gguf_outputs(size: str, root: Path, p: dict[str, Path], env: dict, llama_cpp: Path) -> dict:
    """Make each GGUF type once both ways (unmeasured) and compare the files (compare_gguf.py)."""
    result = {}
    for gtype in ("q8_0", "q4_k_m"):
        efx_dir, base_dir = root / "gguf_check" / f"efexport_{gtype}", root / "gguf_check" / f"llamacpp_{gtype}"
        for d in (efx_dir, base_dir):
            shutil.rmtree(d, ignore_errors=True)
        efx_dir.parent.mkdir(parents=True, exist_ok=True)
        log(f"[{size}] setup (unmeasured): both GGUF {gtype} files, compared")
        for cmd in ([EFEXPORT, str(p["run"]), "--format", "gguf", "--precision", gtype, "--out", str(efx_dir),
                     "--quiet", "--no-verify"], gguf_chains(p, base_dir, llama_cpp)[f"llamacpp_{gtype}"]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
            if r.returncode != 0:
                raise SystemExit(f"setup gguf {gtype} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        r = subprocess.run([PY, str(HERE / "compare_gguf.py"), str(next(efx_dir.glob("*.gguf"))),
                            str(next(base_dir.glob("*.gguf")))], env=env, capture_output=True, text=True, check=True)
        result[gtype] = json.loads(r.stdout.strip().splitlines()[-1])
        log(f"    {gtype}: {result[gtype]['summary']}")
        shutil.rmtree(root / "gguf_check")
    return result


def gguf_f16(size: str, root: Path, p: dict[str, Path], env: dict) -> Path:
    """The f16 GGUF that quantize_only_q4_k_m reads (unmeasured; efexport --precision fp16)."""
    folder = root / "artifacts" / "gguf_f16"
    found = sorted(folder.glob("*.gguf"))
    if found:
        return found[0]
    shutil.rmtree(folder, ignore_errors=True)
    log(f"[{size}] setup (unmeasured): f16 GGUF for the quantize-only task")
    r = subprocess.run([EFEXPORT, str(p["run"]), "--format", "gguf", "--precision", "fp16", "--out", str(folder),
                        "--quiet", "--no-verify"], env=env, capture_output=True, text=True, cwd=root)
    if r.returncode != 0:
        raise SystemExit(f"setup gguf f16 failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return next(folder.glob("*.gguf"))


def task_commands(p: dict[str, Path], a: dict[str, Path], out: Path, shard: str,
                  llama_cpp: Path | None = None) -> dict[str, tuple[list[str], list[Path]]]:
    """task -> (command, inputs to pre-read)."""
    run, ckpt = str(p["run"]), str(p["checkpoint"])
    gguf = lambda t, verify=False: [EFEXPORT, run, "--format", "gguf", "--precision", t, "--out", str(out),  # noqa: E731
                                    "--quiet"] + ([] if verify else ["--no-verify"])
    chains = gguf_chains(p, out, llama_cpp) if llama_cpp else {}
    efx = lambda prec, verify: [EFEXPORT, run, "--out", str(out), "--precision", prec, "--max-shard-size", shard,  # noqa: E731
                                "--quiet"] + ([] if verify else ["--no-verify"])
    return {
        "cp": (["cp", "-r", ckpt, str(out)], [p["checkpoint"]]),
        "cp_sync": (["sh", "-c", f'cp -r "{ckpt}" "{out}" && sync'], [p["checkpoint"]]),
        "efx_bf16": (efx("bf16", False), [p["run"]]),
        "efx_bf16_parity": (efx("bf16", True), [p["run"]]),
        "peft_bf16": ([PY, BASELINES, "peft-merge", "--base", str(p["base"]), "--adapter", str(p["adapter"]),
                       "--out", str(out), "--max-shard-size", shard], [p["base"], p["adapter"]]),
        "efx_int4": (efx("int4", False), [p["run"]]),
        "efx_int4_parity": (efx("int4", True), [p["run"]]),
        "efx_int8": (efx("int8", False), [p["run"]]),
        "tf_int8": ([PY, BASELINES, "tf-int8", "--model", str(a["merged"]), "--out", str(out),
                     "--max-shard-size", shard], [a["merged"]]),
        "tf_int4": ([PY, BASELINES, "tf-int4", "--model", str(a["merged"]), "--out", str(out),
                     "--max-shard-size", shard], [a["merged"]]),
        "load_artifact_bf16": ([PY, BASELINES, "load-artifact", str(a["art_bf16"])], [a["art_bf16"]]),
        "load_artifact_bf16_noverify": ([PY, BASELINES, "load-artifact", "--no-verify", str(a["art_bf16"])], [a["art_bf16"]]),
        "from_pretrained_bf16": ([PY, BASELINES, "from-pretrained", str(a["art_bf16"])], [a["art_bf16"]]),
        "load_artifact_int4": ([PY, BASELINES, "load-artifact", str(a["art_int4"])], [a["art_int4"]]),
        "from_pretrained_int4": ([PY, BASELINES, "from-pretrained", str(a["art_int4"])], [a["art_int4"]]),
        "efx_gguf_q8_0": (gguf("q8_0"), [p["run"]]),
        "efx_gguf_q8_0_parity": (gguf("q8_0", True), [p["run"]]),
        "efx_gguf_q4_k_m": (gguf("q4_k_m"), [p["run"]]),
        "quantize_only_q4_k_m": (["sh", "-c", f'mkdir -p "{out}" && "{PY}" "{BASELINES}" quantize-gguf '
                                  f'"{a.get("gguf_f16", "")}" "{out / "model-Q4_K_M.gguf"}" q4_k_m'],
                                 [a["gguf_f16"]] if "gguf_f16" in a else []),
        **{t: (cmd, [p["base"], p["adapter"]]) for t, cmd in chains.items()},
    }


def _phases(log_path: Path) -> dict | None:
    """The in-process phases a command printed; a chain of baselines.py steps prints one line
    per step, summed here (every step's imports add up under "import")."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    found = [json.loads(line)["phases"] for line in lines if line.startswith('{"phases"')]
    if not found:
        return None
    total: dict = {}
    for ph in found:
        for k, v in ph.items():
            total[k] = total.get(k, 0) + v
    return total


def _timeline_mib(timeline: list) -> list:
    """measure.py's (t, RSS KiB, anon KiB) samples as [t, RSS MiB, anon MiB], down-sampled
    (resultfile.downsample: at most TIMELINE_POINTS, the peak kept)."""
    return resultfile.downsample([[round(t, 2), round(rss / 1024, 1), round(anon / 1024, 1)] for t, rss, anon in timeline])


# --------------------------------------------------------------------------- measuring
def bench_size(size: str, args, env: dict) -> dict:
    root = args.work / size
    p = ensure_synthetic(size, root)
    shard = synth.SHARD_SIZE[size]
    a = setup_artifacts(size, root, p, shard, env, args.converter_sha)
    out = root / "out"
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    tasks = [t for t in TASKS if t in args.tasks and not (args.no_parity and t in PARITY_TASKS)]
    llama_cpp = None
    if args.gguf:
        tasks = [t for t in GGUF_ORDER if t in args.tasks] if args.tasks_given else GGUF_ORDER  # --tasks: a subset
        llama_cpp = ensure_llama_cpp(args.work, args.llama_cpp)
        if "quantize_only_q4_k_m" in tasks:
            a["gguf_f16"] = gguf_f16(size, root, p, env)
    cmds = task_commands(p, a, out, shard, llama_cpp)
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if size == "tiny" else 300.0)
    retries = args.retries if args.retries is not None else (0 if size == "tiny" else 2)
    shards = sorted(p["checkpoint"].glob("*.safetensors"))
    info = {
        "size": size,
        "config": synth.SIZES[size],
        "num_parameters": json.loads((a["art_bf16"] / "efexport.json").read_text())["num_parameters"],
        "checkpoint_bytes": du(p["checkpoint"]),
        "base_bytes": du(p["base"]),
        "adapter_bytes": du(p["adapter"]),
        "largest_source_shard_bytes": max(f.stat().st_size for f in shards),
        "max_shard_size": shard,
        "commands": {t: portable(" ".join(cmds[t][0]), args.work) for t in tasks},
        "reps": {t: [] for t in tasks},
    }
    if args.gguf and not args.no_compare:
        info["gguf_compare"] = compare_gguf_outputs(size, root, p, env, llama_cpp)
        for c in info["gguf_compare"].values():
            c["files"] = [portable(f, args.work) for f in c.get("files", [])]
    for rep in range(args.reps):
        for task in tasks:
            cmd, inputs = cmds[task]
            lp = logs / f"{task}.{rep}.log"
            attempts = []
            for attempt in range(retries + 1):
                shutil.rmtree(out, ignore_errors=True)
                warm(inputs)
                subprocess.run(["sync"])
                busy = wait_quiet(quiet_wait, log=log)
                r = run_measured(cmd, env=env, log_path=lp, cwd=root)  # not the repo: no ./converter on sys.path
                if r["rc"] != 0:
                    raise SystemExit(f"[{size}] {task} failed (rc {r['rc']}); see {lp}:\n" + lp.read_text()[-3000:])
                r["out_bytes"] = du(out) if out.exists() else 0
                r["busy_before"] = round(busy, 3)
                r["phases"] = _phases(lp)
                attempts.append(r)
                if r["foreign_cpu_frac"] <= args.max_foreign or r["wall_s"] < 2.0:  # too short to judge
                    break
                log(f"    {task}: other processes used {100 * r['foreign_cpu_frac']:.0f}% of the CPUs meanwhile; "
                    + ("measuring again" if attempt < retries else "keeping the least disturbed attempt"))
            r = min(attempts, key=lambda x: x["foreign_cpu_frac"])
            r["attempts"] = len(attempts)
            r["timeline"] = _timeline_mib(r["timeline"])
            info["reps"][task].append(r)
            log(f"[{size}] rep {rep + 1}/{args.reps} {task:28s} {r['wall_s']:8.2f}s  cpu {r['cpu_s']:7.1f}s  "
                f"peak RSS {r['peak_rss_mib']:8.0f} MiB (anon {r['peak_rss_anon_mib']:.0f})  "
                f"other load {100 * r['foreign_cpu_frac']:.0f}%" + (f"  {r['phases']}" if r["phases"] else ""))
            shutil.rmtree(out, ignore_errors=True)
    info["median"] = {t: summarize(info["reps"][t]) for t in tasks}
    return info


def summarize(reps: list[dict]) -> dict:
    keys = ("wall_s", "cpu_s", "peak_rss_mib", "peak_rss_anon_mib", "maxrss_single_mib", "foreign_cpu_frac", "out_bytes")
    out = {k: round(statistics.median(r[k] for r in reps), 3) for k in keys}
    out["wall_s_min"] = min(r["wall_s"] for r in reps)
    out["wall_s_max"] = max(r["wall_s"] for r in reps)
    phases = [r["phases"] for r in reps if r.get("phases")]
    if phases:
        out["phases"] = {k: round(statistics.median(ph[k] for ph in phases), 3) for k in phases[0]}
    out["n"] = len(reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", action="append", choices=sorted(synth.SIZES), help="repeatable; default tiny")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=HERE / "_work")
    ap.add_argument("--results", type=Path, default=None, help="default benchmarks/results (results_gguf with --gguf)")
    ap.add_argument("--tasks", default=None, help="comma-separated subset of: " + ", ".join(TASKS)
                    + " (default: all but the --gguf ones; with --gguf: all the gguf ones)")
    ap.add_argument("--no-parity", action="store_true", help="skip the with-parity efexport variants")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="max seconds to wait for an idle machine before each measurement (default 300; 0 for tiny)")
    ap.add_argument("--max-foreign", type=float, default=0.15,
                    help="measure again when other processes used more than this fraction of the CPUs meanwhile")
    ap.add_argument("--retries", type=int, default=None,
                    help="extra attempts per measurement when the machine was busy (default 2; 0 for tiny)")
    ap.add_argument("--gguf", action="store_true",
                    help="measure GGUF export (q8_0, q4_k_m) against PEFT merge + llama.cpp's convert_hf_to_gguf.py "
                         "(+ llama_model_quantize); results to --results, default benchmarks/results_gguf")
    ap.add_argument("--no-compare", action="store_true",
                    help="with --gguf: skip the unmeasured set-up that writes efexport's and llama.cpp's files once "
                         "and compares them (compare_gguf.py; ~10 min at 0.6B)")
    ap.add_argument("--llama-cpp", type=Path, default=None,
                    help="llama.cpp source tree with convert_hf_to_gguf.py (default: unpacked from the llama-cpp-python "
                         "sdist of the installed version)")
    ap.add_argument("--converter-from", type=Path, default=None,
                    help="folder holding the converter/ to measure (default: this checkout), e.g. a saved snapshot")
    ap.add_argument("--keep", action="store_true", help="keep benchmarks/_work (synthetic runs) for a later run")
    args = ap.parse_args()
    args.tasks_given = args.tasks is not None
    if args.tasks is None:
        args.tasks = ",".join(t for t in TASKS if t not in GGUF_TASKS)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.results is None:
        args.results = HERE / ("results_gguf" if args.gguf else "results")
    unknown = set(args.tasks) - set(TASKS)
    if unknown:
        ap.error(f"unknown tasks: {sorted(unknown)}")
    sizes = args.size or ["tiny"]
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    source = args.converter_from.resolve() if args.converter_from else REPO
    if source.resolve() == (args.work / "efexport_snapshot").resolve():
        ap.error("--converter-from must not be the work folder's own efexport_snapshot")
    snap, args.converter_sha = snapshot_converter(args.work, source)
    env = subprocess_env(snap)
    where = subprocess.run([PY, "-c", "import converter; print(converter.__file__)"], env=env, capture_output=True,
                           text=True, cwd=args.work).stdout.strip()
    if not where.startswith(str(snap)):
        raise SystemExit(f"efexport snapshot not used: converter imports from {where}")
    machine = machine_info(args.work)
    machine["versions"]["converter_sha256"] = args.converter_sha
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB; {machine['versions']}")
    done = {}
    try:
        for size in sizes:
            info = bench_size(size, args, env)
            info["machine"] = machine
            if args.work.resolve().is_relative_to(REPO):
                info["work"] = str(args.work.resolve().relative_to(REPO))
            info["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
            info["reps_requested"] = args.reps
            resultfile.write_size_results(args.results / f"{size}.jsonl", info)
            done[size] = info
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    import report

    all_results = report.load_results(args.results)
    try:
        report.make_chart(all_results, args.results / "peak_rss.png")
    except ImportError as exc:
        log(f"(no chart: {exc}; pip install matplotlib)")
    print(report.markdown(all_results), file=sys.stderr)
    print(json.dumps(report.figures({k: all_results[k] for k in done}), separators=(",", ":")))


if __name__ == "__main__":
    main()
