"""The compact layout, the runtime loader (converter.runtime) and `efexport verify`.

Every number is checked against something independent of the code under test:

* fp32: the runtime loader's logits against the plain-torch reference of the fixtures
  (tests/fixtures/reference.py), within FP32_TOL;
* bf16 / int8 / int4: against the in-memory loader ``converter.load_model(run,
  load_precision=...)`` at the same precision (same module code, same bytes: float error
  only, SAME_CODE_TOL), plus a sanity bound against the fp32 reference (LOOSE);
* trust_remote_code: the artifact's own modeling_efexport.py, against the runtime loader
  (SAME_CODE_TOL) and, in fp32, the reference (FP32_TOL).

Runs come from conftest's session-wide ``run_factory``; artifacts and logits are built once
per module (the ``lab`` fixture). Torch runs single-threaded here (``one_thread``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from converter import load_model
from converter.errors import EfexportError
from converter.export import ExportOptions, export
from fixtures.reference import reference_logits
from fixtures.runs import ALL_LINEARS, probe_ids

pytestmark = pytest.mark.filterwarnings("ignore")

BACKBONES = ("qwen3", "llama", "gemma3")
STRUCTURED = ("moe_expert_lora", "mixture_lora")
PRECISIONS = ("fp32", "bf16", "int8", "int4")

FP32_TOL = 1e-5  # max |Δlogit| vs the independent reference, fp32, tiny models (logits are O(10))
SAME_CODE_TOL = 1e-6  # same bytes through the same module code: float error only (observed: 0.0)
# (max |Δlogit| / max |reference logit|, top-1 agreement) vs the fp32 reference: a sanity bound that
# catches a broken artifact (rel ~1, top-1 ~0) while allowing rounding and near-tied top-k flips on
# 2x12 probe tokens. Observed worst over the 6 backbone x strategy runs: bf16 0.14 / 0.92,
# int8 0.14 / 0.96, int4 0.32 / 0.63.
LOOSE = {"bf16": (0.25, 0.8), "int8": (0.25, 0.8), "int4": (0.5, 0.5)}
ADAPTER_MARKS = (".router.", ".experts.")


# --------------------------------------------------------------------------- helpers


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def rel_and_top1(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    rel = maxdiff(candidate, reference) / reference.abs().max().item()
    top1 = (candidate.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return rel, top1


def header_dtypes(folder: Path) -> dict[str, str]:
    """safetensors dtype string ("F32", "BF16", "I8", "U8", ...) of every tensor in the artifact."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                out[name] = fh.get_slice(name).get_dtype()
    return out


def artifact_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def is_base_linear_weight(name: str) -> bool:
    """A backbone Linear's weight (shared / frozen base), not a router, expert or lm_head."""
    if any(m in name for m in ADAPTER_MARKS) or not name.endswith(".weight"):
        return False
    module = name[: -len(".weight")].removesuffix(".base_layer")
    return module.rsplit(".", 1)[-1] in ALL_LINEARS


def three_lines(exc: BaseException | str) -> list[str]:
    lines = str(exc).splitlines()
    assert len(lines) == 3, str(exc)
    assert lines[0].startswith("Cannot ") and lines[1].startswith("Fix: ") and lines[2].startswith("See: "), str(exc)
    return lines


def rewrite_manifest(folder: Path, **changes) -> None:
    path = folder / "efexport.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2) + "\n")


def efexport_cmd() -> list[str]:
    script = Path(sys.executable).parent / "efexport"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "converter.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([*efexport_cmd(), *args], capture_output=True, text=True, timeout=300, env=env)


