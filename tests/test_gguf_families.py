"""GGUF for Qwen2/2.5, Mistral (and Nemo's head_dim), Gemma 2 and Phi-3, proven in llama.cpp.

For each family a tiny random base is built from the transformers config class, an
all-linear LoRA adapter is made by PEFT, and the adapter folder is exported with
``--format gguf --base-model BASE`` through the package's own export. llama.cpp
(llama-cpp-python, f32 KV cache) must reproduce PEFT's ``merge_and_unload()`` logits;
each llama.cpp specific the sink applies (permute, ``1 + w``, folded query scale,
soft-capping, LongRoPE factors, partial rotary, fused-weight order), left out through
monkeypatch, must break that agreement.

The real-vocabulary tests use llama.cpp's own test vocabularies (``ggml-vocab-*.gguf``
with expected ids in ``.inp`` / ``.out``) from the llama-cpp-python sdist of the installed
version, fetched once by ``pip download`` into a cache folder; without pip or network they
are skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tarfile
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from fixtures.runs import default_vocab_size, probe_ids, write_tokenizer
from helpers import assert_three_lines

from converter.errors import EfexportError
from converter.export import ExportOptions, export
from converter.pipeline import open_pipeline
import converter.sinks.gguf as gs
from converter.sinks.gguf import FAMILIES, families, metadata

pytestmark = pytest.mark.filterwarnings("ignore")

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
# rows a multiple of 256 so the K-quants apply to whole rows
WIDE = dict(SMALL, hidden_size=256, intermediate_size=512)


def phi3_longrope(rot_half: int) -> dict:
    """LongRoPE with short factors away from 1. llama.cpp picks the long factors when its (padded, 256) context
    exceeds the original one, transformers when the sequence does: with 256 both use the short ones here."""
    return {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 256, "long_factor": [1.0 + 0.5 * i for i in range(rot_half)],
            "short_factor": [1.0 + 0.25 * i for i in range(rot_half)]}


# name: (config class, HF architecture, GGUF architecture, extra config (small), extra config (wide))
CASES = {
    "qwen2": ("Qwen2Config", "qwen2", dict(tie_word_embeddings=True), {}),
    "mistral": ("MistralConfig", "llama", dict(sliding_window=None, head_dim=16), dict(head_dim=64)),
    # Mistral-Nemo's shape: head_dim 32 with hidden/heads 16
    "mistral-nemo": ("MistralConfig", "llama", dict(sliding_window=None, head_dim=32,
                                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}), {}),
    "gemma2": ("Gemma2Config", "gemma2", dict(
        num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0), dict(head_dim=64, query_pre_attn_scalar=48)),
    "phi3": ("Phi3Config", "phi3", dict(partial_rotary_factor=0.5, original_max_position_embeddings=256,
                                        max_position_embeddings=1024, rope_parameters=phi3_longrope(4)),
             dict(rope_parameters=phi3_longrope(16))),
}
TOL = {"gemma2": 5e-3}  # ggml's CPU GELU goes through an fp16 table; 1e-3 for the others


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf_families")


def _randomize(model, gemma: bool, scale: float) -> None:
    """Seeded weights large enough for peaked logits; norms away from identity (gemma stores w for 1 + w)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                noise = 0.3 * torch.randn(p.shape, generator=g)
                p.copy_(noise if gemma else 1.0 + noise)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]) * scale)


