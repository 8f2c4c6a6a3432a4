"""Resolve what the user pointed at: which folder, which checkpoint, which strategy.

Everything here reads small JSON files only; no tensor data is touched, so every
"wrong path / wrong checkpoint / wrong strategy" error is raised before heavy work.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import fail

STRATEGIES = ("none", "dense_lora", "moe_expert_lora", "mixture_lora")
BACKBONES = ("qwen3", "llama", "gemma3")
CHECKPOINT_DIRS = {"final": "final", "best": "checkpoint-best", "latest": "checkpoint-latest"}
MODEL_TYPE_TO_BACKBONE = {"qwen3": "qwen3", "llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}
SEE_LOADING = "docs: README.md#loading-a-run"
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


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


@dataclass(frozen=True)
class ResolvedRun:
    """A checkpoint chosen and described, before any tensor is read."""

    path_type: str  # "run_dir" | "checkpoint_dir"
    checkpoint_dir: Path
    run_dir: Path | None
    checkpoint: str | None  # "final" | "best" | "latest" | "N" | None (checkpoint_dir given)
    hf_config: dict[str, Any]  # config.json without the eulerforge block
    block: dict[str, Any] | None  # the raw strategy block, if any was found
    backbone: str
    base_model: str | None
    run_name: str | None
    step: int | None
    source_kind: str = "eulerforge_run"  # | "hf_model" | "peft_adapter"
    extras: dict[str, Any] = field(default_factory=dict)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise fail(
            f"read {path.name}: it is not valid JSON ({exc.msg} at line {exc.lineno})",
            f"repair or regenerate {path}.",
            SEE_LOADING,
        ) from None
    if not isinstance(data, dict):
        raise fail(f"read {path.name}: expected a JSON object", f"repair or regenerate {path}.", SEE_LOADING)
    return data


def _step_dirs(run_dir: Path) -> dict[int, Path]:
    return {
        int(m.group(1)): p
        for p in run_dir.iterdir()
        if p.is_dir() and (m := _STEP_DIR.match(p.name))
    }


def available_checkpoints(run_dir: Path) -> list[str]:
    """Names a user can pass to --checkpoint for this run, in a stable order."""
    names = [k for k, d in CHECKPOINT_DIRS.items() if (run_dir / d).is_dir()]
    if "final" not in names and _is_checkpoint_dir(run_dir):
        names.insert(0, "final")
    steps = sorted(_step_dirs(run_dir))
    if steps:
        names += [k for k in ("best", "latest") if k not in names and _trainer_fallback(run_dir, k)]
    return names + [str(s) for s in steps]


def _trainer_fallback(run_dir: Path, which: str) -> Path | None:
    """Trainer-style runs: latest = highest step; best = trainer_state's best_model_checkpoint."""
    steps = _step_dirs(run_dir)
    if not steps:
        return None
    latest = steps[max(steps)]
    if which == "latest":
        return latest
    state_file = latest / "trainer_state.json"
    if which == "best" and state_file.is_file():
        best = read_json(state_file).get("best_model_checkpoint")
        if best:
            candidate = run_dir / Path(str(best)).name  # absolute paths from another machine: keep the name
            if candidate.is_dir():
                return candidate
    return None


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def choose_checkpoint(run_dir: Path, checkpoint: str | int) -> Path:
    """Map final|best|latest|N to a folder, falling back to Trainer-style checkpoint-N folders."""
    key = str(checkpoint).strip()
    if key.isdigit():
        candidate = run_dir / f"checkpoint-{int(key)}"
    elif key in CHECKPOINT_DIRS:
        candidate = run_dir / CHECKPOINT_DIRS[key]
        if not candidate.is_dir():
            if key == "final" and _is_checkpoint_dir(run_dir):
                candidate = run_dir  # a Trainer output folder's own final save
            else:
                candidate = _trainer_fallback(run_dir, key) or candidate
    else:
        raise fail(
            f"choose checkpoint {key!r}: it is not one of final, best, latest or a step number",
            "pass --checkpoint final|best|latest|N (N = a checkpoint-N folder of the run).",
            SEE_LOADING,
        )
    if not candidate.is_dir() or not _is_checkpoint_dir(candidate):
        have = ", ".join(available_checkpoints(run_dir)) or "none"
        raise fail(
            f"find checkpoint {key!r} in {run_dir.name}: {candidate.name}/ is missing (available: {have})",
            "pick one of the available checkpoints with --checkpoint, or point at a checkpoint folder directly.",
            SEE_LOADING,
        )
    return candidate


