"""Hugging Face model facts read off transformers itself: config objects, meta models, quantizable names.

A meta model (every parameter on the meta device) gives the target's structure without
memory; the sinks, the precision stage and the PEFT rules all ask it rather than keep
their own lists.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .modules import ADAPTER_MODULES, apply_structure


def config_object(hf_config: dict[str, Any]):
    """A transformers config from a config.json dict (no Hub access)."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in hf_config.items() if k != "model_type"}
    return AutoConfig.for_model(hf_config["model_type"], **kwargs)


def meta_model(hf_config: dict[str, Any], structure: dict[str, Any] | None) -> nn.Module:
    """The target model with every parameter on the meta device: structure without memory."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = config_object(hf_config)
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
        if structure is not None:
            apply_structure(model, structure)
    return model


SKIP_QUANT = ("lm_head", *ADAPTER_MODULES)


def quantizable_names(model: nn.Module) -> set[str]:
    """Weights bitsandbytes replaces: every nn.Linear but lm_head, routers and LoRA factors.

    This is transformers' own rule (replace_with_bnb_linear acts on nn.Linear), so fused
    MoE experts, which are plain parameters there, stay unquantized exactly as it does.
    """
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in SKIP_QUANT
    }
