"""``efexport verify``: hashes, a reload in the engine that reads the artifact, and its logits re-measured.

Each format reloads where it runs: dense/moe/compact through the runtime loader, GGUF in
llama.cpp (the ``gguf`` extra), a PEFT adapter with ``PeftModel`` on its base model (when
that base is on this machine). The logits on the probe prompts are compared with the
fingerprint recorded at export; a check that cannot run here is reported as skipped, with why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import EfexportError
from .manifest import read_manifest, verified_while_read
from .quiet import quiet_libraries

MISMATCH = ("Cannot reproduce the logits recorded at export\n"
            "Fix: the artifact loads but computes something else; re-export it, or check library versions.\n"
            "See: docs: README.md#verifying-an-artifact")


class Skipped(Exception):
    """A reload that cannot run here; its message says why."""


def verify_artifact(folder: Path, *, parity: bool = True, base_model: str | None = None) -> dict[str, Any]:
    """A report dict; ``ok`` is False on any failure (the CLI exits non-zero then).

    Each file is read once: the weight files are hashed on a thread while the reload reads
    the same pages, and a changed file is reported instead of whatever the reload found.
    """
    folder = Path(folder)
    report: dict[str, Any] = {"artifact": str(folder), "ok": False, "files_checked": 0}
    try:
        manifest = read_manifest(folder)
        recorded = manifest.get("parity") or {}
        rerun = parity and "artifact_fingerprint" in recorded
        with verified_while_read(folder, manifest, workers=1 if rerun else 2):
            if manifest.get("layout") in ("dense", "moe", "compact"):
                from .runtime import check_weights

                check_weights(folder)  # config.json and every safetensors header, as load_artifact checks them
            reloaded = _reload(folder, manifest, base_model) if rerun else None
    except EfexportError as exc:
        report["error"] = str(exc)
        return report
    report["files_checked"] = len(manifest["files"])
    report["layout"], report["precision"] = manifest.get("layout"), manifest.get("precision")
    report["dtype"] = manifest.get("dtype")
    report["recorded"] = {k: v for k, v in recorded.items() if k != "artifact_fingerprint" and k != "probe_ids"}
    report["ok"] = True
    if not parity:
        report["parity"] = {"skipped": "--no-parity (files only)"}
    elif not rerun:
        why = recorded.get("skipped") or "efexport.json records none"
        report["parity"] = {"recorded": None, "skipped": f"no logits were recorded at export ({why})"}
    elif isinstance(reloaded, Skipped):
        report["parity"] = {"recorded": recorded.get("max_abs_logit_diff"), "skipped": str(reloaded)}
    else:
        engine, logits = reloaded
        report["parity"] = compare_with_record(recorded, logits, engine)
        if not report["parity"]["ok"]:
            report["ok"] = False
            report["error"] = MISMATCH
    return report


def _reload(folder: Path, manifest: dict[str, Any], base_model: str | None) -> Any:
    """(engine, logits) from :func:`reload_logits`, or the Skipped reason."""
    try:
        return reload_logits(folder, manifest, base_model)
    except Skipped as why:
        return why


def compare_with_record(recorded: dict[str, Any], logits: list[torch.Tensor], engine: str) -> dict[str, Any]:
    from .parity import fingerprint, same_fingerprint

    ok, agree, rel = same_fingerprint(recorded["artifact_fingerprint"], fingerprint(logits))
    return {
        "recorded": recorded.get("max_abs_logit_diff"),
        "engine": engine,
        "prompts": len(logits),
        "measured": f"top-1 agreement with export-time logits {100 * agree:.1f}%, max |logit| change {rel:.3g} (relative)",
        "top1_agreement_with_export": agree,
        "max_rel_change": rel,
        "ok": ok,
    }


def reload_logits(folder: Path, manifest: dict[str, Any], base_model: str | None) -> tuple[str, list[torch.Tensor]]:
    """(engine, logits on the probe prompts) from the engine that reads this layout; raises Skipped."""
    layout = manifest.get("layout")
    if layout == "gguf":
        return gguf_logits(folder, manifest)
    if layout == "peft_adapter":
        return peft_logits(folder, base_model)
    return hf_logits(folder)


def hf_logits(folder: Path) -> tuple[str, list[torch.Tensor]]:
    """dense / moe / compact: the files read a decoder layer at a time as the runtime loader reads them
    (no more memory than the export took; the files are hashed meanwhile)."""
    from .loaded import load_tokenizer
    from .parity import logits_of, probe_batches
    from .streaming import artifact_stream

    with quiet_libraries(), artifact_stream(folder) as model:
        batches = probe_batches(load_tokenizer(folder), model.config.get_text_config().vocab_size)
        return "runtime loader (transformers), a layer at a time", logits_of(model, batches)


def gguf_logits(folder: Path, manifest: dict[str, Any]) -> tuple[str, list[torch.Tensor]]:
    """The .gguf file in llama.cpp, on the probe token ids recorded at export (the folder has no HF tokenizer)."""
    from .sinks.gguf import llama_cpp_available, llama_cpp_logits

    if not llama_cpp_available():
        raise Skipped("llama-cpp-python is not installed (pip install 'efexport[gguf]' to reload GGUF files)")
    ids = (manifest.get("parity") or {}).get("probe_ids")
    if not ids:
        raise Skipped("efexport.json records no probe token ids (an export by an older efexport); re-export to check "
                      "the file's logits here")
    gguf_file = folder / next(name for name in manifest["files"] if name.endswith(".gguf"))
    return "llama.cpp", [llama_cpp_logits(gguf_file, p).unsqueeze(0) for p in ids]


def peft_logits(folder: Path, base_model: str | None) -> tuple[str, list[torch.Tensor]]:
    """PeftModel on the base model, when that base is a local folder or in the local HF cache."""
    import json

    from .loaded import load_tokenizer
    from .parity import logits_of, probe_batches
    from .source.peft_adapter import find_base

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    named = config.get("base_model_name_or_path")
    if not (base_model or named):
        raise Skipped("the adapter names no base model; pass --base-model PATH to reload it on its base")
    candidates = [("--base-model", base_model, None)] if base_model else [("adapter_config.json", named, None)]
    try:
        _, base_dir = find_base(candidates)
    except EfexportError as exc:
        raise Skipped(f"{exc.cannot.split(': ', 1)[-1]}; pass --base-model PATH to reload it on its base") from None
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with quiet_libraries():
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(folder), torch_device="cpu").eval()
        tokenizer = load_tokenizer(folder)
        batches = probe_batches(tokenizer, base.config.get_text_config().vocab_size)
        return f"peft (PeftModel on {base_dir.name})", logits_of(model, batches)
