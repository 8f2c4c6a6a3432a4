"""The strategy block, normalised and cross-checked against the tensors (docs/run-format.md §3).

:class:`Injection` says what was trained and how to undo it (the LoRA scale); it is
inferred from tensor names and checked against the declared block, so a run whose
config and weights disagree is refused before anything is read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import SEE_LOADING, fail
from ..source.files import typed
from ..source.run_dir import ResolvedRun

STRATEGIES = ("none", "dense_lora", "moe_expert_lora", "mixture_lora")
BLOCK = "the injection block (resolved_config.json or config.json's eulerforge)"


def _field(block: dict[str, Any], key: str, kinds: type | tuple[type, ...], what: str) -> Any:
    """One block field, type-checked where it is read (the error names it)."""
    return typed(block, key, kinds, BLOCK, what)


def _positive(block: dict[str, Any], key: str) -> int | None:
    value = _field(block, key, int, "a positive integer")
    if value is not None and value <= 0:
        raise fail(f"read {BLOCK}: field {key!r} is {value}, expected a positive integer", f"fix {key!r}.", SEE_LOADING)
    return value


def _block_fields(block: dict[str, Any]) -> None:
    """Check the type of every field the strategy reads, before any of them is used."""
    _field(block, "strategy", str, "one of " + ", ".join(STRATEGIES))
    _positive(block, "lora_r")
    _positive(block, "num_experts")
    _positive(block, "top_k")
    alpha = _field(block, "lora_alpha", (int, float), "a number")
    if alpha is not None and not math.isfinite(alpha):
        raise fail(f"read {BLOCK}: field 'lora_alpha' is {alpha}, expected a finite number", "fix 'lora_alpha'.",
                   SEE_LOADING)
    _field(block, "use_rslora", bool, "true or false")
    for key, item in (("target_modules", str), ("moe_layers", int)):
        value = _field(block, key, list, f"a list of {'module names' if item is str else 'layer indexes'}")
        if value is not None and not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise fail(f"read {BLOCK}: field {key!r} holds something other than "
                       f"{'module names' if item is str else 'layer indexes'}", f"fix {key!r}.", SEE_LOADING)


@dataclass(frozen=True)
class Injection:
    """The strategy block, normalised: what was trained and how to undo it."""

    strategy: str
    lora_r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ()
    num_experts: int | None = None
    top_k: int | None = None
    moe_layers: tuple[int, ...] | None = None

    @property
    def scale(self) -> float:
        """LoRA scale s = alpha / r (or alpha / sqrt(r) with rsLoRA)."""
        if self.lora_r is None or self.lora_alpha is None:
            raise fail(
                f"compute the LoRA scale for strategy {self.strategy}: lora_alpha is unknown",
                'add "lora_alpha" to the "injection" block of resolved_config.json (it cannot be read off tensor shapes).',
                SEE_LOADING,
            )
        return self.lora_alpha / (self.lora_r**0.5 if self.use_rslora else self.lora_r)

    @property
    def lora_config(self) -> dict[str, Any] | None:
        if self.strategy == "none" or self.lora_r is None:
            return None
        return {"lora_r": self.lora_r, "lora_alpha": self.lora_alpha}

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "moe_layers": None if self.moe_layers is None else list(self.moe_layers),
        }



def detect_strategy(names: list[str] | set[str]) -> str:
    """Infer the strategy from tensor names alone (docs/run-format.md §3)."""
    has = lambda pattern: any(re.search(pattern, n) for n in names)  # noqa: E731
    if has(r"\.mlp\.router\.weight$") and has(r"\.mlp\.experts\.\d+\.\w+\.lora_A\.weight$"):
        return "moe_expert_lora"
    if has(r"\.router\.weight$") and has(r"\.experts\.\d+\.lora_A\.weight$"):
        return "mixture_lora"
    if has(r"\.lora_A\.weight$"):
        return "dense_lora"
    return "none"


def infer_injection(run: ResolvedRun, names: list[str], shapes: dict[str, tuple[int, ...]]) -> Injection:
    """Normalise the declared block and cross-check it against the tensors (a mismatch is an error)."""
    inferred = detect_strategy(names)
    block = run.block or {}
    _block_fields(block)
    declared = block.get("strategy")
    if declared is not None and declared not in STRATEGIES:
        raise fail(
            f"load strategy {declared!r}: supported strategies are {', '.join(STRATEGIES)}",
            'fix "strategy" in the run\'s injection block.',
            SEE_LOADING,
        )
    if declared is not None and declared != inferred:
        raise fail(
            f"load the checkpoint: the run declares strategy {declared!r} but its tensors look like {inferred!r}",
            "point at the checkpoint that matches the run's config, or fix the injection block.",
            SEE_LOADING,
        )
    strategy = declared or inferred
    if strategy == "none":
        return Injection("none")
    lora_a = [n for n in names if n.endswith("lora_A.weight")]
    r_from_shapes = shapes[lora_a[0]][0] if lora_a and shapes[lora_a[0]] else None
    r = block.get("lora_r", r_from_shapes)
    if r_from_shapes is not None and r is not None and int(r) != r_from_shapes:
        raise fail(
            f"load the checkpoint: lora_r is {r} in the config but the tensors have rank {r_from_shapes}",
            "fix lora_r in the injection block to match the saved LoRA weights.",
            SEE_LOADING,
        )
    alpha = block.get("lora_alpha")
    if alpha is None:
        raise fail(
            f"merge the {strategy} checkpoint: lora_alpha is not recorded (rank {r} was read off the tensors, alpha cannot be)",
            'add "lora_alpha" to resolved_config.json\'s "injection" block (or the checkpoint config\'s "eulerforge" block).',
            SEE_LOADING,
        )
    targets = block.get("target_modules") or sorted(
        {n.split(".lora_A")[0].split(".")[-1] for n in lora_a if ".experts." not in n}
        | {n.split(".router.")[0].split(".")[-1] for n in names if n.endswith(".router.weight") and ".mlp.router" not in n}
    )
    experts = {int(m.group(1)) for n in names if (m := re.search(r"\.experts\.(\d+)\.", n))}
    num_experts = block.get("num_experts") or (max(experts) + 1 if experts else None)
    if experts and num_experts != max(experts) + 1:
        raise fail(
            f"load the checkpoint: num_experts is {num_experts} in the config but the tensors hold {max(experts) + 1} experts",
            "fix num_experts in the injection block to match the saved weights.",
            SEE_LOADING,
        )
    if strategy in ("moe_expert_lora", "mixture_lora") and "top_k" not in block:
        raise fail(
            f"rebuild the {strategy} routing: top_k is not recorded",
            'add "top_k" to the injection block (an integer; null means a soft mixture for mixture_lora).',
            SEE_LOADING,
        )
    top_k = block.get("top_k")
    if strategy == "moe_expert_lora" and top_k is None:
        raise fail("rebuild the moe_expert_lora routing: top_k is null", 'set "top_k" to the trained integer.', SEE_LOADING)
    if top_k is not None and num_experts and top_k > num_experts:
        raise fail(f"rebuild the {strategy} routing: top_k is {top_k} but there are only {num_experts} experts",
                   'fix "top_k" in the injection block.', SEE_LOADING)
    moe_layers = block.get("moe_layers")
    return Injection(
        strategy=strategy,
        lora_r=int(r) if r is not None else None,
        lora_alpha=float(alpha),
        use_rslora=bool(block.get("use_rslora", False)),
        target_modules=tuple(targets),
        num_experts=int(num_experts) if num_experts else None,
        top_k=int(top_k) if top_k is not None else None,
        moe_layers=None if moe_layers is None else tuple(int(i) for i in moe_layers),
    )