@lru_cache(maxsize=None)
def family_case(name: str, root: str, wide: bool = False) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    """(base folder, PEFT adapter folder, probe ids [2, 12], PEFT's merged float32 logits on them)."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg_cls, _, small, wide_extra = CASES[name]
    base = Path(root) / f"{name}-{'wide' if wide else 'small'}"
    write_tokenizer(base)
    kw = {**(WIDE if wide else SMALL), **small, **(wide_extra if wide else {}), "vocab_size": default_vocab_size()}
    cfg = getattr(transformers, cfg_cls)(**kw, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    _randomize(model, name == "gemma2", 0.7 if wide else 1.5)
    model.save_pretrained(base)
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
        base, dtype=torch.float32, attn_implementation="eager")
    peft_model = get_peft_model(load(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=False))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    adapter = Path(root) / f"{name}-{'wide' if wide else 'small'}-adapter"
    peft_model.save_pretrained(adapter)
    ids = probe_ids(base)
    merged = PeftModel.from_pretrained(load(), str(adapter)).merge_and_unload().eval()
    with torch.no_grad():
        ref = merged(input_ids=ids).logits.float()
    return base, adapter, ids, ref


def export_gguf(name: str, root: Path, out: Path, precision: str, wide: bool = False) -> tuple[Path, dict]:
    base, adapter, _, _ = family_case(name, str(root), wide)
    record = export(ExportOptions(run=str(adapter), out=out, fmt="gguf", precision=precision, base_model=str(base),
                                  name="tiny", progress=False)).record
    files = sorted(out.glob("*.gguf"))
    assert len(files) == 1, files
    return files[0], record


def llama_cpp_vs_peft(name: str, root: Path, gguf_file: Path, wide: bool = False) -> tuple[float, float, float]:
    """(max |Δlogit| / max |logit|, max |Δlogit|, top-1 agreement) of llama.cpp against PEFT's merge."""
    _, _, ids, ref = family_case(name, str(root), wide)
    got = torch.stack([gs.llama_cpp_logits(gguf_file, row.tolist()) for row in ids])
    diff = float((got - ref).abs().max())
    return diff / float(ref.abs().max()), diff, float((got.argmax(-1) == ref.argmax(-1)).float().mean())


# --------------------------------------------------------------------------- parity in llama.cpp


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_adapter_export_matches_peft_in_llama_cpp(name, root, tmp_path):
    pytest.importorskip("llama_cpp")
    gguf_file, record = export_gguf(name, root, tmp_path / "out", "fp32")
    rel, diff, top1 = llama_cpp_vs_peft(name, root, gguf_file)
    print(f"PARITY {name} fp32 max|Δ|={diff:.2e} rel={rel:.2e} top1={top1:.3f}")
    assert record["gguf"]["arch"] == CASES[name][1]
    assert record["parity"]["max_abs_logit_diff"] <= TOL.get(name, 1e-3) * record["parity"]["max_abs_logit"]
    assert rel <= TOL.get(name, 1e-3), rel
    assert top1 == 1.0


@pytest.mark.parametrize("name", ["qwen2", "mistral", "gemma2", "phi3"])
@pytest.mark.parametrize("precision,min_top1", [("q8_0", 0.9), ("q4_k_m", 0.6)])
def test_quantized_load_and_keep_top1(name, precision, min_top1, root, tmp_path):
    import gguf

    pytest.importorskip("llama_cpp")
    gguf_file, _ = export_gguf(name, root, tmp_path / "out", precision, wide=True)
    rel, diff, top1 = llama_cpp_vs_peft(name, root, gguf_file, wide=True)
    print(f"PARITY {name} {precision} max|Δ|={diff:.2e} rel={rel:.2e} top1={top1:.3f}")
    types = {t.tensor_type for t in gguf.GGUFReader(str(gguf_file)).tensors}
    assert (gguf.GGMLQuantizationType.Q8_0 if precision == "q8_0" else gguf.GGMLQuantizationType.Q4_K) in types
    assert top1 >= min_top1


def _write_direct(name: str, root: Path, out: Path) -> Path:
    """The adapter merged through the pipeline and written by the sink (no export-time parity gate)."""
    base, adapter, _, _ = family_case(name, str(root))
    with open_pipeline(adapter, base_model=str(base)) as pipe:
        gs.write_gguf(pipe.target.plan, pipe.target.hf_config, base, out, "fp32", name="tiny")
    return out


def _swap_halves(t: torch.Tensor, cfg: dict) -> torch.Tensor:
    return torch.cat(t.chunk(2, dim=0)[::-1])


def uncapped_gemma2(w, cfg: dict) -> None:
    """gemma2's keys with caps of 1e6: llama.cpp's gemma2 always soft-caps, and at these magnitudes 1e6 is none."""
    w.add_attn_logit_softcapping(1e6)
    w.add_final_logit_softcapping(1e6)
    w.add_sliding_window(int(cfg["sliding_window"]))
    w.add_sliding_window_pattern(families.gemma2_swa_layers(cfg))


