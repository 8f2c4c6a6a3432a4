"""K-quants written directly are the file llama.cpp's ``llama_model_quantize`` makes from our F16 GGUF.

``q4_k_m``, ``q5_k_m`` and ``q6_k`` no longer go through an F16 file: the sink orders
and types the tensors as llama.cpp's quantizer would and quantizes row blocks with its
own ``ggml_quantize_chunk``. The reference here is the old path itself: our ``fp16``
GGUF of the same run, quantized by ``llama_cpp.llama_model_quantize``. For every GGUF
fixture (qwen3 / llama / gemma3, plain, dense LoRA merged, native MoE: qwen3moe and
mixtral) at two widths (256-multiple rows, where the K types apply, and 64-wide rows,
where llama.cpp's fallbacks do), plus rows of 80 (fallback to F16), the two files must
agree key by key and tensor by tensor (name, type, shape, bytes) and, as a whole, byte
for byte. Row blocks: the quantizer never sees more than a block of rows in float32,
and block size and thread count do not change a byte.
"""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.runs import default_vocab_size, make_run, write_tokenizer

from converter.pipeline import open_pipeline
from converter.plan import PlannedTensor
import converter.sinks.gguf as gs
from converter.sinks.gguf import ggml, kquants, writer
from converter.sinks.gguf.quant import nbytes

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

Q = gguf.GGMLQuantizationType
KQUANTS = ("q4_k_m", "q5_k_m", "q6_k")
FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
          "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
# every (backbone, strategy) the GGUF sink writes: dense and native MoE (qwen3moe; mixtral is llama with experts)
GGUF_RUNS = [("qwen3", "none"), ("llama", "none"), ("gemma3", "none"), ("qwen3", "dense_lora"), ("llama", "dense_lora"),
             ("gemma3", "dense_lora"), ("qwen3", "moe_expert_lora"), ("llama", "moe_expert_lora")]
WIDTHS = {
    "wide": {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64},  # rows of 256 / 512: K blocks
    "narrow": {},  # rows of 64 / 128: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0
}


