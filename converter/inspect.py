"""``efexport inspect``: what a folder holds and where it can go, from JSON and headers alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import EfexportError
from .export.gguf import check_gguf
from .inputs import artifact_record, describe_folder, quantization_of, quantization_text, source_command
from .pipeline import open_pipeline
from .plan import plan_nbytes
from .sinks.peft import adapter_plan
from .source.run_dir import available_checkpoints, choose_checkpoint, step_of

KINDS = {"eulerforge_run": "EulerForge run", "peft_adapter": "PEFT adapter", "hf_model": "Hugging Face model folder"}
# Artifacts the pipeline reads as a source: float weights in a standard architecture (and adapters).
READABLE_LAYOUTS = ("dense", "moe", "peft_adapter")


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
    """'yes', or 'no (why)' in a phrase that reads on its own."""
    try:
        fn()
        return "yes"
    except EfexportError as exc:
        return "no (" + exc.cannot.split(": ", 1)[-1] + ")"


def inspect_run(path: str, checkpoint: str = "final", *, base_model: str | None = None) -> dict[str, Any]:
    """What ``path`` is and holds: a run, checkpoint, adapter or HF folder, or an efexport artifact."""
    record = artifact_record(path)
    if quantization_of(path) is not None or (record is not None and record.get("layout") not in READABLE_LAYOUTS):
        return inspect_artifact(path, record or {})
    with open_pipeline(path, checkpoint, base_model=base_model) as pipe:
        run, inj, target = pipe.run, pipe.injection, pipe.target
        sizes = {p or "source": plan_nbytes(pipe.planned(p)) for p in (None, "fp32", "fp16", "bf16", "int8", "int4")}
        formats = {"hf": f"yes ({target.layout} layout, {target.architecture})"}
        formats["gguf"] = _format_status(lambda: check_gguf(pipe, "q8_0"))
        formats["peft"] = ("no (no LoRA factors to write: the source is a plain model)" if inj.strategy == "none"
                           else _format_status(lambda: adapter_plan(pipe)))
        return {
            "path": str(Path(path)),
            "what": describe_folder(path) or KINDS.get(run.source_kind, run.source_kind),
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


def inspect_artifact(path: str, record: dict[str, Any]) -> dict[str, Any]:
    """An artifact that is not an export source (quantized, GGUF, compact): its efexport.json, summarised."""
    q = quantization_of(path)
    again = source_command(path)
    if q is not None:
        why = f"its weights are {quantization_text(q)}-quantized"
    elif record.get("layout") == "gguf":
        why = "a GGUF file is an end format"
    else:
        why = f"a {record.get('layout')} artifact is read by the runtime loader, not the export pipeline"
    no = f"no ({why}; export from the run" + (f": {again}" if again else "") + ")"
    files = record.get("files") or {}
    return {
        "path": str(Path(path)),
        "what": describe_folder(path),
        "layout": record.get("layout"),
        "precision": record.get("precision"),
        "quantization": record.get("quantization") or q,
        "strategy": record.get("strategy"),
        "backbone": record.get("backbone") or "",
        "architecture": record.get("architecture"),
        "base_model": record.get("base_model"),
        "lora_config": record.get("lora_config"),
        "source": record.get("source"),
        "files": len(files),
        "size_bytes": sum(int(f.get("size") or 0) for f in files.values()),
        "checkpoints": [],
        "formats": {"hf": no, "gguf": no, "peft": no},
        "loads_with": ("llama.cpp / Ollama / LM Studio" if record.get("layout") == "gguf"
                       else "converter.runtime.load_artifact(DIR), or load_model(DIR)"),
    }
