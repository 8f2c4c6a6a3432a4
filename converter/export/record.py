"""efexport.json and the model card: what was written, how it compares with the source, with what.

The record's fields are described in docs/artifact-format.md §4.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..manifest import FORMAT, FORMAT_VERSION, MANIFEST, file_entries, sha256_file
from ..plan import numel
from ..precision import FLOAT_DTYPES
from ..sinks.side_files import public_base_model
from .hashes import weights_digest
from .prepared import Prepared
from .staging import progress


def versions() -> dict[str, str | None]:
    """Library versions from package metadata (importing bitsandbytes alone costs seconds)."""
    out: dict[str, str | None] = {"efexport": __version__}
    for name in ("torch", "transformers", "bitsandbytes"):
        try:
            out[name] = version(name).split("+")[0]
        except PackageNotFoundError:
            out[name] = None
    return out


def build_record(prepared: Prepared, part: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
    """The efexport.json record for what was written (``part``: what the format sink reports)."""
    opts, pipe, run = prepared.opts, prepared.pipe, prepared.pipe.run
    precision = part.get("precision", opts.precision)
    record: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "strategy": pipe.injection.strategy,
        "layout": part["layout"],
        "structure_preserved": part["layout"] in ("moe", "compact") or pipe.target.layout == "moe",
        "backbone": run.backbone or None,
        "architecture": pipe.target.architecture or None,
        "base_model": public_base_model(run.base_model),
        "precision": precision,
        "dtype": part.get("dtype") or float_dtype_name(prepared, precision),
        "quantization": part.get("quantization") or prepared.fmt.quantization(precision),
        "lora_config": pipe.injection.lora_config,
        "num_parameters": part.get("num_parameters") or pipe.num_parameters(),
        "source": {
            "kind": run.source_kind,
            "run_name": run.run_name,
            "checkpoint": run.checkpoint,
            "step": run.step,
            "weights_sha256": part.get("weights_sha256"),
        },
        "files": files,
        "parity": part.get("parity"),
        "created_with": {**versions(), **(part.get("versions") or {})},
    }
    if "gguf" in part:
        record["gguf"] = {k: v for k, v in part["gguf"].items() if k in ("arch", "tensor_count", "file_type")}
    if run.vocabulary:
        record["vocabulary"] = dict(run.vocabulary)
    return record


def float_dtype_name(prepared: Prepared, precision: str | None) -> str | None:
    """The float dtype the weights were written in: the precision's, or (kept) the plan's own."""
    if precision in FLOAT_DTYPES:
        return str(FLOAT_DTYPES[precision]).removeprefix("torch.")
    if precision is not None:
        return None  # quantized: `quantization` says how
    counts: dict[torch.dtype, int] = {}
    for t in prepared.plan:
        if t.dtype.is_floating_point:
            counts[t.dtype] = counts.get(t.dtype, 0) + numel(t.shape)
    return str(max(counts, key=counts.get)).removeprefix("torch.") if counts else None


def render(prepared: Prepared, record: dict[str, Any]) -> str:
    from ..card import render_card

    opts = prepared.opts
    repo_ref = (opts.push.repo_id if opts.push else None) or opts.out.name
    return render_card(prepared.template, record, license=opts.license, repo_ref=repo_ref,
                       title=opts.name or Path(opts.out).name)


def preview_card(prepared: Prepared) -> str:
    """Render the card once with placeholder figures, so a broken template fails before writing."""
    layout = prepared.fmt.layout(prepared.pipe)
    fake_files = {"model.safetensors": {"sha256": "0" * 64, "size": 0}}
    parity = {"prompts": 4, "max_abs_logit_diff": 0.0, "max_abs_logit": 1.0, "top1_agreement": 1.0,
              "reference": "source run, float32"}
    return render(prepared, build_record(prepared, {"layout": layout, "parity": parity}, fake_files))


def finish(prepared: Prepared, tmp: Path, part: dict[str, Any]) -> dict[str, Any]:
    """Card, then efexport.json over every other file."""
    hashes = prepared.hashes
    digest = hashes.source.result() if hashes and hashes.source else weights_digest(prepared.pipe.source.files)
    part = {**part, "weights_sha256": digest}
    known = hashes.known() if hashes else {}
    total = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file() and p.name not in known)
    with progress(total, "hash", prepared.opts.progress) as bar:
        files = file_entries(tmp, progress=bar.update, known=known)
    record = build_record(prepared, part, files)
    card = tmp / "README.md"
    card.write_text(render(prepared, record), encoding="utf-8")
    files["README.md"] = {"sha256": sha256_file(card), "size": card.stat().st_size}  # the only new file
    record["files"] = dict(sorted(files.items()))
    (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
