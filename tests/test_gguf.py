"""GGUF sink: files that llama.cpp itself loads and computes like the source.

Tiny models (seeded random weights, norms perturbed so a missing ``+1`` shows)
are built with transformers for every layout the sink writes (qwen3, llama,
gemma3, qwen3moe, mixtral), with byte-level BPE tokenizers trained here with
``tokenizers`` using the exact pre-tokenizer configurations of Qwen2/3, Llama 3
and GPT-2. Each folder is read through the package's own pipeline (``open_pipeline``:
a plain HF folder is a strategy-``none`` run), written as GGUF, loaded by llama.cpp
(llama-cpp-python), and its logits are compared with transformers' float32 forward on
the same folder.

Only the tests that run llama.cpp need llama-cpp-python; the rest (metadata read
back with gguf's reader, refusals, Modelfile) run without it.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from converter.errors import EfexportError
from converter.pipeline import open_pipeline
from converter.plan import PlannedTensor
import converter.sinks.gguf as gs
from converter.sinks.gguf import FAMILIES, families, tensors, writer

_OPEN_PIPELINES: list = []


def pipeline_plan(folder) -> list[PlannedTensor]:
    """The package's own reading path over a saved HF folder (a valid input of strategy
    ``none``): ``open_pipeline`` -> ``TensorSource`` -> ``plan_dense``, every tensor read
    lazily. The pipeline stays open until the end of the test (see ``_close_pipelines``)."""
    pipe = open_pipeline(folder)
    _OPEN_PIPELINES.append(pipe)
    assert pipe.injection.strategy == "none" and pipe.target.layout == "dense", (pipe.injection, pipe.target.layout)
    return pipe.target.plan


@pytest.fixture(autouse=True)
def _close_pipelines():
    yield
    while _OPEN_PIPELINES:
        _OPEN_PIPELINES.pop().close()


# --------------------------------------------------------------------------- tokenizers

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A tokenizer learns merges from text; "
    "llama.cpp must split words exactly as Hugging Face does. Numbers like 12345 and 3.14 "
    "and words like don't, we're, I'll, she's appear here. Qwen, Llama and Gemma are model families. "
    "Export the fine-tuned model to GGUF and check the logits match!\n"
    "def f(x):\n    return x * 2  # code with  double  spaces\n"
    "Über café naïve façade — unicode text, émigré résumé.\n"
)
SAMPLE = "The lazy fox exports a model: don't we'll check 2024 logits?  Über café!\n  def g(y): return y"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TPL = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

TOKENIZER_STYLES = {
    # style: (special tokens, bos, eos, chat template)
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TPL),
    "gpt2": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", None),
}
TOKENIZER_VOCAB = 400  # smaller than the models' vocab_size: the GGUF pads


@lru_cache(maxsize=None)
def _trained_tokenizer(style: str):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials, bos, _eos, _tpl = TOKENIZER_STYLES[style]
    tok = Tokenizer(models.BPE(ignore_merges=(style == "llama3")))
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex = gs.QWEN2_PRETOKENIZER_REGEX if style == "qwen2" else gs.LLAMA3_PRETOKENIZER_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=(style == "llama3"), use_regex=False),
        ])
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    if style == "llama3":  # Llama 3 adds BOS through its post-processor; Qwen2 and GPT-2 add nothing
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def save_tokenizer(style: str, folder: Path) -> dict:
    """Save a trained tokenizer the way transformers saves one; return its special ids."""
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, tpl = TOKENIZER_STYLES[style]
    tok = _trained_tokenizer(style)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                 additional_special_tokens=[s for s in specials if s not in (bos, eos)])
    if tpl:
        hf.chat_template = tpl
    hf.save_pretrained(folder)
    return {"bos_token_id": tok.token_to_id(bos) if bos else None, "eos_token_id": tok.token_to_id(eos),
            "pad_token_id": None}


# --------------------------------------------------------------------------- models

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

ARCHS = {
    # name: (config class, model class, tokenizer style, extra config)
    # head_dim differs from hidden/heads where the real models do (qwen3, gemma3)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen2", dict(tie_word_embeddings=True, rms_norm_eps=1e-6, head_dim=32)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", "llama3", dict(
        tie_word_embeddings=False, rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gpt2", dict(
        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"], head_dim=32,
        sliding_window=4, query_pre_attn_scalar=24, tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen2", dict(
        num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
        tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "llama3", dict(
        num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
}


def _randomize(model, arch: str, seed: int, scale: float = 1.5) -> None:
    """Seeded weights large enough for peaked logits; norms perturbed away from their identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = 0.3 * torch.randn(p.shape, generator=g)
                p.copy_(noise if arch == "gemma3" else 1.0 + noise)  # gemma3 stores w for (1 + w)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]) * scale)


