"""Fine-tunes that added tokens: resized vocabularies through --format hf, gguf and peft (issue 21).

Each base is a tiny Llama with a real vocabulary (GPT-2's, rebuilt by transformers from
llama.cpp's own test vocabulary, as in test_gguf_families.py). Each adapter is made the way
PEFT asks: tokens added (two special, one not), ``resize_token_embeddings``, then a LoRA with
``modules_to_save``, ``trainable_token_indices`` or LoRA on the embedding, on tied and untied
bases, saved with and without the embedding layers PEFT adds for a resized vocabulary. The
reference is PEFT's own path on the resized base (``merge_and_unload()``); the probe ids hold
every added token. Run with -s for the table of measured differences.
"""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from fixtures.added_tokens import (ADDED_PLAIN, ADDED_SPECIAL, CHAT_TEMPLATE, TEXT, eulerforge_run, make_adapter,
                                   peft_logits, peft_merged, probe, tiny_base)
from helpers import assert_three_lines
from test_gguf_families import llama_vocabs, vocab_folder  # noqa: F401  (llama_vocabs is a fixture)

from converter import load_model
from converter.card import load_template, render_card
from converter.errors import EfexportError
from converter.export import ExportOptions, export
from converter.pipeline import open_pipeline

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

# name: (kind, tied base, save_embedding_layers, pad_to_multiple_of)
CASES = {
    "modules_to_save-untied": ("modules_to_save", False, True, None),
    "modules_to_save-tied": ("modules_to_save", True, False, None),
    "trainable_tokens-untied": ("trainable_tokens", False, False, None),
    "trainable_tokens-tied": ("trainable_tokens", True, True, None),
    "embedding_lora-untied": ("embedding_lora", False, True, 64),
    "embedding_lora-tied": ("embedding_lora", True, True, 64),
}
HF_TOL, GGUF_TOL = 1e-4, 1e-3  # of max |logit|
REPORT: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    yield tmp_path_factory.mktemp("added_tokens")
    # the measured table, once the module's tests ran (see it with -s)
    print(f"\n{'case':42s} {'hf':>9s} {'gguf':>9s} {'peft':>9s} {'peft-vs-peft':>13s}")
    for name, row in REPORT.items():
        cells = [f"{row[k]:.2e}" if k in row else "-" for k in ("hf", "gguf", "peft", "peft-vs-peft")]
        print(f"{name:42s} {cells[0]:>9s} {cells[1]:>9s} {cells[2]:>9s} {cells[3]:>13s}")


@pytest.fixture(scope="module")
def vocab(llama_vocabs, root) -> Path:  # noqa: F811
    return vocab_folder(str(llama_vocabs), "gpt-2", str(root))


@lru_cache(maxsize=None)
def base_model(root: str, vocab: str, tied: bool) -> Path:
    return tiny_base(Path(root) / f"base-{'tied' if tied else 'untied'}", Path(vocab), tied=tied)


@lru_cache(maxsize=None)
def case(name: str, root: str, vocab: str, saved: bool | None = None) -> tuple[Path, Path, torch.Tensor, torch.Tensor,
                                                                               torch.nn.Module]:
    """(base, adapter, probe ids, PEFT's merged logits on them, PEFT's merged model)."""
    kind, tied, default_saved, pad = CASES[name]
    saved = default_saved if saved is None else saved
    base = base_model(root, vocab, tied)
    adapter = make_adapter(base, Path(root) / f"{name}-{int(saved)}", kind, save_embedding_layers=saved,
                           pad_to_multiple_of=pad)
    ids = probe(tokenizer(adapter))
    merged = peft_merged(base, adapter, pad_to_multiple_of=pad, n_tokens=len(tokenizer(adapter)))
    with torch.no_grad():
        ref = merged(input_ids=ids.view(1, -1)).logits[0].float()
    return base, adapter, ids, ref, merged


