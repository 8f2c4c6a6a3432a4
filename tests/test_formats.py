"""`--format gguf` and `--format peft` end to end, through the real pipeline on fixture runs.

Every GGUF written here is loaded by llama.cpp (llama-cpp-python) and its logits on the
fixture probes are compared with ``reference_logits`` of the source checkpoint, the
independent plain-torch forward of tests/fixtures/reference.py. Every PEFT adapter is
loaded with ``PeftModel.from_pretrained`` on a base model that transformers builds from
the run's own frozen base weights (saved here under Hugging Face names, without efexport).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf  # a core dependency; llama-cpp-python is the efexport[gguf] extra
import pytest
import torch
from fixtures.reference import reference_logits
from fixtures.runs import HF_NAME, PROBE_TEXTS, load_tensors, probe_ids
from helpers import assert_three_lines
from safetensors import safe_open

from converter import EfexportError
from converter.export import ExportOptions, export
from converter.sinks.gguf import llama_cpp_available, llama_cpp_logits, llama_cpp_tokenize
from converter.manifest import sha256_file

ROOT = Path(__file__).resolve().parent.parent
EFEXPORT = [sys.executable, "-m", "converter.cli"]

# Every GGUF a test writes is loaded in llama.cpp; without the extra those tests are skipped
needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python (efexport[gguf]) is not installed")

# the llama.cpp architecture each (backbone, strategy) becomes
GGUF_ARCH = {
    ("qwen3", "none"): "qwen3", ("llama", "none"): "llama", ("gemma3", "none"): "gemma3",
    ("qwen3", "dense_lora"): "qwen3", ("llama", "dense_lora"): "llama", ("gemma3", "dense_lora"): "gemma3",
    ("qwen3", "moe_expert_lora"): "qwen3moe", ("llama", "moe_expert_lora"): "llama",  # Mixtral: llama with experts
}
FP32_TOL = 1e-3  # max|Δlogit| / max|logit|; observed <= 1.4e-4 (gemma3, ggml's fp16 GELU table), <= 1e-6 otherwise
# rows a multiple of 256, so q4_k_m really is made of Q4_K / Q6_K blocks (64-wide rows fall back to Q5_0)
WIDE = dict(config_overrides={"hidden_size": 256, "intermediate_size": 512, "head_dim": 64})
GGUF_FILES = {"README.md", "Modelfile", "efexport.json"}


def _export(run, out: Path, **kw) -> dict:
    kw.setdefault("progress", False)
    return export(ExportOptions(run=str(run.path), out=out, **kw)).record


def _the_gguf(out: Path) -> Path:
    files = sorted(out.glob("*.gguf"))
    assert len(files) == 1, files
    return files[0]


def _llama_cpp(gguf_file: Path, ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([llama_cpp_logits(gguf_file, row.tolist()) for row in ids])


def _rel_top1(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    return rel, (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


def _gguf_vs_reference(out: Path, ckpt: Path) -> tuple[float, float]:
    ids = probe_ids(ckpt)
    return _rel_top1(_llama_cpp(_the_gguf(out), ids), reference_logits(ckpt, ids))


def _manifest(out: Path) -> dict:
    return json.loads((out / "efexport.json").read_text())


def _field(reader, key: str):
    return reader.fields[key].contents()


def _assert_files_hashed(out: Path, data: dict) -> None:
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "efexport.json")
    assert sorted(data["files"]) == on_disk
    for name, entry in data["files"].items():
        assert entry["sha256"] == sha256_file(out / name) and entry["size"] == (out / name).stat().st_size, name


def _recorded_rel(parity: dict) -> float:
    return parity["max_abs_logit_diff"] / parity["max_abs_logit"]


# -- GGUF: fp32 parity in llama.cpp ----------------------------------------------------------
@needs_llama_cpp
@pytest.mark.parametrize("backbone,strategy", list(GGUF_ARCH))
def test_gguf_fp32_matches_the_run_in_llama_cpp(run_factory, tmp_path, backbone, strategy):
    run = run_factory(backbone, strategy)
    out = tmp_path / "gguf"
    record = _export(run, out, fmt="gguf", precision="fp32")
    name = run.path.name  # resolved_config.json run_name
    gguf_file = out / f"{name}-F32.gguf"
    assert {p.name for p in out.iterdir()} == GGUF_FILES | {gguf_file.name}

    ckpt = run.checkpoints["final"]
    rel, top1 = _gguf_vs_reference(out, ckpt)
    print(f"PARITY {backbone}/{strategy} fp32 rel={rel:.2e} top1={top1:.3f}")
    assert rel <= FP32_TOL and top1 == 1.0, (rel, top1)
    # llama.cpp tokenizes the probes exactly as the run's tokenizer does
    ids = probe_ids(ckpt)
    for text, row in zip(PROBE_TEXTS, ids):
        assert llama_cpp_tokenize(gguf_file, text, add_special=False)[:12] == row.tolist()

    data = _manifest(out)
    assert data == {k: v for k, v in record.items() if not k.startswith("_")}
    assert data["layout"] == "gguf" and data["precision"] == "fp32" and data["strategy"] == strategy
    assert data["gguf"]["arch"] == GGUF_ARCH[backbone, strategy] and data["gguf"]["file_type"] == "F32"
    parity = data["parity"]
    assert parity["engine"].startswith("llama.cpp ") and parity["prompts"] == 4
    assert _recorded_rel(parity) <= FP32_TOL and parity["top1_agreement"] == 1.0, parity
    _assert_files_hashed(out, data)

    r = gguf.GGUFReader(str(gguf_file))
    assert _field(r, "general.architecture") == GGUF_ARCH[backbone, strategy]
    assert int(_field(r, "general.file_type")) == gguf.LlamaFileType.ALL_F32
    assert {t.tensor_type for t in r.tensors} == {gguf.GGMLQuantizationType.F32}
    arch = GGUF_ARCH[backbone, strategy]
    if strategy == "moe_expert_lora":  # experts kept as experts, not merged away
        assert int(_field(r, f"{arch}.expert_count")) == 4 and int(_field(r, f"{arch}.expert_used_count")) == 2
        shapes = {t.name: list(t.shape) for t in r.tensors}
        assert shapes["blk.0.ffn_gate_exps.weight"] == [64, 128, 4]
        assert "blk.0.ffn_gate_inp.weight" in shapes
    else:
        assert f"{arch}.expert_count" not in r.fields


# -- GGUF: quantized types keep top-1 ---------------------------------------------------------
QUANT_RUNS = {
    "qwen3-dense_lora-wide": ("qwen3", "dense_lora", WIDE),
    "qwen3-moe_expert_lora": ("qwen3", "moe_expert_lora", {}),
    "llama-moe_expert_lora": ("llama", "moe_expert_lora", {}),
    "gemma3-none": ("gemma3", "none", {}),
}
# Random-weight nets have flat logits; observed top-1 (probes / recorded parity):
# q8_0 >= 0.92 / 0.92, q4_k_m >= 0.75 / 0.70.
MIN_TOP1 = {"q8_0": 0.85, "q4_k_m": 0.6}


@needs_llama_cpp
@pytest.mark.parametrize("gtype", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("which", list(QUANT_RUNS))
def test_gguf_quantized_load_and_keep_top1(run_factory, tmp_path, which, gtype):
    backbone, strategy, kw = QUANT_RUNS[which]
    run = run_factory(backbone, strategy, **kw)
    out = tmp_path / "gguf"
    record = _export(run, out, fmt="gguf", precision=gtype)
    label = gtype.upper()
    gguf_file = out / f"{run.path.name}-{label}.gguf"
    assert {p.name for p in out.iterdir()} == GGUF_FILES | {gguf_file.name}
    assert not list(tmp_path.glob("**/.efexport-gguf-*")), "intermediate F16 file left behind"
    rel, top1 = _gguf_vs_reference(out, run.checkpoints["final"])
    parity = record["parity"]
    print(f"PARITY {which} {gtype} rel={rel:.2e} top1={top1:.3f} "
          f"recorded rel={_recorded_rel(parity):.2e} top1={parity['top1_agreement']:.3f}")
    assert top1 >= MIN_TOP1[gtype] and parity["top1_agreement"] >= MIN_TOP1[gtype], (top1, parity)
    assert 0 < rel < 0.5 and parity["engine"].startswith("llama.cpp")
    assert record["precision"] == gtype and record["gguf"]["file_type"] == label

    r = gguf.GGUFReader(str(gguf_file))
    Q = gguf.GGMLQuantizationType
    types = {t.name: t.tensor_type for t in r.tensors}
    assert int(_field(r, "general.file_type")) == int(getattr(gguf.LlamaFileType, "MOSTLY_" + label))
    assert types["blk.0.attn_norm.weight"] == Q.F32
    if gtype == "q8_0":
        assert types["blk.0.attn_q.weight"] == Q.Q8_0
    elif "wide" in which:
        assert types["blk.0.attn_q.weight"] == Q.Q4_K and Q.Q6_K in set(types.values())
    else:  # 64-wide rows are not a multiple of the 256 K-block: llama.cpp's own fallback
        assert types["blk.0.attn_q.weight"] in (Q.Q5_0, Q.Q5_1, Q.Q8_0)


@needs_llama_cpp
def test_gguf_precision_absent_keeps_the_source_dtype(run_factory, tmp_path):
    run = run_factory("qwen3", "dense_lora", dtype=torch.bfloat16)
    out = tmp_path / "gguf"
    record = _export(run, out, fmt="gguf")
    gguf_file = out / f"{run.path.name}-BF16.gguf"
    assert gguf_file.is_file() and record["precision"] == "bf16" and record["gguf"]["file_type"] == "BF16"
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(gguf_file)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.BF16
    rel, top1 = _gguf_vs_reference(out, run.checkpoints["final"])  # reference: fp32 math on the bf16 weights
    print(f"PARITY qwen3/dense_lora(bf16 run) bf16 rel={rel:.2e} top1={top1:.3f}")
    assert rel <= 0.05 and top1 >= 0.9, (rel, top1)


@needs_llama_cpp
def test_gguf_fp32_of_a_bf16_run_holds_the_exact_fp32_merge(run_factory, tmp_path):
    """dense_lora is merged in fp32: an F32 GGUF must hold W0 + s·B@A unrounded (not rounded to bf16 first)."""
    run = run_factory("qwen3", "dense_lora", dtype=torch.bfloat16)
    out = tmp_path / "gguf"
    _export(run, out, fmt="gguf", precision="fp32", verify=False)
    src = load_tensors(run.checkpoints["final"])
    tensors = {t.name: t for t in gguf.GGUFReader(str(_the_gguf(out))).tensors}
    pairs = (("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"), ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight"))
    for hf, g in pairs:
        a, b = src[f"{hf}.lora_A.weight"].float(), src[f"{hf}.lora_B.weight"].float()
        exact = src[f"{hf}.base_layer.weight"].float() + run.scale * (b @ a)
        got = torch.from_numpy(tensors[g].data.copy()).reshape(exact.shape)
        rounded_first = exact.to(torch.bfloat16).float()  # what a merge cast back to bf16 would hold
        assert (got - exact).abs().max().item() <= 1e-6 < (rounded_first - exact).abs().max().item(), hf
    rel, top1 = _gguf_vs_reference(out, run.checkpoints["final"])
    assert rel <= FP32_TOL and top1 == 1.0, (rel, top1)


# -- GGUF: the folder around the file ---------------------------------------------------------
@needs_llama_cpp
def test_gguf_cli_checkpoint_best_q4_k_m_card_modelfile(run_factory, tmp_path):
    """`efexport RUN --checkpoint best --format gguf --precision q4_k_m --out DIR` as a user types it."""
    from huggingface_hub import ModelCard

    from converter.verify import verify_artifact

    run = run_factory("qwen3", "dense_lora", **WIDE)
    out = tmp_path / "tiny-gguf"
    proc = subprocess.run(EFEXPORT + [str(run.path), "--checkpoint", "best", "--format", "gguf", "--precision", "q4_k_m",
                                      "--out", str(out), "--name", "tiny chat", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parity: max |Δlogit|" in proc.stdout and "llama.cpp" in proc.stdout, proc.stdout
    gguf_file = out / "tiny-chat-Q4_K_M.gguf"  # --name made a plain file name
    assert {p.name for p in out.iterdir()} == GGUF_FILES | {gguf_file.name}
    data = _manifest(out)
    assert data["source"]["checkpoint"] == "best" and data["source"]["step"] == 200
    assert data["precision"] == "q4_k_m" and data["layout"] == "gguf"
    _assert_files_hashed(out, data)
    assert verify_artifact(out)["ok"]

    # the best checkpoint, not final, went in: llama.cpp follows best's reference only
    rel_best, top1_best = _gguf_vs_reference(out, run.checkpoints["best"])
    _, top1_final = _gguf_vs_reference(out, run.checkpoints["final"])
    print(f"PARITY qwen3-dense_lora-wide(best) q4_k_m rel={rel_best:.2e} top1={top1_best:.3f} (vs final {top1_final:.3f})")
    assert top1_best >= MIN_TOP1["q4_k_m"] and top1_final < 0.5, (top1_best, top1_final)
    r = gguf.GGUFReader(str(gguf_file))
    assert _field(r, "general.name") == "tiny chat"
    assert _field(r, "general.base_model.0.repo_url") == f"https://huggingface.co/{HF_NAME['qwen3']}"

    modelfile = (out / "Modelfile").read_text()
    assert modelfile.splitlines()[0] == f"FROM ./{gguf_file.name}"
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<eos>"' in modelfile
    assert 'TEMPLATE """' in modelfile and "<|im_start|>assistant" in modelfile

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == HF_NAME["qwen3"] and card.data.library_name == "gguf"
    assert {"gguf", "efexport", "dense_lora", "q4_k_m"} <= set(card.data.tags)
    assert f"llama-cli -m {gguf_file.name}" in card.text
    assert f"ollama create {out.name} -f Modelfile" in card.text and "LM Studio" in card.text
    assert "llama.cpp" in card.text and "top-1 agreement" in card.text
    for p in out.iterdir():
        if p.suffix != ".gguf":
            text = p.read_text()
            assert str(tmp_path) not in text and str(run.path) not in text and "efexport-tmp" not in text, p.name


