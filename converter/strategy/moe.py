"""Experts: the compact layout keeps them, the native layout materialises them (docs/artifact-format.md §2).

Native MoE names per family are a table: adding a family is one entry.
"""

from __future__ import annotations

import re

from ..errors import SEE_LOADING, fail
from ..plan import TensorPlan
from .injection import Injection
from .lora import merged, passthrough, plan_plain_lora
from .reader import Reader

MOE_PROJS = ("gate_proj", "up_proj", "down_proj")


# Per backbone: the native MoE architecture's name and its router / expert tensor names.
NATIVE_MOE = {
    "qwen3": {
        "architecture": "Qwen3-MoE",
        "router": "model.layers.{i}.mlp.gate.weight",
        "expert": "model.layers.{i}.mlp.experts.{e}.{proj}.weight",
        "proj": {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
    },
    "llama": {
        "architecture": "Mixtral",
        "router": "model.layers.{i}.block_sparse_moe.gate.weight",
        "expert": "model.layers.{i}.block_sparse_moe.experts.{e}.{proj}.weight",
        "proj": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
    },
}


def _is_structure_tensor(name: str) -> bool:
    return bool(re.search(r"\.router\.weight$|\.experts\.\d+\.", name))


_EXPERT = re.compile(r"^(?P<owner>.+)\.experts\.(?P<e>\d+)\.(?P<rest>.+)$")


def check_experts(r: Reader, inj: Injection) -> None:
    """Every router has its complete set of experts, and every expert its router (names and shapes only).

    moe_expert_lora: ``layers.i.mlp.router`` + ``experts.e.{gate,up,down}_proj.lora_{A,B}`` over the
    shared ``mlp.{proj}.weight``; mixture_lora: ``P.router`` + ``P.experts.e.lora_{A,B}`` over
    ``P.base_layer.weight``. A missing piece is refused by name, never exported as a smaller model.
    """
    names = set(r.names)
    owners: dict[str, set[int]] = {}
    for n in r.names:
        if (m := _EXPERT.match(n)):
            owners.setdefault(m.group("owner"), set()).add(int(m.group("e")))
    routers = {n[: -len(".router.weight")] for n in r.names if n.endswith(".router.weight")}
    if inj.strategy == "moe_expert_lora":
        parts = [f"{proj}.lora_{ab}.weight" for proj in MOE_PROJS for ab in "AB"]
        bases = lambda owner: [f"{owner}.{proj}.weight" for proj in MOE_PROJS]  # noqa: E731
    else:
        parts = ["lora_A.weight", "lora_B.weight"]
        bases = lambda owner: [f"{owner}.base_layer.weight"]  # noqa: E731
    n_experts = inj.num_experts or 0

    def incomplete(what: str) -> Exception:
        return fail(f"rebuild the {inj.strategy} structure: {what}",
                    "the checkpoint is incomplete; re-save it from the training run.", SEE_LOADING)

    for owner in sorted(set(owners) - routers):
        raise incomplete(f"{owner} has experts but no {owner}.router.weight")
    for owner in sorted(routers):
        shape = r.shape(f"{owner}.router.weight")
        if len(shape) != 2 or shape[0] != n_experts:
            raise incomplete(f"{owner}.router.weight has shape {list(shape)}, expected [{n_experts}, hidden]")
        for base in bases(owner):
            if base not in names:
                raise incomplete(f"the experts of {owner} have no base weight {base}")
        for e in range(n_experts):  # bounded: num_experts matches the largest expert index found
            for part in parts:
                if f"{owner}.experts.{e}.{part}" not in names:
                    raise incomplete(f"expert {e} of {owner} has no {part} ({owner}.experts.{e}.{part} is missing)")


def plan_compact(r: Reader, inj: Injection) -> TensorPlan:
    """Layout ``compact``: routers and LoRA experts keep the run's names; plain LoRA is merged."""
    check_experts(r, inj)
    if inj.strategy == "mixture_lora":
        return [passthrough(r, n) for n in r.names]
    return plan_plain_lora(r, inj.scale, skip=_is_structure_tensor) + [
        passthrough(r, n) for n in r.names if _is_structure_tensor(n)
    ]


def moe_layers_of(names: list[str]) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.mlp\.router\.weight$", n))})


def plan_native_moe(r: Reader, inj: Injection, family: str) -> TensorPlan:
    """Layout ``moe``: experts materialised as W0 + s·B_e@A_e under Qwen3-MoE or Mixtral names."""
    check_experts(r, inj)
    moe = set(moe_layers_of(r.names))
    s = inj.scale
    plan: TensorPlan = []
    for name in plan_plain_lora(r, s, skip=_is_structure_tensor):
        m = re.match(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$", name.name)
        if not (m and int(m.group(1)) in moe):
            plan.append(name)
    names = NATIVE_MOE[family]
    for i in sorted(moe):
        pre = f"model.layers.{i}.mlp"
        for proj in MOE_PROJS:
            if f"{pre}.{proj}.bias" in r.names:
                raise fail(
                    f"write layer {i}'s experts as a native MoE: the MLP has a bias, which "
                    f"{names['architecture']} cannot hold",
                    "export with --moe-layout compact.",
                    SEE_LOADING,
                )
        plan.append(passthrough(r, f"{pre}.router.weight", names["router"].format(i=i)))
        for e in range(inj.num_experts or 0):
            for proj in MOE_PROJS:
                lora = f"{pre}.experts.{e}.{proj}"
                out = names["expert"].format(i=i, e=e, proj=names["proj"][proj])
                plan.append(merged(r, f"{pre}.{proj}.weight", f"{lora}.lora_A.weight", f"{lora}.lora_B.weight", s, out))
    return plan
