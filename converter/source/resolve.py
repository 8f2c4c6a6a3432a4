"""Which kind of folder the user pointed at, and the checkpoint in it (docs/run-format.md §1).

A run folder (``resolved_config.json`` or Trainer ``checkpoint-N/`` folders), a checkpoint
folder with ``config.json`` (EulerForge or plain Hugging Face) or a PEFT adapter folder
(``adapter_config.json``): each is described as a :class:`ResolvedRun` from JSON alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SEE_LOADING, fail
from .files import read_json
from .peft_adapter import resolve_adapter
from .run_dir import ResolvedRun, choose_checkpoint, describe_checkpoint, is_checkpoint_dir, step_dirs


def resolve(path: str | Path, checkpoint: str | int = "final", *, base_model: str | None = None,
            download_base: bool = False) -> ResolvedRun:
    """Detect the path type and pick the checkpoint (docs/run-format.md §1)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise fail(
            f"identify EulerForge checkpoint: {root} does not exist",
            "Specify a valid run_dir or checkpoint_dir path.",
            SEE_LOADING,
        )
    root = root.resolve()
    resolved_cfg: dict[str, Any] = {}
    steps_here = root.is_dir() and bool(step_dirs(root))
    if (root / "resolved_config.json").is_file() or (
        steps_here and (not is_checkpoint_dir(root) or str(checkpoint).strip() != "final")
    ):
        path_type, run_dir = "run_dir", root
        if (root / "resolved_config.json").is_file():
            resolved_cfg = read_json(root / "resolved_config.json")
        ckpt_dir = choose_checkpoint(root, checkpoint)
        chosen: str | None = str(checkpoint)
    elif root.is_dir() and is_checkpoint_dir(root):
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
        return resolve_adapter(ckpt_dir, path_type, run_dir, chosen, resolved_cfg, base_model,
                               download_base=download_base)
    return describe_checkpoint(ckpt_dir, path_type, run_dir, chosen, resolved_cfg)
