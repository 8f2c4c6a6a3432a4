"""Download an efexport artifact from the Hugging Face Hub by repo id.

The runtime loader's way to the Hub, kept apart from the push code (``converter.hub``)
so that loading an artifact never imports what publishing needs. The download is
``huggingface_hub.snapshot_download`` (retries, resumable transfer and the cache are the
library's); this module checks what arrived against efexport.json, short of hashing:
the caller hashes once, before loading.

It also holds the translation of ``huggingface_hub`` failures into three-line errors,
shared with ``converter.hub``: a download and a push fail on the same HTTP answers, and
the push side may import this module while the runtime side may not import ``hub/``.
The token is never put in a message: text that comes back from a server is scrubbed.

Module import is light: ``huggingface_hub`` is imported inside the functions.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from .errors import EfexportError, fail
from .manifest import MANIFEST, check_present, read_manifest, verify_folder

SEE_PUBLISHING = "docs: README.md#publishing"
SEE_LOADING = "docs: README.md#loading-an-artifact"
TOKEN_URL = "https://huggingface.co/settings/tokens"
_REPO_ID_FIX = "pass the repository as OWNER/NAME (letters, digits, '-', '_', '.'; no '--' or '..')"

_TOKENISH = re.compile(r"\b(hf_|api_org_)[A-Za-z0-9]{6,}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")


def resolve_endpoint(endpoint: str | None) -> str | None:
    """``endpoint``, else HF_ENDPOINT, without a trailing slash; None means huggingface.co."""
    value = endpoint or os.environ.get("HF_ENDPOINT") or None
    return value.rstrip("/") if value else None


def validate_repo_id(repo_id: Any, see: str = SEE_LOADING) -> str:
    """The repo id, stripped; refused before any request when huggingface_hub would refuse it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id

    fix = f"{_REPO_ID_FIX}, e.g. alice/my-model"
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise fail("use an empty repository id", fix, see)
    repo_id = repo_id.strip()
    try:
        hf_validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise fail(f"use {repo_id!r} as a Hub repository id: {_one_line(exc, [])}", fix, see) from None
    return repo_id