def llama_model_quantize(src: Path, dst: Path, gguf_type: str) -> None:
    """The old path's second step: llama.cpp's quantizer on an F16 GGUF (it logs to stderr; pytest keeps that)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[gguf_type])
    params.nthread = max(1, os.cpu_count() or 1)
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    assert dst.is_file()


def write(run_path: Path, out: Path, gguf_type: str, **kw) -> dict:
    pipe = open_pipeline(run_path)
    try:
        return gs.write_gguf(pipe.target.plan, pipe.target.hf_config, pipe.tokenizer_dir(), out, gguf_type,
                             name="tiny", metadata={"base_model": "org/tiny-base", "license": "apache-2.0"}, **kw)
    finally:
        pipe.close()


def old_and_new(run_path: Path, tmp: Path, gguf_type: str) -> tuple[Path, Path]:
    f16 = tmp / "tiny-F16.gguf"
    if not f16.is_file():
        write(run_path, f16, "fp16")
    ref = tmp / f"ref-{gguf_type}.gguf"
    llama_model_quantize(f16, ref, gguf_type)
    new = tmp / f"new-{gguf_type}.gguf"
    report = write(run_path, new, gguf_type)
    counts: dict[str, int] = {}
    for t in tensor_items(ref):
        counts[t[1]] = counts.get(t[1], 0) + 1
    assert report["tensor_types"] == dict(sorted(counts.items()))  # the type mix recorded is the file's
    return ref, new


def kv_items(path: Path) -> list[tuple[str, int, object]]:
    r = gguf.GGUFReader(str(path))
    out = []
    for k, f in r.fields.items():
        if k.startswith("GGUF."):  # the header (version, counts), compared with the whole file
            continue
        value = f.contents()
        out.append((k, int(f.types[0]) if f.types else -1, value))
    return out


def tensor_items(path: Path) -> list[tuple[str, str, list[int], str]]:
    r = gguf.GGUFReader(str(path))
    return [(t.name, t.tensor_type.name, [int(s) for s in t.shape],
             hashlib.sha256(np.ascontiguousarray(t.data).view(np.uint8).tobytes()).hexdigest()) for t in r.tensors]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_file(new: Path, ref: Path) -> None:
    assert kv_items(new) == kv_items(ref)
    got, want = tensor_items(new), tensor_items(ref)
    assert [t[0] for t in got] == [t[0] for t in want]  # names, in llama.cpp's order
    for g, w in zip(got, want):
        assert g == w, (g[:3], w[:3])
    assert sha(new) == sha(ref)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(backbone, strategy, width) -> run path, built once for the module."""
    root = tmp_path_factory.mktemp("kquant_runs")
    cache: dict[tuple, Path] = {}

    def get(backbone: str, strategy: str, width: str, **kw) -> Path:
        key = (backbone, strategy, width, repr(sorted(kw.items())))
        if key not in cache:
            path = root / "-".join(map(str, key[:3] + (len(cache),)))
            make_run(path, backbone, strategy, config_overrides={**WIDTHS.get(width, {}), **kw.pop("overrides", {})},
                     **kw)
            cache[key] = path
        return cache[key]

    return get


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("backbone,strategy", GGUF_RUNS)
def test_kquants_are_llama_model_quantize_of_our_f16(runs, tmp_path, backbone, strategy, width):
    run = runs(backbone, strategy, width)
    seen: dict[str, set[str]] = {}
    for gtype in KQUANTS:
        ref, new = old_and_new(run, tmp_path, gtype)
        assert_same_file(new, ref)
        seen[gtype] = {t[1] for t in tensor_items(new)}
    if width == "wide":  # the K types and the Q6_K bumps really occur
        assert {"Q4_K", "Q6_K"} <= seen["q4_k_m"] and {"Q5_K", "Q6_K"} <= seen["q5_k_m"] and "Q6_K" in seen["q6_k"]
    else:
        assert {"Q5_0", "Q8_0"} <= seen["q4_k_m"] and "Q5_1" in seen["q5_k_m"] and "Q8_0" in seen["q6_k"]
        assert not ({"Q4_K", "Q5_K"} & (seen["q4_k_m"] | seen["q5_k_m"]))


def test_bf16_merged_run_rounds_through_f16_as_the_f16_file_did(runs, tmp_path):
    """A bf16 run with LoRA merged in float32: values pass through float16 exactly as the F16 file held them."""
    run = runs("qwen3", "dense_lora", "wide", dtype=torch.bfloat16)
    ref, new = old_and_new(run, tmp_path, "q4_k_m")
    assert_same_file(new, ref)


def test_rows_that_fit_no_block_fall_back_to_f16(runs, tmp_path):
    """ffn_down rows of 80 fit neither a 256 nor a 32 block: llama.cpp keeps them F16, and so do we."""
    run = runs("llama", "dense_lora", "rows80", overrides={"intermediate_size": 80})
    for gtype in KQUANTS:
        ref, new = old_and_new(run, tmp_path, gtype)
        assert_same_file(new, ref)
        types = {t[0]: t[1] for t in tensor_items(new)}
        assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] != "F16"


@pytest.mark.parametrize("what,backbone,strategy,kw", [
    # 80 layers, fewer kv heads than heads: llama.cpp types the model 70B and bumps attn_v Q4_K -> Q5_K
    # (narrow rows, so it shows as Q5_1 where the others fall back to Q5_0)
    ("70B", "llama", "none", {"overrides": {"num_hidden_layers": 80}}),
    # 8 experts (Mixtral 8x7B's count): attn_v / attn_k -> Q8_0, attn_output -> Q5_K
    ("8 experts", "llama", "moe_expert_lora", {"num_experts": 8}),
])
def test_model_size_and_expert_count_rules(what, backbone, strategy, kw, runs, tmp_path):
    run = runs(backbone, strategy, "wide" if what == "8 experts" else "narrow", **kw)
    ref, new = old_and_new(run, tmp_path, "q4_k_m")
    assert_same_file(new, ref)
    types = {t[0]: t[1] for t in tensor_items(new)}
    if what == "70B":  # on the layers use_more_bits leaves alone
        plain = [i for i in range(80) if not kquants.use_more_bits(i, 80)]
        assert plain and {types[f"blk.{i}.attn_v.weight"] for i in plain} == {"Q5_1"}
        assert {types[f"blk.{i}.attn_q.weight"] for i in plain} == {"Q5_0"}
    else:
        assert types["blk.0.attn_k.weight"] == types["blk.0.attn_v.weight"] == "Q8_0"
        assert types["blk.0.attn_output.weight"] == "Q5_K"


