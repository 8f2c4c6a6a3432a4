"""``efexport verify``: hashes, reload with the runtime loader, and re-measured parity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import EfexportError
from .manifest import read_manifest, verify_files


def verify_artifact(folder: Path, *, parity: bool = True) -> dict[str, Any]:
    """A report dict; ``ok`` is False on any failure (the CLI exits non-zero then)."""
    folder = Path(folder)
    report: dict[str, Any] = {"artifact": str(folder), "ok": False, "files_checked": 0}
    try:
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
    except EfexportError as exc:
        report["error"] = str(exc)
        return report
    report["files_checked"] = len(manifest.get("files") or {})
    recorded = manifest.get("parity") or {}
    if not parity or manifest.get("layout") not in ("dense", "moe", "compact"):
        report["ok"] = True
        return report
    if "artifact_fingerprint" not in recorded:
        report["ok"] = True
        report["parity"] = {"recorded": None, "measured": None, "note": "no parity was recorded at export"}
        return report
    from .parity import fingerprint, logits_of, probe_batches, same_fingerprint
    from .runtime import load_artifact

    loaded = load_artifact(folder, device="cpu", verify=False)
    batches = probe_batches(loaded.tokenizer, loaded.model.config.get_text_config().vocab_size)
    measured = fingerprint(logits_of(loaded.model, batches))
    ok, agree, rel = same_fingerprint(recorded["artifact_fingerprint"], measured)
    report["parity"] = {
        "recorded": recorded.get("max_abs_logit_diff"),
        "measured": f"top-1 agreement with export-time logits {100 * agree:.1f}%, |logit| max change {rel:.2e}",
        "top1_agreement_with_export": agree,
        "max_rel_change": rel,
    }
    report["ok"] = ok
    if not ok:
        report["error"] = ("Cannot reproduce the logits recorded at export\n"
                           "Fix: the artifact loads but computes something else; re-export it, or check library versions.\n"
                           "See: docs: README.md#verifying-an-artifact")
    return report
