"""The temporary folder beside --out: checked before, cleaned on failure, renamed into place at the end.

Nothing is lost or half-written: the artifact is built in ``.<out>.efexport-tmp-<pid>-<id>``,
fsynced, and only then replaces --out; SIGTERM and Ctrl-C remove it, and a folder left by
``kill -9`` is removed by the next export to the same --out.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import fail
from ..manifest import MANIFEST
from .options import SEE

TMP_MARK = ".efexport-tmp-"


def check_out(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise fail(f"write to {out}: it is a file", "pass --out a folder path.", SEE)
        if any(out.iterdir()):
            if not force:
                raise fail(f"write to {out}: the folder exists and is not empty",
                           "pass --force to replace it (the old one stays until the new one is complete), or choose another --out.", SEE)
            if not (out / MANIFEST).is_file():
                raise fail(f"replace {out}: it is not an efexport artifact (no {MANIFEST}), so --force will not delete it",
                           "choose another --out, or empty the folder yourself.", SEE)
    if not out.parent.exists():
        raise fail(f"write to {out}: the parent folder {out.parent} does not exist", "create it first, or choose another --out.", SEE)
    if not os.access(out.parent, os.W_OK):
        raise fail(f"write to {out.parent}: permission denied", "choose an --out you can write to.", SEE)


def check_disk(folder: Path, planned: int) -> None:
    free = shutil.disk_usage(folder).free
    need = int(planned * 1.05) + 64 * 1024 * 1024
    if free < need:
        raise fail(f"export here: about {need / 1e9:.2f} GB is needed but {free / 1e9:.2f} GB is free on {folder}",
                   "free some disk space, or pass --out on a larger disk.", SEE)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so cleanup runs on `kill` too."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def clean_stale(out: Path) -> None:
    """Temporary folders left by a killed export (kill -9) of the same --out."""
    for p in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        pid = p.name.rsplit("-", 2)[-2] if p.name.count("-") >= 2 else ""
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def new_tmp(out: Path) -> Path:
    return out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(tmp: Path, out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}{TMP_MARK}old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)


def progress(total: int, desc: str, enabled: bool, unit: str = "B") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=None if enabled else True,
                leave=False, dynamic_ncols=True)