@needs_llama_cpp
def test_gguf_no_verify_records_skipped(run_factory, tmp_path):
    run = run_factory("llama", "none")
    out = tmp_path / "gguf"
    # a --name with path parts still names one file inside --out
    record = _export(run, out, fmt="gguf", precision="fp16", verify=False, name="../../sub/evil")
    assert [p.name for p in tmp_path.iterdir()] == ["gguf"]
    assert {p.name for p in out.iterdir()} == GGUF_FILES | {"sub-evil-F16.gguf"}
    assert record["parity"] == {"skipped": "--no-verify"} == _manifest(out)["parity"]
    assert "Not measured: --no-verify" in (out / "README.md").read_text()
    rel, top1 = _gguf_vs_reference(out, run.checkpoints["final"])  # still loads and computes the run
    print(f"PARITY llama/none fp16 rel={rel:.2e} top1={top1:.3f}")
    assert rel <= 1e-2 and top1 == 1.0, (rel, top1)


@needs_llama_cpp
def test_gguf_without_llama_cpp_python(run_factory, tmp_path, monkeypatch):
    """q8_0 needs no extra (parity is then recorded as skipped, saying why); K-quants name the extra."""
    run = run_factory("qwen3", "none")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails
    with pytest.raises(EfexportError) as info:
        _export(run, tmp_path / "k", fmt="gguf", precision="q4_k_m")
    assert_three_lines(info.value)
    assert "efexport[gguf]" in str(info.value) and not (tmp_path / "k").exists()
    out = tmp_path / "gguf"
    record = _export(run, out, fmt="gguf", precision="q8_0")
    assert "llama-cpp-python is not installed" in record["parity"]["skipped"]
    monkeypatch.undo()
    rel, top1 = _gguf_vs_reference(out, run.checkpoints["final"])
    assert top1 >= MIN_TOP1["q8_0"], (rel, top1)


