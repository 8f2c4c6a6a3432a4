"""``--format peft``: a dense_lora run as a PEFT LoRA adapter (vLLM / TGI multi-LoRA).

The LoRA factors are streamed under PEFT's key names into ``adapter_model.safetensors``;
``adapter_config.json`` is written by PEFT's own ``LoraConfig``. Parity loads the run's
base weights as a plain model, applies the adapter with ``PeftModel.from_pretrained``
and compares with the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import fail
from .plan import PlannedTensor, TensorPlan
from .transforms import LORA_SUFFIXES
from .run import Injection

SEE = "docs: README.md#formats"
PEFT_PREFIX = "base_model.model."


def check_peft_export(pipe) -> TensorPlan:
    """The adapter's planned tensors, or a three-line refusal for what a PEFT LoRA cannot hold."""
    inj = pipe.injection
    if inj.strategy != "dense_lora" or pipe.run.source_kind != "eulerforge_run":
        raise fail(
            f"write a {inj.strategy} {pipe.run.source_kind} as a PEFT adapter: only EulerForge dense_lora runs are plain LoRA"
            + (" (a mixture of LoRA experts is not a PEFT LoRA)" if inj.strategy in ("moe_expert_lora", "mixture_lora") else ""),
            "use --format hf (or gguf) for this run.",
            SEE,
        )
    r = pipe.source
    return [
        PlannedTensor(PEFT_PREFIX + name, r.shape(name), r.dtype(name), lambda n=name: r.get(n))
        for name in r.names
        if name.endswith(LORA_SUFFIXES)
    ]


def _lora_config(inj: Injection, base_model: str | None, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=inj.lora_r, lora_alpha=inj.lora_alpha, use_rslora=inj.use_rslora, target_modules=target_modules,
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True,
    )


def write_peft(prepared, tmp: Path) -> dict[str, Any]:
    from .export import _copy_side_files, _public_base_model
    from .safetensors_sink import write_shard

    pipe = prepared.pipe
    write_shard(tmp / "adapter_model.safetensors", prepared.plan)
    targets = sorted({t.name.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for t in prepared.plan})
    _lora_config(pipe.injection, _public_base_model(pipe.run.base_model), targets).save_pretrained(str(tmp))
    _copy_side_files(pipe, tmp)
    parity = _parity(prepared, tmp) if prepared.opts.verify else {"skipped": "--no-verify"}
    from .parity import within_tolerance

    if not within_tolerance(parity, "fp32", True):
        raise fail(f"keep this adapter: with its base weights it differs from the run by {parity['max_abs_logit_diff']:.3g}",
                   "report this as a bug; nothing was written to --out.", SEE)
    return {"layout": "peft_adapter", "parity": parity}


def base_plan(pipe) -> TensorPlan:
    """The run's frozen base weights under Hugging Face names (LoRA left out, nothing merged)."""
    r = pipe.source
    return [
        PlannedTensor(n.replace(".base_layer.", "."), r.shape(n), r.dtype(n), lambda n=n: r.get(n).float())
        for n in r.names
        if not n.endswith(LORA_SUFFIXES)
    ]


def _parity(prepared, tmp: Path) -> dict[str, Any]:
    from .export import measure_parity
    from .model_sink import build_model

    pipe = prepared.pipe

    def adapter_logits(batches: list[torch.Tensor]) -> list[torch.Tensor]:
        from peft import PeftModel

        base = build_model(pipe.target.hf_config, None, base_plan(pipe), None, set())
        model = PeftModel.from_pretrained(base, str(tmp), torch_device="cpu").eval()
        with torch.no_grad():
            return [model(input_ids=b).logits.float() for b in batches]

    return measure_parity(prepared, adapter_logits, engine="peft (PeftModel on the run's base weights)")