@lru_cache(maxsize=None)
def tokenizer(folder: Path):
    """A tokenizer loaded once (a real vocabulary takes a moment)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def hf_logits(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=ids.view(1, -1)).logits[0].float(), model.config


# --------------------------------------------------------------------------- --format hf


@pytest.mark.parametrize("name", list(CASES))
def test_hf_export_equals_peft_on_the_added_tokens(name, root, vocab, tmp_path):
    base, adapter, ids, ref, merged = case(name, str(root), str(vocab))
    tied_after = merged.get_input_embeddings().weight is merged.get_output_embeddings().weight
    out = tmp_path / "hf"
    verify = name == "modules_to_save-untied"  # the export's own parity once; PEFT is the reference here
    record = export(ExportOptions(run=str(adapter), out=out, fmt="hf", base_model=str(base), progress=False,
                                  verify=verify)).record
    got, config = hf_logits(out, ids)
    r = rel(got, ref)
    REPORT.setdefault(name, {})["hf"] = r
    print(f"HF {name}: vocab {config.vocab_size} tied {config.tie_word_embeddings} max|Δ|/max|logit| {r:.2e}")
    assert config.vocab_size == ref.shape[-1] and got.shape == ref.shape
    assert bool(config.tie_word_embeddings) is tied_after  # PEFT's merge unties modules_to_save, keeps the others
    assert r <= HF_TOL, r
    if verify:
        assert record["parity"]["max_abs_logit_diff"] <= HF_TOL * record["parity"]["max_abs_logit"]
    # the artifact's tokenizer is the adapter's: same ids for text with the new tokens, flags and chat template kept
    mine, theirs = tokenizer(out), tokenizer(adapter)
    assert mine(TEXT)["input_ids"] == theirs(TEXT)["input_ids"] and len(mine) == len(theirs)
    flags = {t.content: t.special for t in mine.added_tokens_decoder.values()}
    assert all(flags[t] for t in ADDED_SPECIAL) and not any(flags[t] for t in ADDED_PLAIN)
    assert mine.chat_template == CHAT_TEMPLATE


def test_rows_the_adapter_does_not_carry_are_the_resize_mean(root, vocab):
    """Embedding LoRA saved without the embedding (a Hub base offline): PEFT's path samples the new rows around the
    old rows' mean (covariance scaled by 1e-9), so two PEFT runs differ; efexport writes the mean and lands within
    that spread, while every row PEFT's path fixes is exact."""
    name = "embedding_lora-tied"
    base, adapter, ids, ref, merged = case(name, str(root), str(vocab), saved=False)
    other = peft_logits(base, adapter, ids, pad_to_multiple_of=CASES[name][3], seed=7, n_tokens=len(tokenizer(adapter)))
    loaded = load_model(adapter, base_model=str(base), device="cpu", dtype="float32")  # the pipeline --format hf runs
    with torch.no_grad():
        mine = rel(loaded.model(input_ids=ids.view(1, -1)).logits[0].float(), ref)
    emb, ref_emb = loaded.model.get_input_embeddings().weight, merged.get_input_embeddings().weight
    old = len(tokenizer(base))
    assert torch.equal(emb[:old], ref_emb[:old])
    new_rows = float((emb[old:] - ref_emb[old:]).abs().max() / ref_emb[:old].std())
    spread = rel(other, ref)
    REPORT["embedding_lora-tied (embedding not saved)"] = {"hf": mine, "peft-vs-peft": spread}
    print(f"NOT CARRIED new rows {new_rows:.2e} σ, efexport {mine:.2e}, PEFT vs PEFT {spread:.2e}")
    assert new_rows < 1e-3
    assert mine <= 2 * spread and mine <= GGUF_TOL


# --------------------------------------------------------------------------- --format gguf


@pytest.mark.parametrize("name", list(CASES))
def test_gguf_equals_peft_in_llama_cpp_and_tokenizes_the_same(name, root, vocab, tmp_path):
    import converter.sinks.gguf as gs

    pytest.importorskip("llama_cpp")
    base, adapter, ids, ref, _ = case(name, str(root), str(vocab))
    if name == "modules_to_save-untied":  # the whole export once; the others through the same sink directly
        export(ExportOptions(run=str(adapter), out=tmp_path / "g", fmt="gguf", precision="fp32", base_model=str(base),
                             name="tiny", progress=False, verify=False))
        out = next((tmp_path / "g").glob("*.gguf"))
    else:
        out = tmp_path / "tiny.gguf"
        with open_pipeline(adapter, base_model=str(base)) as pipe:
            gs.write_gguf(pipe.target.plan, pipe.target.hf_config, pipe.tokenizer_dir(), out, "fp32", name="tiny")
    got = gs.llama_cpp_logits(out, ids.tolist())
    r = rel(got, ref)
    REPORT.setdefault(name, {})["gguf"] = r
    print(f"GGUF {name}: max|Δ|/max|logit| {r:.2e}")
    assert got.shape == ref.shape and r <= GGUF_TOL, r  # the vocabulary padded to the tensor rows
    tok = tokenizer(adapter)
    want = tok(TEXT, add_special_tokens=False)["input_ids"]
    special = {tok.convert_tokens_to_ids(t) for t in ADDED_SPECIAL}
    plain = {tok.convert_tokens_to_ids(t) for t in ADDED_PLAIN}
    assert gs.llama_cpp_tokenize(out, TEXT, add_special=False, parse_special=True) == want
    without = gs.llama_cpp_tokenize(out, TEXT, add_special=False, parse_special=False)
    # typed as llama.cpp's convert_hf_to_gguf.py types added tokens: special ones CONTROL (matched only when special
    # tokens are parsed), the others USER_DEFINED (always matched)
    assert not special & set(without) and plain <= set(without)