def _step_of(checkpoint_dir: Path) -> int | None:
    state = checkpoint_dir / "trainer_state.json"
    if state.is_file():
        step = read_json(state).get("global_step")
        if isinstance(step, int):
            return step
    m = _STEP_DIR.match(checkpoint_dir.name)
    return int(m.group(1)) if m else None


def resolve(path: str | Path, checkpoint: str | int = "final", *, base_model: str | None = None,
            download_base: bool = False) -> ResolvedRun:
    """Detect the path type and pick the checkpoint, as seed 000 describes."""
    root = Path(path).expanduser()
    if not root.exists():
        raise fail(
            f"identify EulerForge checkpoint: {root} does not exist",
            "Specify a valid run_dir or checkpoint_dir path.",
            SEE_LOADING,
        )
    root = root.resolve()
    resolved_cfg: dict[str, Any] = {}
    steps_here = root.is_dir() and bool(_step_dirs(root))
    if (root / "resolved_config.json").is_file() or (
        steps_here and (not _is_checkpoint_dir(root) or str(checkpoint).strip() != "final")
    ):
        path_type, run_dir = "run_dir", root
        if (root / "resolved_config.json").is_file():
            resolved_cfg = read_json(root / "resolved_config.json")
        ckpt_dir = choose_checkpoint(root, checkpoint)
        chosen: str | None = str(checkpoint)
    elif root.is_dir() and _is_checkpoint_dir(root):
        path_type, run_dir, ckpt_dir, chosen = "checkpoint_dir", None, root, None
        parent = root.parent
        if (parent / "resolved_config.json").is_file():
            run_dir, resolved_cfg = parent, read_json(parent / "resolved_config.json")
    else:
        raise fail(
            f"identify EulerForge checkpoint: {root} has neither resolved_config.json nor config.json",
            "Specify a valid run_dir or checkpoint_dir path.",
            SEE_LOADING,
        )

    if (ckpt_dir / "adapter_config.json").is_file() and not (ckpt_dir / "config.json").is_file():
        from .adapters import resolve_adapter  # PEFT adapter folders: their own resolution

        return resolve_adapter(ckpt_dir, path_type, run_dir, chosen, resolved_cfg, base_model,
                               download_base=download_base)

    hf_config = read_json(ckpt_dir / "config.json")
    ef_block = hf_config.pop("eulerforge", None)
    block = _merge_blocks(resolved_cfg, ef_block)
    model_type = str(hf_config.get("model_type", ""))
    declared = (ef_block or {}).get("backbone") or resolved_cfg.get("backbone") or ""
    backbone = _backbone(declared, model_type)
    model_info = resolved_cfg.get("model") or {}
    kind = "eulerforge_run" if (block is not None or resolved_cfg) else "hf_model"
    return ResolvedRun(
        path_type=path_type,
        checkpoint_dir=ckpt_dir,
        run_dir=run_dir,
        checkpoint=chosen,
        hf_config=hf_config,
        block=block,
        backbone=backbone,
        base_model=model_info.get("name_or_path") or hf_config.get("_name_or_path") or None,
        run_name=resolved_cfg.get("run_name") or (run_dir.name if run_dir else None),
        step=_step_of(ckpt_dir),
        source_kind=kind,
    )


def _merge_blocks(resolved_cfg: dict[str, Any], ef_block: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checkpoint's own block wins over the run's (it was saved with those weights)."""
    run_block = resolved_cfg.get("injection")
    if isinstance(ef_block, dict) and isinstance(ef_block.get("injection"), dict):
        ef_block = ef_block["injection"]  # a whole resolved config stored in the checkpoint
    if ef_block is None and run_block is None:
        return None
    merged = dict(run_block or {})
    merged.update(ef_block or {})
    return merged


def _backbone(declared: str, model_type: str) -> str:
    from_type = MODEL_TYPE_TO_BACKBONE.get(model_type, "")
    declared = str(declared or "").lower()
    if declared and declared not in BACKBONES:
        raise fail(
            f"load backbone {declared!r}: supported backbones are {', '.join(BACKBONES)}",
            "export a run trained on qwen3, llama or gemma3, or fix \"backbone\" in resolved_config.json.",
            SEE_LOADING,
        )
    if declared and from_type and declared != from_type:
        raise fail(
            f"load the checkpoint: the run says backbone {declared!r} but config.json has model_type {model_type!r}",
            "fix \"backbone\" in resolved_config.json or point at the right checkpoint.",
            SEE_LOADING,
        )
    return declared or from_type


def detect_strategy(names: list[str] | set[str]) -> str:
    """Infer the strategy from tensor names alone (run-format.md §3)."""
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
    r_from_shapes = shapes[lora_a[0]][0] if lora_a else None
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
