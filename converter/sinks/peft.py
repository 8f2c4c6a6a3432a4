"""PEFT adapter sink: LoRA factors under PEFT's key names, ``adapter_config.json`` from PEFT's ``LoraConfig``.

For vLLM / TGI multi-LoRA and ``PeftModel.from_pretrained``; only plain LoRA runs
(EulerForge ``dense_lora``) are adapters PEFT can hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import fail
from ..plan import PlannedTensor, TensorPlan
from ..strategy.injection import Injection
from ..strategy.lora import LORA_SUFFIXES
from .safetensors import write_shard

SEE = "docs: README.md#formats"
PEFT_PREFIX = "base_model.model."


def adapter_plan(pipe: Any) -> TensorPlan:
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


def lora_config(inj: Injection, base_model: str | None, target_modules: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=inj.lora_r, lora_alpha=inj.lora_alpha, use_rslora=inj.use_rslora, target_modules=target_modules,
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True,
    )


def write_adapter(plan: TensorPlan, inj: Injection, base_model: str | None, dest: Path,
                  modules_to_save: list[str] | None = None) -> None:
    """adapter_model.safetensors and adapter_config.json into ``dest``.

    ``modules_to_save``: whole modules the plan also carries (a resized embedding and head);
    the LoRA targets are read off the plan's LoRA factors only.
    """
    write_shard(dest / "adapter_model.safetensors", plan)
    targets = sorted({t.name.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for t in plan if ".lora_" in t.name})
    config = lora_config(inj, base_model, targets)
    if modules_to_save:
        config.modules_to_save = list(modules_to_save)
    config.save_pretrained(str(dest))


def base_plan(pipe: Any) -> TensorPlan:
    """The run's frozen base weights under Hugging Face names (LoRA left out, nothing merged)."""
    r = pipe.source
    return [
        PlannedTensor(n.replace(".base_layer.", "."), r.shape(n), r.dtype(n), lambda n=n: r.get(n).float())
        for n in r.names
        if not n.endswith(LORA_SUFFIXES)
    ]
