"""``export(ExportOptions)``: check, write atomically, then publish if asked.

Order of work, so that nothing is lost or half-written:
1. :func:`~converter.export.prepare.prepare` runs every check and reads no tensor data;
2. the format sink streams weights into a temporary folder beside --out, then config,
   tokenizer, card and efexport.json, all fsynced;
3. parity is measured on the temporary folder; a float export beyond tolerance stops here;
4. the folder is renamed into place (an old artifact replaced only now, with --force).
On any error, Ctrl-C or SIGTERM the temporary folder is removed and --out is untouched.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..encoders import torch_threads
from ..errors import EfexportError
from .hashes import BackgroundHashes
from .options import ExportOptions, PushOptions
from .prepare import prepare
from .prepared import Prepared
from .staging import (check_out, clean_stale, fsync_tree, make_parents, move_into_place, new_tmp, out_lock,
                      remove_parents, sigterm_as_interrupt)


@dataclass
class ExportResult:
    """What an export did: the efexport.json record (None for a dry run), where, how long, and the push."""

    out: Path
    record: dict[str, Any] | None
    seconds: float = 0.0
    push: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None  # a dry run's summary


class PushFailed(EfexportError):
    """The artifact is complete at ``out`` but publishing it failed: it can be pushed on its own."""

    def __init__(self, cause: EfexportError, out: Path, push: PushOptions) -> None:
        self.cause, self.out, self.push = cause, out, push
        super().__init__(f"{cause.cannot} (the export itself is complete at {out})",
                         cause.fix + "; then publish the folder without exporting again", cause.see)


def run_export(prepared: Prepared) -> dict[str, Any]:
    """Write, check, and move the artifact into place; returns the efexport.json record."""
    opts, pipe = prepared.opts, prepared.pipe
    out = opts.out
    created: list[Path] = []
    tmp: Path | None = None
    try:
        with sigterm_as_interrupt():
            created = make_parents(out)
            with out_lock(out):
                check_out(out, opts.force)  # again, under the lock: another export may have finished meanwhile
                clean_stale(out)
                tmp = new_tmp(out)
                prepared.hashes = BackgroundHashes()
                prepared.hashes.hash_source(pipe.source.files)
                tmp.mkdir()
                record = prepared.fmt.write(prepared, tmp)
                fsync_tree(tmp)
                move_into_place(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_parents(created)
        raise
    finally:
        if prepared.hashes is not None:
            prepared.hashes.close()
        pipe.close()
    return record


def export(opts: ExportOptions) -> ExportResult:
    """Check, then write, then push. The API behind `efexport RUN --out DIR`."""
    started = time.time()
    prepared = prepare(opts)
    out = prepared.opts.out
    if opts.dry_run:
        prepared.pipe.close()
        return ExportResult(out=out, record=None, plan=prepared.summary())
    with torch_threads(opts.threads):
        record = run_export(prepared)
    result = ExportResult(out=out, record=record, seconds=round(time.time() - started, 2))
    if opts.push:
        from ..hub import push_artifact

        p = opts.push
        try:
            pushed = push_artifact(out, p.repo_id, api=prepared.hub_api, revision=p.revision,
                                   commit_message=p.commit_message, private=p.private)
        except EfexportError as exc:
            raise PushFailed(exc, out, p) from None
        result.push = {"repo_id": pushed.repo_id, "url": pushed.url, "commit_id": pushed.commit_id,
                       "revision": pushed.revision}
    return result