# -- refusals: three lines, nothing written -----------------------------------------------------
REFUSALS = [
    # (backbone, strategy, run options, format, precision, text the message must hold)
    ("qwen3", "dense_lora", {}, "gguf", "int4", "--precision q4_k_m"),
    ("qwen3", "dense_lora", {}, "gguf", "int8", "--precision q8_0"),
    ("llama", "none", {}, "gguf", "q3_k_xl", "q4_k_m"),
    ("qwen3", "mixture_lora", {}, "gguf", None, "no architecture"),
    ("llama", "mixture_lora", {}, "gguf", "q8_0", "no architecture"),
    ("gemma3", "moe_expert_lora", {}, "gguf", "fp32", "no architecture"),
    # llama.cpp's qwen3moe has experts in every layer; a run with dense layers cannot be written exactly
    ("qwen3", "moe_expert_lora", {"moe_layers": [1]}, "gguf", "q8_0", "mlp_only_layers"),
    ("qwen3", "none", {}, "peft", None, "PEFT adapter"),
    ("qwen3", "moe_expert_lora", {}, "peft", None, "mixture of LoRA experts"),
    ("gemma3", "mixture_lora", {}, "peft", None, "mixture of LoRA experts"),
]


@pytest.mark.parametrize("backbone,strategy,kw,fmt,precision,needle", REFUSALS)
def test_refusals_are_three_lines_and_write_nothing(run_factory, tmp_path, backbone, strategy, kw, fmt, precision, needle):
    run = run_factory(backbone, strategy, **kw)
    out = tmp_path / "out"
    with pytest.raises(EfexportError) as info:
        _export(run, out, fmt=fmt, precision=precision)
    assert_three_lines(info.value)
    assert needle in str(info.value), str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_int4_for_gguf(run_factory, tmp_path, monkeypatch, capsys):
    from converter import cli

    run = run_factory("qwen3", "dense_lora")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["efexport", str(run.path), "--format", "gguf", "--precision", "int4", "--out", str(out)])
    with pytest.raises(SystemExit) as info:
        cli.run()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert_three_lines(err)
    assert "q4_k_m" in err and "Traceback" not in err and not out.exists()