@lru_cache(maxsize=None)
def build_model(arch: str, root: str, weight_scale: float = 1.5, **overrides) -> Path:
    import transformers

    cfg_cls, model_cls, style, extra = ARCHS[arch]
    tag = hashlib.sha1(repr(sorted({**overrides, "scale": weight_scale}.items())).encode()).hexdigest()[:10]
    folder = Path(root) / f"{arch}-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    special = save_tokenizer(style, folder)
    overrides = {k: dict(v) if isinstance(v, tuple) else v for k, v in overrides.items()}  # hashable dicts
    kw = {**COMMON, **extra, **overrides, **special}
    cfg = getattr(transformers, cfg_cls)(**kw)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    _randomize(model, arch, seed=1234, scale=weight_scale)
    model.save_pretrained(folder)
    return folder


def hf_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


@lru_cache(maxsize=None)
def hf_logits(folder: str, ids: tuple[int, ...]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return m(torch.tensor([list(ids)])).logits[0].float()


def hf_ids(folder: Path, text: str = SAMPLE) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(folder)(text)["input_ids"])


def export(folder: Path, out_dir: Path, gguf_type: str = "fp32", **kw) -> tuple[Path, dict]:
    out = Path(out_dir) / gs.gguf_filename("tiny", gguf_type)
    report = gs.write_gguf(pipeline_plan(folder), hf_config(folder), folder, out, gguf_type,
                           name="tiny", metadata={"base_model": "org/tiny-base", "license": "apache-2.0"}, **kw)
    return out, report


def parity(folder: Path, gguf_file: Path, text: str = SAMPLE) -> tuple[float, float]:
    ids = hf_ids(folder, text)
    ref = hf_logits(str(folder), tuple(ids))
    got = gs.llama_cpp_logits(gguf_file, ids)
    assert got.shape == ref.shape
    rel = float((got - ref).abs().max() / ref.abs().max())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return rel, top1


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("gguf_models"))


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(str(path))


def _field(r, key):
    f = r.fields[key]
    return f.contents()


# --------------------------------------------------------------------------- llama.cpp parity

PARITY_TOL = {"qwen3": 1e-3, "llama": 1e-3, "qwen3moe": 1e-3, "mixtral": 1e-3,
              "gemma3": 3e-3}  # ggml's CPU GELU goes through an fp16 table


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fp32_parity_in_llama_cpp(arch, models_root, tmp_path):
    pytest.importorskip("llama_cpp")
    folder = build_model(arch, models_root)
    out, report = export(folder, tmp_path, "fp32")
    rel, top1 = parity(folder, out)
    print(f"PARITY {arch} fp32 rel={rel:.2e} top1={top1:.3f}")
    assert rel <= PARITY_TOL[arch], rel
    assert top1 == 1.0


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_yarn_rope_parity(arch, models_root, tmp_path):
    """YaRN (HF defaults) is written as llama.cpp's yarn and matches; without the keys it would not."""
    pytest.importorskip("llama_cpp")
    yarn = (("rope_type", "yarn"), ("factor", 4.0), ("rope_theta", 1e6), ("original_max_position_embeddings", 16))
    folder = build_model(arch, models_root, rope_parameters=yarn)
    out, _ = export(folder, tmp_path, "fp32")
    rel, top1 = parity(folder, out, CORPUS)
    assert rel <= PARITY_TOL[arch] and top1 == 1.0, (rel, top1)