class Lab:
    """Fixture runs, their artifacts and logits, each made once and shared by the tests."""

    def __init__(self, root: Path, run_factory) -> None:
        self.root = root
        self._run_factory = run_factory  # conftest's session-wide cache of make_run
        self._refs: dict = {}
        self._artifacts: dict = {}
        self._memory: dict = {}
        self.runtime: dict = {}  # artifact folder -> runtime-loader logits (CPU, verified)

    def run(self, backbone: str, strategy: str):
        return self._run_factory(backbone, strategy)

    def ids(self, backbone: str, strategy: str) -> torch.Tensor:
        return probe_ids(self.run(backbone, strategy).checkpoints["final"])

    def reference(self, backbone: str, strategy: str) -> torch.Tensor:
        key = (backbone, strategy)
        if key not in self._refs:
            run = self.run(backbone, strategy)
            self._refs[key] = reference_logits(run.checkpoints["final"], self.ids(backbone, strategy)).float()
        return self._refs[key]

    def artifact(self, backbone: str, strategy: str, precision: str | None, moe_layout: str | None = "compact",
                 **options) -> tuple[Path, dict]:
        """(folder, efexport.json record). Folder names are unique: trust_remote_code caches by name."""
        key = (backbone, strategy, precision, moe_layout, tuple(sorted(options.items())))
        if key not in self._artifacts:
            extra = "-".join(f"{k}{v}" for k, v in sorted(options.items()))
            out = self.root / "artifacts" / f"rt-{backbone}-{strategy}-{precision}-{moe_layout or 'default'}{extra}"
            out.parent.mkdir(parents=True, exist_ok=True)
            record = export(ExportOptions(run=str(self.run(backbone, strategy).path), out=out, precision=precision,
                                          moe_layout=moe_layout, progress=False, **options)).record
            self._artifacts[key] = (out, record)
        return self._artifacts[key]

    def memory(self, backbone: str, strategy: str, precision: str) -> torch.Tensor:
        """The in-memory loader's logits at the same precision (load_model, CPU)."""
        key = (backbone, strategy, precision)
        if key not in self._memory:
            loaded = load_model(str(self.run(backbone, strategy).path), device="cpu", load_precision=precision)
            self._memory[key] = logits_of(loaded.model, self.ids(backbone, strategy))
        return self._memory[key]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and immune to OpenMP spin-waits on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, run_factory) -> Lab:
    return Lab(tmp_path_factory.mktemp("runtime"), run_factory)


@pytest.fixture
def copy_of(lab, tmp_path):
    """A private copy of an artifact, to tamper with."""

    def get(*key, **options) -> Path:
        src, _ = lab.artifact(*key, **options)
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return get


