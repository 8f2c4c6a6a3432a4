"""Proves the shared fixtures are what they claim and the plain-torch reference is right.

* reference vs transformers on plain runs (all backbones, biases, llama3 rope, extra vocab)
* reference vs transformers on hand-merged dense LoRA (plain and rsLoRA)
* reference vs brute-force per-token loops for moe_expert_lora and mixture_lora, plus
  moe_expert_lora vs transformers' Qwen3-MoE / Mixtral with materialised experts
* the fixture files: layout, blocks, tokenizer, shards, .bin, bf16, extra vocab, trainer-style runs
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from fixtures import reference
from fixtures.reference import reference_logits, reference_logits_from_tensors
from fixtures.runs import (
    BACKBONES,
    STRATEGIES,
    FixtureRun,
    default_vocab_size,
    hf_config,
    load_tensors,
    make_run,
    make_trainer_style_run,
    probe_ids,
    tokenizer_size,
    write_tokenizer,
)

TOL = 1e-5  # fp32 reference vs fp32 transformers / brute force
CLEAR = 0.25  # "clearly different" logits (max |delta|); logits have std ~2


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Memoised make_run: runs(name, backbone, strategy, **kw) -> FixtureRun."""
    base = tmp_path_factory.mktemp("runs")
    cache: dict[str, FixtureRun] = {}

    def get(name: str, backbone: str, strategy: str, **kw) -> FixtureRun:
        if name not in cache:
            cache[name] = make_run(base / name, backbone, strategy, **kw)
        return cache[name]

    return get


def hf_logits(ckpt: Path, ids: torch.Tensor, dtype=torch.float32, attn_implementation: str | None = None
              ) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype, **kw).eval()
    with torch.no_grad():
        return model(ids).logits


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def scale_of(block: dict) -> float:
    r, alpha = block["lora_r"], block["lora_alpha"]
    return alpha / math.sqrt(r) if block["use_rslora"] else alpha / r


def merge_dense_by_hand(tensors: dict, s: float) -> dict:
    """dense_lora -> plain HF state dict: W = W0 + s * B @ A in float32."""
    out = {}
    for k, v in tensors.items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        if ".base_layer." in k:
            p, leaf = k.split(".base_layer.")
            if leaf == "weight" and f"{p}.lora_A.weight" in tensors:
                a = tensors[f"{p}.lora_A.weight"].float()
                b = tensors[f"{p}.lora_B.weight"].float()
                v = (v.float() + s * (b @ a)).to(v.dtype)
            out[f"{p}.{leaf}"] = v
        else:
            out[k] = v
    return out


def strip_adapters(tensors: dict, config: dict) -> dict:
    """The frozen base model of any strategy, as a plain HF state dict."""
    out = {}
    for k, v in tensors.items():
        if any(x in k for x in (".lora_A.", ".lora_B.", ".router.", ".experts.")):
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def save_plain_checkpoint(directory: Path, tensors: dict, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in config.items() if k != "eulerforge"}
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory


def act_of(config: dict):
    name = config.get("hidden_activation") or config.get("hidden_act")
    return {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}[name]


# --------------------------------------------------------------------------- tokenizer & config


def test_tokenizer_loads_has_chat_template_and_fits_vocab(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path / "a")
    write_tokenizer(tmp_path / "b")
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    # deterministic training
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert 300 <= len(tok) <= 400 and len(tok) == tokenizer_size()
    assert default_vocab_size() % 64 == 0 and default_vocab_size() - len(tok) >= 64
    for backbone in BACKBONES:
        cfg = hf_config(backbone)
        assert len(tok) < cfg["vocab_size"] == default_vocab_size()
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
            cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"])
    assert tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of South Korea?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|im_start|>user\nWhat is the capital of South Korea?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id and max(ids) < len(tok)
    assert tok.decode(ids) == text
    # all 256 byte tokens exist: any text round-trips
    odd = "Ünïcödé ✓ 漢字 \t tabs"
    assert tok.decode(tok(odd, add_special_tokens=False).input_ids) == odd

    probe = probe_ids(tmp_path / "a")
    assert probe.shape == (2, 12) and probe.dtype == torch.long
    assert torch.equal(probe, probe_ids(tmp_path / "b")) and not torch.equal(probe[0], probe[1])

    write_tokenizer(tmp_path / "c", extra_tokens=5)
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "c"))) == len(tok) + 5