@pytest.mark.parametrize("style,arch", [("qwen2", "qwen3"), ("llama3", "llama"), ("gpt2", "gemma3")])
def test_tokenization_identical(style, arch, models_root, tmp_path):
    pytest.importorskip("llama_cpp")
    folder = build_model(arch, models_root)
    out, report = export(folder, tmp_path, "fp32")
    assert report["tokenizer_pre"] == {"qwen2": "qwen2", "llama3": "llama-bpe", "gpt2": "gpt-2"}[style]
    for text in (SAMPLE, CORPUS, "<|im_start|>user\nhi<|im_end|>" if style == "qwen2" else "x  y\t\tz 999999"):
        assert gs.llama_cpp_tokenize(out, text) == hf_ids(folder, text), text


@pytest.mark.parametrize("gguf_type,min_top1", [("q8_0", 0.9), ("q4_k_m", 0.6)])
def test_quantized_keep_top1(gguf_type, min_top1, models_root, tmp_path):
    """Random-weight nets have flat logits; even so the quantized files keep most top-1s
    (observed on 192 positions: q8_0 0.98, q4_k_m 0.70)."""
    pytest.importorskip("llama_cpp")
    # rows a multiple of 256 so the K-quants really apply
    folder = build_model("qwen3", models_root, weight_scale=0.7, hidden_size=256, intermediate_size=512, head_dim=64)
    out, report = export(folder, tmp_path, gguf_type)
    r = _reader(out)
    import gguf

    types = {t.name: t.tensor_type for t in r.tensors}
    assert int(_field(r, "general.file_type")) == int(getattr(gguf.LlamaFileType, "MOSTLY_" + gguf_type.upper()))
    if gguf_type == "q8_0":
        assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    else:
        assert gguf.GGMLQuantizationType.Q4_K in set(types.values())
        assert [p.name for p in tmp_path.iterdir()] == [out.name], "something beside the file left behind"
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    rel, top1 = parity(folder, out, CORPUS)
    print(f"PARITY qwen3 {gguf_type} rel={rel:.2e} top1={top1:.3f}")
    assert top1 >= min_top1


@pytest.mark.parametrize("arch,flag", [("llama", "no_permute"), ("gemma3", "no_norm_shift"),
                                       ("gemma3", "no_q_fold"), ("llama", "no_llama3_rope")])
def test_negative_controls_are_caught(arch, flag, models_root, tmp_path, monkeypatch):
    """Each llama.cpp specific, left out, makes the parity check fail."""
    pytest.importorskip("llama_cpp")
    folder = build_model(arch, models_root)
    keep = lambda t, cfg: t  # noqa: E731
    if flag == "no_permute":  # q/k weights and biases keep HF's rotate-half row order
        monkeypatch.setattr(families, "permute", lambda w, n_head, n_head_kv: w)
    elif flag == "no_norm_shift":  # norms stored as w, not 1 + w (the query scale is still folded)
        monkeypatch.setitem(FAMILIES["gemma3"].transforms, "norm.weight", keep)
    elif flag == "no_q_fold":
        monkeypatch.setitem(FAMILIES["gemma3"].transforms, "self_attn.q_norm.weight", keep)
    elif flag == "no_llama3_rope":
        real = tensors.llama3_rope_factors
        monkeypatch.setattr(tensors, "llama3_rope_factors", lambda cfg, rope: torch.ones_like(real(cfg, rope)))
    out, _ = export(folder, tmp_path, "fp32")
    rel, top1 = parity(folder, out)
    print(f"NEGATIVE {arch} {flag} rel={rel:.2e} top1={top1:.3f}")
    assert rel > 10 * PARITY_TOL[arch], (rel, top1)


# --------------------------------------------------------------------------- file contents (no llama.cpp needed)


