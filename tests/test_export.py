"""`efexport` export: artifacts load in plain transformers, match the reference, and are written atomically."""

from __future__ import annotations

import json
import math
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures.reference import reference_logits
from fixtures.runs import BACKBONES, probe_ids
from helpers import assert_three_lines, max_diff, rel_diff, top1
from safetensors import safe_open

from converter import EfexportError
from converter.export import ExportOptions, export
from converter.manifest import sha256_file

ROOT = Path(__file__).resolve().parent.parent
EFEXPORT = [sys.executable, "-m", "converter.cli"]
# The CLI with every tensor write slowed down, so a test can interrupt an export mid-way
# (the sink's write_shard wrapped from outside: no hook in shipped code).
SLOW_EFEXPORT = [sys.executable, "-c", """
import sys, time
import converter.sinks.safetensors as sink
real = sink.write_shard
def slow(path, shard, on_tensor=None):
    def tick(planned, size):
        time.sleep(0.05)
        if on_tensor is not None:
            on_tensor(planned, size)
    return real(path, shard, tick)
sink.write_shard = slow
from converter.cli import run
sys.argv[0] = "efexport"
run()
"""]
PRECISIONS = [None, "fp32", "bf16", "fp16", "int8", "int4"]


def _export(run, out: Path, **kw) -> dict:
    kw.setdefault("progress", False)
    return export(ExportOptions(run=str(run.path if hasattr(run, "path") else run), out=out, **kw)).record


def _hf_load(path: Path, **kw):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _quantize_with_transformers(bf16_dir: Path, precision: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4",
                            bnb_4bit_use_double_quant=True) if precision == "int4" else BitsAndBytesConfig(load_in_8bit=True))
    return AutoModelForCausalLM.from_pretrained(str(bf16_dir), quantization_config=q, device_map="cpu").eval()


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


# gemma3 has no native MoE class in transformers: its moe_expert_lora runs export compact (test_runtime.py).
ROUND_TRIPS = [(b, s) for b in BACKBONES for s in ("none", "dense_lora", "moe_expert_lora")
               if not (b == "gemma3" and s == "moe_expert_lora")]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backbone,strategy", ROUND_TRIPS)