NEGATIVE = {
    "mistral-nemo:no_permute": lambda mp: mp.setattr(families, "permute", lambda w, n_head, n_head_kv: w),
    "gemma2:no_norm_shift": lambda mp: mp.setitem(FAMILIES["gemma2"].transforms, "norm.weight", lambda t, cfg: t),
    "gemma2:no_q_fold": lambda mp: mp.setitem(FAMILIES["gemma2"].transforms, "self_attn.q_proj.weight",
                                              lambda t, cfg: t),
    "gemma2:no_softcap": lambda mp: mp.setitem(FAMILIES, "gemma2", dataclasses.replace(FAMILIES["gemma2"],
                                                                                      hparams=uncapped_gemma2)),
    "phi3:gate_up_swapped": lambda mp: mp.setitem(FAMILIES["phi3"].transforms, "mlp.gate_up_proj.weight", _swap_halves),
    "phi3:no_longrope_factors": lambda mp: mp.setitem(
        FAMILIES, "phi3", dataclasses.replace(FAMILIES["phi3"], extra_tensors=None)),
    "phi3:whole_head_roped": lambda mp: mp.setattr(metadata, "rotary_dims", lambda cfg: families.head_dim(cfg)),
}


@pytest.mark.parametrize("case", list(NEGATIVE))
def test_negative_controls_are_caught(case, root, tmp_path, monkeypatch):
    """Each llama.cpp specific of the new families, left out, breaks the agreement with PEFT."""
    pytest.importorskip("llama_cpp")
    name, _ = case.split(":")
    NEGATIVE[case](monkeypatch)
    out = _write_direct(name, root, tmp_path / "neg.gguf")
    try:
        rel, diff, top1 = llama_cpp_vs_peft(name, root, out)
    except ValueError as e:  # llama.cpp refuses the file (e.g. rope factors longer than the roped dimensions)
        print(f"NEGATIVE {case} not loadable: {e}")
        return
    print(f"NEGATIVE {case} rel={rel:.2e} top1={top1:.3f}")
    assert rel > 10 * TOL.get(name, 1e-3), (rel, top1)


# --------------------------------------------------------------------------- file contents and refusals


def test_reachable_for_every_family(root):
    """``check_gguf_request`` (what ``efexport inspect`` asks) names each family's llama.cpp architecture."""
    for name, (_, arch, _, _) in CASES.items():
        base, _, _, _ = family_case(name, str(root))
        assert gs.check_gguf_request(json.loads((base / "config.json").read_text()), "q8_0", base) == arch