def test_gemma3_file_layout(models_root, tmp_path):
    import gguf

    folder = build_model("gemma3", models_root)
    out, report = export(folder, tmp_path, "fp32")
    r = _reader(out)
    names = {t.name: t for t in r.tensors}
    assert report["arch"] == "gemma3" and _field(r, "general.architecture") == "gemma3"
    assert "output.weight" not in names  # tied embeddings
    assert list(_field(r, "gemma3.attention.sliding_window_pattern")) == [True, False, True]
    assert int(_field(r, "gemma3.attention.sliding_window")) == 4
    assert float(_field(r, "gemma3.rope.freq_base_swa")) == 10000.0
    assert float(_field(r, "gemma3.rope.scaling.factor")) == 2.0
    # norms stored as 1 + w; q_norm also carries (24 ** -0.5) / (32 ** -0.5): llama.cpp scales by head_dim ** -0.5
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        w_in = f.get_tensor("model.layers.0.input_layernorm.weight")
        w_q = f.get_tensor("model.layers.0.self_attn.q_norm.weight")
    got_in = torch.from_numpy(np.array(names["blk.0.attn_norm.weight"].data))
    got_q = torch.from_numpy(np.array(names["blk.0.attn_q_norm.weight"].data))
    torch.testing.assert_close(got_in, w_in + 1)
    torch.testing.assert_close(got_q, (w_q + 1) * (24 ** -0.5) / (32 ** -0.5))
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_metadata_vocab_and_types(models_root, tmp_path):
    import gguf

    folder = build_model("qwen3moe", models_root)
    seen: list[int] = []
    out, report = export(folder, tmp_path, "q8_0", progress=seen.append)
    r = _reader(out)
    assert _field(r, "general.architecture") == "qwen3moe"
    assert _field(r, "general.name") == "tiny"
    assert _field(r, "general.quantized_by") == "efexport"
    assert _field(r, "general.license") == "apache-2.0"
    assert _field(r, "general.base_model.0.repo_url") == "https://huggingface.co/org/tiny-base"
    assert int(_field(r, "general.quantization_version")) == gguf.GGML_QUANT_VERSION
    assert int(_field(r, "general.file_type")) == gguf.LlamaFileType.MOSTLY_Q8_0
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "qwen2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB and tokens[-1] == f"[PAD{VOCAB - 1}]"
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[-1] == gguf.TokenType.UNUSED and types[2] == gguf.TokenType.CONTROL  # <|im_end|>
    assert len(_field(r, "tokenizer.ggml.merges")) > 0
    assert int(_field(r, "tokenizer.ggml.eos_token_id")) == 2
    assert "<|im_start|>" in _field(r, "tokenizer.chat_template")
    assert int(_field(r, "qwen3moe.expert_count")) == 4 and int(_field(r, "qwen3moe.expert_used_count")) == 2
    assert int(_field(r, "qwen3moe.expert_feed_forward_length")) == 48
    t = {x.name: x for x in r.tensors}
    assert t["blk.0.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert list(t["blk.0.ffn_gate_exps.weight"].shape) == [64, 48, 4]        # ggml order {n_embd, n_ff, n_expert}
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # router stays F32
    assert t["blk.0.attn_q_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert t["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert report["tensor_count"] == len(r.tensors) and report["file_size"] == out.stat().st_size
    assert sum(seen) == sum(int(x.n_bytes) for x in r.tensors)
    assert report["n_params"] == sum(int(np.prod(x.shape)) for x in r.tensors)


def test_rows_not_multiple_of_block_fall_back_to_f16(models_root, tmp_path):
    import gguf

    folder = build_model("qwen3", models_root, intermediate_size=80)  # down_proj rows of 80: not a multiple of 32
    out, _ = export(folder, tmp_path, "q8_0")
    t = {x.name: x.tensor_type for x in _reader(out).tensors}
    assert t["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert t["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0


def test_streams_one_tensor_at_a_time(models_root, tmp_path):
    """Tensors are produced only after header/KV/infos are on disk, each one after the
    previous was written and released: memory holds one tensor at a time."""
    import weakref

    folder = build_model("qwen3", models_root)
    out = tmp_path / "tiny-F16.gguf"
    partial = out.with_name(out.name + ".partial")
    state = {"sizes": [], "prev": None}

    def wrap(p: PlannedTensor) -> PlannedTensor:
        def produce():
            state["sizes"].append(partial.stat().st_size)
            assert state["prev"] is None or state["prev"]() is None, "previous tensor still alive"
            # a copy only the sink holds: the pipeline's Reader keeps its own small LRU of
            # source tensors on purpose (transforms.Reader), which is not the sink's doing
            t = p.produce().clone()
            state["prev"] = weakref.ref(t)
            return t
        return PlannedTensor(p.name, p.shape, p.dtype, produce)

    plan = [wrap(p) for p in pipeline_plan(folder)]
    gs.write_gguf(plan, hf_config(folder), folder, out, "fp16", name="tiny")
    sizes = state["sizes"]
    assert len(sizes) == len(plan)  # every tensor produced exactly once (tied lm_head is not in the plan)
    assert sizes[0] > 0 and all(b > a for a, b in zip(sizes, sizes[1:]))
    assert out.is_file() and not partial.exists()


@pytest.mark.parametrize("gtype", ["q8_0", "fp16"])
def test_tensors_taken_as_they_are_stream_in_row_pieces(gtype, models_root, tmp_path, monkeypatch):
    """The embedding (the largest tensor of most models) is never held whole: its rows are
    read, encoded and written a piece at a time, and the file is byte-identical to one
    written from whole tensors."""
    import dataclasses

    folder = build_model("qwen3", models_root)
    monkeypatch.setattr(writer, "CHUNK_ELEMS", 64 * 7)  # 7 rows of the 64-wide embedding per piece
    pieces: list[tuple[int, int]] = []

    def watch(p: PlannedTensor) -> PlannedTensor:
        if p.name != "model.embed_tokens.weight":
            return p
        assert p.produce_rows is not None

        def rows(start: int, stop: int) -> torch.Tensor:
            pieces.append((start, stop))
            return p.produce_rows(start, stop)

        def whole() -> torch.Tensor:
            raise AssertionError("the embedding was read whole")

        return dataclasses.replace(p, produce=whole, produce_rows=rows)

    streamed = tmp_path / "streamed.gguf"
    gs.write_gguf([watch(p) for p in pipeline_plan(folder)], hf_config(folder), folder, streamed, gtype, name="tiny")
    whole = tmp_path / "whole.gguf"
    gs.write_gguf([dataclasses.replace(p, produce_rows=None) for p in pipeline_plan(folder)], hf_config(folder), folder,
                  whole, gtype, name="tiny")

    n_rows = hf_config(folder)["vocab_size"]
    assert pieces[0][0] == 0 and pieces[-1][1] == n_rows and len(pieces) == math.ceil(n_rows / 7)
    assert all(b - a <= 7 and b == c for (a, b), (c, _) in zip(pieces, pieces[1:] + [(n_rows, None)]))
    assert hashlib.sha256(streamed.read_bytes()).hexdigest() == hashlib.sha256(whole.read_bytes()).hexdigest()


def test_source_dtype_is_the_default(models_root, tmp_path):
    import gguf

    folder = build_model("qwen3", models_root)
    out = tmp_path / "x.gguf"
    plan = [PlannedTensor(p.name, p.shape, torch.bfloat16, (lambda p=p: p.produce().to(torch.bfloat16)))
            for p in pipeline_plan(folder)]
    rep = gs.write_gguf(plan, hf_config(folder), folder, out, None, name="tiny")
    assert rep["gguf_type"] == "bf16"
    t = {x.name: x.tensor_type for x in _reader(out).tensors}
    assert t["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.BF16


def test_modelfile(models_root, tmp_path):
    folder = build_model("qwen3", models_root)
    path = gs.write_modelfile(tmp_path, "tiny-Q8_0.gguf", folder)
    text = path.read_text()
    assert text.startswith("FROM ./tiny-Q8_0.gguf\n")
    assert 'TEMPLATE """' in text and "<|im_start|>assistant" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    folder = build_model("gemma3", models_root)  # no chat template: no TEMPLATE, stops from eos
    text = gs.write_modelfile(tmp_path, "g.gguf", folder).read_text()
    assert "TEMPLATE" not in text and 'PARAMETER stop "<|endoftext|>"' in text


# --------------------------------------------------------------------------- refusals


def _assert_three_lines(err: EfexportError, *needles: str) -> None:
    lines = str(err).split("\n")
    assert len(lines) == 3 and lines[0].startswith("Cannot ") and lines[1].startswith("Fix: ") and lines[2].startswith("See: ")
    for n in needles:
        assert n in str(err), (n, str(err))


@pytest.mark.parametrize("bad,needles", [
    ("int4", ("q4_k_m",)), ("int8", ("q8_0",)), ("q3_k_xl", ("q4_k_m", "fp16")),
])
def test_refuses_bad_types_before_any_work(bad, needles, models_root, tmp_path):
    folder = build_model("qwen3", models_root)
    produced = []
    plan = [PlannedTensor(p.name, p.shape, p.dtype, lambda: produced.append(1)) for p in pipeline_plan(folder)]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(EfexportError) as e:
        gs.write_gguf(plan, hf_config(folder), folder, out_dir / "x.gguf", bad, name="x")
    _assert_three_lines(e.value, *needles)
    assert not produced and not list(out_dir.iterdir())


def test_without_llama_cpp(models_root, monkeypatch, tmp_path):
    """K-quants name the extra before any work; everything else works without llama-cpp-python."""
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    folder = build_model("qwen3", models_root)
    with pytest.raises(EfexportError) as e:
        gs.check_gguf_request(hf_config(folder), "q4_k_m", folder)
    _assert_three_lines(e.value, "pip install 'efexport[gguf]'")
    assert gs.check_gguf_request(hf_config(folder), "q8_0", folder) == "qwen3"  # no extra needed
    out, rep = export(folder, tmp_path, "q8_0")
    assert out.is_file() and rep["file_type"] == "Q8_0"


@pytest.mark.parametrize("change,needle", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "beta_fast": 8.0,
                          "original_max_position_embeddings": 64}}, "beta_fast"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e6}}, "longrope"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}, "dynamic"),
    ({"architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe"}, "PhiMoEForCausalLM"),
    ({"hidden_act": "gelu"}, "gelu"),
])
def test_refuses_what_llama_cpp_cannot_express(change, needle, models_root, tmp_path):
    folder = build_model("qwen3", models_root)
    cfg = {**hf_config(folder), **change}
    with pytest.raises(EfexportError) as e:
        gs.write_gguf(pipeline_plan(folder), cfg, folder, tmp_path / "x.gguf", "fp16", name="x")
    _assert_three_lines(e.value, needle)
    assert not list(tmp_path.iterdir())