# --------------------------------------------------------------------------- compact round trips


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("strategy", STRUCTURED)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_compact_roundtrip_through_runtime_loader(lab, backbone, strategy, precision, record_property):
    from converter.runtime import load_artifact

    folder, record = lab.artifact(backbone, strategy, precision)
    assert (record["layout"], record["structure_preserved"], record["strategy"], record["backbone"],
            record["precision"]) == ("compact", True, strategy, backbone, precision)

    # The run's structure, under the run's names: routers and LoRA experts byte-identical, float32.
    run_tensors = load_file(str(lab.run(backbone, strategy).checkpoints["final"] / "model.safetensors"))
    art = artifact_tensors(folder)
    structure = [n for n in run_tensors if any(m in n for m in ADAPTER_MARKS)]
    assert len(structure) >= 2 * 4 * 2  # routers + experts of 2 layers x 4 experts
    for name in structure:
        assert art[name].dtype == torch.float32 and torch.equal(art[name], run_tensors[name]), name
    # Precision applies to the base Linear weights only.
    dtypes = header_dtypes(folder)
    base = [n for n in dtypes if is_base_linear_weight(n)]
    assert len(base) == 2 * 7  # 7 Linears per decoder layer
    want = {"fp32": "F32", "bf16": "BF16", "int8": "I8", "int4": "U8"}[precision]
    assert {dtypes[n] for n in base} == {want}
    if precision == "int8":
        assert all(n.removesuffix("weight") + "SCB" in dtypes for n in base)
    if precision == "int4":
        assert all(n + ".quant_state.bitsandbytes__nf4" in dtypes for n in base)
    assert dtypes["model.embed_tokens.weight"] == ("F32" if precision == "fp32" else "BF16")

    loaded = load_artifact(folder, device="cpu")
    model = loaded.model
    assert not model.training
    adapters = {n: p.dtype for n, p in model.named_parameters() if any(m in n for m in ADAPTER_MARKS)}
    assert len(adapters) == len(structure) and set(adapters.values()) == {torch.float32}
    got = lab.runtime[folder] = logits_of(model, lab.ids(backbone, strategy))
    ref = lab.reference(backbone, strategy)
    d_ref = maxdiff(got, ref)
    record_property("max_abs_diff_vs_reference", d_ref)
    if precision == "fp32":
        assert d_ref <= FP32_TOL, d_ref
        return
    d_mem = maxdiff(got, lab.memory(backbone, strategy, precision))
    record_property("max_abs_diff_vs_in_memory", d_mem)
    assert d_mem <= SAME_CODE_TOL, d_mem
    rel, top1 = rel_and_top1(got, ref)
    record_property("rel_top1_vs_reference", (rel, top1))
    max_rel, min_top1 = LOOSE[precision]
    assert rel <= max_rel and top1 >= min_top1, (rel, top1)
    assert d_ref > SAME_CODE_TOL  # really a different precision, not the fp32 model


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("strategy", STRUCTURED)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_compact_roundtrip_through_trust_remote_code(lab, backbone, strategy, precision, record_property):
    from transformers import AutoModelForCausalLM

    from converter.runtime import load_artifact

    folder, _ = lab.artifact(backbone, strategy, precision)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_efexport.EfexportForCausalLM"}
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    assert type(model).__name__ == "EfexportForCausalLM"
    # Routers and LoRA factors stay float32 as the run had them (not config.dtype = bfloat16).
    adapters = {n: p.dtype for n, p in model.named_parameters() if any(m in n for m in ADAPTER_MARKS)}
    assert adapters and set(adapters.values()) == {torch.float32}, sorted(set(adapters.values()))
    ids = lab.ids(backbone, strategy)
    got = logits_of(model, ids)
    runtime = lab.runtime.get(folder)
    if runtime is None:  # run alone: the runtime-loader test did not fill the cache
        runtime = logits_of(load_artifact(folder, device="cpu").model, ids)
    d_rt = maxdiff(got, runtime)
    record_property("max_abs_diff_vs_runtime", d_rt)
    assert d_rt <= SAME_CODE_TOL, d_rt
    if precision == "fp32":
        d_ref = maxdiff(got, lab.reference(backbone, strategy))
        record_property("max_abs_diff_vs_reference", d_ref)
        assert d_ref <= FP32_TOL, d_ref
    else:
        d_mem = maxdiff(got, lab.memory(backbone, strategy, precision))
        record_property("max_abs_diff_vs_in_memory", d_mem)
        assert d_mem <= SAME_CODE_TOL, d_mem


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bfloat16_run_keeps_bfloat16_adapters_everywhere(lab, precision, record_property):
    """A run trained in bf16: its routers and LoRA factors stay bf16 in the artifact, the runtime
    loader and trust_remote_code alike (also when the base weights are exported as fp32)."""
    from transformers import AutoModelForCausalLM

    from converter.runtime import load_artifact

    run = lab._run_factory("llama", "mixture_lora", dtype=torch.bfloat16)
    out = lab.root / "artifacts" / f"rt-llama-mixture_lora-bf16run-{precision}"
    export(ExportOptions(run=str(run.path), out=out, precision=precision, progress=False))
    dtypes = header_dtypes(out)
    assert {d for n, d in dtypes.items() if any(m in n for m in ADAPTER_MARKS)} == {"BF16"}
    assert {dtypes[n] for n in dtypes if is_base_linear_weight(n)} == {"F32" if precision == "fp32" else "BF16"}
    ids = probe_ids(run.checkpoints["final"])
    memory = logits_of(load_model(str(run.path), device="cpu", load_precision=precision).model, ids)
    for model in (load_artifact(out, device="cpu").model,
                  AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()):
        adapters = {p.dtype for n, p in model.named_parameters() if any(m in n for m in ADAPTER_MARKS)}
        assert adapters == {torch.bfloat16}, (type(model).__name__, adapters)
        d = maxdiff(logits_of(model, ids), memory)
        record_property(f"max_abs_diff_{type(model).__name__}_vs_in_memory", d)
        assert d <= SAME_CODE_TOL, d
    rel, top1 = rel_and_top1(memory, reference_logits(run.checkpoints["final"], ids).float())
    assert rel <= LOOSE["bf16"][0] and top1 >= LOOSE["bf16"][1], (rel, top1)


