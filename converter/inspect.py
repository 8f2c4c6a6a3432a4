"""``efexport inspect``: what a run holds and where it can go, from headers alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import EfexportError
from .export.gguf import check_gguf
from .pipeline import open_pipeline
from .plan import plan_nbytes
from .sinks.peft import adapter_plan
from .source.run_dir import available_checkpoints, choose_checkpoint, step_of


def _checkpoints(run_dir: Path | None) -> list[dict[str, Any]]:
    if run_dir is None:
        return []
    out = []
    for name in available_checkpoints(run_dir):
        try:
            d = choose_checkpoint(run_dir, name)
        except EfexportError:
            continue
        out.append({"name": name, "folder": d.name, "step": step_of(d)})
    return out


def _format_status(fn: Callable[[], object]) -> str:
    try:
        fn()
        return "yes"
    except EfexportError as exc:
        return "no (" + exc.cannot + ")"


def inspect_run(path: str, checkpoint: str = "final", *, base_model: str | None = None) -> dict[str, Any]:
    with open_pipeline(path, checkpoint, base_model=base_model) as pipe:
        run, inj, target = pipe.run, pipe.injection, pipe.target
        sizes = {p or "source": plan_nbytes(pipe.planned(p)) for p in (None, "fp32", "fp16", "bf16", "int8", "int4")}
        formats = {"hf": f"yes ({target.layout} layout, {target.architecture})"}

        formats["gguf"] = _format_status(lambda: check_gguf(pipe, "q8_0"))
        formats["peft"] = _format_status(lambda: adapter_plan(pipe))
        return {
            "path": str(Path(path)),
            "path_type": run.path_type,
            "source_kind": run.source_kind,
            "checkpoint": run.checkpoint,
            "checkpoint_dir": str(run.checkpoint_dir),
            "step": run.step,
            "strategy": inj.strategy,
            "backbone": run.backbone or "",
            "base_model": run.base_model,
            "lora_config": inj.lora_config,
            "default_layout": target.layout,
            "architecture": target.architecture,
            "source_tensors": len(pipe.source.names),
            "source_bytes": pipe.source.nbytes(),
            "source_dtype": str(pipe.source_dtype()).removeprefix("torch."),
            "checkpoints": _checkpoints(run.run_dir),
            "size_by_precision": sizes,
            "formats": formats,
        }