def test_round_trip_in_plain_transformers(run_factory, tmp_path, backbone, strategy, precision):
    run = run_factory(backbone, strategy)
    ids = probe_ids(run.checkpoints["final"])
    out = tmp_path / "artifact"
    record = _export(run, out, precision=precision, verify=precision in (None, "fp32"))
    expected_layout = "moe" if strategy == "moe_expert_lora" else "dense"
    assert record["layout"] == expected_layout and record["precision"] == precision
    assert record["structure_preserved"] == (expected_layout == "moe")
    model = _hf_load(out)
    arch = {"qwen3": "Qwen3MoeForCausalLM", "llama": "MixtralForCausalLM"}.get(backbone) if strategy == "moe_expert_lora" else None
    if arch:
        assert type(model).__name__ == arch == record["architecture"]
    ours = _logits(model, ids)
    ref = reference_logits(run.checkpoints["final"], ids)
    if precision in (None, "fp32"):
        assert max_diff(ours, ref) <= 1e-5
        parity = record["parity"]
        assert parity["prompts"] == 4 and parity["max_abs_logit_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    elif precision in ("bf16", "fp16"):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        assert model.model.embed_tokens.weight.dtype == dtype
        assert all(t.dtype == dtype for t in _all_tensors(out).values())
        per_position = (ours - ref).abs().amax(-1) / ref.abs().amax().clamp(min=1.0)
        assert torch.quantile(per_position.flatten(), 0.9).item() <= (0.01 if precision == "fp16" else 0.08)
        assert top1(ours, ref) >= 0.85
    else:
        bf16 = tmp_path / "bf16"
        _export(run, bf16, precision="bf16", verify=False)
        theirs = _quantize_with_transformers(bf16, precision)
        theirs_dir = tmp_path / "theirs"
        theirs.save_pretrained(str(theirs_dir))
        a, b = _all_tensors(out), _all_tensors(theirs_dir)
        assert a.keys() == b.keys()
        quantized = [k for k in a if k.endswith((".SCB", ".quant_state.bitsandbytes__nf4"))]
        assert len(quantized) >= 8
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        assert max_diff(ours, _logits(theirs, ids)) <= 1e-5
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert cfg["quant_method"] == "bitsandbytes" and cfg[f"load_in_{precision[3]}bit"] is True
        assert top1(ours, ref) >= 0.5  # quantized tiny random models keep most top-1 choices


def test_metadata_hashes_card_and_no_local_paths(run_factory, tmp_path):
    from huggingface_hub import ModelCard

    run = run_factory("qwen3", "dense_lora")
    out = tmp_path / "art"
    record = _export(run, out, checkpoint="best", precision="int4")
    data = json.loads((out / "efexport.json").read_text())
    for key in ("format", "format_version", "strategy", "layout", "structure_preserved", "backbone", "architecture",
                "base_model", "precision", "quantization", "lora_config", "num_parameters", "source", "files",
                "parity", "created_with"):
        assert key in data, key
    assert data["format"] == "efexport" and data["format_version"] == 1
    assert data["quantization"] == {"method": "bitsandbytes", "quant_type": "nf4", "double_quant": True,
                                    "compute_dtype": "bfloat16"}
    assert data["source"]["kind"] == "eulerforge_run" and data["source"]["checkpoint"] == "best"
    assert data["source"]["step"] == 200 and data["base_model"] == "Qwen/Qwen3-0.6B"
    assert data["lora_config"] == {"lora_r": 4, "lora_alpha": 8.0}
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "efexport.json")
    assert sorted(data["files"]) == on_disk
    for name, entry in data["files"].items():
        assert entry["sha256"] == sha256_file(out / name) and entry["size"] == (out / name).stat().st_size
    assert record["files"] == data["files"]
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "Qwen/Qwen3-0.6B" and card.data.library_name == "transformers"
    assert {"efexport", "dense_lora", "int4"} <= set(card.data.tags)
    assert "top-1 agreement" in card.text and "model.safetensors" in card.text
    # chat template preserved, no absolute path or temp folder anywhere in the artifact
    assert (out / "chat_template.jinja").read_text() == (run.checkpoints["best"] / "chat_template.jinja").read_text()
    for p in out.iterdir():
        if p.suffix in (".json", ".md", ".jinja", ".py"):
            text = p.read_text()
            assert str(tmp_path) not in text and str(run.path) not in text and "efexport-tmp" not in text, p.name
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}


def test_sharded_output_loads_identically(run_factory, tmp_path):
    run = run_factory("llama", "dense_lora")
    out = tmp_path / "sharded"
    _export(run, out, max_shard_size="60KB", verify=False)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _all_tensors(out).values())
    ids = probe_ids(run.checkpoints["final"])
    assert max_diff(_logits(_hf_load(out), ids), reference_logits(run.checkpoints["final"], ids)) <= 1e-5


def test_each_shard_is_flushed_to_disk_off_the_writing_thread(run_factory, tmp_path, monkeypatch):
    """The writer never waits on the disk: a finished shard is fsynced by the hashing worker while
    the next one is produced, and everything is fsynced again before the rename."""
    import threading

    run = run_factory("llama", "dense_lora")
    synced: list[tuple[str, str]] = []
    real = os.fsync

    def spy(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), threading.current_thread().name))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    out = tmp_path / "sharded"
    _export(run, out, max_shard_size="60KB", verify=False)
    monkeypatch.undo()
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    early = [(Path(path).name, thread) for path, thread in synced if Path(path).name in shards]
    # each shard twice: once by the hashing worker as it completes, once in the final fsync of the folder
    for shard in shards:
        threads = [t for name, t in early if name == shard]
        assert len(threads) == 2 and threads[0].startswith("efexport-hash"), (shard, threads)
    assert threading.main_thread().name in {t for _, t in early}
    assert [n for n, t in early if t.startswith("efexport-hash")] == shards  # in the order written