def _one_line(text: Any, secrets: Iterable[str], limit: int = 240) -> str:
    """Server or library text fit for a message: scrubbed of tokens, on one line, bounded."""
    text = " ".join(_scrub(str(text), secrets).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _secrets(token: str | None, api: Any = None) -> list[str]:
    """Every token this process might be sending, longest first, to scrub from messages."""
    found = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"), getattr(api, "token", None)]
    try:  # the cached login (`hf auth login`); read as a file, since get_token() may refresh over the network
        from huggingface_hub import constants

        found.append(Path(constants.HF_TOKEN_PATH).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):  # no login: the explicit and env tokens are still scrubbed
        pass
    return sorted({s.strip() for s in found if isinstance(s, str) and len(s.strip()) >= 4}, key=len, reverse=True)


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
        body = secret.split("_", 2)[-1] if secret.startswith(("hf_", "api_org_")) else ""
        if len(body) >= 8:  # the token without its prefix (e.g. echoed in a URL-safe form)
            text = text.replace(body, "***")
    text = _TOKENISH.sub(lambda m: m.group(1) + "***", text)
    return _BEARER.sub(lambda m: m.group(1) + "***", text)


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _token_source(token: str | None) -> str:
    if token:
        return "the --token value"
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "the HF_TOKEN environment variable"
    return "the cached login (`hf auth login`)"


def hub_error(
    exc: BaseException,
    action: str,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    api: Any = None,
    endpoint: str | None = None,
    write: bool = True,
    see: str | None = None,
) -> EfexportError:
    """Map anything huggingface_hub raised to a three-line error (``write``: a push, not a download).

    ``action`` is the "Cannot" part's verb phrase; the HTTP status, the server's own
    message (scrubbed) and what to do next are added to it. ``see`` replaces the See
    line chosen by ``write``.
    """
    if isinstance(exc, EfexportError):
        return exc
    from huggingface_hub import errors as hf_errors

    secrets = _secrets(token, api)
    default_see, rerun, access = _wording(write)
    see = see or default_see
    where = endpoint or getattr(api, "endpoint", None) or "the Hub"

    for err in _chain(exc):
        if isinstance(err, hf_errors.LocalTokenNotFoundError):
            return fail(f"{action}: no Hugging Face token found",
                        f"create a token with {access} access at {TOKEN_URL} and pass it with --token, "
                        "set the HF_TOKEN environment variable, or run `hf auth login`", see)
        if isinstance(err, hf_errors.HFValidationError):
            return fail(f"{action}: {_one_line(err, secrets)}", _REPO_ID_FIX, see)
        if isinstance(err, hf_errors.OfflineModeIsEnabled):
            return fail(f"{action}: HF_HUB_OFFLINE is set, so huggingface_hub refuses to use the network",
                        "unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) for pushes and downloads", see)

    http_err = next(
        (e for e in _chain(exc) if isinstance(e, hf_errors.HfHubHTTPError) and e.response is not None), None)
    if http_err is not None:
        return _http_error(http_err, action, repo_id or "the repository", revision, token, where, write, secrets, see)

    try:
        import httpx2

        transport: tuple[type[BaseException], ...] = (httpx2.TransportError, ConnectionError, TimeoutError)
    except ImportError:  # pragma: no cover - huggingface_hub >= 2.4 depends on httpx2
        transport = (ConnectionError, TimeoutError)
    net_err = next((e for e in _chain(exc) if isinstance(e, transport)), None)
    if net_err is not None:
        return fail(f"{action}: the connection to {where} failed ({type(net_err).__name__}: "
                    f"{_one_line(net_err, secrets, 160) or 'no answer'})",
                    f"check the network, proxy and --endpoint / HF_ENDPOINT; then {rerun}", see)
    return fail(f"{action}: {type(exc).__name__}: {_one_line(exc, secrets) or 'unexpected error'}",
                f"check the artifact and the repository, then {rerun}", see)


def _wording(write: bool) -> tuple[str, str, str]:
    """See line, how to retry, and the token access needed: for a push or for a download."""
    if write:
        return SEE_PUBLISHING, "re-run the same command: files already stored on the Hub are not uploaded again", "write"
    return SEE_LOADING, "re-run the same command: files already in the cache are not downloaded again", "read"


def _http_error(http_err: Any, action: str, repo: str, revision: str | None, token: str | None, where: str,
                write: bool, secrets: list[str], see: str) -> EfexportError:
    """The HTTP answer's part of :func:`hub_error`: one message per status the Hub gives."""
    from huggingface_hub import errors as hf_errors

    _, rerun, access = _wording(write)
    status = http_err.response.status_code
    server = http_err.server_message or ""
    detail = f": {_one_line(server, secrets)}" if server.strip() else ""
    if isinstance(http_err, hf_errors.GatedRepoError):
        return fail(f"{action}: {repo} is gated and this token's account has not been granted access ({status}{detail})",
                    f"request access on {where}/{repo}, then use a token of that account (--token or HF_TOKEN)", see)
    if status == 401:
        return fail(f"{action}: {where} rejected the token from {_token_source(token)} (401 Unauthorized{detail})",
                    f"create a token with {access} access at {TOKEN_URL} and pass it with --token or set HF_TOKEN "
                    "(HF_TOKEN takes precedence over `hf auth login`)", see)
    if status == 403 and not write:
        return fail(f"{action}: the token has no read access to {repo} (403 Forbidden{detail})",
                    "use a token of an account that can see the repository (--token or HF_TOKEN)", see)
    if status == 403:
        return fail(f"{action}: the token has no write access to {repo} (403 Forbidden{detail})",
                    f"use a token with write permission on that namespace ({TOKEN_URL}: a 'write' token, "
                    "or a fine-grained token with repo.write on it), or push to a repository under your own name", see)
    if status == 404:
        if isinstance(http_err, hf_errors.RevisionNotFoundError):
            return fail(f"{action}: revision {revision or 'main'!r} does not exist in {repo} (404{detail})",
                        "check the --revision spelling, or omit it to use main", see)
        if isinstance(http_err, hf_errors.RemoteEntryNotFoundError):
            return fail(f"{action}: a file is missing from {repo} (404{detail})",
                        "check that the repository holds an efexport artifact (efexport.json at its root)", see)
        return fail(f"{action}: {repo} was not found on {where}, or is private to this token (404{detail})",
                    "check the OWNER/NAME spelling and --endpoint; for a private repository use a token "
                    "of an account that can see it", see)
    if status in (409, 412):
        return fail(f"{action}: {repo}@{revision or 'main'} changed during the push ({status} Conflict{detail})",
                    f"make sure no other job pushes to the same branch at the same time, then {rerun}", see)
    if status == 429:
        retry_after = http_err.response.headers.get("Retry-After")
        wait = f"wait {retry_after} s" if retry_after and retry_after.isdigit() else "wait a few minutes"
        return fail(f"{action}: {where} rate-limited the requests (429 Too Many Requests{detail})",
                    f"{wait}, then {rerun}", see)
    if status >= 500:
        return fail(f"{action}: {where} answered {status} (server error{detail})",
                    f"try again later (huggingface_hub already retried what it safely could); {rerun}", see)
    if status == 413:
        return fail(f"{action}: {where} refused a request as too large (413{detail})",
                    "check the repository storage limits and the file sizes in the artifact", see)
    return fail(f"{action}: {where} refused the request ({status}{detail})",
                f"check the repository id, --revision and the artifact, then {rerun}", see)


def download_snapshot(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    allow_patterns: list[str] | None = None,
    what: str = "download",
    see: str | None = None,
) -> Path:
    """``snapshot_download`` with efexport's errors; return the local snapshot folder.

    The one Hub download path: an artifact here, a base model for a PEFT adapter
    (``allow_patterns``, ``what="download base model"``) where its resolver wants it.
    """
    repo_id = validate_repo_id(repo_id, see or SEE_LOADING)
    from huggingface_hub import snapshot_download

    resolved = resolve_endpoint(endpoint)
    try:
        path = snapshot_download(repo_id=repo_id, revision=revision, token=token or None, endpoint=resolved,
                                 cache_dir=str(cache_dir) if cache_dir is not None else None,
                                 allow_patterns=allow_patterns)
    except Exception as exc:
        raise hub_error(exc, f"{what} {repo_id}@{revision or 'main'}", repo_id=repo_id, revision=revision,
                        token=token, endpoint=resolved, write=False, see=see) from None
    return Path(path)


def download_artifact(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    verify: bool = False,
) -> Path:
    """Download an efexport artifact; return the local snapshot folder, checked short of hashing.

    The downloaded efexport.json is untrusted until checked: its ``files`` table must
    name plain relative paths inside the folder, and every listed file must have
    arrived with its listed size, with no unlisted weight file beside them. Hashing is
    left to the caller (the runtime loader hashes once, before loading) unless
    ``verify=True``. Raises :class:`EfexportError` when the download or a check fails.
    """
    folder = download_snapshot(repo_id, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir)
    if not (folder / MANIFEST).is_file():
        raise fail(f"load {repo_id.strip()}@{revision or 'main'}: the repository has no {MANIFEST}, "
                   "so it is not an efexport artifact",
                   "load it with transformers directly, or push an artifact with `efexport push DIR REPO_ID`", SEE_LOADING)
    if verify:
        verify_folder(folder)
    else:
        check_present(folder, read_manifest(folder))
    return folder
