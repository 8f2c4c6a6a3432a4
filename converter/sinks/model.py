"""In-memory sink: turn a planned (and possibly quantized) tensor stream into a model.

The model is built on the meta device (no weights allocated, no random init), its
non-persistent buffers (rotary frequencies, embedding scales) are filled by
transformers' own ``_init_weights``, and then each planned tensor is produced and
assigned in turn. Quantized Linears become bitsandbytes modules built from the
prequantized tensors the precision stage made (``Params4bit.from_prequantized``),
the same bytes the exporter writes. The runtime loader uses this sink too.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..errors import fail
from ..hf_model import meta_model
from ..plan import PlannedTensor

SEE = "docs: README.md#loading-a-run"


def materialise_buffers(model: nn.Module) -> None:
    """Fill meta buffers exactly as transformers does after from_pretrained."""
    for _, module in model.named_modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        current = getattr(module, leaf)
    except AttributeError:
        raise fail(
            f"load tensor {name!r}: the model has no such parameter (unexpected key)",
            "the checkpoint does not match its config; re-save it from the training run.",
            SEE,
        ) from None
    if current is not None and tuple(current.shape) != tuple(value.shape):
        raise fail(
            f"load tensor {name!r}: shape {list(value.shape)} does not match the model's {list(current.shape)}",
            "the checkpoint does not match its config (vocab_size, hidden size, rank?); re-save it.",
            SEE,
        )
    if isinstance(current, nn.Parameter) or current is None:
        setattr(module, leaf, nn.Parameter(value, requires_grad=False))
    else:
        setattr(module, leaf, value)


def _bnb_linear(old: nn.Linear, tensors: dict[str, torch.Tensor], precision: str) -> nn.Module:
    import bitsandbytes as bnb

    bias = old.bias is not None
    if precision == "int4":
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=bias, compute_dtype=torch.bfloat16,
                                compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
        stats = {k.lstrip("."): v for k, v in tensors.items() if k.startswith(".")}
        new.weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, requires_grad=False,
                                                         device="cpu", module=new)
    else:
        new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=bias, has_fp16_weights=False,
                                  threshold=6.0, device="meta")
        cb, scb = tensors["weight"], tensors["SCB"]
        new.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    if bias:
        new.bias = old.bias
    return new


def build_model(hf_config: dict[str, Any], structure: dict[str, Any] | None, plan: Iterable[PlannedTensor],
                precision: str | None, quantized: set[str], *, progress: Any = None) -> nn.Module:
    """Assemble the model from the plan; every parameter must be produced exactly once."""
    model = meta_model(hf_config, structure)
    materialise_buffers(model)
    assign(model, plan, precision, quantized, progress=progress)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise fail(
            f"load the model: {len(missing)} tensors are missing from the checkpoint, e.g. {', '.join(missing[:3])}",
            "the checkpoint is incomplete or does not match its config; re-save it from the training run.",
            SEE,
        )
    return model.eval()


def assign(model: nn.Module, plan: Iterable[PlannedTensor], precision: str | None, quantized: set[str], *,
           progress: Any = None) -> None:
    """Produce each planned tensor and set it in the model; quantized Linears become bitsandbytes modules.

    Also used a part at a time (one decoder layer) by the layer-by-layer parity forward.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    quant_modules = {n[: -len(".weight")] for n in quantized}
    for t in plan:
        value = t.produce()
        if progress is not None:
            progress.update(1)
        module_name = _quant_module_of(t.name, quant_modules)
        if module_name is None:
            _set_tensor(model, t.name, value)
            continue
        key = t.name[len(module_name) + 1 :]
        group = groups.setdefault(module_name, {})
        group["weight" if key == "weight" else ("." + key[len("weight.") :] if key.startswith("weight.") else key)] = value
    for module_name, tensors in groups.items():
        parent_name, _, leaf = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, leaf)
        if old.bias is not None and old.bias.is_meta:
            raise fail(f"load {module_name}.bias: it is missing from the checkpoint", "re-save the checkpoint.", SEE)
        setattr(parent, leaf, _bnb_linear(old, tensors, precision or ""))


def _quant_module_of(name: str, quant_modules: set[str]) -> str | None:
    """The quantized Linear a tensor name belongs to (its weight or one of its quant stats)."""
    if not quant_modules:
        return None
    for cut in (".weight", ".SCB", ".weight_format"):
        idx = name.rfind(cut)
        if idx > 0 and name[:idx] in quant_modules and (name.endswith(cut) or name[idx:].startswith(".weight.")):
            return name[:idx]
    return None