def test_bf16_source_keeps_its_dtype_and_merges_in_fp32(run_factory, tmp_path):
    run = run_factory("qwen3", "dense_lora", dtype=torch.bfloat16)
    out = tmp_path / "art"
    _export(run, out, verify=False)
    tensors = _all_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    from safetensors.torch import load_file

    src = load_file(run.checkpoints["final"] / "model.safetensors")
    p = "model.layers.0.self_attn.q_proj"
    s = run.block["lora_alpha"] / run.block["lora_r"]
    expected = (src[f"{p}.base_layer.weight"].float() + s * src[f"{p}.lora_B.weight"].float() @ src[f"{p}.lora_A.weight"].float()).to(torch.bfloat16)
    assert torch.equal(tensors[f"{p}.weight"], expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_blockwise_merge_equals_the_whole_matrix_float32_merge(dtype):
    # 600 rows: two full 256-row blocks and a partial one.
    from converter.strategy.lora import merge_lora, merge_lora_f32

    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(600, 320, generator=g).to(dtype)
    a, b = (torch.randn(8, 320, generator=g) * 0.05).to(dtype), (torch.randn(600, 8, generator=g) * 0.05).to(dtype)
    merged = merge_lora(w0, a, b, 2.5)
    whole = torch.addmm(w0.float(), b.float(), a.float(), alpha=2.5)  # one addmm over the whole matrix
    assert torch.equal(merge_lora_f32(w0, a, b, 2.5).view(torch.int32), whole.view(torch.int32))
    expected = whole.to(dtype)
    assert not torch.equal(expected, w0)  # the update is not lost in the rounding
    assert merged.dtype == dtype and merged.shape == w0.shape
    assert torch.equal(merged, expected)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_large_tensors_taken_as_they_are_stream_in_row_pieces(run_factory, tmp_path, monkeypatch, precision):
    """Above the streaming size, a tensor the export copies (or only casts) is read and written a
    block of rows at a time, never whole, and the shards are byte-identical to whole-tensor writes."""
    import converter.sinks.safetensors as sink
    from converter.source.safetensors import TensorSource

    run = run_factory("qwen3", "dense_lora", dtype=torch.bfloat16)
    whole = tmp_path / "whole"
    _export(run, whole, precision=precision, verify=False)

    monkeypatch.setattr(sink, "STREAM_BYTES", 4096)
    monkeypatch.setattr(sink, "PIECE_BYTES", 1024)
    pieces: dict[str, list[tuple[int, int]]] = {}
    real_get, real_rows = TensorSource.get, TensorSource.get_rows

    def get(self, name):
        assert name != "model.embed_tokens.weight", "the embedding was read whole"
        return real_get(self, name)

    def get_rows(self, name, start, stop):
        pieces.setdefault(name, []).append((start, stop))
        return real_rows(self, name, start, stop)

    monkeypatch.setattr(TensorSource, "get", get)
    monkeypatch.setattr(TensorSource, "get_rows", get_rows)
    streamed = tmp_path / "streamed"
    _export(run, streamed, precision=precision, verify=False)

    emb = pieces["model.embed_tokens.weight"]
    vocab, hidden = run.config["vocab_size"], run.config["hidden_size"]
    assert emb[0][0] == 0 and emb[-1][1] == vocab and len(emb) == math.ceil(vocab / (1024 // (hidden * 2)))
    assert all(b == c for (_, b), (c, _) in zip(emb, emb[1:]))
    shards = sorted(p.name for p in whole.glob("*.safetensors"))
    assert shards == sorted(p.name for p in streamed.glob("*.safetensors"))
    assert all(sha256_file(whole / n) == sha256_file(streamed / n) for n in shards)


# -- nothing lost, nothing half-written ------------------------------------------------
def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in folder.iterdir()} if folder.exists() else {}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "efexport-tmp" in p.name]


def test_existing_out_refused_without_force(run_factory, tmp_path):
    run = run_factory("qwen3", "none")
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(EfexportError) as info:
        _export(run, out)
    assert_three_lines(info.value)
    assert "--force" in str(info.value)
    with pytest.raises(EfexportError) as info:
        _export(run, out, force=True)  # not an efexport artifact: --force will not delete it
    assert "not an efexport artifact" in str(info.value)
    assert (out / "keep.txt").read_text() == "user data" and len(list(out.iterdir())) == 1


def test_force_keeps_old_artifact_when_new_export_fails(run_factory, tmp_path, monkeypatch):
    run = run_factory("qwen3", "dense_lora")
    out = tmp_path / "art"
    _export(run, out, verify=False)
    before = _snapshot(out)
    import converter.sinks.safetensors as sink

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sink, "write_shard", boom)
    with pytest.raises(RuntimeError):
        _export(run, out, force=True, precision="bf16")
    assert _snapshot(out) == before and not _leftovers(tmp_path)
    monkeypatch.undo()
    _export(run, out, force=True, precision="bf16", verify=False)
    assert _snapshot(out) != before and json.loads((out / "efexport.json").read_text())["precision"] == "bf16"
    assert not _leftovers(tmp_path)


