"""Hugging Face model facts read off transformers itself: config objects, meta models, quantizable names.

A meta model (every parameter on the meta device) gives the target's structure without
memory; the sinks, the precision stage and the PEFT rules all ask it rather than keep
their own lists.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SEE_LOADING, fail
from .modules import ADAPTER_MODULES, apply_structure
from .source.files import typed


def config_object(hf_config: dict[str, Any]):
    """A transformers config from a config.json dict (no Hub access)."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in hf_config.items() if k != "model_type"}
    return AutoConfig.for_model(hf_config["model_type"], **kwargs)


def check_config(hf_config: dict[str, Any], path: Path, see: str = SEE_LOADING) -> str:
    """config.json's ``model_type``, one this transformers knows, and fields its config class accepts.

    transformers validates each field's type when it builds the config object; done here,
    a wrong field is the three-line error naming the file instead of a traceback later.
    """
    model_type = typed(hf_config, "model_type", str, path.name, "a model type name", see)
    if not model_type:
        raise fail(f"read {path.name}: it has no \"model_type\"",
                   f"add the model's \"model_type\" (e.g. \"qwen3\") to {path}.", see)
    import transformers
    from transformers import CONFIG_MAPPING  # the table only; no model code is imported

    if model_type not in CONFIG_MAPPING:
        raise fail(f"read {path.name}: model_type {model_type[:60]!r} is not one transformers "
                   f"{transformers.__version__} knows",
                   f"fix \"model_type\" in {path}, or upgrade transformers if the model is newer than it.", see)
    try:
        config_object(hf_config)
    except Exception as exc:  # transformers' field validation: any field, any complaint
        why = " ".join(str(exc).split())[:200]
        raise fail(f"read {path.name}: transformers refuses it as a {model_type} config ({type(exc).__name__}: {why})",
                   f"fix the field it names in {path}.", see) from None
    return model_type


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


# Native MoE experts are stored per expert (`experts.{e}.{proj}.weight`) and fused by transformers on
# load into `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I].
_FUSED = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
          "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", None), "w2": ("down_proj", None)}


def check_plan_fits(hf_config: dict[str, Any], structure: dict[str, Any] | None,
                    plan: list[tuple[str, tuple[int, ...], torch.dtype]]) -> str | None:
    """What is wrong between a planned tensor list and the model its config describes, or None.

    The header-level twin of the in-memory sink's checks, for artifacts nothing loads at
    export time (``--no-verify``): every tensor is a parameter or buffer of the model with
    its shape (float where the model's is float), and every parameter is written. A tensor
    the model would drop, or one it would leave randomly initialised, is a different model.
    """
    layers = {int(m.group(1)) for name, _, _ in plan if (m := re.search(r"\.layers\.(\d+)\.", name))}
    declared = getattr(config_object(hf_config).get_text_config(), "num_hidden_layers", None)
    if isinstance(declared, int) and declared != (max(layers) + 1 if layers else declared):
        return f"config.json has num_hidden_layers {declared} but the weights hold {max(layers) + 1} layers"
    model = meta_model(hf_config, structure)  # built only once the layer count is known to be real
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {**dict(model.named_buffers()), **params}
    covered: set[int] = set()
    fused: dict[str, set[tuple[int, int | None]]] = {}
    renames = _renamings(str(hf_config.get("model_type", "")))
    for name, shape, dtype in plan:
        for source, dest in renames:  # checkpoint names transformers renames on load (Mixtral's block_sparse_moe)
            name = re.sub(source, dest, name)
        target = tensors.get(name)
        want: tuple[int, ...] | None = None if target is None else tuple(target.shape)
        key = name
        if target is None and (m := re.match(r"^(.+\.experts)\.(\d+)\.(\w+)\.weight$", name)) and m.group(3) in _FUSED:
            owner, e, (leaf, half) = m.group(1), int(m.group(2)), _FUSED[m.group(3)]
            target = tensors.get(f"{owner}.{leaf}")
            if target is not None and e < target.shape[0]:
                rows = target.shape[1] // 2 if half is not None else target.shape[1]
                want, key = (rows, *tuple(target.shape[2:])), f"{owner}.{leaf}"
                fused.setdefault(key, set()).add((e, half))
            else:
                target = None
        if target is None:
            return f"tensor {name} is not part of a {model.__class__.__name__} with this config.json"
        if tuple(shape) != want:
            return f"tensor {name} has shape {list(shape)} but this config.json gives it {list(want or ())}"
        if target.is_floating_point() and not dtype.is_floating_point:
            return f"tensor {name} is stored as {str(dtype).removeprefix('torch.')}, the model holds floats there"
        if key == name:
            covered.add(id(target))
    for key, seen in fused.items():
        halves = (0, 1) if key.endswith("gate_up_proj") else (None,)
        if len(seen) != tensors[key].shape[0] * len(halves):
            covered.discard(id(tensors[key]))
        else:
            covered.add(id(tensors[key]))
    missing = [n for n, p in params.items() if id(p) not in covered]
    if missing:
        return f"{len(missing)} of the model's weights are not in the checkpoint (e.g. {missing[0]})"
    return None


def _renamings(model_type: str) -> list[tuple[str, str]]:
    """transformers' own renames of checkpoint names for this model type (regex, replacement)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        mapping = get_checkpoint_conversion_mapping(model_type) or []
    except Exception:  # an older transformers without conversion mappings: names are the model's own
        return []
    out: list[tuple[str, str]] = []
    for rule in mapping:
        if type(rule).__name__ == "WeightRenaming":
            sources, targets = list(rule.source_patterns), list(rule.target_patterns)
            out += [(src, targets[min(i, len(targets) - 1)]) for i, src in enumerate(sources)]
    return out
