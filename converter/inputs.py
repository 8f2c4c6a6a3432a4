"""Folders efexport may be pointed at that are someone's output: efexport artifacts and quantized HF folders.

Read from JSON alone (``efexport.json``, ``config.json``), so the answer comes before any
tensor is read. Quantized weights are refused as an export source: the pipeline reads float
weights, and quantizing already-quantized weights again compounds two roundings; the run the
artifact was made from is the better source, and efexport.json names it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import fail
from .manifest import MANIFEST

SEE = "docs: README.md#artifacts-as-inputs"


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def artifact_record(folder: str | Path) -> dict[str, Any] | None:
    """The efexport.json of an efexport artifact folder (unverified), or None."""
    p = Path(folder).expanduser()
    return _json(p / MANIFEST) if p.is_dir() else None


def quantization_of(folder: str | Path, hf_config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """config.json's quantization_config (bitsandbytes, GPTQ, AWQ, ...), or None for float weights."""
    config = hf_config if hf_config is not None else (_json(Path(folder).expanduser() / "config.json") or {})
    q = config.get("quantization_config")
    return q if isinstance(q, dict) and q else None


def quantization_text(q: dict[str, Any]) -> str:
    """'bitsandbytes int4 (NF4)', 'bitsandbytes int8 (LLM.int8)', or the quant_method's name."""
    method = str(q.get("quant_method") or "unknown")
    if method == "bitsandbytes":
        if q.get("load_in_4bit"):
            return f"bitsandbytes int4 ({str(q.get('bnb_4bit_quant_type') or 'nf4').upper()})"
        if q.get("load_in_8bit"):
            return "bitsandbytes int8 (LLM.int8)"
    return method


def describe_folder(folder: str | Path) -> str | None:
    """One line saying what an output folder is, or None for a run, checkpoint or float HF folder."""
    record = artifact_record(folder)
    q = quantization_of(folder)
    if record is not None:
        src = record.get("source") or {}
        made = (f", made from {src.get('run_name') or 'a run'}"
                + (f" checkpoint {src['checkpoint']}" if src.get("checkpoint") else "")) if src else ""
        return (f"efexport artifact ({record.get('layout')}, {record.get('precision') or 'source dtype'}"
                + (f", {quantization_text(q)} weights" if q else "") + made + ")")
    if q is not None:
        return f"{quantization_text(q)}-quantized Hugging Face folder"
    return None


def source_command(folder: str | Path) -> str | None:
    """`efexport RUN --checkpoint C` for the run an artifact was made from, when efexport.json names it."""
    src = (artifact_record(folder) or {}).get("source") or {}
    if not src.get("run_name"):
        return None
    return f"efexport {src['run_name']}" + (f" --checkpoint {src['checkpoint']}" if src.get("checkpoint") else "")


def refuse_quantized(folder: str | Path, hf_config: dict[str, Any] | None = None) -> None:
    """Raise the three-line error when ``folder``'s weights are quantized (nothing is read or written)."""
    q = quantization_of(folder, hf_config)
    if q is None:
        return
    name = Path(folder).name
    again = source_command(folder)
    fix = ((f"export from the run it was made from, e.g. `{again} --out DIR` (names from its efexport.json)"
            if again else "export from the float run or model the quantized folder was made from")
           + (f"; to use the artifact itself, load it with converter.runtime.load_artifact('{name}')"
              if artifact_record(folder) is not None else ""))
    raise fail(
        f"read {name} as a source: its weights are {quantization_text(q)}-quantized (quantization_config in "
        "config.json); efexport exports from float weights only, so no artifact carries a second rounding",
        fix + ".", SEE)
