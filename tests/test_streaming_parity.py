"""Parity a decoder layer at a time: the same figures as the whole-model check, in one layer's memory.

The whole-model path (the run loaded by ``load_model`` in float32, the artifact by the
runtime's ``load_weights``) is kept here as the reference the streamed figures must equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import converter.parity as parity
import converter.streaming as streaming
from converter.export import ExportOptions, export
from converter.loader import load_model
from converter.runtime import load_weights
from converter.sinks.gguf import llama_cpp_available

TOL = 1e-6
needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python (efexport[gguf]) is not installed")


def _export_capturing(run, out: Path, monkeypatch, **kw) -> tuple[dict, list, list]:
    """Export with parity on; return the record and the (reference, candidate) logits the comparison saw."""
    seen: dict[str, list] = {}
    real = parity.compare

    def spy(reference, candidate, *args, **kwargs):
        seen["ref"], seen["cand"] = reference, candidate
        return real(reference, candidate, *args, **kwargs)

    monkeypatch.setattr(parity, "compare", spy)
    export(ExportOptions(run=str(run.path), out=out, progress=False, **kw))
    monkeypatch.undo()
    return json.loads((out / "efexport.json").read_text())["parity"], seen["ref"], seen["cand"]


def _whole_reference(run) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    loaded = load_model(str(run.path), device="cpu", dtype="float32")
    batches = parity.probe_batches(loaded.tokenizer, loaded.model.config.get_text_config().vocab_size)
    return batches, parity.logits_of(loaded.model, batches)


def _maxdiff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _same_figures(recorded: dict, whole: dict) -> None:
    for key in ("max_abs_logit_diff", "max_abs_logit", "top1_agreement"):
        assert abs(recorded[key] - whole[key]) <= TOL, (key, recorded[key], whole[key])
    assert recorded["artifact_fingerprint"]["top1"] == whole["artifact_fingerprint"]["top1"]
    for a, b in zip(recorded["artifact_fingerprint"]["max_abs_logit"], whole["artifact_fingerprint"]["max_abs_logit"]):
        assert abs(a - b) <= TOL


CASES = [
    ("qwen3", "dense_lora", "bf16", None, "dense"),
    ("qwen3", "dense_lora", "int4", None, "dense"),
    ("gemma3", "dense_lora", "int8", None, "dense"),
    ("qwen3", "moe_expert_lora", "bf16", "native", "moe"),
    ("qwen3", "moe_expert_lora", "int4", "native", "moe"),
    ("llama", "mixture_lora", "bf16", None, "compact"),
    ("llama", "mixture_lora", "int4", None, "compact"),
    ("gemma3", "moe_expert_lora", "fp32", None, "compact"),
]


@pytest.mark.parametrize("backbone,strategy,precision,moe_layout,layout", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[4]}" for c in CASES])
def test_streamed_parity_equals_the_whole_model_figures(run_factory, tmp_path, monkeypatch,
                                                        backbone, strategy, precision, moe_layout, layout):
    run = run_factory(backbone, strategy)
    out = tmp_path / "art"
    recorded, ref, cand = _export_capturing(run, out, monkeypatch, precision=precision, moe_layout=moe_layout)
    manifest = json.loads((out / "efexport.json").read_text())
    assert manifest["layout"] == layout
    batches, whole_ref = _whole_reference(run)
    whole_model = load_weights(out, layout, precision, torch.device("cpu"), None)
    whole_cand = parity.logits_of(whole_model, batches)
    assert _maxdiff(ref, whole_ref) <= TOL and _maxdiff(cand, whole_cand) <= TOL
    _same_figures(recorded, parity.compare(whole_ref, whole_cand, "source run, float32"))


@needs_llama_cpp
def test_gguf_parity_streams_its_reference(run_factory, tmp_path, monkeypatch):
    run = run_factory("llama", "dense_lora")
    recorded, ref, cand = _export_capturing(run, tmp_path / "g", monkeypatch, fmt="gguf", precision="q8_0")
    _, whole_ref = _whole_reference(run)
    assert _maxdiff(ref, whole_ref) <= TOL
    _same_figures(recorded, parity.compare(whole_ref, cand, "source run, float32"))
    assert recorded["engine"].startswith("llama.cpp")


def test_peft_parity_streams_its_reference(run_factory, tmp_path, monkeypatch):
    run = run_factory("qwen3", "dense_lora")
    recorded, ref, cand = _export_capturing(run, tmp_path / "p", monkeypatch, fmt="peft")
    _, whole_ref = _whole_reference(run)
    assert _maxdiff(ref, whole_ref) <= TOL
    _same_figures(recorded, parity.compare(whole_ref, cand, "source run, float32"))


def _param_bytes(model: torch.nn.Module) -> int:
    seen = {}
    for p in model.parameters():
        if not p.is_meta:
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def test_the_reference_is_never_built_whole(run_factory, tmp_path, monkeypatch):
    """At most one decoder layer, or the embedding, or norm + head, holds real memory at any time."""
    run = run_factory("qwen3", "dense_lora", tie_word_embeddings=False, config_overrides={"num_hidden_layers": 6})
    held, calls = [], []
    real_assign = streaming.assign

    def tracking(model, plan, *args, **kwargs):
        plan = list(plan)
        calls.append([t.name for t in plan])
        real_assign(model, plan, *args, **kwargs)
        held.append(_param_bytes(model))

    monkeypatch.setattr(streaming, "assign", tracking)
    export(ExportOptions(run=str(run.path), out=tmp_path / "art", progress=False, precision="bf16"))
    monkeypatch.undo()

    loaded = load_model(str(run.path), device="cpu", dtype="float32")
    named = dict(loaded.model.named_parameters())
    layer = max(sum(p.numel() * 4 for n, p in named.items() if n.startswith(f"model.layers.{i}.")) for i in range(6))
    embed = named["model.embed_tokens.weight"].numel() * 4
    head = named["lm_head.weight"].numel() * 4 + named["model.norm.weight"].numel() * 4
    whole = sum(p.numel() * 4 for p in named.values())
    reference = held[: len(held) // 2]  # the source side streams first, then the artifact
    assert len(reference) == 6 + 2
    assert max(reference) <= max(layer, embed, head) < whole / 3, (max(reference), layer, embed, head, whole)
    # each layer's tensors were produced once, for all probe prompts together
    layer_calls = [c for c in calls[: len(calls) // 2] if c and c[0].startswith("model.layers.")]
    assert len(layer_calls) == 6 and len({c[0].split(".")[2] for c in layer_calls}) == 6


def _spy_reads(monkeypatch) -> list[tuple[str, int | None]]:
    """(name, rows) of every tensor read from safetensors files from now on (None: read whole)."""
    from converter.source.safetensors import TensorSource

    reads: list[tuple[str, int | None]] = []
    get, rows = TensorSource.get, TensorSource.get_rows
    monkeypatch.setattr(TensorSource, "get", lambda self, n: reads.append((n, None)) or get(self, n))
    monkeypatch.setattr(TensorSource, "get_rows",
                        lambda self, n, a, b: reads.append((n, min(b, self.shape(n)[0]) - a)) or rows(self, n, a, b))
    return reads


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_vocabulary_matrices_are_read_a_block_of_rows_at_a_time(run_factory, tmp_path, monkeypatch, tied):
    """Embedding: only the probe ids' rows; head: HEAD_ROWS rows per matmul; the logits unchanged.

    (Blocks of 64+ rows give bit-identical logits here; 7-row blocks took another GEMM kernel, 2e-6 apart.)
    """
    from converter.pipeline import open_pipeline

    run = run_factory("qwen3", "dense_lora", tie_word_embeddings=tied)
    out = tmp_path / "art"
    export(ExportOptions(run=str(run.path), out=out, progress=False, precision="bf16", verify=False))
    batches, whole_ref = _whole_reference(run)
    whole_cand = parity.logits_of(load_weights(out, "dense", "bf16", torch.device("cpu"), None), batches)
    vocab = whole_ref[0].shape[-1]
    ids = len(torch.unique(torch.cat([b.flatten() for b in batches])))
    monkeypatch.setattr(streaming, "HEAD_ROWS", 64)
    vocab_names = {"model.embed_tokens.weight", "lm_head.weight"}
    for side, whole in (("source", whole_ref), ("artifact", whole_cand)):
        reads = _spy_reads(monkeypatch)
        if side == "source":
            with open_pipeline(str(run.path), "final", for_loading=True) as pipe:
                model = streaming.streamed_model(pipe.target.hf_config, pipe.target.structure,
                                                 pipe.planned(None, torch.float32))
                streamed = parity.logits_of(model, batches)
        else:
            with streaming.artifact_stream(out) as model:
                streamed = parity.logits_of(model, batches)
        monkeypatch.undo()
        assert _maxdiff(streamed, whole) <= TOL, side
        vocab_reads = [(n, k) for n, k in reads if n in vocab_names]
        assert all(k is not None for _, k in vocab_reads), (side, vocab_reads)  # never read whole
        embed = [k for n, k in vocab_reads if n == "model.embed_tokens.weight"]
        head = [k for n, k in vocab_reads if n == ("model.embed_tokens.weight" if tied else "lm_head.weight")]
        if tied:  # one row per probe id, then the head's blocks
            assert embed[:ids] == [1] * ids and embed[ids:] == head[ids:]
            head = head[ids:]
        else:
            assert embed == [1] * ids
        assert max(head) == 64 and len(head) > 1 and sum(head) == vocab, (side, head)
        monkeypatch.setattr(streaming, "HEAD_ROWS", 64)


def test_streamed_model_puts_every_weight_back_on_meta(run_factory):
    from converter.pipeline import open_pipeline

    run = run_factory("gemma3", "mixture_lora")
    with open_pipeline(str(run.path), "final", for_loading=True) as pipe:
        model = streaming.streamed_model(pipe.target.hf_config, pipe.target.structure, pipe.planned(None, torch.float32))
        batches = [torch.tensor([[1, 2, 3, 4]])]
        first = parity.logits_of(model, batches)
        assert all(p.is_meta for p in model.model.parameters())
        assert _maxdiff(first, parity.logits_of(model, batches)) == 0.0  # reusable: the layers are back in place


def test_freed_memory_is_handed_back_after_the_embedding_and_every_layer(run_factory, monkeypatch):
    from converter.pipeline import open_pipeline

    run = run_factory("qwen3", "dense_lora", config_overrides={"num_hidden_layers": 6})
    held: list[int] = []
    with open_pipeline(str(run.path), "final", for_loading=True) as pipe:
        model = streaming.streamed_model(pipe.target.hf_config, pipe.target.structure, pipe.planned(None, torch.float32))
        monkeypatch.setattr(streaming, "release_free_memory", lambda: held.append(_param_bytes(model.model)))
        parity.logits_of(model, [torch.tensor([[1, 2, 3, 4]])])
    assert len(held) == 6 + 1 and held == [0] * 7  # each time, nothing of the model is still held


def test_parity_is_skipped_only_when_one_layer_cannot_fit(run_factory, tmp_path, monkeypatch):
    run = run_factory("llama", "none")
    monkeypatch.setattr(parity, "available_memory", lambda: 1000)
    export(ExportOptions(run=str(run.path), out=tmp_path / "art", progress=False))
    recorded = json.loads((tmp_path / "art" / "efexport.json").read_text())["parity"]
    assert "one layer or the embedding and head" in recorded["skipped"]


def test_verify_streams_the_artifact(run_factory, tmp_path, monkeypatch):
    import converter.runtime as runtime
    from converter.verify import verify_artifact

    run = run_factory("qwen3", "moe_expert_lora")
    out = tmp_path / "art"
    export(ExportOptions(run=str(run.path), out=out, progress=False, precision="int4", moe_layout="native"))

    def whole(*a, **k):
        raise AssertionError("verify built the whole model")

    monkeypatch.setattr(runtime, "load_artifact", whole)
    monkeypatch.setattr(runtime, "load_weights", whole)
    report = verify_artifact(out)
    assert report["ok"] and report["parity"]["top1_agreement_with_export"] == 1.0
    assert report["parity"]["max_rel_change"] == 0.0


def test_a_mixtral_folder_streams_as_from_pretrained_loads_it(tmp_path):
    """Per-expert w1/w2/w3 under block_sparse_moe are fused and renamed as transformers' loader does."""
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path)
    batches = [torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))]
    whole = parity.logits_of(AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval(), batches)
    with streaming.artifact_stream(tmp_path) as model:
        assert _maxdiff(parity.logits_of(model, batches), whole) <= TOL