def test_remote_code_is_the_package_module_code_verbatim(lab):
    """modeling_efexport.py = converter/modules.py + a footer that defines no module code of its own."""
    import inspect

    from transformers import AutoModelForCausalLM

    import converter.modules as modules

    package_source = Path(modules.__file__).read_text(encoding="utf-8")
    for backbone in BACKBONES:
        for strategy in STRUCTURED:
            folder, _ = lab.artifact(backbone, strategy, "fp32")
            text = (folder / "modeling_efexport.py").read_text(encoding="utf-8")
            assert text.startswith(package_source), f"{backbone}/{strategy}: modules.py was not copied verbatim"
            footer = ast.parse(text[len(package_source):])
            defined = {t.id for node in footer.body if isinstance(node, ast.Assign) for t in node.targets}
            defined |= {node.name for node in footer.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
            assert defined == {"EfexportForCausalLM", "_ADAPTER_DTYPE"}, defined  # ADAPTER_MODULES comes from modules.py
            package_names = {n for n in vars(modules) if not n.startswith("__")}
            assert not defined & package_names
    # The classes trust_remote_code instantiates are the package's, line for line.
    folder, _ = lab.artifact("llama", "moe_expert_lora", "fp32")
    remote = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
    mlp = remote.model.layers[0].mlp
    q = remote.model.layers[0].self_attn.q_proj
    assert type(mlp).__module__ != modules.__name__ and type(mlp).__name__ == "MoELoRAMLP"
    assert inspect.getsource(type(mlp)) == inspect.getsource(modules.MoELoRAMLP)
    assert inspect.getsource(sys.modules[type(mlp).__module__].apply_structure) == inspect.getsource(
        modules.apply_structure)
    assert type(q).__name__ == "Linear"  # plain LoRA on attention was merged
    folder, _ = lab.artifact("gemma3", "mixture_lora", "fp32")
    remote = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
    linear = remote.model.layers[1].mlp.down_proj
    assert inspect.getsource(type(linear)) == inspect.getsource(modules.MixtureLoRALinear)


# --------------------------------------------------------------------------- other layouts


@pytest.mark.parametrize("backbone,strategy,layout,architecture", [
    ("qwen3", "none", "dense", "Qwen3ForCausalLM"),
    ("llama", "dense_lora", "dense", "LlamaForCausalLM"),
    ("gemma3", "dense_lora", "dense", "Gemma3ForCausalLM"),
    ("qwen3", "moe_expert_lora", "moe", "Qwen3MoeForCausalLM"),
    ("llama", "moe_expert_lora", "moe", "MixtralForCausalLM"),
])
def test_dense_and_native_moe_artifacts_load_fp32(lab, backbone, strategy, layout, architecture, record_property):
    from converter.runtime import load_artifact

    folder, record = lab.artifact(backbone, strategy, "fp32", moe_layout=None)
    assert (record["layout"], record["architecture"], record["structure_preserved"]) == (
        layout, architecture, layout == "moe")
    assert not (folder / "modeling_efexport.py").exists()
    loaded = load_artifact(folder, device="cpu")
    assert type(loaded.model).__name__ == architecture and not loaded.model.training
    d = maxdiff(logits_of(loaded.model, lab.ids(backbone, strategy)), lab.reference(backbone, strategy))
    record_property("max_abs_diff_vs_reference", d)
    assert d <= FP32_TOL, d


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_dense_quantized_artifact_matches_in_memory_loader(lab, precision, record_property):
    from converter.runtime import load_artifact

    folder, record = lab.artifact("qwen3", "dense_lora", precision, moe_layout=None)
    assert record["layout"] == "dense"
    loaded = load_artifact(folder, device="cpu")
    got = logits_of(loaded.model, lab.ids("qwen3", "dense_lora"))
    d = maxdiff(got, lab.memory("qwen3", "dense_lora", precision))
    record_property("max_abs_diff_vs_in_memory", d)
    assert d <= SAME_CODE_TOL, d
    rel, top1 = rel_and_top1(got, lab.reference("qwen3", "dense_lora"))
    assert rel <= LOOSE[precision][0] and top1 >= LOOSE[precision][1], (rel, top1)


def test_sharded_compact_artifact_loads(lab):
    from converter.runtime import load_artifact

    folder, record = lab.artifact("qwen3", "mixture_lora", "fp32", max_shard_size="300KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (folder / "model.safetensors.index.json").is_file()
    assert set(shards) <= set(record["files"])
    d = maxdiff(logits_of(load_artifact(folder, device="cpu").model, lab.ids("qwen3", "mixture_lora")),
                lab.reference("qwen3", "mixture_lora"))
    assert d <= FP32_TOL, d


# --------------------------------------------------------------------------- metadata


def test_metadata_and_manifest_fields(lab):
    from converter.runtime import load_artifact

    folder, record = lab.artifact("qwen3", "moe_expert_lora", "int4")
    manifest = json.loads((folder / "efexport.json").read_text())
    assert {k: v for k, v in record.items() if not k.startswith("_")} == manifest
    spec_keys = {"format", "format_version", "strategy", "layout", "structure_preserved", "backbone", "architecture",
                 "base_model", "precision", "quantization", "lora_config", "num_parameters", "source", "files",
                 "parity", "created_with"}
    assert spec_keys <= set(manifest)
    assert (manifest["format"], manifest["format_version"], manifest["architecture"], manifest["base_model"]) == (
        "efexport", 1, "Qwen3ForCausalLM", "Qwen/Qwen3-0.6B")
    assert manifest["quantization"] == {"method": "bitsandbytes", "quant_type": "nf4", "double_quant": True,
                                        "compute_dtype": "bfloat16"}
    assert manifest["lora_config"]["lora_r"] == 4 and manifest["lora_config"]["lora_alpha"] == 8.0
    assert manifest["source"]["kind"] == "eulerforge_run" and manifest["source"]["checkpoint"] == "final"
    # files: every other file, with the Hub's sha256 and the size
    on_disk = {p.name for p in folder.iterdir() if p.is_file() and p.name != "efexport.json"}
    assert set(manifest["files"]) == on_disk and "modeling_efexport.py" in on_disk
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, name
    local = (str(lab.run("qwen3", "moe_expert_lora").path.parent), str(folder.parent))
    for name in ("efexport.json", "config.json", "README.md", "modeling_efexport.py"):
        text = (folder / name).read_text()
        assert not any(path in text for path in local), f"{name} holds a local path"
    config = json.loads((folder / "config.json").read_text())
    skip = set(config["quantization_config"]["llm_int8_skip_modules"])
    assert {"router", "lora_A", "lora_B", "lm_head"} <= skip and config["quantization_config"]["load_in_4bit"]

    loaded = load_artifact(folder, device="cpu")
    meta = loaded.metadata
    assert (meta.strategy, meta.backbone, meta.path_type, meta.structure_preserved, meta.load_precision) == (
        "moe_expert_lora", "qwen3", "artifact", True, "int4")
    assert meta.lora_config == manifest["lora_config"]
    assert Path(meta.checkpoint_dir) == folder.resolve()
    text = "The quick brown fox asks the model about the capital of South Korea today."
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:12]
    assert ids == lab.ids("qwen3", "moe_expert_lora")[0].tolist()
    assert loaded.tokenizer.chat_template


def test_device_auto_and_dtype_override(lab, monkeypatch):
    import converter.manifest as manifest
    import converter.runtime as runtime
    from converter.runtime import load_artifact

    folder, _ = lab.artifact("llama", "mixture_lora", "fp32")
    loaded = load_artifact(folder, device="auto", dtype="bfloat16")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in loaded.model.parameters()} == {want}
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    rel, top1 = rel_and_top1(logits_of(loaded.model, lab.ids("llama", "mixture_lora")),
                             lab.reference("llama", "mixture_lora"))
    assert rel <= LOOSE["bf16"][0] and top1 >= LOOSE["bf16"][1], (rel, top1)
    hashed = []
    monkeypatch.setattr(manifest, "hash_listed", lambda *a: hashed.append(a))
    monkeypatch.setattr(runtime, "_local_folder", lambda *a: hashed.append(a))  # where a Hub id would download
    for bad in ({"dtype": "float8"}, {"device": "tpu"}):
        with pytest.raises(EfexportError) as err:
            load_artifact(folder, **bad)
        assert repr(list(bad.values())[0]) in three_lines(err.value)[0] and hashed == []  # before download or hashing