def test_use_more_bits_over_many_layers(runs, tmp_path):
    """Ten layers: attn_v / ffn_down get Q6_K on exactly llama.cpp's layers (first and last eighth, every third)."""
    run = runs("qwen3", "none", "wide", overrides={"num_hidden_layers": 10})
    for gtype in ("q4_k_m", "q5_k_m"):
        ref, new = old_and_new(run, tmp_path, gtype)
        assert_same_file(new, ref)
    types = {t[0]: t[1] for t in tensor_items(new)}
    bumped = [i for i in range(10) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert bumped == [i for i in range(10) if kquants.use_more_bits(i, 10)] and 0 < len(bumped) < 10


# the other families the sink writes, as plain Hugging Face folders (wide rows): config class, extra config
FAMILY_CASES = {
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=None, head_dim=64)),
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, head_dim=64, query_pre_attn_scalar=48, sliding_window=4,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=10.0)),
    "phi3": ("Phi3Config", dict(sliding_window=None, max_position_embeddings=256)),  # fused attn_qkv, ffn_up
}


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_other_families(family, tmp_path):
    import transformers

    cfg_cls, extra = FAMILY_CASES[family]
    folder = tmp_path / family
    write_tokenizer(folder)
    cfg = getattr(transformers, cfg_cls)(**{
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "vocab_size": default_vocab_size(),
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **extra})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    for gtype in KQUANTS:
        ref, new = old_and_new(folder, tmp_path, gtype)
        assert_same_file(new, ref)


def big_plan(rows: int, cols: int) -> tuple[list[PlannedTensor], dict]:
    """A tiny qwen3 whose embedding (the tensor under test) has ``rows`` x ``cols`` bf16 values."""
    g = torch.Generator().manual_seed(7)
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": cols, "intermediate_size": cols,
           "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": cols,
           "vocab_size": rows, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 64,
           "rope_theta": 1e6}
    shapes = {"model.embed_tokens.weight": (rows, cols), "model.norm.weight": (cols,)}
    for p in ("q", "k", "v", "o"):
        shapes[f"model.layers.0.self_attn.{p}_proj.weight"] = (cols, cols)
    for p in ("gate", "up", "down"):
        shapes[f"model.layers.0.mlp.{p}_proj.weight"] = (cols, cols)
    for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
        shapes[f"model.layers.0.{n}.weight"] = (cols,)
    tensors = {n: (torch.randn(s, generator=g) * 0.05).to(torch.bfloat16) for n, s in shapes.items()}
    plan = [PlannedTensor(n, tuple(t.shape), t.dtype, (lambda t=t: t),
                          produce_rows=(lambda a, b, t=t: t[a:b]) if t.ndim == 2 else None) for n, t in tensors.items()]
    return plan, cfg


