"""What a new user meets: artifacts as inputs, honest cards and verify output, a quiet terminal.

CLI output is asserted where it is the behaviour (three-line errors, the progress bar under a
pseudo-terminal, an empty stderr on a quantized load). Artifacts are made once per module.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import pty
import re
import runpy
import select
import shutil
import struct
import subprocess
import sys
import termios
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter import cli, load_model
from converter.errors import EfexportError
from converter.export import ExportOptions, export
from converter.quiet import quiet_libraries
from converter.sinks.gguf import llama_cpp_available
from converter.verify import verify_artifact
from helpers import assert_three_lines, run_cli

ROOT = Path(__file__).resolve().parent.parent
needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python not installed")


@pytest.fixture(scope="module")
def made(run_factory, tmp_path_factory):
    """One dense_lora run and its int4, bf16, PEFT (and GGUF when llama.cpp is here) artifacts."""
    run = run_factory("qwen3", "dense_lora")
    root = tmp_path_factory.mktemp("ux")
    outs = {"int4": root / "tiny-int4", "bf16": root / "tiny-bf16", "peft": root / "tiny-adapter"}
    export(ExportOptions(run=str(run.path), out=outs["int4"], precision="int4", progress=False))
    export(ExportOptions(run=str(run.path), out=outs["bf16"], precision="bf16", progress=False, verify=False))
    export(ExportOptions(run=str(run.path), out=outs["peft"], fmt="peft", progress=False))
    if llama_cpp_available():
        outs["gguf"] = root / "tiny-gguf"
        export(ExportOptions(run=str(run.path), out=outs["gguf"], fmt="gguf", precision="q4_k_m", name="tiny chat",
                             progress=False))
    return run, outs


def record(folder: Path) -> dict:
    return json.loads((folder / "efexport.json").read_text())


# --------------------------------------------------------------------------- 1. artifacts as inputs

def test_exporting_from_an_int4_artifact_is_refused_naming_the_run_to_export_from(made, tmp_path):
    run, outs = made
    code, _, err = run_cli([outs["int4"], "--precision", "bf16", "--out", tmp_path / "y"])
    assert code == 2 and "Traceback" not in err
    assert_three_lines(err.strip())
    cannot, fix, see = err.strip().splitlines()
    assert "bitsandbytes int4 (NF4)-quantized" in cannot and "does not match" not in cannot
    assert f"`efexport {run.path.name} --checkpoint final --out DIR`" in fix and "load_artifact" in fix
    assert see == "See: docs: README.md#artifacts-as-inputs" and "## Artifacts as inputs" in (ROOT / "README.md").read_text()
    assert not (tmp_path / "y").exists()


def test_a_plain_bnb_quantized_folder_is_recognised_by_inspect_and_refused_by_export(made, tmp_path):
    _, outs = made
    plain = tmp_path / "bnb"
    shutil.copytree(outs["int4"], plain)
    (plain / "efexport.json").unlink()
    info = json.loads(run_cli(["inspect", plain, "--json"])[1])
    assert info["what"] == "bitsandbytes int4 (NF4)-quantized Hugging Face folder"
    with pytest.raises(EfexportError) as err:
        export(ExportOptions(run=str(plain), out=tmp_path / "y", precision="bf16", progress=False))
    assert "bitsandbytes int4 (NF4)-quantized" in err.value.cannot
    assert "export from the float run or model" in err.value.fix


def test_exporting_from_a_float_artifact_works_like_an_hf_folder(made, tmp_path):
    _, outs = made
    out = tmp_path / "again"
    result = export(ExportOptions(run=str(outs["bf16"]), out=out, precision="fp32", progress=False))
    assert result.record["source"]["kind"] == "hf_model" and result.record["parity"]["top1_agreement"] == 1.0
    assert result.record["parity"]["max_abs_logit_diff"] <= 1e-4 * result.record["parity"]["max_abs_logit"]


def test_load_model_on_an_artifact_loads_it_through_the_runtime_loader_verified(made, tmp_path):
    from converter.runtime import load_artifact

    _, outs = made
    loaded = load_model(outs["int4"], device="cpu")
    assert loaded.metadata.path_type == "artifact" and loaded.metadata.load_precision == "int4"
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits,
                           load_artifact(outs["int4"], device="cpu").model(input_ids=ids).logits)
    with pytest.raises(EfexportError) as err:
        load_model(outs["int4"], device="cpu", load_precision="int8")
    assert "already quantized" in err.value.cannot
    tampered = tmp_path / "t"
    shutil.copytree(outs["int4"], tampered)
    tensors = load_file(str(tampered / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EfexportError) as err:
        load_model(tampered, device="cpu")
    assert err.value.cannot.startswith("verify model.safetensors")


def test_inspect_says_what_the_folder_is_and_shows_lora_in_text(made, tmp_path):
    run, outs = made
    code, out, _ = run_cli(["inspect", outs["int4"]])
    assert code == 0
    lines = out.splitlines()
    assert f"what: efexport artifact (dense, int4, bitsandbytes int4 (NF4) weights, made from {run.path.name} checkpoint final)" in lines
    assert any(line.startswith("formats: hf, gguf, peft: no (its weights are bitsandbytes int4 (NF4)-quantized; "
                               f"export from the run: efexport {run.path.name}") for line in lines), out
    code, out, _ = run_cli(["inspect", run.path])
    assert "lora: r 4, alpha 8.0" in out.splitlines() and "what: EulerForge run" in out.splitlines()
    merged = run_cli(["inspect", outs["bf16"]])[1]  # a float artifact reads like any HF folder
    assert "what: efexport artifact (dense, bf16, made from" in merged
    assert "peft: no (no LoRA factors to write: the source is a plain model)" in merged
    assert "write a none" not in merged


# --------------------------------------------------------------------------- 2. verify says what it checked

def test_verify_prints_what_it_checked_with_the_exports_rounding(made):
    _, outs = made
    code, out, _ = run_cli(["verify", outs["int4"]])
    rec = record(outs["int4"])["parity"]
    assert code == 0, out
    lines = out.splitlines()
    assert lines[1].startswith("files: 8 checked (size and sha256")
    assert lines[2].startswith("reload: runtime loader") and "top-1 agreement with export-time logits 100.0%" in lines[2]
    assert lines[3].startswith(f"at export: max |Δlogit| {rec['max_abs_logit_diff']:.3g} (")
    assert str(rec["max_abs_logit_diff"]) not in out and "recorded, not gated" in lines[3]


@needs_llama_cpp
def test_verify_reloads_a_gguf_in_llama_cpp_on_the_recorded_probe_ids(made):
    _, outs = made
    report = verify_artifact(outs["gguf"])
    assert report["ok"] and report["parity"]["engine"] == "llama.cpp"
    assert report["parity"]["top1_agreement_with_export"] == 1.0 and report["parity"]["max_rel_change"] <= 1e-3
    data = record(outs["gguf"])
    assert len(data["parity"]["probe_ids"]) == data["parity"]["prompts"]


def test_verify_reloads_a_peft_adapter_on_its_base_or_says_why_not(made, tmp_path):
    run, outs = made
    code, out, _ = run_cli(["verify", outs["peft"]])
    assert code == 0
    assert "reload: skipped: 'Qwen/Qwen3-0.6B' (adapter_config.json) is neither a local model folder" in out
    base = tmp_path / "base"  # the run's own base weights as a plain HF folder
    base.mkdir()
    ckpt = run.checkpoints["final"]
    tensors = {k.replace(".base_layer", ""): v for k, v in load_file(str(ckpt / "model.safetensors")).items()
               if ".lora_" not in k}
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("eulerforge", None)
    (base / "config.json").write_text(json.dumps(config))
    report = verify_artifact(outs["peft"], base_model=str(base))
    assert report["ok"], report
    assert report["parity"]["top1_agreement_with_export"] == 1.0 and report["parity"]["max_rel_change"] <= 1e-5


# --------------------------------------------------------------------------- 3. cards and records

def test_quantized_card_says_recorded_not_gated_and_what_the_figure_means(made):
    _, outs = made
    card = (outs["int4"] / "README.md").read_text()
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == "# tiny-int4"  # title: the artifact's name
    assert "recorded, not gated: int4 quantization changes logits by design" in card
    assert "% of the source's max |logit|" in card and "most likely next token is unchanged" in card


def test_peft_card_and_record_describe_the_adapter(made):
    _, outs = made
    card = (outs["peft"] / "README.md").read_text()
    data = record(outs["peft"])
    adapter = load_file(str(outs["peft"] / "adapter_model.safetensors"))
    assert data["num_parameters"] == sum(t.numel() for t in adapter.values())
    assert f"| Parameters | {data['num_parameters']:,} (the adapter's LoRA factors) |" in card
    assert "| Layout | `peft_adapter` (LoRA factors as trained, not merged) |" in card and "merged, dense" not in card
    assert "| Precision | float32 (kept from the source) |" in card and data["dtype"] == "float32"
    assert "source-dtype" not in card and "- fp32" in card


@needs_llama_cpp
def test_gguf_record_names_the_type_mix_and_the_llama_cpp_versions(made):
    _, outs = made
    data = record(outs["gguf"])
    q = data["quantization"]
    assert q["method"] == "gguf" and q["file_type"] == "Q4_K_M"
    assert sum(q["tensor_types"].values()) == data["gguf"]["tensor_count"]
    versions = data["created_with"]
    assert versions["gguf"] and versions["llama-cpp-python"] and versions["llama.cpp"]
    assert versions["llama-cpp-python"] in data["parity"]["engine"]
    assert (outs["gguf"] / "README.md").read_text().count("# tiny chat") == 1  # --name is the title


def test_the_demo_run_names_no_base_model(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["make_demo_run.py", str(tmp_path / "demo_run")])
    with contextlib.redirect_stdout(io.StringIO()) as out:
        runpy.run_path(str(ROOT / "examples" / "make_demo_run.py"), run_name="__main__")
    assert "no base model" in out.getvalue()
    resolved = json.loads((tmp_path / "demo_run" / "resolved_config.json").read_text())
    assert "name_or_path" not in resolved["model"]


def test_examples_and_readme_name_the_api_by_what_it_does():
    texts = [p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "examples").glob("*.py"))]]
    assert not [t for t in texts if re.search(r"seed 000", t, re.IGNORECASE)]


# --------------------------------------------------------------------------- 4. a quiet, consistent terminal

def test_bad_option_value_gets_three_lines_naming_what_was_typed(made, tmp_path):
    run, _ = made
    code, _, err = run_cli([run.path, "--format", "ggfu", "--out", tmp_path / "z"])
    assert code == 2
    assert_three_lines(err.strip())
    assert err.strip().splitlines() == [
        f"Cannot run `efexport {run.path} --format ggfu --out {tmp_path / 'z'}`: --format 'ggfu' is not one of hf, gguf, peft",
        "Fix: pass --format hf|gguf|peft (did you mean --format gguf?).",
        "See: efexport export --help",
    ]
    code, _, err = run_cli([run.path, "--precision", "bf16"])
    assert code == 2 and err.strip().splitlines()[0].endswith("--precision bf16`: --out is missing")
    assert_three_lines(err.strip())


def test_debug_is_listed_in_every_commands_help():
    from click.testing import CliRunner

    for command in ("export", "inspect", "verify", "push"):
        assert "--debug" in CliRunner().invoke(cli.main, [command, "--help"]).output


def test_export_json_has_the_output_path_and_no_private_keys(made, tmp_path):
    run, _ = made
    code, out, _ = run_cli([run.path, "--out", tmp_path / "j", "--no-verify", "--json", "--quiet"])
    data = json.loads(out)
    assert code == 0 and data["out"] == str((tmp_path / "j").resolve())
    assert data["seconds"] > 0 and data["command_seconds"] >= data["seconds"]
    assert not [k for k in data if k.startswith("_")]


def test_progress_bar_shows_under_a_pseudo_terminal_and_not_with_quiet(made, tmp_path):
    run, _ = made

    def stderr_through_a_pty(*extra: object) -> str:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
        with open(slave, "w", closefd=True) as tty:
            code, _, _ = run_cli([run.path, "--out", tmp_path / f"p{len(extra)}", "--no-verify", *extra], stderr=tty)
        assert code == 0
        chunks = []
        while select.select([master], [], [], 0.5)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal's other end is closed: everything was read
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)
        return b"".join(chunks).decode("utf-8", "replace")

    shown = stderr_through_a_pty()
    assert re.search(r"export: +\d+%\|", shown) and re.search(r"\d+(\.\d+)?[kM]?B/s|it/s|\?B/s", shown), shown
    assert "export:" not in stderr_through_a_pty("--quiet")


def test_known_library_messages_are_dropped_in_scope_and_real_ones_kept(caplog):
    ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        with quiet_libraries():
            ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module named 'kernels'")
            ops.warning("a real bitsandbytes warning")
        ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: outside the scope")
    assert [r.getMessage() for r in caplog.records] == [
        "a real bitsandbytes warning", "Failed to load CPU gemm_4bit_forward from kernels-community: outside the scope"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries():
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
            warnings.warn("something real", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    assert [str(w.message)[:14] for w in seen] == ["something real", "`is_gradient_c"]


def test_a_quantized_load_and_a_peft_export_print_nothing_on_stderr(made, tmp_path):
    """In a fresh process (bitsandbytes imported for the first time): stderr stays empty."""
    run, outs = made
    code = ("import sys, torch\n"
            "from converter import load_model\n"
            "from converter.export import ExportOptions, export\n"
            f"m = load_model({str(outs['int4'])!r}, device='cpu').model\n"
            "with torch.no_grad(): m(input_ids=torch.tensor([[1, 2, 3]]))\n"
            f"export(ExportOptions(run={str(run.path)!r}, out=__import__('pathlib').Path({str(tmp_path / 'a')!r}), "
            "fmt='peft', progress=False))\n")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
