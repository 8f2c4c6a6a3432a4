"""Modules for the structure-preserving strategies (moe_expert_lora, mixture_lora).

This file is the single source of truth for their forward math (docs/run-format.md §3).
It is used by the loader and the runtime loader, and it is copied verbatim into
compact artifacts as ``modeling_efexport.py`` so ``trust_remote_code`` loads the very
same code. Keep it self-contained: torch and transformers only, no package imports.
"""

from __future__ import annotations

import torch
from torch import nn

STRUCTURE_KEY = "efexport_structure"
# The run's own modules: kept in the dtype the run saved them in, never quantized.
ADAPTER_MODULES = ("router", "lora_A", "lora_B")


def _route(logits: torch.Tensor, top_k: int | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Dense gate weights [..., E]: softmax in float32, optional top-k renormalised, cast."""
    probs = torch.softmax(logits.float(), dim=-1)
    if top_k is not None and top_k < probs.shape[-1]:
        values, index = torch.topk(probs, top_k, dim=-1)
        values = values / values.sum(dim=-1, keepdim=True)
        probs = torch.zeros_like(probs).scatter(-1, index, values)
    return probs.to(out_dtype)


class LoRAFactors(nn.Module):
    """B(A x): one LoRA pair, kept as two Linears so names read ``lora_A`` / ``lora_B``."""

    def __init__(self, in_features: int, out_features: int, r: int) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_A.weight.dtype
        return self.lora_B(self.lora_A(x.to(dtype))).to(x.dtype)


class LoRAExpert(nn.Module):
    """Expert e of a moe_expert_lora MLP: its LoRA pair on each of the three projections."""

    def __init__(self, hidden: int, intermediate: int, r: int) -> None:
        super().__init__()
        self.gate_proj = LoRAFactors(hidden, intermediate, r)
        self.up_proj = LoRAFactors(hidden, intermediate, r)
        self.down_proj = LoRAFactors(intermediate, hidden, r)


class MoELoRAMLP(nn.Module):
    """Shared frozen MLP + per-expert LoRA, routed per token (softmax, top-k, renormalise)."""

    def __init__(
        self, hidden: int, intermediate: int, num_experts: int, top_k: int, r: int, scale: float,
        act: str, bias: bool = False,
    ) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.top_k, self.scale = top_k, scale
        self.act_fn = ACT2FN[act]
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.experts = nn.ModuleList(LoRAExpert(hidden, intermediate, r) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        router_dtype = self.router.weight.dtype
        gates = _route(self.router(h.to(router_dtype)), self.top_k, h.dtype)
        out = torch.zeros_like(h)
        s = self.scale
        for e in torch.nonzero(gates.sum(0)).flatten().tolist():
            rows = torch.nonzero(gates[:, e]).flatten()
            xe = h[rows]
            ex = self.experts[e]
            g = self.gate_proj(xe) + s * ex.gate_proj(xe)
            u = self.up_proj(xe) + s * ex.up_proj(xe)
            m = self.act_fn(g) * u
            y = self.down_proj(m) + s * ex.down_proj(m)
            out.index_add_(0, rows, (y * gates[rows, e, None]).to(out.dtype))
        return out.reshape(shape)


class MixtureLoRALinear(nn.Module):
    """Base Linear + input-gated mixture of LoRA experts: W0 x + s * sum_e g_e B_e A_e x."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, num_experts: int, top_k: int | None,
        r: int, scale: float,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.top_k, self.scale = top_k, scale
        self.base_layer = nn.Linear(in_features, out_features, bias=bias)
        self.router = nn.Linear(in_features, num_experts, bias=False)
        self.experts = nn.ModuleList(LoRAFactors(in_features, out_features, r) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        gates = _route(self.router(x.to(self.router.weight.dtype)), self.top_k, x.dtype)
        delta = torch.zeros_like(out)
        for e, expert in enumerate(self.experts):
            delta = delta + gates[..., e : e + 1] * expert(x)
        return out + self.scale * delta


def apply_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Swap the backbone's MLPs / Linears for the trained structure, in place.

    ``structure`` is the ``efexport_structure`` block: strategy, num_experts, top_k,
    lora_r, scale, moe_layers (None = all) and target_modules.
    """
    config = model.config
    layers = model.model.layers
    kind = structure["strategy"]
    E, r, s = int(structure["num_experts"]), int(structure["lora_r"]), float(structure["scale"])
    top_k = structure.get("top_k")
    if kind == "moe_expert_lora":
        chosen = structure.get("moe_layers")
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        for i, layer in enumerate(layers):
            if chosen is not None and i not in chosen:
                continue
            old = layer.mlp
            layer.mlp = MoELoRAMLP(
                old.gate_proj.in_features, old.gate_proj.out_features, E, int(top_k), r, s, act,
                bias=old.gate_proj.bias is not None,
            )
    elif kind == "mixture_lora":
        targets = set(structure["target_modules"])
        for layer in layers:
            for name, module in list(layer.named_modules()):
                leaf = name.rsplit(".", 1)[-1]
                if leaf in targets and isinstance(module, nn.Linear):
                    parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                    setattr(parent, leaf, MixtureLoRALinear(
                        module.in_features, module.out_features, module.bias is not None, E,
                        None if top_k is None else int(top_k), r, s,
                    ))
    else:
        raise ValueError(f"no structure to apply for strategy {kind!r}")
    return model