def test_parity_failure_is_an_error_and_writes_nothing(run_factory, tmp_path, monkeypatch):
    run = run_factory("llama", "none")
    out = tmp_path / "art"
    import converter.parity as parity

    real = parity.logits_of
    calls = {"n": 0}

    def corrupt(model, batches):
        calls["n"] += 1
        result = real(model, batches)
        return [r + 5.0 if calls["n"] == 2 else r for r in result]  # the artifact's logits, off by 5

    monkeypatch.setattr(parity, "logits_of", corrupt)
    with pytest.raises(EfexportError) as info:
        _export(run, out)
    assert_three_lines(info.value)
    assert "differ from the source" in str(info.value)
    assert not out.exists() and not _leftovers(tmp_path)


def test_dry_run_writes_nothing(run_factory, tmp_path):
    run = run_factory("qwen3", "moe_expert_lora")
    out = tmp_path / "art"
    result = export(ExportOptions(run=str(run.path), out=out, dry_run=True, precision="int4", progress=False))
    assert result.record is None
    assert result.plan["layout"] == "moe" and result.plan["architecture"] == "Qwen3MoeForCausalLM"
    assert result.plan["planned_bytes"] > 0
    assert list(tmp_path.iterdir()) == []


def test_checks_run_before_any_write(run_factory, tmp_path, monkeypatch):
    run = run_factory("qwen3", "none")
    out = tmp_path / "art"
    import shutil as _shutil

    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(EfexportError) as info:
        _export(run, out)
    assert "free" in str(info.value)
    monkeypatch.undo()
    for kw, needle in [({"precision": "int3"}, "int3"), ({"max_shard_size": "lots"}, "lots"),
                       ({"checkpoint": "7"}, "checkpoint-7"), ({"moe_layout": "compact"}, "no experts"),
                       ({"template": tmp_path / "nope.jinja"}, "nope.jinja")]:
        with pytest.raises(EfexportError) as info:
            _export(run, out, **kw)
        assert_three_lines(info.value)
        assert needle in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_native_moe_refusals_suggest_compact(run_factory, tmp_path):
    partial = run_factory("llama", "moe_expert_lora", moe_layers=[1])
    with pytest.raises(EfexportError) as info:
        _export(partial, tmp_path / "a", moe_layout="native")
    assert "Mixtral has no dense layers" in str(info.value) and "--moe-layout compact" in str(info.value)
    biased = run_factory("llama", "moe_expert_lora", config_overrides={"mlp_bias": True})
    with pytest.raises(EfexportError) as info:
        _export(biased, tmp_path / "b")
    assert "--moe-layout compact" in str(info.value)
    with pytest.raises(EfexportError) as info:
        _export(run_factory("gemma3", "moe_expert_lora"), tmp_path / "c", moe_layout="native")
    assert "compact" in str(info.value)
    assert not any(tmp_path.iterdir())


def test_qwen3_partial_moe_layers_become_mlp_only_layers(run_factory, tmp_path):
    run = run_factory("qwen3", "moe_expert_lora", moe_layers=[1])
    out = tmp_path / "art"
    _export(run, out, verify=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [0] and cfg["num_local_experts"] == 4 and cfg["norm_topk_prob"] is True
    ids = probe_ids(run.checkpoints["final"])
    assert max_diff(_logits(_hf_load(out), ids), reference_logits(run.checkpoints["final"], ids)) <= 1e-5


def test_user_template_is_sandboxed_and_strict(run_factory, tmp_path):
    run = run_factory("qwen3", "none")
    good = tmp_path / "good.jinja"
    good.write_text("# {{ title }}\nstrategy={{ strategy }} sha={{ files['model.safetensors'].sha256 if false else 'x' }}\n")
    out = tmp_path / "art"
    _export(run, out, template=good, verify=False)
    assert "strategy=none" in (out / "README.md").read_text()
    for body, needle in [("{{ no_such_variable }}", "no_such_variable"),
                         ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "render the model card"),
                         ("{% for %}", "compile template")]:
        bad = tmp_path / "bad.jinja"
        bad.write_text(body)
        with pytest.raises(EfexportError) as info:
            _export(run, tmp_path / "bad_out", template=bad, verify=False)
        assert needle in str(info.value)
        assert not (tmp_path / "bad_out").exists() and not _leftovers(tmp_path)