# --------------------------------------------------------------------------- an EulerForge run and --format peft


@pytest.fixture(scope="module")
def run(root, vocab) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    base = base_model(str(root), str(vocab), False)
    ckpt, logits, ids = eulerforge_run(base, Path(root) / "ef-run")
    return base, ckpt, ids, logits


def test_eulerforge_checkpoint_with_a_resized_embedding_exports(run, tmp_path):
    """config.json keeps the backbone's vocab_size; the embedding and the tokenizer have the added tokens."""
    _, ckpt, ids, ref = run
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] < ref.shape[-1]
    export(ExportOptions(run=str(ckpt), out=tmp_path / "hf", fmt="hf", progress=False, verify=False))
    got, config = hf_logits(tmp_path / "hf", ids)
    REPORT.setdefault("eulerforge run (modules_to_save-like)", {})["hf"] = rel(got, ref)
    assert config.vocab_size == ref.shape[-1] and rel(got, ref) <= HF_TOL


def test_peft_format_reloads_on_the_resized_base(run, tmp_path):
    """--format peft keeps the trained embedding and head as modules_to_save: PeftModel on the base resized to the
    tokenizer computes the run."""
    from transformers import AutoModelForCausalLM

    base, ckpt, ids, ref = run
    out = tmp_path / "peft"
    record = export(ExportOptions(run=str(ckpt), out=out, fmt="peft", progress=False)).record
    assert record["vocabulary"]["size"] == ref.shape[-1] == json.loads((out / "efexport.json").read_text())["vocabulary"]["size"]
    card = (out / "README.md").read_text()
    assert "resize_token_embeddings(len(tokenizer))" in card and "vLLM" in card  # the card tells how to load it
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["modules_to_save"]) == ["embed_tokens", "lm_head"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    model.resize_token_embeddings(len(tokenizer(out)))
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(model, str(out)).eval()(input_ids=ids.view(1, -1)).logits[0].float()
    REPORT.setdefault("eulerforge run (modules_to_save-like)", {})["peft"] = rel(got, ref)
    assert rel(got, ref) <= HF_TOL


def test_card_says_how_to_load_a_resized_adapter():
    record = {"strategy": "dense_lora", "layout": "peft_adapter", "precision": None, "dtype": "float32",
              "backbone": "llama", "architecture": "LlamaForCausalLM", "base_model": "org/base", "lora_config": None,
              "num_parameters": 1, "source": {"kind": "eulerforge_run"}, "files": {}, "parity": {"skipped": "x"},
              "created_with": {"efexport": "0"}, "vocabulary": {"base_size": 50257, "size": 50260}}
    card = render_card(load_template(None), record)
    assert "resize_token_embeddings(len(tokenizer))" in card and "50,257 to 50,260" in card and "vLLM" in card
    merged = render_card(load_template(None), {**record, "layout": "hf", "vocabulary": {"untied": True}})
    assert "tie_word_embeddings: false" in merged and "resize_token_embeddings" not in merged


# --------------------------------------------------------------------------- what does not add up


@pytest.mark.parametrize("name", ["modules_to_save-untied", "trainable_tokens-untied"])
def test_a_tokenizer_that_does_not_explain_the_rows_is_refused(name, root, vocab, tmp_path):
    base, adapter, *_ = case(name, str(root), str(vocab))
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    for f in copy.glob("tokenizer*"):
        f.unlink()  # the base's tokenizer (50257 tokens) is then the one found
    with pytest.raises(EfexportError) as e:
        open_pipeline(copy, base_model=str(base))
    assert_three_lines(e.value)
    first, fix = str(e.value).splitlines()[:2]
    assert "50257" in first and "50260" in first and "tokenizer" in fix and "another base" not in fix


def test_an_eulerforge_embedding_the_tokenizer_does_not_explain_is_refused(run, tmp_path):
    _, ckpt, _, _ = run
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    tj = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    tj["added_tokens"] = tj["added_tokens"][:-1]  # one added token lost
    (copy / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(EfexportError) as e:
        open_pipeline(copy)
    assert_three_lines(e.value)
    assert "50260" in str(e.value) and "50257" in str(e.value) and "50259 tokens" in str(e.value)