@pytest.mark.parametrize("backbone", BACKBONES)
def test_hf_config_is_valid_and_realistic(backbone):
    from transformers import AutoConfig

    cfg = hf_config(backbone)
    assert cfg["model_type"] == {"qwen3": "qwen3", "llama": "llama", "gemma3": "gemma3_text"}[backbone]
    assert cfg["architectures"] == [{"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                                     "gemma3": "Gemma3ForCausalLM"}[backbone]]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"]) == (64, 2, 4, 2, 16, 128)
    assert cfg["tie_word_embeddings"] is (backbone == "gemma3")
    assert cfg["attention_bias"] is False
    rp = cfg["rope_parameters"]
    if backbone == "gemma3":
        assert cfg["hidden_activation"] == "gelu_pytorch_tanh"
        assert sorted(cfg["layer_types"]) == ["full_attention", "sliding_attention"]
        assert rp["sliding_attention"]["rope_theta"] != rp["full_attention"]["rope_theta"]
        assert cfg["query_pre_attn_scalar"] != cfg["head_dim"]
        assert cfg["sliding_window"] < 12  # shorter than the probe
    else:
        assert cfg["hidden_act"] == "silu"
        assert rp["rope_type"] == "default" and rp["rope_theta"] not in (10_000.0, None)
    # round trip through transformers
    again = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    assert again.to_dict()["rope_parameters"] == rp
    # overrides / knobs
    assert hf_config(backbone, vocab_size=512, tie_word_embeddings=backbone != "gemma3")["vocab_size"] == 512
    if backbone == "llama":
        biased = hf_config("llama", attention_bias=True, mlp_bias=True)
        assert biased["attention_bias"] is True and biased["mlp_bias"] is True


# --------------------------------------------------------------------------- reference vs transformers