def test_only_a_row_block_is_ever_float32(runs, tmp_path, monkeypatch):
    """An embedding of 4096 x 256 (4 MB of float32) quantized in blocks of 32 rows: every call into llama.cpp's
    quantizer gets at most a block, the blocks cover the tensor once, in order, and the Python-side float32 /
    float16 / output buffers (numpy, traced) stay far below the tensor; block size and thread count change no byte."""
    tok = runs("qwen3", "none", "narrow")  # any tokenizer folder: the vocabulary is padded to the model's
    plan, cfg = big_plan(4096, 256)
    base = tmp_path / "blocks-default.gguf"
    gs.write_gguf(plan, cfg, tok / "final", base, "q4_k_m", name="big")

    calls: list[tuple[int, int]] = []
    real = ggml.quantize_rows

    def watched(qtype: int, rows: np.ndarray) -> np.ndarray:
        calls.append(rows.shape)
        return real(qtype, rows)

    monkeypatch.setattr(ggml, "quantize_rows", watched)
    monkeypatch.setattr(writer, "BLOCK_ELEMS", 32 * 256)
    small = tmp_path / "blocks-32.gguf"
    tracemalloc.start()
    try:
        gs.write_gguf(plan, cfg, tok / "final", small, "q4_k_m", name="big", threads=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"row blocks: {len(calls)}, traced peak {peak / 2**10:.0f} KiB")
    assert max(n for n, _ in calls) <= 32 and {k for _, k in calls} == {256}
    assert sum(n for n, _ in calls) == 4096 + 7 * 256  # the embedding and the 7 matrices, each row once
    assert peak < 4096 * 256 * 4 // 4, peak  # well under the embedding's float32 size (4 MB)
    assert sha(small) == sha(base)


def test_row_block_quantizer_is_ggml_quantize_chunk_on_the_whole_tensor(tmp_path):
    """Blocks over threads equal one call over all rows (no importance matrix: rows are independent)."""
    rows = torch.randn(1000, 512, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q5_0, Q.Q5_1):
        whole = ggml.quantize_rows(int(qtype), rows.float().numpy().astype(np.float16).astype(np.float32))
        with ggml.RowQuantizer(threads=3) as rq:
            pieces = (rows[i:i + 37] for i in range(0, 1000, 37))
            blocks = b"".join(b.tobytes() for b in rq.encode(pieces, qtype, Q.F16))
        assert blocks == whole.tobytes()
        assert len(blocks) == nbytes((1000, 512), qtype)


def test_missing_ggml_library_is_refused_before_writing(runs, tmp_path, monkeypatch):
    """llama-cpp-python without its ggml library: the three-line error, and no file."""
    from helpers import assert_three_lines

    from converter.errors import EfexportError

    run = runs("qwen3", "none", "narrow")
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(tmp_path / "nowhere"))
    ggml.ggml_base.cache_clear()
    try:
        with pytest.raises(EfexportError) as e:
            write(run, tmp_path / "out" / "x.gguf", "q4_k_m")
    finally:
        ggml.ggml_base.cache_clear()
    assert_three_lines(e.value)
    assert "libggml-base" in str(e.value) and "pip install 'efexport[gguf]'" in str(e.value)
    assert not list((tmp_path / "out").glob("*"))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # writing the F16 reference file
def test_values_beyond_float16_fail_as_llama_cpp_fails(runs, tmp_path):
    """A weight of 1e6 is infinite in the F16 file: llama.cpp's quantizer refuses that file, the direct path
    refuses too (three lines, no file left) instead of writing a broken one."""
    from helpers import assert_three_lines

    from converter.errors import EfexportError

    tok = runs("qwen3", "none", "narrow") / "final"
    plan, cfg = big_plan(512, 256)

    def huge(p: PlannedTensor) -> PlannedTensor:
        return PlannedTensor(p.name, p.shape, p.dtype, lambda: p.produce().clone().index_fill_(0, torch.tensor([3]), 1e6))

    plan = [huge(p) if "q_proj" in p.name else p for p in plan]
    f16 = tmp_path / "big-F16.gguf"
    gs.write_gguf(plan, cfg, tok, f16, "fp16", name="big")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp_path / "ref.gguf").encode(), params) != 0
    out = tmp_path / "out"
    with pytest.raises(EfexportError) as e:
        gs.write_gguf(plan, cfg, tok, out / "big-Q4_K_M.gguf", "q4_k_m", name="big")
    assert_three_lines(e.value)
    assert "float16's range" in str(e.value) and not list(out.iterdir())
