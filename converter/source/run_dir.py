"""Run folders and checkpoint folders: which checkpoint, which backbone, which strategy block.

Everything here reads small JSON files (and, for a resized vocabulary, a safetensors header)
only (docs/run-format.md §1-2); no tensor data is touched, so every "wrong path / wrong
checkpoint" error is raised before heavy work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SEE_LOADING, fail
from ..hf_model import check_config
from .files import read_json, typed
from .vocab import resized_config, tokenizer_dir

BACKBONES = ("qwen3", "llama", "gemma3")
CHECKPOINT_DIRS = {"final": "final", "best": "checkpoint-best", "latest": "checkpoint-latest"}
MODEL_TYPE_TO_BACKBONE = {"qwen3": "qwen3", "llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")
RESOLVED = "resolved_config.json"


@dataclass(frozen=True)
class AdapterBase:
    """A PEFT adapter's other half: the base model folder and both configs (docs/run-format.md §5)."""

    base_dir: Path
    adapter_config: dict[str, Any]
    base_config: dict[str, Any]


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
    adapter: AdapterBase | None = None  # set for PEFT adapter folders
    # a vocabulary resized for added tokens: {"base_size", "size"} (+ "untied" when a merge unties the embeddings)
    vocabulary: dict[str, Any] | None = None


def step_dirs(run_dir: Path) -> dict[int, Path]:
    return {
        int(m.group(1)): p
        for p in run_dir.iterdir()
        if p.is_dir() and (m := _STEP_DIR.match(p.name))
    }


def available_checkpoints(run_dir: Path) -> list[str]:
    """Names a user can pass to --checkpoint for this run, in a stable order."""
    names = [k for k, d in CHECKPOINT_DIRS.items() if (run_dir / d).is_dir()]
    if "final" not in names and is_checkpoint_dir(run_dir):
        names.insert(0, "final")
    steps = sorted(step_dirs(run_dir))
    if steps:
        names += [k for k in ("best", "latest") if k not in names and _trainer_fallback(run_dir, k)]
    return names + [str(s) for s in steps]


def _trainer_fallback(run_dir: Path, which: str) -> Path | None:
    """Trainer-style runs: latest = highest step; best = trainer_state's best_model_checkpoint."""
    steps = step_dirs(run_dir)
    if not steps:
        return None
    latest = steps[max(steps)]
    if which == "latest":
        return latest
    state_file = latest / "trainer_state.json"
    if which == "best" and state_file.is_file():
        best = typed(read_json(state_file), "best_model_checkpoint", str, state_file.name, "a checkpoint path")
        if best:
            candidate = run_dir / Path(str(best)).name  # absolute paths from another machine: keep the name
            if candidate.is_dir():
                return candidate
    return None


def is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def choose_checkpoint(run_dir: Path, checkpoint: str | int) -> Path:
    """Map final|best|latest|N to a folder, falling back to Trainer-style checkpoint-N folders."""
    key = str(checkpoint).strip()
    if key.isdigit():
        candidate = run_dir / f"checkpoint-{int(key)}"
    elif key in CHECKPOINT_DIRS:
        candidate = run_dir / CHECKPOINT_DIRS[key]
        if not candidate.is_dir():
            if key == "final" and is_checkpoint_dir(run_dir):
                candidate = run_dir  # a Trainer output folder's own final save
            else:
                candidate = _trainer_fallback(run_dir, key) or candidate
    else:
        raise fail(
            f"choose checkpoint {key!r}: it is not one of final, best, latest or a step number",
            "pass --checkpoint final|best|latest|N (N = a checkpoint-N folder of the run).",
            SEE_LOADING,
        )
    if not candidate.is_dir() or not is_checkpoint_dir(candidate):
        have = ", ".join(available_checkpoints(run_dir)) or "none"
        raise fail(
            f"find checkpoint {key!r} in {run_dir.name}: {candidate.name}/ is missing (available: {have})",
            "pick one of the available checkpoints with --checkpoint, or point at a checkpoint folder directly.",
            SEE_LOADING,
        )
    return candidate


def step_of(checkpoint_dir: Path) -> int | None:
    state = checkpoint_dir / "trainer_state.json"
    if state.is_file():
        step = typed(read_json(state), "global_step", int, state.name, "an integer")
        if step is not None:
            return step
    m = _STEP_DIR.match(checkpoint_dir.name)
    return int(m.group(1)) if m else None


def where(ckpt_dir: Path, path_type: str, run_dir: Path | None, chosen: str | None,
          resolved_cfg: dict[str, Any]) -> dict[str, Any]:
    """The ResolvedRun fields every kind of checkpoint shares: where it is and which run it belongs to."""
    run_name = typed(resolved_cfg, "run_name", str, RESOLVED, "a string")
    return dict(path_type=path_type, checkpoint_dir=ckpt_dir, run_dir=run_dir, checkpoint=chosen,
                run_name=run_name or (run_dir.name if run_dir else None), step=step_of(ckpt_dir))


def model_info(resolved_cfg: dict[str, Any]) -> dict[str, Any]:
    """resolved_config.json's ``model`` block, type-checked (``name_or_path`` names the base model)."""
    info = typed(resolved_cfg, "model", dict, RESOLVED, "an object") or {}
    typed(info, "name_or_path", str, f"{RESOLVED} (model)", "a model id or path")
    return info


def describe_checkpoint(ckpt_dir: Path, path_type: str, run_dir: Path | None, chosen: str | None,
                        resolved_cfg: dict[str, Any]) -> ResolvedRun:
    """A checkpoint with its own config.json: an EulerForge checkpoint or a plain HF model folder."""
    hf_config = read_json(ckpt_dir / "config.json")
    ef_block = typed(hf_config, "eulerforge", dict, "config.json", "an object (the strategy block)")
    hf_config.pop("eulerforge", None)
    block = _merge_blocks(resolved_cfg, ef_block)
    model_type = check_config(hf_config, ckpt_dir / "config.json")
    hf_config, vocabulary = resized_config(hf_config, ckpt_dir, tokenizer_dir([ckpt_dir, run_dir]), SEE_LOADING)
    declared = (typed(ef_block or {}, "backbone", str, "config.json (eulerforge)", "a backbone name")
                or typed(resolved_cfg, "backbone", str, RESOLVED, "a backbone name") or "")
    backbone = backbone_of(declared, model_type)
    info = model_info(resolved_cfg)
    kind = "eulerforge_run" if (block is not None or resolved_cfg) else "hf_model"
    return ResolvedRun(
        **where(ckpt_dir, path_type, run_dir, chosen, resolved_cfg),
        hf_config=hf_config,
        block=block,
        backbone=backbone,
        base_model=info.get("name_or_path") or typed(hf_config, "_name_or_path", str, "config.json", "a string") or None,
        source_kind=kind,
        vocabulary=vocabulary,
    )


def _merge_blocks(resolved_cfg: dict[str, Any], ef_block: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checkpoint's own block wins over the run's (it was saved with those weights)."""
    run_block = typed(resolved_cfg, "injection", dict, RESOLVED, "an object (the strategy block)")
    if isinstance(ef_block, dict) and isinstance(ef_block.get("injection"), dict):
        ef_block = ef_block["injection"]  # a whole resolved config stored in the checkpoint
    if ef_block is None and run_block is None:
        return None
    merged = dict(run_block or {})
    merged.update(ef_block or {})
    return merged


def backbone_of(declared: str, model_type: str) -> str:
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

