"""sha256 of finished files (and of the source weights) on a worker thread.

hashlib releases the GIL, so on two cores hashing shard N overlaps writing shard N+1
instead of re-reading every file at the end.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..manifest import sha256_file


def weights_digest(files: list[Path]) -> str:
    """sha256 over the source weight files' sha256s: identifies exactly which weights were exported."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


class BackgroundHashes:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="efexport-hash")
        self._files: dict[str, Future[str]] = {}
        self.source: Future[str] | None = None

    def hash_source(self, files: list[Path]) -> None:
        self.source = self._pool.submit(weights_digest, files)

    def file(self, path: Path) -> None:
        self._files[path.name] = self._pool.submit(sha256_file, path)

    def known(self) -> dict[str, str]:
        return {name: future.result() for name, future in self._files.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
