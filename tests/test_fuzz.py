"""A fuzzed corpus (issues 19 and 22): mutated runs, adapters and artifacts never get past the checks.

Good fixture sources are mutated by hypothesis (random bytes and truncation of safetensors
headers and JSON files, wrong dtypes / shapes / offsets, missing or renamed tensors, wrong
types and huge numbers in config fields, NaN / inf in weights; for artifacts, hostile
manifest names and header lengths / offsets with the manifest re-hashed). For every example
the export (in-process, through the CLI entry point) either writes a complete artifact that
``efexport verify`` passes and ``load_artifact`` loads, or exits 2 with the three-line error,
no traceback, and nothing next to --out.

A fixed seed (``derandomize``); ``EFEXPORT_FUZZ_EXAMPLES`` sets the examples per test
(default 100, the CI share: 300 in all, under a minute on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
from itertools import count
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from converter.errors import EfexportError  # noqa: E402
from converter.manifest import MANIFEST, sha256_file  # noqa: E402
from converter.runtime import load_artifact  # noqa: E402
from fixtures.runs import make_run  # noqa: E402
from helpers import assert_three_lines  # noqa: E402
from test_bad_input import run_cli, write_adapter  # noqa: E402

EXAMPLES = int(os.environ.get("EFEXPORT_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
pytestmark = pytest.mark.filterwarnings("ignore")

HOSTILE_VALUES: list[Any] = [
    "abc", "", None, True, -1, 0, 1, 2.5, 10**30, -(10**30), 1e308, float("nan"), float("inf"), float("-inf"),
    [], {}, [1, 2], {"a": 1}, "../../etc/passwd", [[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]], "\ufffd",
]
HOSTILE_NAMES = ["../outside.txt", "/etc/passwd", "a/../../b", "..", ".", "", "a\\..\\b", "C:/x", "a//b", "\x00",
                 "sub/./x", "efexport.json", 7, None]
SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "XX", "", 3]


# --------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Good sources to mutate: runs of every strategy, a PEFT adapter with its base, and an artifact."""
    root = tmp_path_factory.mktemp("fuzz_sources")
    out = {
        "dense_run": make_run(root / "dense_run", "qwen3", "dense_lora", seed=1).path,
        "moe": make_run(root / "moe", "qwen3", "moe_expert_lora", kind="checkpoint_dir", num_experts=2, top_k=1).path,
        "mixture": make_run(root / "mixture", "llama", "mixture_lora", kind="checkpoint_dir", num_experts=2).path,
        "sharded": make_run(root / "sharded", "qwen3", "none", kind="checkpoint_dir", sharded=True).path,
    }
    adapter_root = root / "adapter"
    base = make_run(adapter_root / "base", "qwen3", "none", kind="checkpoint_dir", seed=4).path
    write_adapter(adapter_root / "lora", base, ["q_proj", "v_proj", "down_proj"], use_dora=False)
    out["adapter"] = adapter_root
    code, _, err = run_cli([out["dense_run"], "--out", root / "artifact", "-q", "--no-verify"])
    assert code == 0, err
    out["artifact"] = root / "artifact"
    return out


_counter = count()


def fresh(tmp_root: Path, source: Path) -> Path:
    """A private copy of a source, in a folder of its own."""
    dest = tmp_root / f"ex{next(_counter)}"
    shutil.copytree(source, dest / source.name)
    return dest / source.name


def adapter_paths(copy: Path) -> tuple[Path, Path]:
    """(adapter folder, base folder) of a copied adapter source, the adapter pointed at its own base."""
    adapter, base = copy / "lora", copy / "base"
    cfg_path = adapter / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        if isinstance(cfg, dict) and "base_model_name_or_path" in cfg:
            cfg["base_model_name_or_path"] = str(base)
            cfg_path.write_text(json.dumps(cfg))
    except (ValueError, UnicodeDecodeError, RecursionError):
        pass
    return adapter, base


# --------------------------------------------------------------------------- mutations


