"""Publish an exported artifact to the Hugging Face Hub.

Everything that talks to the Hub goes through ``huggingface_hub``: ``HfApi`` for
``whoami`` / ``create_repo`` / ``create_branch`` / ``upload_folder`` / ``get_paths_info``.
Retries, backoff, hashing and resumable transfer (Xet on the real Hub, LFS elsewhere)
are the library's; this package only decides *what* to push and checks *what arrived*.

The flow of :func:`push_artifact`::

    verify_folder(folder)       # manifest.py: every file matches efexport.json, no stray weights
    preflight(repo_id, ...)     # preflight.py: repo id, token (whoami), repo created / writable, branch
    api.upload_folder(...)      # push.py: only the files efexport.json lists, plus efexport.json
    verify_remote(...)          # push.py: Hub's lfs.sha256 / git blob id == our hashes

Every failure is an :class:`~converter.errors.EfexportError` (Cannot / Fix / See);
huggingface_hub's are translated by :func:`converter.fetch.hub_error`, which the
download side shares. The token is never printed, logged, put in a message or written
to disk. Downloading an artifact is :mod:`converter.fetch`'s, not this package's, so
the runtime loader never imports it. Module import is light: ``huggingface_hub`` is
imported inside the functions.
"""

from __future__ import annotations

from .preflight import preflight
from .push import PushResult, push_artifact, verify_remote

__all__ = ["PushResult", "preflight", "push_artifact", "verify_remote"]