# --------------------------------------------------------------------------- verification


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-100])


TAMPER = {
    "flip": ("model.safetensors", _flip_byte, "its sha256 differs"),
    "flip-config": ("config.json", _flip_byte, "its sha256 differs"),
    "flip-remote-code": ("modeling_efexport.py", _flip_byte, "its sha256 differs"),
    "truncate": ("model.safetensors", _truncate, "size"),
    "delete": ("model.safetensors", lambda p: p.unlink(), "the file is missing"),
    "unlisted": ("extra.safetensors", lambda p: save_file({"x": torch.zeros(2)}, str(p)), "not listed"),
}


@pytest.mark.parametrize("how", list(TAMPER))
def test_tampered_artifact_is_refused_before_loading(lab, copy_of, monkeypatch, how):
    """No model comes back from a changed artifact. Listing, sizes and small files are checked before any
    load; a weight file's bytes are hashed while they are loaded (one read), so only then may the load run."""
    import converter.runtime as runtime

    folder = copy_of("qwen3", "mixture_lora", "int4")
    name, tamper, why = TAMPER[how]
    tamper(folder / name)
    loads, load_weights = [], runtime.load_weights
    monkeypatch.setattr(runtime, "load_weights", lambda *a, **k: loads.append(a) or load_weights(*a, **k))
    with pytest.raises(EfexportError) as err:
        runtime.load_artifact(folder, device="cpu")
    first = three_lines(err.value)[0]
    assert first.startswith(f"Cannot verify {name}:") and why in first, first
    assert len(loads) == (1 if how == "flip" else 0)  # only a weight's changed content needs its bytes read
    if how == "unlisted":  # verify=False skips the check; the stray file is not read
        monkeypatch.undo()
        model = runtime.load_artifact(folder, device="cpu", verify=False).model
        d = maxdiff(logits_of(model, lab.ids("qwen3", "mixture_lora")), lab.memory("qwen3", "mixture_lora", "int4"))
        assert d <= SAME_CODE_TOL, d


