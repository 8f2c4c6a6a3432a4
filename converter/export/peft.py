"""``--format peft``: a dense_lora run as a PEFT adapter; parity with PeftModel on the run's base weights.

A run whose vocabulary was resized for added tokens (docs/run-format.md §1) keeps its
embedding and head as ``modules_to_save``: the adapter then loads with
``PeftModel.from_pretrained`` on the base resized to the tokenizer, whatever the resize
initialised the new rows to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import fail
from ..pipeline import Pipeline
from ..plan import PlannedTensor, TensorPlan, numel
from ..quiet import quiet_libraries
from ..sinks.model import build_model
from ..sinks.peft import PEFT_PREFIX, adapter_plan, base_plan, write_adapter
from ..sinks.side_files import copy_side_files, public_base_model
from .options import SEE, ExportOptions
from .parity import measure_parity, require_tolerance
from .prepared import Prepared
from .record import finish


class PeftFormat:
    name = "peft"
    disk_factor = 1

    def check_options(self, opts: ExportOptions) -> ExportOptions:
        if opts.precision is not None:
            raise fail(f"write a PEFT adapter at precision {opts.precision}: adapters keep the run's LoRA factors as trained",
                       "drop --precision for --format peft (quantize the base model at serving time instead).", SEE)
        return opts

    def plan(self, opts: ExportOptions, pipe: Pipeline) -> TensorPlan:
        return adapter_plan(pipe) + vocabulary_plan(pipe)

    def layout(self, pipe: Pipeline) -> str:
        return "peft_adapter"

    def quantization(self, precision: str | None) -> dict[str, Any] | None:
        return None

    def write(self, prepared: Prepared, tmp: Path) -> dict[str, Any]:
        pipe = prepared.pipe
        saved = list(VOCAB_MODULES) if vocabulary_plan(pipe) else None  # LoRA plus whole embedding and head
        write_adapter(prepared.plan, pipe.injection, public_base_model(pipe.run.base_model), tmp, saved)
        copy_side_files(pipe.tokenizer_dir(), pipe.config_dirs(), tmp)
        parity = _parity(prepared, tmp) if prepared.opts.verify else {"skipped": "--no-verify"}
        require_tolerance(parity, "fp32", True, "adapter: with its base weights its logits")
        adapter_parameters = sum(numel(t.shape) for t in prepared.plan)  # the card gives the adapter's count
        return finish(prepared, tmp, {"layout": "peft_adapter", "parity": parity, "num_parameters": adapter_parameters})


# modules_to_save an adapter carries for a resized vocabulary -> the run's tensor (a tied head is the embedding)
VOCAB_MODULES = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}


def vocabulary_plan(pipe: Pipeline) -> TensorPlan:
    """The run's embedding and head as PEFT modules_to_save, when its vocabulary was resized (else nothing)."""
    if not (pipe.run.vocabulary or {}).get("size"):
        return []
    r, embed = pipe.source, VOCAB_MODULES["embed_tokens"]
    if embed not in r.infos:
        raise fail(f"write the resized embedding into the PEFT adapter: the run has no {embed}",
                   "use --format hf (or gguf) for this run.", SEE)
    out = []
    for name in VOCAB_MODULES.values():
        src = name if name in r.infos else embed
        out.append(PlannedTensor(PEFT_PREFIX + name, r.shape(src), r.dtype(src), lambda s=src: r.get(s)))
    return out


def _parity(prepared: Prepared, tmp: Path) -> dict[str, Any]:
    pipe = prepared.pipe

    def adapter_logits(batches: list[torch.Tensor]) -> list[torch.Tensor]:
        from peft import PeftModel

        base = build_model(pipe.target.hf_config, None, base_plan(pipe), None, set())
        with quiet_libraries():  # PEFT reads an attribute transformers 5 deprecates
            model = PeftModel.from_pretrained(base, str(tmp), torch_device="cpu").eval()
        with torch.no_grad():
            return [model(input_ids=b).logits.float() for b in batches]

    return measure_parity(prepared, adapter_logits, engine="peft (PeftModel on the run's base weights)")
