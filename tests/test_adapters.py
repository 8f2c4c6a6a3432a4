"""PEFT adapter folders, proved against PEFT itself (issue: sources beyond EulerForge, §1-§4).

Every adapter here is made by real PEFT (``get_peft_model`` + ``save_pretrained``) on a tiny
base model built by the fixtures, with non-zero LoRA factors and perturbed DoRA magnitudes /
replaced modules, and compared with PEFT's own
``PeftModel.from_pretrained(base, adapter).merge_and_unload()``: merged weights and logits,
max |Δ| ≤ 1e-5 in float32, one case per PEFT option.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from fixtures.runs import default_vocab_size, make_run, probe_ids, write_tokenizer

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from converter import load_model  # noqa: E402
from converter.source.peft_adapter import DOWNLOAD_OPTION  # noqa: E402
from converter.strategy.peft_merge import merge_dora  # noqa: E402
from converter.errors import EfexportError  # noqa: E402
from converter.pipeline import open_pipeline  # noqa: E402
from converter.source.resolve import resolve  # noqa: E402

TOL = 1e-5
REPORT: dict[str, tuple[float, float]] = {}  # case -> (max |Δ| weights, max |Δ| logits), printed with -s

pytestmark = pytest.mark.filterwarnings("ignore")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny base model folders (config.json + model.safetensors + tokenizer), one per backbone."""
    root = tmp_path_factory.mktemp("bases")
    out: dict[str, Path] = {}
    for backbone in ("qwen3", "llama", "gemma3"):
        make_run(root / backbone, backbone, "none", kind="checkpoint_dir", seed=7)
        out[backbone] = root / backbone
    make_run(root / "qwen3_bias", "qwen3", "none", kind="checkpoint_dir", seed=8,
             config_overrides={"attention_bias": True})
    out["qwen3_bias"] = root / "qwen3_bias"
    # GPT-2: Conv1D layers, the layout fan_in_fan_out exists for
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=default_vocab_size(),
                                      bos_token_id=2, eos_token_id=1, pad_token_id=0))
    gpt2.save_pretrained(root / "gpt2")
    write_tokenizer(root / "gpt2")
    out["gpt2"] = root / "gpt2"
    return out