def json_paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a JSON value (capped, for large tokenizer files)."""
    out = [prefix]
    if len(prefix) < 4:
        items = list(data.items()) if isinstance(data, dict) else list(enumerate(data)) if isinstance(data, list) else []
        for k, v in items[:40]:
            out += json_paths(v, prefix + (k,))
    return out


def mutate_json(path: Path, rnd: random.Random, kind: str) -> str:
    raw = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(raw[: rnd.randrange(len(raw))])
        return "truncate"
    if kind == "bytes":
        buf = bytearray(raw)
        for _ in range(rnd.randint(1, 4)):
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        path.write_bytes(bytes(buf))
        return "bytes"
    data = json.loads(raw)
    paths = [p for p in json_paths(data) if p]
    if not paths:
        return "none"
    where = rnd.choice(paths)
    parent = data
    for k in where[:-1]:
        parent = parent[k]
    leaf = where[-1]
    if kind == "delete" or (kind == "rename" and isinstance(parent, list)):
        del parent[leaf]
    elif kind == "rename":
        parent[f"{leaf}_x"] = parent.pop(leaf)
    else:
        parent[leaf] = rnd.choice(HOSTILE_VALUES)
    path.write_text(json.dumps(data))
    return f"{kind} {'.'.join(map(str, where))}"


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def mutate_safetensors(path: Path, rnd: random.Random, kind: str) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if kind == "truncate":
        path.write_bytes(raw[: rnd.randrange(len(raw))])
        return "truncate"
    if kind == "length":
        n2 = rnd.choice([0, 1, n - 1, n + 1, 2**40, 2**64 - 1, rnd.randrange(2**32)])
        path.write_bytes(struct.pack("<Q", n2) + raw[8:])
        return f"length {n2}"
    if kind == "bytes":
        buf = bytearray(raw)
        for _ in range(rnd.randint(1, 4)):
            buf[8 + rnd.randrange(n)] = rnd.randrange(256)
        path.write_bytes(bytes(buf))
        return "header bytes"
    header, data = read_st(path)
    names = sorted(k for k in header if k != "__metadata__")
    name = rnd.choice(names)
    entry = header[name]
    if kind == "dtype":
        entry["dtype"] = rnd.choice(SAFETENSORS_DTYPES)
    elif kind == "shape":
        shape = entry["shape"]
        entry["shape"] = rnd.choice([shape[::-1], [*shape, 1], shape[1:], [], [-1], [10**12], [math.prod(shape)],
                                     [s + 1 for s in shape], "x"])
    elif kind == "offsets":
        b, e = entry["data_offsets"]
        entry["data_offsets"] = rnd.choice([[b + 2, e + 2], [b, e + 2**40], [e, b], [-4, e], [b], "x", [b, e, 0]])
    elif kind in ("drop", "rename", "nan", "huge", "extra"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path))
        if kind == "drop":
            del tensors[name]
        elif kind == "rename":
            tensors[name.replace(".weight", ".weigth") if ".weight" in name else name + "_x"] = tensors.pop(name)
        elif kind == "extra":
            tensors["model.layers.0.extra.weight"] = tensors[name].clone()
        elif tensors[name].is_floating_point():
            t = tensors[name]
            flat = t.view(-1)
            if kind == "nan":
                flat[rnd.randrange(flat.numel())] = rnd.choice([float("nan"), float("inf"), float("-inf")])
            else:
                tensors[name] = t * 1e30
        save_file(tensors, str(path), metadata=header.get("__metadata__"))
        return f"{kind} {name}"
    write_st(path, header, data)
    return f"{kind} {name}"


JSON_KINDS = ["truncate", "bytes", "field", "field", "field", "delete", "rename"]
ST_KINDS = ["truncate", "length", "bytes", "dtype", "shape", "offsets", "drop", "rename", "nan", "huge", "extra"]


def mutate(folder: Path, rnd: random.Random) -> str:
    """One mutation of one JSON or safetensors file under ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors"))
    target = rnd.choice(files)
    kind = rnd.choice(ST_KINDS if target.suffix == ".safetensors" else JSON_KINDS)
    if target.suffix == ".safetensors":
        what = mutate_safetensors(target, rnd, kind)
    else:
        what = mutate_json(target, rnd, kind)
    return f"{target.relative_to(folder)}: {what}"


# --------------------------------------------------------------------------- the property


def check_outcome(args: list[Any], parent: Path, out: Path, what: str) -> str:
    """Export; then a complete, verified, loadable artifact, or the three-line error and nothing beside --out."""
    code, _, err = run_cli(args)
    if code == 0:
        assert sorted(p.name for p in parent.iterdir()) == [out.name], what
        vcode, _, verr = run_cli(["verify", out])
        assert vcode == 0, (what, verr)
        load_artifact(out, device="cpu")
        return "exported"
    assert code == 2, (what, err)
    assert "Traceback" not in err, (what, err)
    assert_three_lines(err.strip())
    assert not parent.exists() or list(parent.iterdir()) == [], (what, list(parent.iterdir()))
    return err.splitlines()[0][:60]