def test_a_changed_weight_is_the_error_even_when_the_load_fails_on_it(copy_of):
    """A flipped byte inside a safetensors header breaks the load itself; the digest mismatch is what is reported."""
    from converter.runtime import load_artifact

    folder = copy_of("qwen3", "mixture_lora", "fp32")
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8 + 2] ^= 0x20  # inside the JSON header: still a file of the listed size
    path.write_bytes(bytes(data))
    with pytest.raises(EfexportError) as err:
        load_artifact(folder, device="cpu")
    assert three_lines(err.value)[0].startswith("Cannot verify model.safetensors: its sha256 differs")


def test_missing_shard_is_named(copy_of):
    from converter.runtime import load_artifact

    folder = copy_of("qwen3", "mixture_lora", "fp32", max_shard_size="300KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(EfexportError) as err:
        load_artifact(folder, device="cpu")
    assert three_lines(err.value)[0] == f"Cannot verify {shard.name}: the file is missing"


def test_unknown_format_version_and_layout_are_refused(copy_of):
    from converter.runtime import load_artifact
    from converter.verify import verify_artifact

    folder = copy_of("llama", "moe_expert_lora", "fp32")
    rewrite_manifest(folder, format_version=2)
    with pytest.raises(EfexportError) as err:
        load_artifact(folder, device="cpu")
    first = three_lines(err.value)[0]
    assert "format_version 2 is not supported" in first and "reads 1" in first
    report = verify_artifact(folder)
    assert report["ok"] is False and "format_version 2" in three_lines(report["error"])[0]
    rewrite_manifest(folder, format_version=1, layout="gguf")
    with pytest.raises(EfexportError) as err:
        load_artifact(folder, device="cpu")
    assert "'gguf' artifact" in three_lines(err.value)[0]
    rewrite_manifest(folder, layout="compact", format="something-else")
    with pytest.raises(EfexportError):
        load_artifact(folder, device="cpu")


def test_verify_detects_changed_logits_behind_matching_hashes(copy_of):
    """Weights changed *and* re-hashed into efexport.json: the hash check passes, the parity re-check must not."""
    from converter.verify import verify_artifact

    folder = copy_of("qwen3", "mixture_lora", "bf16")
    good = verify_artifact(folder)
    assert good["ok"] is True and good["parity"]["top1_agreement_with_export"] == 1.0
    assert good["parity"]["max_rel_change"] <= 1e-6
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    save_file(tensors, str(weights), metadata={"format": "pt"})
    files = json.loads((folder / "efexport.json").read_text())["files"]
    files["model.safetensors"] = {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                                  "size": weights.stat().st_size}
    rewrite_manifest(folder, files=files)
    report = verify_artifact(folder)
    assert report["ok"] is False and report["files_checked"] == len(files)
    assert report["parity"]["max_rel_change"] > 0.1, report["parity"]
    assert three_lines(report["error"])[0] == "Cannot reproduce the logits recorded at export"


# --------------------------------------------------------------------------- the CLI


def test_cli_verify_good_artifact(lab):
    folder, record = lab.artifact("gemma3", "moe_expert_lora", "int8")
    proc = run_cli("verify", str(folder), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["files_checked"] == len(record["files"])
    assert report["parity"]["top1_agreement_with_export"] == 1.0
    assert report["parity"]["max_rel_change"] <= 1e-6
    assert report["parity"]["recorded"] == pytest.approx(record["parity"]["max_abs_logit_diff"])


@pytest.fixture(scope="module")
def tampered_cli(lab, tmp_path_factory):
    src, _ = lab.artifact("llama", "mixture_lora", "int8")
    folder = tmp_path_factory.mktemp("cli") / src.name
    shutil.copytree(src, folder)
    _flip_byte(folder / "model.safetensors")
    return run_cli("verify", str(folder)), run_cli("verify", str(folder), "--json")


def test_cli_verify_tampered_artifact_fails(tampered_cli):
    text, as_json = tampered_cli
    assert text.returncode == 1 and as_json.returncode == 1
    assert "FAILED" in text.stdout.splitlines()[0]
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert three_lines(report["error"])[0] == (
        "Cannot verify model.safetensors: its sha256 differs from efexport.json (the file was changed)")


def test_cli_verify_tampered_artifact_prints_the_three_line_error(tampered_cli):
    text, _ = tampered_cli
    out = text.stdout + text.stderr
    assert "Cannot verify model.safetensors: its sha256 differs" in out
    assert "\nFix: re-download or re-export the artifact.\nSee: " in out


# --------------------------------------------------------------------------- import-light


def test_runtime_is_import_light(lab):
    fp32, _ = lab.artifact("qwen3", "mixture_lora", "fp32")
    int4, _ = lab.artifact("qwen3", "mixture_lora", "int4")
    script = textwrap.dedent("""
        import json, sys
        watch = ("torch", "safetensors", "transformers", "bitsandbytes", "click", "jinja2", "peft", "huggingface_hub")
        def loaded():
            tops = {m.split(".")[0] for m in sys.modules}
            return sorted(w for w in watch if w in tops)
        import converter.runtime as rt
        out = {"import": loaded()}
        rt.load_artifact(sys.argv[1], device="cpu")
        out["fp32"] = loaded()
        out["converter"] = sorted(m for m in sys.modules if m.startswith("converter"))
        rt.load_artifact(sys.argv[2], device="cpu")
        out["int4"] = loaded()
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, str(fp32), str(int4)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "torch" in out["import"]
    assert not {"click", "jinja2", "peft", "huggingface_hub", "bitsandbytes"} & set(out["import"]), out["import"]
    # Loading brings transformers and safetensors; transformers itself imports huggingface_hub and
    # jinja2 (`import transformers` alone does), efexport adds none of its heavy modules.
    assert {"transformers", "safetensors"} <= set(out["fp32"])
    assert not {"click", "peft", "bitsandbytes"} & set(out["fp32"]), out["fp32"]
    heavy = {"converter.cli", "converter.card", "converter.export", "converter.hub", "converter.strategy", "converter.source.resolve",
             "converter.sinks.peft", "converter.sinks.gguf", "converter.inspect", "converter.sinks.safetensors",
             "converter.pipeline"}
    assert not heavy & set(out["converter"]), out["converter"]
    assert "bitsandbytes" in out["int4"] and not {"click", "peft"} & set(out["int4"])


# --------------------------------------------------------------------------- CUDA (runs where a GPU is)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("strategy", STRUCTURED)
def test_compact_on_cuda(lab, strategy, precision, record_property):
    from converter.runtime import load_artifact

    folder, _ = lab.artifact("qwen3", strategy, precision)
    loaded = load_artifact(folder, device="cuda")
    assert {p.device.type for p in loaded.model.parameters()} == {"cuda"}
    ids = lab.ids("qwen3", strategy)
    got = logits_of(loaded.model, ids)
    if precision == "fp32":
        d = maxdiff(got, lab.reference("qwen3", strategy))
        record_property("max_abs_diff_vs_reference", d)
        assert d <= 1e-4, d  # GPU kernels: float error, no TF32 (torch's default for matmul)
        return
    memory = load_model(str(lab.run("qwen3", strategy).path), device="cuda", load_precision=precision)
    d = maxdiff(got, logits_of(memory.model, ids))
    record_property("max_abs_diff_vs_in_memory", d)
    assert d <= 1e-3, d
    rel, top1 = rel_and_top1(got, lab.reference("qwen3", strategy))
    assert rel <= LOOSE[precision][0] and top1 >= LOOSE[precision][1], (rel, top1)