def test_inspect_json_lists_the_formats(run_factory):
    from click.testing import CliRunner

    from converter.cli import main

    expected = {  # (backbone, strategy): (gguf, peft)
        ("qwen3", "none"): ("yes", "no"),
        ("qwen3", "dense_lora"): ("yes", "yes"),
        ("gemma3", "dense_lora"): ("yes", "yes"),
        ("llama", "moe_expert_lora"): ("yes", "no"),
        ("gemma3", "moe_expert_lora"): ("no", "no"),
        ("qwen3", "mixture_lora"): ("no", "no"),
    }
    for (backbone, strategy), (want_gguf, want_peft) in expected.items():
        run = run_factory(backbone, strategy)
        result = CliRunner().invoke(main, ["inspect", str(run.path), "--json"])
        assert result.exit_code == 0, result.output
        formats = json.loads(result.stdout)["formats"]
        assert formats["hf"].startswith("yes")
        for fmt, want in (("gguf", want_gguf), ("peft", want_peft)):
            got = formats[fmt]
            assert got == "yes" if want == "yes" else got.startswith("no ("), (backbone, strategy, fmt, got)


# -- PEFT adapters ---------------------------------------------------------------------------
def _base_model_from_run(ckpt: Path, dest: Path):
    """The run's frozen base weights under Hugging Face names, saved and loaded by transformers."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = {k.replace(".base_layer.", "."): v.contiguous() for k, v in load_tensors(ckpt).items() if ".lora_" not in k}
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("eulerforge", None)
    dest.mkdir()
    (dest / "config.json").write_text(json.dumps(config))
    save_file(base, str(dest / "model.safetensors"), metadata={"format": "pt"})
    model, info = AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


PEFT_RUNS = {
    "qwen3": ("qwen3", {}),
    "llama": ("llama", {}),
    "gemma3": ("gemma3", {}),
    "qwen3-rslora": ("qwen3", dict(use_rslora=True, lora_r=8, lora_alpha=16.0)),
}


@pytest.mark.parametrize("which", list(PEFT_RUNS))
def test_peft_adapter_reproduces_the_run(run_factory, tmp_path, which):
    from huggingface_hub import ModelCard
    from peft import PeftModel

    from converter.verify import verify_artifact

    backbone, kw = PEFT_RUNS[which]
    run = run_factory(backbone, "dense_lora", **kw)
    out = tmp_path / "adapter"
    record = _export(run, out, fmt="peft")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "efexport.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.gguf")) and not (out / "model.safetensors").exists()

    cfg = json.loads((out / "adapter_config.json").read_text())
    block = run.block
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == block["lora_r"] and cfg["lora_alpha"] == block["lora_alpha"]
    assert cfg["use_rslora"] is block["use_rslora"]
    assert sorted(cfg["target_modules"]) == sorted(block["target_modules"])
    assert cfg["base_model_name_or_path"] == HF_NAME[backbone]

    ckpt = run.checkpoints["final"]
    src = load_tensors(ckpt)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        adapter = {k: fh.get_tensor(k) for k in fh.keys()}
    assert all(re.fullmatch(r"base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_[AB]\.weight", k)
               for k in adapter), sorted(adapter)[:4]
    assert set(adapter) == {"base_model.model." + k for k in src if ".lora_" in k}
    assert all(torch.equal(v, src[k.removeprefix("base_model.model.")]) for k, v in adapter.items())

    ids = probe_ids(ckpt)
    ref = reference_logits(ckpt, ids)
    base = _base_model_from_run(ckpt, tmp_path / "base")
    without = (_logits(base, ids) - ref).abs().max().item()
    model = PeftModel.from_pretrained(base, str(out)).eval()
    diff = (_logits(model, ids) - ref).abs().max().item()
    print(f"PARITY {which}/dense_lora peft max|Δ|={diff:.2e} (rel {diff / ref.abs().max().item():.2e}); base alone {without:.2e}")
    assert diff <= 1e-4 and without > 0.1, (diff, without)

    data = _manifest(out)
    assert data["layout"] == "peft_adapter" and data["strategy"] == "dense_lora"
    assert data["lora_config"] == {"lora_r": block["lora_r"], "lora_alpha": block["lora_alpha"]}
    parity = data["parity"]
    assert parity["engine"].startswith("peft") and parity["max_abs_logit_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    assert record["parity"] == parity
    _assert_files_hashed(out, data)
    assert verify_artifact(out)["ok"]
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == HF_NAME[backbone] and card.data.library_name == "peft"
    assert {"efexport", "dense_lora"} <= set(card.data.tags)
    assert "PeftModel.from_pretrained" in card.text

    if block["use_rslora"]:  # negative control: the same adapter read as plain LoRA scale computes something else
        plain = tmp_path / "plain"
        plain.mkdir()
        (plain / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": False}))
        (plain / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes())
        wrong = PeftModel.from_pretrained(_base_model_from_run(ckpt, tmp_path / "base2"), str(plain)).eval()
        assert (_logits(wrong, ids) - ref).abs().max().item() > 0.1