def test_phi3_and_gemma2_keys(root, tmp_path):
    import gguf

    phi, _ = export_gguf("phi3", root, tmp_path / "phi", "fp16")
    r = gguf.GGUFReader(str(phi))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.")}
    assert f["phi3.rope.dimension_count"] == 8 and f["phi3.attention.key_length"] == 16  # partial rotary: half
    assert f["phi3.rope.scaling.original_context_length"] == 256
    assert f["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(1024 / 256) / math.log(256)))
    t = {x.name: x for x in r.tensors}
    assert list(t["rope_factors_short.weight"].data) == [1.0, 1.25, 1.5, 1.75]
    assert list(t["blk.0.attn_qkv.weight"].shape) == [64, 64 + 2 * 32] and list(t["blk.0.ffn_up.weight"].shape) == [64, 256]
    gem, _ = export_gguf("gemma2", root, tmp_path / "gem", "fp16")
    f = {k: v.contents() for k, v in gguf.GGUFReader(str(gem)).fields.items() if k.startswith("gemma2.")}
    assert f["gemma2.attn_logit_softcapping"] == 5.0 and f["gemma2.final_logit_softcapping"] == 10.0
    assert f["gemma2.attention.sliding_window"] == 4 and list(f["gemma2.attention.sliding_window_pattern"]) == [
        True, False, True]


@pytest.mark.parametrize("name,change,needle", [
    ("mistral", {"sliding_window": 4}, "sliding_window=4"),
    ("phi3", {"sliding_window": 1023}, "sliding_window=1023"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("gemma2", {"final_logit_softcapping": None}, "final_logit_softcapping"),
    ("gemma2", {"attn_logit_softcapping": None}, "attn_logit_softcapping"),
    ("gemma2", {"attention_bias": True}, "attention_bias"),
    ("phi3", {"rope_parameters": {**phi3_longrope(3)}}, "long_factor has 3 values"),
    ("phi3", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}}, "yarn"),
    ("qwen2", {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"}, "Qwen2MoeForCausalLM"),
    ("phi3", {"architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe"}, "PhiMoEForCausalLM"),
    ("mistral", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
])
def test_refuses_what_llama_cpp_cannot_express(name, change, needle, root):
    base, _, _, _ = family_case(name, str(root))
    cfg = {**json.loads((base / "config.json").read_text()), **change}
    with pytest.raises(EfexportError) as e:
        gs.check_gguf_request(cfg, "fp16", base)
    assert_three_lines(e.value)
    assert needle in str(e.value), str(e.value)


def test_a_phi3_name_without_phi3_tokens_is_refused(root, tmp_path):
    """llama.cpp looks up </s>, <unk>, <s>, <|endoftext|> for any model named like Phi-3: refused, not a broken file."""
    base, adapter, _, _ = family_case("phi3", str(root))
    with pytest.raises(EfexportError) as e:
        export(ExportOptions(run=str(adapter), out=tmp_path / "out", fmt="gguf", precision="fp16", base_model=str(base),
                             name="my-phi3-tune", progress=False))
    assert_three_lines(e.value)
    assert "--name" in str(e.value) and not (tmp_path / "out").exists()


def test_sentencepiece_style_tokenizer_json_without_model_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1}, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(EfexportError) as e:
        gs.check_gguf_request({**SMALL, "architectures": ["MistralForCausalLM"], "vocab_size": 8}, "fp16", tmp_path)
    assert_three_lines(e.value)
    assert "tokenizer.model" in str(e.value)


# --------------------------------------------------------------------------- real vocabularies

VOCABS = {  # llama.cpp test vocabulary: (kind, expected pre-tokenizer, family used for the tiny model)
    "qwen2": ("bpe", "qwen2", "qwen2"),
    "llama-bpe": ("bpe", "llama-bpe", "mistral"),
    "gpt-2": ("bpe", "gpt-2", "phi3"),
    "llama-spm": ("spm", "default", "mistral"),
    "phi-3": ("spm", "default", "phi3"),
}


@pytest.fixture(scope="session")
def llama_vocabs() -> Path:
    """llama.cpp's models/ggml-vocab-* of the installed llama-cpp-python's sdist, cached across sessions."""
    llama_cpp = pytest.importorskip("llama_cpp")
    cache = Path(os.environ.get("EFEXPORT_TEST_CACHE", Path.home() / ".cache" / "efexport-tests"))
    dest = cache / f"llama-cpp-python-{llama_cpp.__version__}-vocabs"
    names = [f"ggml-vocab-{v}.gguf{s}" for v in VOCABS for s in ("", ".inp", ".out")]
    if not all((dest / n).is_file() for n in names):
        sdist = cache / "sdist"
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={llama_cpp.__version__}", "-d", str(sdist)],
                           check=True, capture_output=True, timeout=300)
            archive = next(sdist.glob("llama_cpp_python-*.tar.gz"))
        except (OSError, subprocess.SubprocessError, StopIteration) as e:
            pytest.skip(f"llama.cpp's test vocabularies need the llama-cpp-python sdist (pip download failed: {e})")
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if "/vendor/llama.cpp/models/" in m.name and Path(m.name).name in names:
                    (dest / Path(m.name).name).write_bytes(tf.extractfile(m).read())  # type: ignore[union-attr]
    return dest


def expected(vocabs: Path, vocab: str) -> list[tuple[str, list[int]]]:
    texts = (vocabs / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = [[int(x) for x in line.split()] for line in (vocabs / f"ggml-vocab-{vocab}.gguf.out").read_text().splitlines()]
    return list(zip(texts, outs))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(fno: int, wt: int, payload) -> bytes:
    import struct

    key = _varint(fno << 3 | wt)
    if wt == 0:
        return key + _varint(payload)
    if wt == 5:
        return key + struct.pack("<f", payload)
    return key + _varint(len(payload)) + payload


def sentencepiece_model_from_gguf(vocab_file: Path, folder: Path) -> None:
    """A Llama-style ``tokenizer.model`` (BPE, byte fallback) holding a GGUF's SentencePiece pieces, typed as
    SentencePiece types them (0 unknown, 1-2 control); the GGUF's added tokens go to tokenizer_config.json."""
    import gguf

    r = gguf.GGUFReader(str(vocab_file))
    tokens, scores, types = (r.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type"))
    n = next((i for i, t in enumerate(tokens) if i > 258 and (t.startswith(("<|", "[PAD")))), len(tokens))
    kinds = [2 if i == 0 else 3 if i in (1, 2) else 6 if types[i] == 6 else 1 for i in range(n)]
    body = b"".join(_field(1, 2, _field(1, 2, tokens[i].encode()) + _field(2, 5, float(scores[i])) + _field(3, 0, kinds[i]))
                    for i in range(n))
    trainer = _field(3, 0, 2) + _field(35, 0, 1)  # model_type BPE, byte_fallback
    normalizer = _field(1, 2, b"identity") + _field(3, 0, 1) + _field(4, 0, 0) + _field(5, 0, 1)
    (folder / "tokenizer.model").write_bytes(body + _field(2, 2, trainer) + _field(3, 2, normalizer))
    added = {str(i): {"content": tokens[i], "special": True} for i in range(n, len(tokens)) if not tokens[i].startswith("[PAD")}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
         "added_tokens_decoder": added}))