def test_refuses_moe_shapes_llama_cpp_lacks(models_root):
    cfg = hf_config(build_model("qwen3moe", models_root))
    folder = build_model("qwen3moe", models_root)
    for change, needle in (({"norm_topk_prob": False}, "norm_topk_prob"), ({"mlp_only_layers": [0]}, "mlp_only_layers")):
        with pytest.raises(EfexportError) as e:
            gs.check_gguf_request({**cfg, **change}, "fp16", folder)
        _assert_three_lines(e.value, needle)


def test_refuses_unrecognised_pre_tokenizer(models_root, tmp_path):
    folder = build_model("qwen3", models_root)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+|[^\s\p{L}]+"
    (tok_dir / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(EfexportError) as e:
        gs.check_gguf_request(hf_config(folder), "fp16", tok_dir)
    _assert_three_lines(e.value, "pre-tokenizer")


# --------------------------------------------------------------------------- other plan layouts and vocabularies


@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral"])
def test_fused_expert_layout_parity(arch, models_root, tmp_path):
    """transformers' in-memory MoE layout (3-D ``experts.gate_up_proj`` / ``down_proj``) writes the same GGUF."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    folder = build_model(arch, models_root)
    sd = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    plan = [PlannedTensor(k, tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in sd.items()]
    out = tmp_path / "fused.gguf"
    gs.write_gguf(plan, hf_config(folder), folder, out, "fp32", name="tiny")
    rel, top1 = parity(folder, out)
    assert rel <= PARITY_TOL[arch] and top1 == 1.0, (rel, top1)


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(fno: int, wt: int, payload) -> bytes:
    key = _pb_varint(fno << 3 | wt)
    if wt == 0:
        return key + _pb_varint(payload)
    if wt == 5:
        return key + np.float32(payload).tobytes()
    return key + _pb_varint(len(payload)) + payload


def write_sentencepiece_model(path: Path, pieces: list[tuple[str, float, int]], add_dummy_prefix: bool = True) -> None:
    """A minimal sentencepiece ModelProto (pieces, trainer_spec BPE + byte_fallback, normalizer_spec.add_dummy_prefix)."""
    body = b"".join(_pb(1, 2, _pb(1, 2, p.encode()) + _pb(2, 5, s) + _pb(3, 0, t)) for p, s, t in pieces)
    body += _pb(2, 2, _pb(3, 0, 2) + _pb(35, 0, 1))  # model_type=BPE, byte_fallback=true
    body += _pb(3, 2, _pb(1, 2, b"identity") + _pb(3, 0, int(add_dummy_prefix)))
    path.write_bytes(body)


SP_WORDS = ["▁", "t", "h", "e", "f", "o", "x", "▁t", "▁th", "▁the", "▁f", "▁fo", "▁fox"]


@pytest.fixture
def sp_tokenizer_dir(tmp_path) -> Path:
    d = tmp_path / "sp"
    d.mkdir()
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{i:02X}>", 0.0, 6) for i in range(256)]
    pieces += [(w, -float(i), 1) for i, w in enumerate(SP_WORDS)]
    write_sentencepiece_model(d / "tokenizer.model", pieces)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    return d


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sentencepiece_vocab(arch, sp_tokenizer_dir, models_root, tmp_path):
    import gguf

    folder = build_model(arch, models_root)
    cfg = {**hf_config(folder), "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}  # ids from the pieces
    out = tmp_path / "sp.gguf"
    rep = gs.write_gguf(pipeline_plan(folder), cfg, sp_tokenizer_dir, out, "fp16", name="tiny")
    assert rep["tokenizer_model"] == "llama"
    r = _reader(out)
    assert _field(r, "tokenizer.ggml.model") == "llama" and _field(r, "tokenizer.ggml.pre") == "default"
    tokens, scores, types = (_field(r, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    n_sp = 3 + 256 + len(SP_WORDS)
    assert len(tokens) == VOCAB and tokens[n_sp - 1] == "▁fox" and tokens[n_sp] == f"[PAD{n_sp}]"
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL and types[3] == gguf.TokenType.BYTE
    assert types[n_sp] == gguf.TokenType.UNUSED and scores[n_sp] == -10000.0 and scores[n_sp - 1] == -(len(SP_WORDS) - 1)
    assert int(_field(r, "tokenizer.ggml.bos_token_id")) == 1 and bool(_field(r, "tokenizer.ggml.add_bos_token"))
    assert int(_field(r, "tokenizer.ggml.eos_token_id")) == 2 and int(_field(r, "tokenizer.ggml.unknown_token_id")) == 0
    if arch == "gemma3":
        assert _field(r, "tokenizer.ggml.add_space_prefix") is False
    pytest.importorskip("llama_cpp")
    ids = gs.llama_cpp_tokenize(out, "the fox")
    if arch == "llama":
        assert ids == [1, tokens.index("▁the"), tokens.index("▁fox")]
    else:  # no space prefix: "the" is spelled from pieces
        assert ids[0] == 1 and ids[-1] == tokens.index("▁fox")
