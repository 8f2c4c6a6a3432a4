"""efexport.json: the artifact's metadata record and its file manifest.

Hashing and checking live here, in a module that imports only the standard library,
so the runtime loader, ``efexport verify`` and ``efexport push`` share one check.
The sha256 is the digest the Hugging Face Hub uses as an LFS file's id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from .errors import fail

MANIFEST = "efexport.json"
FORMAT = "efexport"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
SEE = "docs: README.md#verifying-an-artifact"


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024, progress: Callable[[int], Any] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
            if progress is not None:
                progress(len(block))
    return h.hexdigest()


def file_entries(folder: Path, progress: Callable[[int], Any] | None = None,
                 known: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in the folder but efexport.json, by relative path.

    ``known``: digests already computed (while the file was being written), by relative path.
    """
    out: dict[str, dict[str, Any]] = {}
    known = known or {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not _hidden(p, folder):
            rel = p.relative_to(folder).as_posix()
            digest = known.get(rel) or sha256_file(p, progress=progress)
            out[rel] = {"sha256": digest, "size": p.stat().st_size}
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise fail(
            f"load {folder}: it has no {MANIFEST}, so it is not an efexport artifact",
            "export it with `efexport RUN --out DIR`, or load a plain model with transformers.",
            SEE,
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise fail(f"read {MANIFEST}: {exc.msg} at line {exc.lineno}", "re-export the artifact.", SEE) from None
    if data.get("format") != FORMAT:
        raise fail(f"read {MANIFEST}: format is {data.get('format')!r}, not {FORMAT!r}", "re-export the artifact.", SEE)
    if data.get("format_version") != FORMAT_VERSION:
        raise fail(
            f"read {MANIFEST}: format_version {data.get('format_version')!r} is not supported (this efexport reads {FORMAT_VERSION})",
            "upgrade efexport (pip install -U efexport) or re-export with this version.",
            SEE,
        )
    return data


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present with its size and sha256; no unlisted weight file.

    Sizes and stray files are checked first (cheap); then the files are hashed on two
    threads (hashlib releases the GIL), so verifying costs about half a sequential read.
    """
    from concurrent.futures import ThreadPoolExecutor

    folder = Path(folder)
    listed = manifest.get("files") or {}
    for rel, entry in listed.items():
        p = folder / rel
        if not p.is_file():
            raise fail(f"verify {rel}: the file is missing", "re-download or re-export the artifact.", SEE)
        if p.stat().st_size != entry["size"]:
            raise fail(
                f"verify {rel}: size {p.stat().st_size} differs from the recorded {entry['size']} (truncated or changed)",
                "re-download or re-export the artifact.",
                SEE,
            )
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and rel not in listed and not _hidden(p, folder):
            raise fail(f"verify {rel}: this weight file is not listed in efexport.json",
                       "remove the stray file, or re-export the artifact.", SEE)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="efexport-verify") as pool:
        digests = dict(zip(listed, pool.map(lambda rel: sha256_file(folder / rel), listed)))
    for rel, entry in listed.items():
        if digests[rel] != entry["sha256"]:
            raise fail(f"verify {rel}: its sha256 differs from efexport.json (the file was changed)",
                       "re-download or re-export the artifact.", SEE)


def _hidden(path: Path, folder: Path) -> bool:
    """Dot-folders (a download cache's bookkeeping) are not part of the artifact."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)