# -- the command line ----------------------------------------------------------------------
def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EFEXPORT, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_users_own_words(run_factory, tmp_path):
    run = run_factory("qwen3", "dense_lora")
    proc = _cli(str(run.path), "--checkpoint", "best", "--precision", "int4", "--out", "dir", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["precision"] == "int4" and record["source"]["checkpoint"] == "best"
    assert (tmp_path / "dir" / "efexport.json").is_file()
    assert "Traceback" not in proc.stderr


def test_cli_errors_are_three_lines_without_traceback(tmp_path):
    proc = _cli(str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert_three_lines(proc.stderr.strip())
    debug = _cli("--debug", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_cli_help_inspect_and_dry_run(run_factory, tmp_path):
    help_text = _cli("--help").stdout
    assert "Examples:" in help_text and "inspect" in help_text and "push" in help_text
    export_help = _cli("export", "--help").stdout
    for option in ("--checkpoint", "--precision", "--moe-layout", "--max-shard-size", "--template", "--force",
                   "--dry-run", "--no-verify", "--json", "--quiet", "--push-to-hub", "--format"):
        assert option in export_help, option
    run = run_factory("llama", "moe_expert_lora")
    info = json.loads(_cli("inspect", str(run.path), "--json").stdout)
    assert info["strategy"] == "moe_expert_lora" and info["default_layout"] == "moe"
    assert [c["name"] for c in info["checkpoints"]][:3] == ["final", "best", "latest"]
    assert info["checkpoints"][1]["step"] == 200
    assert info["size_by_precision"]["int4"] < info["size_by_precision"]["bf16"] < info["size_by_precision"]["fp32"]
    assert info["formats"]["hf"].startswith("yes")
    dry = _cli(str(run.path), "--out", str(tmp_path / "o"), "--dry-run")
    assert dry.returncode == 0 and "Dry run" in dry.stdout and not (tmp_path / "o").exists()


def test_interrupted_export_leaves_nothing_and_stale_tmp_is_cleaned(run_factory, tmp_path):
    """SIGTERM mid-export: --out never appears; a kill -9 leftover is removed by the next run."""
    run = run_factory("gemma3", "mixture_lora")
    out = tmp_path / "art"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*SLOW_EFEXPORT, str(run.path), "--out", str(out), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not _leftovers(tmp_path):
        time.sleep(0.05)
    assert _leftovers(tmp_path), "export never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "nothing was written" in err
    assert not out.exists() and not _leftovers(tmp_path)
    # kill -9 leaves the temporary folder behind; the next export of the same --out removes it
    proc = subprocess.Popen([*SLOW_EFEXPORT, str(run.path), "--out", str(out), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while time.time() < deadline and not _leftovers(tmp_path):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert _leftovers(tmp_path) and not out.exists()
    _export(run, out, verify=False)
    assert out.is_dir() and not _leftovers(tmp_path)


def test_templates_ship_in_a_non_editable_install(tmp_path):
    """The wheel carries templates/ as converter.templates, found through importlib.resources."""
    target, src = tmp_path / "site", tmp_path / "src"  # built from a copy: setuptools leaves build/ in the source tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("converter", "templates"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                    "--target", str(target), str(src)], check=True, capture_output=True, text=True)
    code = ("import converter, importlib.resources as r; "
            "print(converter.__file__); print(r.files('converter.templates').joinpath('model_card.md.jinja').read_text()[:40])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout.splitlines()[0]
    assert "{{ title }}" in proc.stdout