def _base(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def make_adapter(base: Path, out: Path, *, seed: int = 0, config=None, **lora_kwargs) -> Path:
    """A real PEFT adapter with non-zero LoRA factors and trained-looking extra parameters."""
    torch.manual_seed(seed)
    config = config or LoraConfig(init_lora_weights=False, **lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_base(base), config)
        g = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                noise = torch.randn(p.shape, generator=g)
                if ".lora_A." in name or ".lora_B." in name or "lora_embedding" in name:
                    if not name.endswith(".bias"):
                        p.copy_(0.1 * noise)  # non-zero factors of a sensible size
                        continue
                p.mul_(1 + 0.2 * noise).add_(0.02 * noise)  # DoRA magnitudes, modules_to_save, biases
        model.save_pretrained(str(out))
    return out


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def peft_merged(base: Path, adapter: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_base(base), str(adapter)).merge_and_unload().eval()


def compare(base: Path, adapter: Path, *, case: str, base_model: str | None = None) -> tuple[float, float]:
    """(max |Δ| merged weights, max |Δ| logits) of efexport against PEFT's merge_and_unload()."""
    ref = peft_merged(base, adapter)
    ref_sd = ref.state_dict()
    base_sd = _base(base).state_dict()
    w_diff, moved = 0.0, 0.0
    with open_pipeline(adapter, base_model=base_model or str(base), for_loading=True) as pipe:
        names = set()
        for t in pipe.target.plan:
            got = t.produce()
            want = ref_sd[t.name]
            assert tuple(got.shape) == tuple(want.shape) and got.dtype == want.dtype, t.name
            w_diff = max(w_diff, (got.float() - want.float()).abs().max().item())
            moved = max(moved, (got.float() - base_sd[t.name].float()).abs().max().item()
                        if t.name in base_sd and base_sd[t.name].shape == got.shape else 1.0)
            names.add(t.name)
        assert pipe.run.source_kind == "peft_adapter"
        assert pipe.injection.strategy == "dense_lora"
    tied = bool(getattr(ref.config, "tie_word_embeddings", False))
    missing = {n for n in ref_sd if n not in names and not (tied and n == "lm_head.weight")}
    assert not missing, f"efexport did not produce {sorted(missing)[:5]}"
    assert moved > 1e-3, "the adapter did not change any weight: the comparison would prove nothing"

    ids = probe_ids(base)
    loaded = load_model(adapter, base_model=base_model or str(base), device="cpu", dtype="float32")
    assert loaded.metadata.strategy == "dense_lora"
    with torch.no_grad():
        logit_diff = (loaded.model(ids).logits - ref(ids).logits).abs().max().item()
    REPORT[case] = (w_diff, logit_diff)
    print(f"\n[{case}] max|Δ| weights {w_diff:.3g}  logits {logit_diff:.3g}")
    return w_diff, logit_diff


# --------------------------------------------------------------------------- §2/§3: one case per PEFT option

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    # case: (base, LoraConfig kwargs, adapter_config.json edits after saving)
    "r_alpha": ("qwen3", dict(r=8, lora_alpha=16, target_modules=ALL), None),
    "use_rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
                   None),
    "rank_alpha_pattern": ("gemma3", dict(r=4, lora_alpha=8, target_modules=ALL,
                                          rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
                                          alpha_pattern={"v_proj": 3.0, r"layers\.0\.self_attn\.o_proj": 20.0}), None),
    "rslora_rank_pattern": ("qwen3", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "up_proj"],
                                          rank_pattern={"up_proj": 8}), None),
    "all_linear": ("qwen3", dict(r=4, lora_alpha=8, target_modules="all-linear"), None),
    "all_linear_string": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear"),
                          {"target_modules": "all-linear"}),
    "layers_to_transform": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          layers_to_transform=[1], layers_pattern="layers"), None),
    "fan_in_fan_out_conv1d": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True,
                                           target_modules=["c_attn", "c_proj", "c_fc"]), None),
    "fan_in_fan_out_on_linear": ("qwen3", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]),
                                 {"fan_in_fan_out": True}),
    "modules_to_save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      modules_to_save=["lm_head", "embed_tokens"]), None),
    "modules_to_save_norm": ("qwen3", dict(r=4, lora_alpha=8, target_modules=["k_proj"],
                                           modules_to_save=["model.norm"]), None),
    "modules_to_save_tied": ("gemma3", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                             None),
    "modules_to_save_tied_ensure": ("gemma3", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                   modules_to_save=["embed_tokens"], ensure_weight_tying=True), None),
    "lora_bias": ("qwen3_bias", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                     lora_bias=True), None),
    "bias_all": ("qwen3_bias", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all"), None),
    "embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), None),
    "embedding_tied": ("gemma3", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "k_proj"]), None),
    "lm_head_lora_tied": ("gemma3", dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]), None),
    "embedding_tied_ensure": ("gemma3", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"],
                                             ensure_weight_tying=True), None),
    "use_dora": ("qwen3", dict(r=4, lora_alpha=8, use_dora=True, target_modules=ALL), None),
    "dora_embedding_rslora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, use_rslora=True,
                                            target_modules=["embed_tokens", "v_proj"],
                                            rank_pattern={"v_proj": 2}), None),
    "dora_conv1d": ("gpt2", dict(r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=True,
                                 target_modules=["c_attn", "c_fc"]), None),
    "dora_bias_all": ("qwen3_bias", dict(r=4, lora_alpha=8, use_dora=True, bias="all",
                                         target_modules=["q_proj", "v_proj"]), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_option_matches_peft(case, bases, tmp_path):
    base_key, kwargs, edits = CASES[case]
    adapter = make_adapter(bases[base_key], tmp_path / case, seed=len(case), **kwargs)
    if edits:
        edit_config(adapter, **edits)
    w_diff, logit_diff = compare(bases[base_key], adapter, case=case)
    assert w_diff <= TOL
    assert logit_diff <= TOL


def test_bfloat16_base_merges_in_float32(tmp_path):
    """A bfloat16 base keeps its dtype; the merge is PEFT's float32 merge, cast once."""
    base = tmp_path / "base_bf16"
    make_run(base, "llama", "none", kind="checkpoint_dir", seed=9, dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "a", use_dora=True, target_modules=["q_proj", "down_proj"])
    ref_sd = peft_merged(base, adapter).state_dict()  # _base() loads the base in float32
    with open_pipeline(adapter, base_model=str(base), for_loading=True) as pipe:
        assert pipe.source_dtype() == torch.bfloat16
        for t in pipe.target.plan:
            got = t.produce()
            assert got.dtype == torch.bfloat16 == t.dtype
            assert torch.equal(got, ref_sd[t.name].to(torch.bfloat16)) or (
                (got.float() - ref_sd[t.name]).abs().max() <= 2 ** -7 * ref_sd[t.name].abs().max()), t.name


def test_merge_dora_is_peft_definition():
    """W = m / ||W0 + s·B@A||_row · (W0 + s·B@A), per output row of a Linear."""
    g = torch.Generator().manual_seed(0)
    w0, a, b = torch.randn(6, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    m = torch.rand(6, generator=g) + 0.5
    v = w0 + 1.5 * (b @ a)
    want = (m / torch.linalg.norm(v, dim=1)).view(-1, 1) * v
    assert torch.allclose(merge_dora(w0, a, b, 1.5, m), want, atol=1e-6)
    # per column (embedding [vocab, dim] / Conv1D [in, out]): norm over dim 0
    want_t = (m[:5] / torch.linalg.norm(v[:, :5], dim=0)).view(1, -1) * v[:, :5]
    assert torch.allclose(merge_dora(w0[:, :5], a[:, :5], b, 1.5, m[:5], norm_dim=0), want_t, atol=1e-6)


# --------------------------------------------------------------------------- §1: sources and base lookup


@pytest.mark.parametrize("backbone", ["qwen3", "llama", "gemma3"])
def test_resolved_run_metadata(backbone, bases, tmp_path):
    adapter = make_adapter(bases[backbone], tmp_path / "a", r=4, lora_alpha=16.0, target_modules=["q_proj", "v_proj"])
    run = resolve(adapter, base_model=str(bases[backbone]))
    assert run.source_kind == "peft_adapter"
    assert run.path_type == "checkpoint_dir"
    assert run.backbone == backbone
    assert run.base_model == str(bases[backbone])
    assert run.adapter.base_dir == bases[backbone].resolve()
    assert run.adapter.adapter_config["r"] == 4
    assert "eulerforge" not in run.hf_config and run.hf_config["model_type"]
    with open_pipeline(adapter, base_model=str(bases[backbone])) as pipe:
        inj = pipe.injection
        assert (inj.strategy, inj.lora_r, inj.lora_alpha) == ("dense_lora", 4, 16.0)
        assert inj.target_modules == ("q_proj", "v_proj")
        assert inj.lora_config == {"lora_r": 4, "lora_alpha": 16.0}
        assert pipe.source.names and pipe.source.files and pipe.source.nbytes() > 0
        assert pipe.source_dtype() == torch.float32
        assert pipe.tokenizer_dir() == bases[backbone].resolve()
    loaded = load_model(adapter, base_model=str(bases[backbone]), device="cpu")
    assert loaded.metadata.lora_config == {"lora_r": 4, "lora_alpha": 16.0}
    assert loaded.tokenizer is not None


def test_base_from_adapter_config(bases, tmp_path):
    """No --base-model: PEFT's own base_model_name_or_path (a local folder here)."""
    adapter = make_adapter(bases["llama"], tmp_path / "a", target_modules=["q_proj"])
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(bases["llama"])
    run = resolve(adapter)
    assert run.base_model == str(bases["llama"])
    ref = peft_merged(bases["llama"], adapter)
    ids = probe_ids(bases["llama"])
    got = load_model(adapter, device="cpu").model(ids).logits
    assert (got - ref(ids).logits).abs().max().item() <= TOL


def test_base_from_run_config_wins_over_adapter_config(bases, tmp_path):
    run_dir = tmp_path / "run"
    adapter = make_adapter(bases["qwen3"], run_dir / "final", target_modules=["v_proj"])
    edit_config(adapter, base_model_name_or_path="/nonexistent/elsewhere")
    (run_dir / "resolved_config.json").write_text(json.dumps(
        {"backbone": "qwen3", "model": {"name_or_path": str(bases["qwen3"])}, "run_name": "peft_run"}))
    run = resolve(run_dir, "final")
    assert (run.path_type, run.base_model, run.run_name) == ("run_dir", str(bases["qwen3"]), "peft_run")
    assert run.source_kind == "peft_adapter"


def test_run_config_hub_id_falls_back_to_adapter_base(bases, tmp_path, empty_hf_cache):
    run_dir = tmp_path / "run"
    make_adapter(bases["qwen3"], run_dir / "final", target_modules=["v_proj"])
    (run_dir / "resolved_config.json").write_text(json.dumps({"model": {"name_or_path": "Qwen/Qwen3-0.6B"}}))
    assert resolve(run_dir).base_model == str(bases["qwen3"])


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and any download attempt is a test failure."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError("efexport tried to download without being asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    return cache


def _into_hf_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay ``folder`` out as huggingface_hub does: blobs, a snapshot of symlinks, refs/main."""
    import hashlib
    import os

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        os.symlink(f"../../blobs/{digest}", snapshot / f.name)
    return snapshot


@pytest.mark.parametrize("sharded", [False, True])
def test_base_from_local_hf_cache(sharded, bases, tmp_path, empty_hf_cache):
    """A Hub id already in the local cache is used from there; base_model stays the Hub id."""
    base = bases["llama"]
    if sharded:
        base = tmp_path / "sharded_base"
        make_run(base, "llama", "none", kind="checkpoint_dir", seed=7, sharded=True)
    snapshot = _into_hf_cache(empty_hf_cache, "tiny-org/tiny-llama", base)
    adapter = make_adapter(base, tmp_path / "a", target_modules=["q_proj", "o_proj"])
    edit_config(adapter, base_model_name_or_path="tiny-org/tiny-llama")
    run = resolve(adapter)
    assert run.base_model == "tiny-org/tiny-llama"
    assert run.adapter.base_dir == snapshot
    assert resolve(adapter, base_model="tiny-org/tiny-llama").base_model == "tiny-org/tiny-llama"
    ref = peft_merged(base, adapter)
    ids = probe_ids(base)
    got = load_model(adapter, device="cpu").model(ids).logits
    assert (got - ref(ids).logits).abs().max().item() <= TOL


def _assert_three_lines(err: EfexportError) -> list[str]:
    lines = str(err).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("Cannot ") and lines[1].startswith("Fix: ") and lines[2].startswith("See: ")
    return lines


def test_missing_base_names_base_model_option(bases, tmp_path, empty_hf_cache):
    adapter = make_adapter(bases["llama"], tmp_path / "a", target_modules=["q_proj"])
    edit_config(adapter, base_model_name_or_path="nobody-org/not-cached-model")
    with pytest.raises(EfexportError) as exc:
        resolve(adapter)
    lines = _assert_three_lines(exc.value)
    assert "nobody-org/not-cached-model" in lines[0]
    assert "--base-model" in lines[1] and DOWNLOAD_OPTION.split()[0] in lines[1]
    with pytest.raises(EfexportError) as exc:
        load_model(adapter, device="cpu")
    _assert_three_lines(exc.value)
    # an explicit --base-model that is missing is an error too (no silent fallback)
    with pytest.raises(EfexportError) as exc:
        resolve(adapter, base_model=str(tmp_path / "no_such_base"))
    lines = _assert_three_lines(exc.value)
    assert "no_such_base" in lines[0] and "--base-model" in lines[0] + lines[1]
    # no base named anywhere
    edit_config(adapter, base_model_name_or_path=None)
    with pytest.raises(EfexportError) as exc:
        resolve(adapter)
    assert "--base-model" in _assert_three_lines(exc.value)[1]


def test_wrong_base_is_refused(bases, tmp_path):
    adapter = make_adapter(bases["llama"], tmp_path / "a", target_modules=["q_proj"])
    with pytest.raises(EfexportError) as exc:
        open_pipeline(adapter, base_model=str(bases["gpt2"]))
    assert "adapter" in _assert_three_lines(exc.value)[0]


def test_weights_not_selected_by_config_are_refused(bases, tmp_path):
    adapter = make_adapter(bases["qwen3"], tmp_path / "a", target_modules=["q_proj", "v_proj"])
    edit_config(adapter, target_modules=["q_proj"])
    with pytest.raises(EfexportError) as exc:
        open_pipeline(adapter, base_model=str(bases["qwen3"]))
    assert "v_proj" in _assert_three_lines(exc.value)[0]


def test_rank_pattern_must_match_weights(bases, tmp_path):
    adapter = make_adapter(bases["qwen3"], tmp_path / "a", r=4, target_modules=["q_proj"])
    edit_config(adapter, rank_pattern={"q_proj": 2})
    with pytest.raises(EfexportError) as exc:
        open_pipeline(adapter, base_model=str(bases["qwen3"]))
    assert "rank" in _assert_three_lines(exc.value)[0]


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_plain_hf_model_folder(which, bases, tmp_path):
    """A plain Hugging Face model folder (save_pretrained output): strategy none, kind hf_model."""
    folder = tmp_path / "hf"
    ref = _base(bases[which])
    ref.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("eulerforge", None)  # the fixture base carries an (empty-strategy) EulerForge block
    (folder / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(folder)
    run = resolve(folder)
    assert (run.source_kind, run.path_type) == ("hf_model", "checkpoint_dir")
    loaded = load_model(folder, device="cpu", dtype="float32")
    assert loaded.metadata.strategy == "none"
    ids = probe_ids(folder)
    with torch.no_grad():
        assert (loaded.model(ids).logits - ref(ids).logits).abs().max().item() <= TOL


# --------------------------------------------------------------------------- Trainer-style output folders


def test_trainer_style_folder_best_and_latest(bases, tmp_path):
    root = tmp_path / "trainer_out"
    for i, step in enumerate((100, 200, 300)):
        ckpt = make_adapter(bases["llama"], root / f"checkpoint-{step}", seed=10 + i,
                            target_modules=["q_proj", "v_proj"])
        state = {"global_step": step, "best_model_checkpoint": f"/home/someone/trainer_out/checkpoint-{min(step, 200)}",
                 "best_metric": 1.0}
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    best, latest, step100 = resolve(root, "best"), resolve(root, "latest"), resolve(root, "100")
    assert best.checkpoint_dir.name == "checkpoint-200" and best.step == 200 and best.checkpoint == "best"
    assert latest.checkpoint_dir.name == "checkpoint-300" and latest.step == 300
    assert step100.checkpoint_dir.name == "checkpoint-100"
    assert best.path_type == "run_dir" and best.source_kind == "peft_adapter"
    assert best.base_model == str(bases["llama"])
    ids = probe_ids(bases["llama"])
    for which, folder in (("best", "checkpoint-200"), ("latest", "checkpoint-300")):
        ref = peft_merged(bases["llama"], root / folder)
        got = load_model(root, checkpoint=which, device="cpu").model(ids).logits
        assert (got - ref(ids).logits).abs().max().item() <= TOL
    with pytest.raises(EfexportError) as exc:
        resolve(root, "final")
    assert "best" in _assert_three_lines(exc.value)[0]


# --------------------------------------------------------------------------- §2: refused types and options


def _refused(adapter: Path, base: Path) -> list[str]:
    with pytest.raises(EfexportError) as exc:
        open_pipeline(adapter, base_model=str(base))
    return _assert_three_lines(exc.value)


@pytest.mark.parametrize("kind", ["LOHA", "LOKR", "IA3", "PROMPT_TUNING"])
def test_unsupported_peft_types_are_refused(kind, bases, tmp_path):
    from peft import IA3Config, LoHaConfig, LoKrConfig, PromptTuningConfig

    config = {
        "LOHA": lambda: LoHaConfig(r=4, target_modules=["q_proj"]),
        "LOKR": lambda: LoKrConfig(r=4, target_modules=["q_proj"]),
        "IA3": lambda: IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "PROMPT_TUNING": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }[kind]()
    adapter = make_adapter(bases["llama"], tmp_path / kind, config=config)
    lines = _refused(adapter, bases["llama"])
    assert kind in lines[0]
    with pytest.raises(EfexportError):
        load_model(adapter, base_model=str(bases["llama"]), device="cpu")


@pytest.mark.parametrize("option, value", [
    ("init_lora_weights", "pissa"),
    ("init_lora_weights", "olora"),
    ("layer_replication", [[0, 2]]),
    ("trainable_token_indices", [3, 5]),
    ("use_qalora", True),
    ("alora_invocation_tokens", [5, 6]),
    ("target_parameters", ["mlp.experts.gate_up_proj"]),
    ("use_some_future_option", True),
])
def test_unsupported_options_are_refused(option, value, bases, tmp_path):
    adapter = make_adapter(bases["qwen3"], tmp_path / "a", target_modules=["q_proj"])
    edit_config(adapter, **{option: value})
    lines = _refused(adapter, bases["qwen3"])
    assert option in lines[0]


def test_unknown_adapter_tensor_is_refused(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(bases["qwen3"], tmp_path / "a", target_modules=["q_proj"])
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_E"] = torch.zeros(4, 1)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    assert "lora_E" in _refused(adapter, bases["qwen3"])[0]


def test_report():
    """Print the per-option table (run with -s); always passes."""
    for case, (w, lg) in sorted(REPORT.items()):
        print(f"{case:32s} weights {w:.3g}  logits {lg:.3g}")