OUTCOMES: dict[str, int] = {}


def record(outcome: str) -> None:
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if os.environ.get("EFEXPORT_FUZZ_REPORT"):
        print(f"\nfuzz outcomes ({sum(OUTCOMES.values())} examples):")
        for k, v in sorted(OUTCOMES.items(), key=lambda kv: -kv[1]):
            print(f"  {v:5d}  {k}")


@FUZZ
@given(source=st.sampled_from(["dense_run", "moe", "mixture", "sharded"]), seed=st.integers(0, 2**32 - 1),
       layout=st.sampled_from([None, "compact"]), parity=st.sampled_from([False] * 7 + [True]))
def test_a_mutated_run_exports_completely_or_is_refused_in_three_lines(sources, tmp_path_factory, source, seed,
                                                                       layout, parity):
    rnd = random.Random(seed)
    run = fresh(tmp_path_factory.getbasetemp() / "fuzz_runs", sources[source])
    what = mutate(run, rnd)
    parent = run.parent / "exports"
    parent.mkdir()
    out = parent / "out"
    args = [run, "--out", out, "-q"] + ([] if parity else ["--no-verify"])
    if layout and source == "moe":
        args += ["--moe-layout", layout]
    record(check_outcome(args, parent, out, f"{source} {what}"))


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), parity=st.sampled_from([False] * 7 + [True]))
def test_a_mutated_peft_adapter_exports_completely_or_is_refused(sources, tmp_path_factory, seed, parity):
    rnd = random.Random(seed)
    copy = fresh(tmp_path_factory.getbasetemp() / "fuzz_adapters", sources["adapter"])
    what = mutate(copy, rnd)
    adapter, base = adapter_paths(copy)
    parent = copy.parent / "exports"
    parent.mkdir()
    out = parent / "out"
    args = [adapter, "--base-model", base, "--out", out, "-q"] + ([] if parity else ["--no-verify"])
    record(check_outcome(args, parent, out, f"adapter {what}"))


def rehash(folder: Path, names: dict[Any, Path] | None = None) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    for rel in list(manifest["files"]):
        if (folder / rel).is_file():
            manifest["files"][rel] = {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
    for rel, path in (names or {}).items():
        manifest["files"][rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    (folder / MANIFEST).write_text(json.dumps(manifest))


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), attack=st.sampled_from(["name", "name", "header", "header", "header"]),
       hostile=st.sampled_from(HOSTILE_NAMES))
def test_a_hostile_artifact_loads_or_is_refused_in_three_lines(sources, tmp_path_factory, seed, attack, hostile):
    """Hostile manifest names and safetensors headers (hashes recomputed): load, or the three-line error."""
    rnd = random.Random(seed)
    art = fresh(tmp_path_factory.getbasetemp() / "fuzz_artifacts", sources["artifact"])
    outside = art.parent / "outside.txt"
    outside.write_text("outside")
    if attack == "name":
        rehash(art)
        manifest = json.loads((art / MANIFEST).read_text())
        entry = {"sha256": sha256_file(outside), "size": outside.stat().st_size}
        if hostile == 7:
            manifest["files"] = list(manifest["files"].items())
        elif hostile is None:
            manifest["files"]["model.safetensors"] = None
        else:
            manifest["files"][hostile] = entry
        (art / MANIFEST).write_text(json.dumps(manifest))
        what = f"manifest name {hostile!r}"
    else:
        what = mutate_safetensors(art / "model.safetensors", rnd,
                                  rnd.choice(["length", "bytes", "dtype", "shape", "offsets", "truncate"]))
        rehash(art)
    try:
        load_artifact(art, device="cpu")
        loaded = True
    except EfexportError as exc:
        assert_three_lines(exc)
        loaded = False
    code, _, err = run_cli(["verify", art])
    assert "Traceback" not in err, (what, err)
    if loaded:
        record("artifact loaded")
        assert code == 0, (what, err)
    else:
        record("artifact refused")
        assert code != 0, what
        assert_three_lines(err.strip())
