"""Target layouts: which architecture a run becomes, its config, and its planned tensors.

``dense`` (none, dense_lora), ``moe`` (moe_expert_lora as Qwen3-MoE or Mixtral) and
``compact`` (the run's own structure, see :mod:`converter.modules`). A layout that
cannot represent the source exactly is refused, never approximated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


from ..errors import fail
from ..modules import STRUCTURE_KEY
from ..plan import TensorPlan
from .injection import Injection
from .lora import plan_dense
from .moe import moe_layers_of, plan_compact, plan_native_moe
from .reader import Reader

SEE_LAYOUTS = "docs: README.md#layouts"
STRUCTURED = ("moe_expert_lora", "mixture_lora")
# Config keys that never change the forward math (or are rewritten on purpose).
_NEUTRAL_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "output_router_logits", "router_aux_loss_coef", "layer_types", "max_window_layers", "use_sliding_window",
    "sliding_window", "intermediate_size", "attention_dropout", "pretraining_tp", "mlp_bias",
    "id2label", "label2id", "return_dict", "output_hidden_states", "tie_word_embeddings", "chunk_size_feed_forward",
}


@dataclass
class Target:
    """What the sinks build or write: architecture, config, structure and planned tensors."""

    layout: str  # "dense" | "moe" | "compact"
    architecture: str
    hf_config: dict[str, Any]
    structure: dict[str, Any] | None
    plan: TensorPlan

    @property
    def structure_preserved(self) -> bool:
        return self.layout in ("moe", "compact")


def choose_layout(inj: Injection, backbone: str, moe_layout: str | None, *, for_loading: bool = False) -> str:
    """Default layouts (docs/artifact-format.md §2); load_model keeps the run's structure."""
    if inj.strategy in ("none", "dense_lora"):
        if moe_layout not in (None, "native"):
            raise fail(
                f"use --moe-layout {moe_layout} for strategy {inj.strategy}: there are no experts",
                "drop --moe-layout; dense runs always export as the backbone's own architecture.",
                SEE_LAYOUTS,
            )
        return "dense"
    if inj.strategy == "mixture_lora" or for_loading:
        if moe_layout == "native":
            raise fail(
                "write mixture_lora as a native MoE: each Linear's gate depends on its input, so no MoE class holds it",
                "drop --moe-layout native (mixture_lora exports as compact).",
                SEE_LAYOUTS,
            )
        return "compact"
    if moe_layout == "compact":
        return "compact"
    if backbone not in ("qwen3", "llama"):
        if moe_layout == "native":
            raise fail(
                f"write a native MoE for backbone {backbone or 'unknown'!r}: transformers has no MoE class for it",
                "use --moe-layout compact (loads with the runtime loader or trust_remote_code).",
                SEE_LAYOUTS,
            )
        return "compact"
    return "moe"


def _check_equivalent(source: dict[str, Any], target: dict[str, Any], arch: str) -> None:
    """Every source field that changes the math must survive into the target config unchanged."""
    for key, value in source.items():
        if key in _NEUTRAL_KEYS or key.startswith("_"):
            continue
        if target.get(key, object()) != value:
            raise fail(
                f"write this run as {arch}: config field {key!r} ({value!r}) has no exact equivalent there",
                "export with --moe-layout compact, which keeps the backbone's own architecture.",
                SEE_LAYOUTS,
            )


def native_moe_config(hf_config: dict[str, Any], inj: Injection, backbone: str, moe: list[int]) -> dict[str, Any]:
    """Qwen3 -> Qwen3MoeForCausalLM, Llama -> MixtralForCausalLM, carrying every math field."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    n_layers = int(hf_config["num_hidden_layers"])
    src = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")}
    if hf_config.get("use_sliding_window") or any(t != "full_attention" for t in hf_config.get("layer_types") or []):
        raise fail("write a sliding-window run as a native MoE", "export with --moe-layout compact.", SEE_LAYOUTS)
    top_k = inj.top_k or 2
    if backbone == "qwen3":
        cfg_cls, arch = Qwen3MoeConfig, "Qwen3MoeForCausalLM"
        extra = dict(
            num_experts=inj.num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
            moe_intermediate_size=hf_config["intermediate_size"], decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(n_layers) if i not in moe],
        )
    else:
        if sorted(moe) != list(range(n_layers)):
            raise fail(
                "write this llama run as Mixtral: only some layers are MoE and Mixtral has no dense layers",
                "export with --moe-layout compact.",
                SEE_LAYOUTS,
            )
        for flag in ("attention_bias", "mlp_bias"):
            if hf_config.get(flag):
                raise fail(f"write this llama run as Mixtral: it has {flag}, Mixtral has none",
                           "export with --moe-layout compact.", SEE_LAYOUTS)
        cfg_cls, arch = MixtralConfig, "MixtralForCausalLM"
        extra = dict(num_local_experts=inj.num_experts, num_experts_per_tok=top_k,
                     intermediate_size=hf_config["intermediate_size"])
    merged = {**src, **extra}
    target = cfg_cls(**merged).to_dict()
    _check_equivalent(src, target, arch)
    target["architectures"] = [arch]
    for key in ("transformers_version",):
        target.pop(key, None)
    return target


def build_target(reader: Reader, hf_config: dict[str, Any], inj: Injection, backbone: str, layout: str) -> Target:
    """Plan the tensors and config of one layout (names, shapes and dtypes only)."""
    hf_config = copy.deepcopy(hf_config)
    arch = (hf_config.get("architectures") or [""])[0]
    if layout == "dense":
        return Target("dense", arch, hf_config, None, plan_dense(reader, inj))
    moe = moe_layers_of(reader.names)
    if inj.strategy == "moe_expert_lora" and inj.moe_layers is not None and sorted(inj.moe_layers) != moe:
        raise fail(
            f"load the MoE layers: the config says moe_layers={list(inj.moe_layers)} but routers exist for {moe}",
            "fix moe_layers in the injection block to match the checkpoint.",
            "docs: README.md#loading-a-run",
        )
    if layout == "moe":
        cfg = native_moe_config(hf_config, inj, backbone, moe)
        return Target("moe", cfg["architectures"][0], cfg, None, plan_native_moe(reader, inj, backbone))
    structure = {
        "strategy": inj.strategy,
        "num_experts": inj.num_experts,
        "top_k": inj.top_k,
        "lora_r": inj.lora_r,
        "lora_alpha": inj.lora_alpha,
        "use_rslora": inj.use_rslora,
        "scale": inj.scale,
        "moe_layers": moe if inj.strategy == "moe_expert_lora" else None,
        "target_modules": list(inj.target_modules),
        # routers and LoRA factors keep the dtype the run saved them in (see modeling_efexport.py)
        "adapter_dtype": next((str(reader.dtype(n)).removeprefix("torch.") for n in reader.names
                               if n.endswith(".router.weight")), "float32"),
    }
    hf_config[STRUCTURE_KEY] = structure
    return Target("compact", arch, hf_config, structure, plan_compact(reader, inj))
