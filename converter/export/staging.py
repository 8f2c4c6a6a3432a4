"""The temporary folder beside --out: checked before, cleaned on failure, renamed into place at the end.

Nothing is lost or half-written: the artifact is built in ``.<out>.efexport-tmp-<pid>-<id>``,
fsynced, and only then replaces --out; SIGTERM and Ctrl-C remove it, and a folder left by
``kill -9`` is removed by the next export to the same --out. Missing parents of --out are
created (and removed again if the export fails); ``.<out>.efexport-lock``, held with
``flock`` while writing, lets only one export at a time write to one --out.
"""

from __future__ import annotations

import fcntl
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
LOCK_MARK = ".efexport-lock"


def existing_ancestor(path: Path) -> Path:
    """The nearest folder above ``path`` that exists (where missing parents would be created)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


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
    base = existing_ancestor(out)
    if not base.is_dir():
        raise fail(f"write to {out}: {base} is a file, not a folder", "choose another --out.", SEE)
    if not os.access(base, os.W_OK):
        raise fail(f"write to {base}: permission denied", "choose an --out you can write to.", SEE)


def make_parents(out: Path) -> list[Path]:
    """``mkdir -p`` of --out's parent; returns the folders it created, outermost first."""
    created: list[Path] = []
    for folder in reversed([out.parent, *out.parent.parents]):
        if not folder.exists():
            try:
                folder.mkdir()
            except OSError as exc:
                remove_parents(created)
                raise fail(f"create {folder} for --out: {exc.strerror or exc}", "choose an --out you can write to.",
                           SEE) from None
            created.append(folder)
    return created


def remove_parents(created: list[Path]) -> None:
    """Undo :func:`make_parents` after a failed export (only folders still empty)."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold ``.<out>.efexport-lock`` beside --out: a second export to the same --out fails at once.

    The file is removed on release while still locked; an export that opened it just
    before finds its inode gone and takes a fresh one, so two never hold "the" lock.
    """
    path = out.parent / f".{out.name}{LOCK_MARK}"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise fail(f"write to {out}: another efexport is writing there right now (it holds {path.name})",
                       "wait for it to finish, or choose another --out.", SEE) from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


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


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fsync_file(p)
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