NONE_CASES = {
    "qwen3": ("qwen3", {}),
    "llama": ("llama", {}),
    "gemma3": ("gemma3", {}),
    "llama-biases": ("llama", {"config_overrides": {"attention_bias": True, "mlp_bias": True}}),
    "llama-llama3-rope": ("llama", {"config_overrides": {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}}),
    "gemma3-untied-extra-vocab": ("gemma3", {"tie_word_embeddings": False, "extra_vocab": 7}),
    "qwen3-tied": ("qwen3", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", list(NONE_CASES))
def test_reference_matches_transformers_on_plain_runs(runs, case):
    backbone, kw = NONE_CASES[case]
    run = runs(f"none-{case}", backbone, "none", kind="checkpoint_dir", **kw)
    ids = probe_ids(run.path)
    ref = reference_logits(run.path, ids)
    hf = hf_logits(run.path, ids)  # default attention (sdpa)
    assert ref.shape == hf.shape == (2, 12, run.config["vocab_size"])
    d = maxdiff(ref, hf)
    eager = maxdiff(ref, hf_logits(run.path, ids, attn_implementation="eager"))
    print(f"{case}: max|ref - transformers| = {d:.2e} (sdpa), {eager:.2e} (eager)")
    assert d < TOL and eager < 1e-6
    assert ref.std() > 1.0  # logits carry signal, the tolerance is meaningful


def test_reference_features_matter(runs):
    """Each piece of config the reference reads changes the logits: if the reference
    ignored it, the transformers comparison above would have caught it."""
    run = runs("none-gemma3", "gemma3", "none", kind="checkpoint_dir")
    ids = probe_ids(run.path)
    t = load_tensors(run.path)
    base = reference_logits_from_tensors(t, run.config, run.block, ids)
    variants = {
        "query_pre_attn_scalar": {"query_pre_attn_scalar": 16},
        "sliding_window": {"sliding_window": 64},
        "rope_theta": {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                           "full_attention": {"rope_type": "default", "rope_theta": 10_000.0}}},
        "activation": {"hidden_activation": "silu"},
    }
    for what, change in variants.items():
        other = reference_logits_from_tensors(t, {**run.config, **change}, run.block, ids)
        assert maxdiff(base, other) > 1e-2, what
    # gemma norms are (1 + w): norm weights are far from 0, so (1 + w) vs w matters
    norms = [v for k, v in t.items() if k.endswith("norm.weight")]
    assert all(v.abs().max() > 0.1 and v.abs().mean() < 0.5 for v in norms)
    llama = runs("none-llama", "llama", "none", kind="checkpoint_dir")
    lnorms = [v for k, v in load_tensors(llama.path).items() if k.endswith("norm.weight")]
    assert all((v - 1).abs().max() > 0.1 for v in lnorms)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_dense_lora_reference_matches_transformers_on_merged_weights(runs, tmp_path, backbone, use_rslora):
    run = runs(f"dense-{backbone}-{use_rslora}", backbone, "dense_lora", kind="checkpoint_dir",
               use_rslora=use_rslora, lora_r=4, lora_alpha=8.0)
    s = scale_of(run.block)
    assert s == (4.0 if use_rslora else 2.0)
    ids = probe_ids(run.path)
    tensors = load_tensors(run.path)
    assert sum(".lora_B." in k for k in tensors) == 7 * 2
    assert all(tensors[k].abs().max() > 0 for k in tensors if ".lora_B." in k)
    ref = reference_logits(run.path, ids)
    merged_dir = save_plain_checkpoint(tmp_path / "merged", merge_dense_by_hand(tensors, s), run.config)
    hf = hf_logits(merged_dir, ids)
    d = maxdiff(ref, hf)
    print(f"dense_lora {backbone} rslora={use_rslora}: max|ref - transformers(merged)| = {d:.2e}")
    assert d < TOL
    # LoRA changes the logits clearly; the scale matters
    base = reference_logits_from_tensors(strip_adapters(tensors, run.config), run.config, None, ids)
    assert maxdiff(ref, base) > CLEAR
    other_scale = reference_logits_from_tensors(tensors, run.config, {**run.block, "use_rslora": not use_rslora}, ids)
    assert maxdiff(ref, other_scale) > CLEAR


def test_dense_lora_with_biases_matches_transformers(runs, tmp_path):
    run = runs("dense-llama-bias", "llama", "dense_lora", kind="checkpoint_dir",
               config_overrides={"attention_bias": True, "mlp_bias": True})
    tensors = load_tensors(run.path)
    assert "model.layers.0.self_attn.q_proj.base_layer.bias" in tensors
    assert "model.layers.0.mlp.down_proj.base_layer.bias" in tensors
    assert not any(k.endswith("_proj.bias") for k in tensors)
    ids = probe_ids(run.path)
    ref = reference_logits(run.path, ids)
    hf = hf_logits(save_plain_checkpoint(tmp_path / "m", merge_dense_by_hand(tensors, run.scale), run.config), ids)
    assert maxdiff(ref, hf) < TOL


# --------------------------------------------------------------------------- MoE / mixture brute force


def brute_moe_mlp(tensors: dict, prefix: str, x: torch.Tensor, act, s: float, top_k: int) -> torch.Tensor:
    """Per-token loop in float64 over materialised experts W0 + s * B @ A; routing by
    sorting the softmax by hand."""
    router = tensors[f"{prefix}.router.weight"].double()
    n_exp = router.shape[0]

    def w(proj, e):
        w0 = tensors[f"{prefix}.{proj}.weight"].double()
        a = tensors[f"{prefix}.experts.{e}.{proj}.lora_A.weight"].double()
        b = tensors[f"{prefix}.experts.{e}.{proj}.lora_B.weight"].double()
        bias = tensors.get(f"{prefix}.{proj}.bias")
        return w0 + s * (b @ a), (bias.double() if bias is not None else 0.0)

    experts = [{p: w(p, e) for p in ("gate_proj", "up_proj", "down_proj")} for e in range(n_exp)]
    flat = x.reshape(-1, x.shape[-1]).double()
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        xt = flat[t]
        logits = [float(router[e] @ xt) for e in range(n_exp)]
        m = max(logits)
        ex = [math.exp(v - m) for v in logits]
        probs = [v / sum(ex) for v in ex]
        chosen = sorted(range(n_exp), key=lambda e: -probs[e])[:top_k]
        z = sum(probs[e] for e in chosen)
        for e in chosen:
            (wg, bg), (wu, bu), (wd, bd) = (experts[e][p] for p in ("gate_proj", "up_proj", "down_proj"))
            h = act(wg @ xt + bg) * (wu @ xt + bu)
            out[t] += (probs[e] / z) * (wd @ h + bd)
    return out.reshape(x.shape)


def brute_mixture_linear(tensors: dict, prefix: str, x: torch.Tensor, s: float, top_k: int | None) -> torch.Tensor:
    """Per-token loop in float64: W0 x + s * sum_e g_e B_e A_e x with a hand-made gate."""
    w0 = tensors[f"{prefix}.base_layer.weight"].double()
    bias = tensors.get(f"{prefix}.base_layer.bias")
    router = tensors[f"{prefix}.router.weight"].double()
    n_exp = router.shape[0]
    ab = [(tensors[f"{prefix}.experts.{e}.lora_A.weight"].double(),
           tensors[f"{prefix}.experts.{e}.lora_B.weight"].double()) for e in range(n_exp)]
    flat = x.reshape(-1, x.shape[-1]).double()
    out = torch.zeros(flat.shape[0], w0.shape[0], dtype=torch.float64)
    for t in range(flat.shape[0]):
        xt = flat[t]
        logits = [float(router[e] @ xt) for e in range(n_exp)]
        m = max(logits)
        ex = [math.exp(v - m) for v in logits]
        g = [v / sum(ex) for v in ex]
        if top_k is not None:
            keep = sorted(range(n_exp), key=lambda e: -g[e])[:top_k]
            z = sum(g[e] for e in keep)
            g = [g[e] / z if e in keep else 0.0 for e in range(n_exp)]
        y = w0 @ xt + (bias.double() if bias is not None else 0.0)
        for e, (a, b) in enumerate(ab):
            if g[e]:
                y = y + s * g[e] * (b @ (a @ xt))
        out[t] = y
    return out.reshape(*x.shape[:-1], w0.shape[0])


def _router_gaps(monkeypatch, tensors, config, block, ids) -> list[float]:
    """Smallest gap between the k-th and (k+1)-th router logit, per router call. fp32
    errors in router logits are ~1e-6, so a gap > 5e-4 makes top-k unambiguous in fp32
    (NOT in bf16, whose logit errors are ~1e-2)."""
    gaps = []
    orig = reference._gate

    def spy(logits, top_k, dtype):
        if top_k is not None:
            srt = logits.float().sort(-1, descending=True).values
            gaps.append((srt[..., top_k - 1] - srt[..., top_k]).min().item())
        return orig(logits, top_k, dtype)

    monkeypatch.setattr(reference, "_gate", spy)
    reference_logits_from_tensors(tensors, config, block, ids)
    monkeypatch.setattr(reference, "_gate", orig)
    return gaps


@pytest.mark.parametrize("backbone", BACKBONES)
def test_moe_expert_lora_reference_matches_brute_force(runs, monkeypatch, backbone):
    run = runs(f"moe-{backbone}", backbone, "moe_expert_lora", kind="checkpoint_dir")
    tensors, cfg, block = load_tensors(run.path), run.config, run.block
    ids = probe_ids(run.path)
    s, act = run.scale, act_of(cfg)
    ref = reference_logits(run.path, ids)

    # 1. the MoE block alone, on random inputs
    w = reference._Weights(tensors, block, torch.float32)
    x = torch.randn(2, 12, cfg["hidden_size"], generator=torch.Generator().manual_seed(1))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp"
        got = reference.moe_mlp(w, p, x, act, block["top_k"])
        assert maxdiff(got, brute_moe_mlp(tensors, p, x, act, s, block["top_k"])) < TOL

    # 2. the whole model with the brute-force MoE swapped in
    calls = []

    def brute(w_, prefix, x_, act_, top_k):
        calls.append(prefix)
        return brute_moe_mlp(tensors, prefix, x_, act_, s, top_k).to(x_.dtype)

    monkeypatch.setattr(reference, "moe_mlp", brute)
    slow = reference_logits(run.path, ids)
    monkeypatch.undo()
    assert calls == ["model.layers.0.mlp", "model.layers.1.mlp"]
    d = maxdiff(ref, slow)
    print(f"moe_expert_lora {backbone}: max|ref - brute force| = {d:.2e}")
    assert d < TOL

    # 3. experts, routing and attention LoRA all change the logits clearly
    base = reference_logits_from_tensors(strip_adapters(tensors, cfg), cfg, None, ids)
    assert maxdiff(ref, base) > CLEAR
    top1 = reference_logits_from_tensors(tensors, cfg, {**block, "top_k": 1}, ids)
    assert maxdiff(ref, top1) > CLEAR
    gaps = _router_gaps(monkeypatch, tensors, cfg, block, ids)
    print(f"min router logit gap {min(gaps):.4f}")
    assert len(gaps) == 2 and min(gaps) > 5e-4  # top-k selection is unambiguous (fp32)


def test_moe_expert_lora_partial_layers_and_targets(runs):
    run = runs("moe-qwen3-layer1", "qwen3", "moe_expert_lora", kind="checkpoint_dir", moe_layers=[1],
               target_modules=["q_proj", "k_proj", "o_proj"], num_experts=3, top_k=1)
    t = load_tensors(run.path)
    assert "model.layers.0.mlp.router.weight" not in t and "model.layers.0.mlp.gate_proj.weight" in t
    assert t["model.layers.1.mlp.router.weight"].shape == (3, 64)
    assert {k.split(".experts.")[1].split(".")[0] for k in t if ".mlp.experts." in k} == {"0", "1", "2"}
    assert "model.layers.1.self_attn.k_proj.lora_A.weight" in t and "model.layers.1.self_attn.v_proj.weight" in t
    assert not any(".mlp.gate_proj.lora_A" in k for k in t)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_expert_lora_equals_transformers_sparse_moe(runs, arch):
    """run-format.md: moe_expert_lora is a standard softmax/top-k/renormalised sparse MoE
    with materialised experts (Qwen3-MoE norm_topk_prob=True, Mixtral)."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    backbone, moe_layers = ("qwen3", [1]) if arch == "qwen3_moe" else ("llama", None)
    run = runs(f"moe-{arch}", backbone, "moe_expert_lora", kind="checkpoint_dir", moe_layers=moe_layers)
    cfg, block, s = run.config, run.block, run.scale
    raw = load_tensors(run.path)
    t = merge_dense_by_hand(raw, s)  # attention LoRA merged (drops every lora_A/B: experts read from raw)
    E, k = block["num_experts"], block["top_k"]
    common = dict(vocab_size=cfg["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
                  rms_norm_eps=cfg["rms_norm_eps"], rope_parameters=cfg["rope_parameters"],
                  tie_word_embeddings=False, num_experts_per_tok=k)
    if arch == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, num_experts=E, norm_topk_prob=True,
                                                   moe_intermediate_size=128, mlp_only_layers=[0]))
    else:
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=E))
    sd = {}
    for name, v in t.items():
        if ".mlp.router." in name or ".mlp.experts." in name:
            continue
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is not None and f"model.layers.{layer}.mlp.router.weight" in t and ".mlp." in name:
            continue
        sd[name] = v
    for i in range(2):
        p = f"model.layers.{i}.mlp"
        if f"{p}.router.weight" not in t:
            continue
        sd[f"{p}.gate.weight"] = raw[f"{p}.router.weight"]
        mat = {proj: torch.stack([raw[f"{p}.{proj}.weight"] + s * raw[f"{p}.experts.{e}.{proj}.lora_B.weight"]
                                  @ raw[f"{p}.experts.{e}.{proj}.lora_A.weight"] for e in range(E)])
               for proj in ("gate_proj", "up_proj", "down_proj")}
        sd[f"{p}.experts.gate_up_proj"] = torch.cat([mat["gate_proj"], mat["up_proj"]], dim=1)
        sd[f"{p}.experts.down_proj"] = mat["down_proj"]
    model.load_state_dict(sd, strict=True)
    ids = probe_ids(run.path)
    with torch.no_grad():
        hf = model.eval()(ids).logits
    d = maxdiff(reference_logits(run.path, ids), hf)
    print(f"moe_expert_lora vs transformers {arch}: {d:.2e}")
    assert d < TOL


@pytest.mark.parametrize("top_k", [None, 2], ids=["soft", "top2"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_mixture_lora_reference_matches_brute_force(runs, monkeypatch, backbone, top_k):
    run = runs(f"mix-{backbone}-{top_k}", backbone, "mixture_lora", kind="checkpoint_dir", top_k=top_k,
               config_overrides={"attention_bias": True} if backbone == "llama" else None)
    tensors, cfg, block = load_tensors(run.path), run.config, run.block
    ids = probe_ids(run.path)
    s = run.scale
    ref = reference_logits(run.path, ids)
    prefixes = sorted({k[: -len(".router.weight")] for k in tensors if k.endswith(".router.weight")})
    assert len(prefixes) == 7 * cfg["num_hidden_layers"]

    # 1. each mixture Linear alone, on random inputs
    w = reference._Weights(tensors, block, torch.float32)
    g = torch.Generator().manual_seed(2)
    for p in prefixes:
        x = torch.randn(2, 5, tensors[f"{p}.base_layer.weight"].shape[1], generator=g)
        assert maxdiff(w.linear(p, x), brute_mixture_linear(tensors, p, x, s, top_k)) < TOL

    # 2. the whole model with every mixture Linear computed by the brute-force loop
    orig = reference._Weights.linear
    seen = []

    def linear(self, prefix, x):
        if f"{prefix}.router.weight" in self.t:
            seen.append(prefix)
            return brute_mixture_linear(self.t, prefix, x, s, top_k).to(x.dtype)
        return orig(self, prefix, x)

    monkeypatch.setattr(reference._Weights, "linear", linear)
    slow = reference_logits(run.path, ids)
    monkeypatch.undo()
    assert sorted(seen) == prefixes
    d = maxdiff(ref, slow)
    print(f"mixture_lora {backbone} top_k={top_k}: max|ref - brute force| = {d:.2e}")
    assert d < TOL

    # 3. the mixture changes logits clearly, and soft vs top-k gating differ
    base = reference_logits_from_tensors(strip_adapters(tensors, cfg), cfg, None, ids)
    assert maxdiff(ref, base) > CLEAR
    other = reference_logits_from_tensors(tensors, cfg, {**block, "top_k": 2 if top_k is None else None}, ids)
    assert maxdiff(ref, other) > 0.05
    if top_k is not None:
        gaps = _router_gaps(monkeypatch, tensors, cfg, block, ids)
        print(f"min router logit gap {min(gaps):.4f}")
        assert len(gaps) == len(prefixes) and min(gaps) > 5e-4


# --------------------------------------------------------------------------- fixture files


def test_run_dir_layout_and_checkpoints_differ(runs):
    run = runs("rundir-qwen3-dense", "qwen3", "dense_lora")
    root = run.path
    rc = json.loads((root / "resolved_config.json").read_text())
    assert set(rc) == {"backbone", "model", "injection", "training", "run_name"}
    assert rc["backbone"] == "qwen3" and rc["model"] == {"name_or_path": "Qwen/Qwen3-0.6B", "dtype": "float32"}
    assert set(rc["injection"]) == {"strategy", "lora_r", "lora_alpha", "lora_dropout", "use_rslora",
                                    "target_modules", "num_experts", "top_k", "moe_layers"}
    assert rc["injection"] == run.block and rc["injection"]["strategy"] == "dense_lora"
    assert rc["run_name"] == root.name
    assert run.checkpoints == {"final": root / "final", "best": root / "checkpoint-best",
                               "latest": root / "checkpoint-latest"}
    steps = {}
    for name, ck in run.checkpoints.items():
        files = {p.name for p in ck.iterdir()}
        assert {"config.json", "model.safetensors", "generation_config.json", "trainer_state.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
        cfg = json.loads((ck / "config.json").read_text())
        assert cfg["eulerforge"] == run.block and cfg["model_type"] == "qwen3"
        steps[name] = json.loads((ck / "trainer_state.json").read_text())["global_step"]
        with safe_open(str(ck / "model.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert steps == {"final": 300, "best": 200, "latest": 300}
    metrics = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [100, 200, 300] and all("eval_loss" in m for m in metrics)

    ids = probe_ids(run.checkpoints["final"])
    logits = {n: reference_logits(ck, ids) for n, ck in run.checkpoints.items()}
    tensors = {n: load_tensors(ck) for n, ck in run.checkpoints.items()}
    for a, b in (("final", "best"), ("final", "latest"), ("best", "latest")):
        assert maxdiff(logits[a], logits[b]) > CLEAR
        key = "model.layers.0.self_attn.q_proj.lora_B.weight"
        assert not torch.equal(tensors[a][key], tensors[b][key])
        assert not torch.equal(tensors[a]["model.embed_tokens.weight"], tensors[b]["model.embed_tokens.weight"])


@pytest.mark.parametrize("block_in", ["resolved", "checkpoint", "none"])
def test_block_placement(runs, block_in):
    both = runs("rundir-qwen3-dense", "qwen3", "dense_lora")
    run = runs(f"blockin-{block_in}", "qwen3", "dense_lora", block_in=block_in)
    rc = json.loads((run.path / "resolved_config.json").read_text())
    cfg = json.loads((run.checkpoints["final"] / "config.json").read_text())
    assert ("injection" in rc) == (block_in == "resolved")
    assert ("eulerforge" in cfg) == (block_in == "checkpoint")
    ids = probe_ids(run.checkpoints["final"])
    want = reference_logits(both.checkpoints["final"], ids)  # same seed -> same tensors
    if block_in == "none":
        assert reference.load_block(run.checkpoints["final"]) is None
        with pytest.raises(ValueError, match="lora_alpha"):
            reference_logits(run.checkpoints["final"], ids)
        got = reference_logits(run.checkpoints["final"], ids, block=run.block)
    else:
        assert reference.load_block(run.checkpoints["final"]) == run.block
        got = reference_logits(run.checkpoints["final"], ids)
    assert torch.equal(got, want)


def test_checkpoint_block_wins_over_resolved_in_reference(runs, tmp_path):
    import shutil

    for block_in, resolved_matters in (("both", False), ("resolved", True)):
        src = runs("rundir-qwen3-dense" if block_in == "both" else "blockin-resolved", "qwen3", "dense_lora",
                   block_in=block_in)
        dst = tmp_path / block_in
        shutil.copytree(src.path, dst)
        ids = probe_ids(dst / "final")
        before = reference_logits(dst / "final", ids)
        rc = json.loads((dst / "resolved_config.json").read_text())
        rc["injection"]["lora_alpha"] = 32.0
        (dst / "resolved_config.json").write_text(json.dumps(rc))
        after = reference_logits(dst / "final", ids)
        assert (maxdiff(before, after) > CLEAR) == resolved_matters


def test_intermediate_checkpoints(tmp_path):
    run = make_run(tmp_path / "run", "llama", "none", intermediate_steps=(1200,))
    ck = run.path / "checkpoint-1200"
    assert run.checkpoints["1200"] == ck
    assert json.loads((ck / "trainer_state.json").read_text())["global_step"] == 1200
    a, b = load_tensors(ck), load_tensors(run.checkpoints["final"])
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_checkpoint_dir_kind(runs):
    run = runs("ckpt-llama-mix", "llama", "mixture_lora", kind="checkpoint_dir")
    assert run.checkpoints == {"final": run.path}
    assert (run.path / "config.json").exists() and not (run.path / "resolved_config.json").exists()
    assert not (run.path.parent / "resolved_config.json").exists()
    assert json.loads((run.path / "config.json").read_text())["eulerforge"]["strategy"] == "mixture_lora"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_strategy_tensor_names(runs, backbone):
    expected_linears = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
                        "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    none = load_tensors(runs(f"none-{backbone}", backbone, "none", kind="checkpoint_dir").path)
    dense = load_tensors(runs(f"dense-{backbone}-False", backbone, "dense_lora", kind="checkpoint_dir",
                              use_rslora=False, lora_r=4, lora_alpha=8.0).path)
    mix = load_tensors(runs(f"mix-{backbone}-2", backbone, "mixture_lora", kind="checkpoint_dir", top_k=2,
                            config_overrides={"attention_bias": True} if backbone == "llama" else None).path)
    assert ("lm_head.weight" in none) == (backbone != "gemma3")
    for i in range(2):
        for leaf, (o, n) in expected_linears.items():
            part = "self_attn" if leaf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            p = f"model.layers.{i}.{part}.{leaf}"
            assert none[f"{p}.weight"].shape == (o, n)
            assert f"{p}.weight" not in dense and f"{p}.weight" not in mix
            assert dense[f"{p}.base_layer.weight"].shape == (o, n)
            assert dense[f"{p}.lora_A.weight"].shape == (4, n) and dense[f"{p}.lora_B.weight"].shape == (o, 4)
            assert torch.equal(dense[f"{p}.base_layer.weight"], none[f"{p}.weight"])  # same seed, same base
            assert mix[f"{p}.router.weight"].shape == (4, n)
            for e in range(4):
                assert mix[f"{p}.experts.{e}.lora_A.weight"].shape == (4, n)
                assert mix[f"{p}.experts.{e}.lora_B.weight"].shape == (o, 4)
    non_linear = {k for k in none if not any(f".{x}." in k for x in expected_linears)}
    assert non_linear <= set(dense) and non_linear <= set(mix)


def test_sharded_and_single_file_hold_identical_tensors(runs):
    single = runs("shard-single", "gemma3", "mixture_lora", kind="checkpoint_dir", seed=5)
    sharded = runs("shard-sharded", "gemma3", "mixture_lora", kind="checkpoint_dir", seed=5, sharded=True)
    index = json.loads((sharded.path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n >= 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (sharded.path / "model.safetensors").exists()
    a, b = load_tensors(single.path), load_tensors(sharded.path)
    assert set(a) == set(b) == set(index["weight_map"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in b.values())
    for f in files:
        with safe_open(str(sharded.path / f), "pt") as h:
            assert h.metadata() == {"format": "pt"}
            assert all(index["weight_map"][k] == f for k in h.keys())
    # transformers loads a sharded plain run too
    plain = runs("shard-none", "llama", "none", kind="checkpoint_dir", sharded=True)
    ids = probe_ids(plain.path)
    assert maxdiff(reference_logits(plain.path, ids), hf_logits(plain.path, ids)) < TOL


@pytest.mark.parametrize("sharded", [False, True])
def test_legacy_bin(runs, sharded):
    ref_run = runs("bin-ref", "qwen3", "dense_lora", kind="checkpoint_dir", seed=3)
    run = runs(f"bin-{sharded}", "qwen3", "dense_lora", kind="checkpoint_dir", seed=3, legacy_bin=True,
               sharded=sharded)
    names = {p.name for p in run.path.iterdir()}
    assert not any(n.endswith(".safetensors") for n in names)
    if sharded:
        assert "pytorch_model.bin.index.json" in names and sum(n.endswith(".bin") for n in names) >= 2
    else:
        assert "pytorch_model.bin" in names
    a, b = load_tensors(ref_run.path), load_tensors(run.path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_runs_store_bf16(runs):
    run = runs("bf16-gemma3-moe", "gemma3", "moe_expert_lora", dtype=torch.bfloat16)
    fp32 = runs("fp32-gemma3-moe", "gemma3", "moe_expert_lora")
    rc = json.loads((run.path / "resolved_config.json").read_text())
    assert rc["model"]["dtype"] == "bfloat16" and run.config["dtype"] == "bfloat16"
    ck = run.checkpoints["final"]
    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    t, t32 = load_tensors(ck), load_tensors(fp32.checkpoints["final"])
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    assert all(torch.equal(t[k], t32[k].to(torch.bfloat16)) for k in t)
    ids = probe_ids(ck)
    lo = reference_logits(ck, ids, dtype=torch.bfloat16)
    hi = reference_logits(ck, ids, dtype=torch.float32)
    assert lo.dtype == torch.bfloat16 and hi.dtype == torch.float32
    assert 0 < maxdiff(lo, hi) < 0.5


@pytest.mark.parametrize("backbone", BACKBONES)
def test_bf16_reference_matches_transformers_bf16(runs, backbone):
    """In bfloat16 the reference follows transformers' casts exactly: it matches eager
    attention to the bit on this machine (asserted to < 1e-3, far below one bf16 ulp of
    these logits, ~1.6e-2); sdpa differs by a few ulps."""
    run = runs(f"bf16-{backbone}-none", backbone, "none", kind="checkpoint_dir", dtype=torch.bfloat16)
    ids = probe_ids(run.path)
    ref = reference_logits(run.path, ids, dtype=torch.bfloat16)
    eager = maxdiff(ref, hf_logits(run.path, ids, torch.bfloat16, "eager"))
    sdpa = maxdiff(ref, hf_logits(run.path, ids, torch.bfloat16, "sdpa"))
    print(f"bf16 {backbone}: max|ref - transformers eager| = {eager:.2e}, sdpa = {sdpa:.3f}")
    assert eager < 1e-3 and sdpa < 0.25


def test_extra_vocab(runs):
    run = runs("extra-llama", "llama", "dense_lora", kind="checkpoint_dir", extra_vocab=10)
    from transformers import AutoTokenizer

    t = load_tensors(run.path)
    v = default_vocab_size() + 10
    assert run.config["vocab_size"] == v
    assert json.loads((run.path / "config.json").read_text())["vocab_size"] == v
    assert t["model.embed_tokens.weight"].shape == (v, 64) and t["lm_head.weight"].shape == (v, 64)
    tok = AutoTokenizer.from_pretrained(str(run.path))
    assert len(tok) == tokenizer_size() + 10 < v
    ids = torch.tensor([[v - 1, v - 2, 3, 4]])
    assert reference_logits(run.path, ids).shape == (1, 4, v)


def test_trainer_style_run(tmp_path):
    root = make_trainer_style_run(tmp_path / "trainer", "llama", "dense_lora", steps=(100, 200, 300), best_step=200)
    assert root == tmp_path / "trainer"
    names = {p.name for p in root.iterdir()}
    assert {"checkpoint-100", "checkpoint-200", "checkpoint-300", "resolved_config.json"} <= names
    assert not names & {"final", "checkpoint-best", "checkpoint-latest"}
    state = json.loads((root / "checkpoint-300" / "trainer_state.json").read_text())
    assert state["global_step"] == 300
    assert state["best_model_checkpoint"] == str((root / "checkpoint-200").resolve())
    assert Path(state["best_model_checkpoint"]).is_absolute()
    for s in (100, 200, 300):
        assert json.loads((root / f"checkpoint-{s}" / "trainer_state.json").read_text())["global_step"] == s
        assert json.loads((root / f"checkpoint-{s}" / "config.json").read_text())["eulerforge"]["strategy"] == "dense_lora"
    rc = json.loads((root / "resolved_config.json").read_text())
    assert rc["injection"]["strategy"] == "dense_lora" and rc["backbone"] == "llama"
    ids = probe_ids(root / "checkpoint-100")
    l100, l200 = reference_logits(root / "checkpoint-100", ids), reference_logits(root / "checkpoint-200", ids)
    assert maxdiff(l100, l200) > CLEAR


def test_load_tensors_errors_on_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path)


def test_every_backbone_strategy_combination_runs(runs):
    """All 12 combinations build and the reference gives finite logits of the right shape,
    distinct per strategy."""
    for backbone in BACKBONES:
        seen = []
        for strategy in STRATEGIES:
            run = runs(f"combo-{backbone}-{strategy}", backbone, strategy, kind="checkpoint_dir")
            ids = probe_ids(run.path)
            out = reference_logits(run.path, ids)
            assert out.shape == (2, 12, run.config["vocab_size"]) and torch.isfinite(out).all()
            seen.append(out)
        for i in range(len(seen)):
            for j in range(i + 1, len(seen)):
                assert maxdiff(seen[i], seen[j]) > CLEAR