@lru_cache(maxsize=None)
def vocab_folder(vocabs: str, vocab: str, root: str) -> Path:
    """A tokenizer folder for the vocabulary: HF's rebuild from the GGUF (BPE; slow, so kept beside the cached
    vocabularies) or a tokenizer.model (SentencePiece)."""
    import shutil

    folder = Path(root) / f"tok-{vocab}"
    if VOCABS[vocab][0] == "spm":
        folder.mkdir(parents=True, exist_ok=True)
        sentencepiece_model_from_gguf(Path(vocabs) / f"ggml-vocab-{vocab}.gguf", folder)
        return folder
    cached = Path(vocabs) / f"hf-{vocab}"
    if not (cached / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            AutoTokenizer.from_pretrained(vocabs, gguf_file=f"ggml-vocab-{vocab}.gguf").save_pretrained(cached)
        if vocab == "llama-bpe":  # Llama 3's tokenizer.json has "ignore_merges": true, which the GGUF does not carry
            tj = json.loads((cached / "tokenizer.json").read_text(encoding="utf-8"))
            tj["model"]["ignore_merges"] = True
            (cached / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    shutil.copytree(cached, folder)
    return folder


@pytest.mark.parametrize("vocab", list(VOCABS))
def test_real_vocabulary_tokenizes_as_expected_in_llama_cpp(vocab, llama_vocabs, root, tmp_path):
    """The sink identifies the pre-tokenizer of a real vocabulary and llama.cpp then splits every test text of
    llama.cpp's own suite as the reference tokenizer does (HF's rebuild for BPE, sentencepiece for SPM)."""
    import transformers

    kind, pre, family = VOCABS[vocab]
    folder = vocab_folder(str(llama_vocabs), vocab, str(root))
    cases = expected(llama_vocabs, vocab)
    if kind == "bpe":
        ref = transformers.AutoTokenizer.from_pretrained(folder)
        reference = lambda text: ref(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    else:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        reference = lambda text: sp.encode(text)  # noqa: E731
    if kind == "bpe":
        n_vocab = len(ref)  # HF's rebuild may add a pad token after the GGUF's vocabulary
    else:
        added = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
        n_vocab = max([sp.vocab_size() - 1, *map(int, added)]) + 1
    cfg_cls = CASES[family][0]
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **CASES[family][2]}, vocab_size=n_vocab)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)  # the tiny model at the real vocabulary size, next to its tokenizer
    plan = _plan(folder)
    out = tmp_path / f"{vocab}.gguf"
    report = gs.write_gguf(plan, json.loads((folder / "config.json").read_text()), folder, out, "fp16", name="v")
    assert report["tokenizer_pre"] == pre
    agree_ref = sum(reference(text) == ids for text, ids in cases)
    got = gs.llama_cpp_tokenize_all(out, [text for text, _ in cases], add_special=False, parse_special=False)
    agree_llama = sum(g == ids for g, (_, ids) in zip(got, cases))
    same = sum(g == reference(text) for g, (text, _) in zip(got, cases))
    print(f"TOKENIZER {vocab} pre={report['tokenizer_pre']} llama.cpp=expected {agree_llama}/{len(cases)} "
          f"reference=expected {agree_ref}/{len(cases)} llama.cpp=reference {same}/{len(cases)}")
    assert agree_llama == len(cases) and same == len(cases)


def _plan(folder: Path):
    pipe = open_pipeline(folder)
    try:
        return [dataclasses.replace(p, produce=(lambda t=p.produce(): t), produce_rows=None) for p in pipe.target.plan]
    finally:
        pipe.close()
