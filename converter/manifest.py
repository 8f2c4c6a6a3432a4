"""efexport.json: the artifact's metadata record and its file manifest.

Hashing and checking live here, in a module that imports only the standard library,
so the runtime loader, ``efexport verify``, the Hub download and the push share one check.
The sha256 is the digest the Hugging Face Hub uses as an LFS file's id.

A manifest may come from elsewhere (a Hub download, a folder someone edited): its shape
is checked (:func:`check_listing`) before any name in it is used as a path.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .errors import EfexportError, fail

MANIFEST = "efexport.json"
FORMAT = "efexport"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
SEE = "docs: README.md#verifying-an-artifact"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


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
    except UnicodeDecodeError:
        raise fail(f"read {MANIFEST}: it is not UTF-8 text", "re-export the artifact.", SEE) from None
    except RecursionError:
        raise fail(f"read {MANIFEST}: it nests too deeply to be a manifest", "re-export the artifact.", SEE) from None
    if not isinstance(data, dict):
        raise _bad_manifest(folder, f"{MANIFEST} is not a JSON object")
    if data.get("format") != FORMAT:
        raise fail(f"read {MANIFEST}: format is {data.get('format')!r}, not {FORMAT!r}", "re-export the artifact.", SEE)
    if data.get("format_version") != FORMAT_VERSION:
        raise fail(
            f"read {MANIFEST}: format_version {data.get('format_version')!r} is not supported (this efexport reads {FORMAT_VERSION})",
            "upgrade efexport (pip install -U efexport) or re-export with this version.",
            SEE,
        )
    return data


def check_listing(folder: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``files`` table is well-formed; return it. Reads no file.

    Every name must be a plain relative path inside the folder (a hostile or broken
    manifest is refused rather than followed) and every entry must carry a lowercase
    hex sha256 and a size, so that the checks after it can trust the table.
    """
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _bad_manifest(folder, f"{MANIFEST} has no `files` table")
    for rel in sorted(files):
        _check_name(folder, rel)
        entry = files[rel]
        size = entry.get("size") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not _SHA256_HEX.fullmatch(entry["sha256"])
                or not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise _bad_manifest(
                folder, f"{MANIFEST} has a malformed entry for {rel} (needs a lowercase hex sha256 and a size)")
    return files


def check_present(folder: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present with its size; no unlisted weight file. Cheap: nothing is hashed.

    The listing is checked first (:func:`check_listing`), so no name from the manifest is
    opened outside the folder, for a local folder and a download alike.
    """
    folder = Path(folder)
    listed = check_listing(folder, manifest)
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


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present with its size and sha256; no unlisted weight file.

    Sizes and stray files are checked first (cheap); then the files are hashed on two
    threads (hashlib releases the GIL), so verifying costs about half a sequential read.
    """
    folder = Path(folder)
    check_present(folder, manifest)
    listed = manifest.get("files") or {}
    check_digests(listed, hash_listed(folder, list(listed)))


def hash_listed(folder: Path, names: list[str], workers: int = 2) -> dict[str, str]:
    """sha256 of each named file (relative paths already checked by :func:`check_listing`)."""
    from concurrent.futures import ThreadPoolExecutor

    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="efexport-verify") as pool:
        return dict(zip(names, pool.map(lambda rel: sha256_file(Path(folder) / rel), names)))


def check_digests(listed: dict[str, dict[str, Any]], digests: dict[str, str]) -> None:
    """Raise the three-line error for the first hashed file whose digest is not the listed one."""
    for rel in sorted(digests):
        if digests[rel] != listed[rel]["sha256"]:
            raise fail(f"verify {rel}: its sha256 differs from efexport.json (the file was changed)",
                       "re-download or re-export the artifact.", SEE)


def is_weight_file(rel: str) -> bool:
    return rel.endswith(WEIGHT_SUFFIXES)


@contextmanager
def verified_while_read(folder: Path, manifest: dict[str, Any], workers: int = 2) -> Iterator[None]:
    """Verify an artifact in one read of each file, around the block that reads its weights.

    Names, sizes, stray weights and every small file (config, tokenizer, code) are checked
    before the block runs; the weight files are hashed on threads (hashlib releases the
    GIL) while the block reads the same pages. A changed file is the error raised on exit,
    in preference to whatever the block ran into reading it.
    """
    from concurrent.futures import ThreadPoolExecutor

    folder = Path(folder)
    check_present(folder, manifest)
    listed = manifest["files"]
    weights = [rel for rel in listed if is_weight_file(rel)]
    check_digests(listed, hash_listed(folder, [rel for rel in listed if rel not in weights]))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="efexport-verify") as pool:
        hashed = pool.submit(hash_listed, folder, weights, workers)
        try:
            yield
        except Exception:
            check_digests(listed, hashed.result())  # a changed file explains the failure better
            raise
        check_digests(listed, hashed.result())


def verify_folder(folder: Path) -> dict[str, Any]:
    """Check an artifact folder against its efexport.json completely; return the manifest.

    The check before a push and after a download asked to verify: the manifest's shape
    and sizes, stray weights and hashes (:func:`verify_files`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise fail(f"use {folder} as an efexport artifact: it is not a directory",
                   "pass the folder written by `efexport ... --out DIR`", SEE)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    return manifest


def _bad_manifest(folder: Path, why: str) -> EfexportError:
    return fail(f"use {folder} as an efexport artifact: {why}",
                "point at the folder written by `efexport ... --out DIR`, or re-export it; "
                "efexport.json must not be edited by hand", SEE)


def _check_name(folder: Path, rel: Any) -> None:
    """A listed name is a plain relative path inside the folder, and not efexport.json itself."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise _bad_manifest(folder, f"{MANIFEST} lists an invalid file name {rel!r}")
    if (PurePosixPath(rel).is_absolute() or re.match(r"[A-Za-z]:", rel)  # a drive, as Windows would read it
            or any(part in ("", ".", "..") for part in rel.split("/"))):
        raise _bad_manifest(folder, f"{MANIFEST} lists {rel!r}, which is not a plain relative path inside the folder")
    if rel == MANIFEST:
        raise _bad_manifest(folder, f"{MANIFEST} lists itself in `files`")


def _hidden(path: Path, folder: Path) -> bool:
    """Dot-folders (a download cache's bookkeeping) are not part of the artifact."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)
