"""Publish an exported artifact to the Hugging Face Hub, and fetch one back.

Everything that talks to the Hub goes through ``huggingface_hub`` (>= 2.4): ``HfApi``
for ``whoami`` / ``create_repo`` / ``create_branch`` / ``upload_folder`` /
``get_paths_info`` and ``snapshot_download`` for downloads. Retries, backoff,
hashing and resumable transfer (Xet on the real Hub, LFS elsewhere) are the
library's; this module only decides *what* to push and checks *what arrived*.

The flow of :func:`push_artifact`::

    verify_local(folder)        # every file matches efexport.json, no stray weights
    preflight(repo_id, ...)     # repo id, token (whoami), repo created / writable, branch
    api.upload_folder(...)      # only the files efexport.json lists, plus efexport.json
    verify_remote(...)          # Hub's lfs.sha256 / git blob id == our hashes

Every failure is an :class:`~converter.errors.EfexportError` (Cannot / Fix / See).
The token is never printed, logged, put in a message or written to disk; text that
comes back from a server is scrubbed of it before it reaches a message.

Module import is light: ``huggingface_hub`` is imported inside the functions.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterable

from converter.errors import DOCS, EfexportError
from converter.manifest import MANIFEST as MANIFEST_NAME
from converter.manifest import WEIGHT_SUFFIXES
from converter.manifest import sha256_file as _sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import HfApi

__all__ = [
    "PushResult",
    "preflight",
    "verify_local",
    "push_artifact",
    "verify_remote",
    "download_artifact",
]

#: Remote files matching these are weights left over from an earlier push; the push
#: deletes those that the new artifact does not contain (so a repo never mixes the
#: shards of two exports, e.g. a stale model.safetensors shadowing a new index).
_STALE_WEIGHT_SUFFIXES = WEIGHT_SUFFIXES + (".safetensors.index.json", ".bin.index.json")
_PATHS_INFO_BATCH = 500  # the Hub caps paths-info requests; the client does not split them

_SEE_DOCS = DOCS
_SEE_FORMAT = DOCS
_SEE_AUTH = "https://huggingface.co/docs/huggingface_hub/quick-start#authentication"
_SEE_TOKENS = "https://huggingface.co/docs/hub/security-tokens"
_SEE_REPOS = "https://huggingface.co/docs/hub/repositories-getting-started"
_SEE_BRANCHES = "https://huggingface.co/docs/huggingface_hub/guides/repository"
_SEE_RATE = "https://huggingface.co/docs/hub/rate-limits"
_SEE_STATUS = "https://status.huggingface.co"
_SEE_UPLOAD = "https://huggingface.co/docs/huggingface_hub/guides/upload"
_TOKEN_URL = "https://huggingface.co/settings/tokens"

_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
_COMMIT_ID = re.compile(r"[0-9a-fA-F]{40}")
_PR_REF = re.compile(r"refs/pr/[0-9]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class PushResult:
    """What a push did: where, which commit, and whether the Hub's copy was verified."""

    repo_id: str
    url: str
    commit_id: str
    revision: str
    files: int
    verified: bool
    commit_url: str = ""
    deleted: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``--json``)."""
        data = asdict(self)
        data["deleted"] = list(self.deleted)
        return data


# --------------------------------------------------------------------------- local


def _bad_manifest(folder: Path, why: str) -> EfexportError:
    return EfexportError(
        f"use {folder} as an efexport artifact: {why}",
        "point at the folder written by `efexport ... --out DIR`, or re-export it; efexport.json must not be edited by hand",
        _SEE_FORMAT,
    )


def _check_relpath(folder: Path, rel: Any) -> str:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise _bad_manifest(folder, f"efexport.json lists an invalid file name {rel!r}")
    posix = PurePosixPath(rel)
    if posix.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        raise _bad_manifest(folder, f"efexport.json lists {rel!r}, which is not a plain relative path inside the folder")
    if rel == MANIFEST_NAME:
        raise _bad_manifest(folder, "efexport.json lists itself in `files`")
    return rel


def verify_local(folder: Path) -> dict:
    """Check an artifact folder against its ``efexport.json``; return the parsed manifest.

    The same check as ``efexport verify`` (:func:`converter.manifest.verify_files`): every
    file listed in ``files`` exists with the listed size and sha256, and no weight file
    exists that is not listed. Before that, the manifest's shape is checked so that a
    hostile or broken efexport.json (a path outside the folder, an entry without a
    hash) is refused rather than followed. Raises :class:`EfexportError` naming the file.
    """
    from converter.manifest import read_manifest, verify_files

    folder = Path(folder)
    if not folder.is_dir():
        raise EfexportError(
            f"use {folder} as an efexport artifact: it is not a directory",
            "pass the folder written by `efexport ... --out DIR`",
            _SEE_FORMAT,
        )
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            raw = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raw = {}  # read_manifest reports it, with the line number
        if not isinstance(raw, dict):
            raise _bad_manifest(folder, "efexport.json is not a JSON object")
    manifest = read_manifest(folder)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _bad_manifest(folder, "efexport.json has no `files` table")
    for rel in sorted(files):
        _check_relpath(folder, rel)
        entry = files[rel]
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _SHA256.fullmatch(entry["sha256"])
            or not isinstance(entry.get("size"), int)
            or isinstance(entry.get("size"), bool)
            or entry["size"] < 0
        ):
            raise _bad_manifest(
                folder, f"efexport.json has a malformed entry for {rel} (needs a lowercase hex sha256 and a size)"
            )
    verify_files(folder, manifest)
    return manifest


# --------------------------------------------------------------------------- errors


def _resolve_endpoint(endpoint: str | None) -> str | None:
    value = endpoint or os.environ.get("HF_ENDPOINT") or None
    return value.rstrip("/") if value else None


def _secrets(token: str | None, api: Any = None) -> list[str]:
    """Every token this process might be sending, to scrub from messages."""
    found = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    api_token = getattr(api, "token", None)
    if isinstance(api_token, str):
        found.append(api_token)
    try:
        from huggingface_hub.utils._auth import _get_token_from_file

        found.append(_get_token_from_file())
    except Exception:  # pragma: no cover - private helper moved: env + explicit still scrubbed
        pass
    return sorted({s.strip() for s in found if isinstance(s, str) and len(s.strip()) >= 4}, key=len, reverse=True)


_TOKENISH = re.compile(r"\b(hf_|api_org_)[A-Za-z0-9]{6,}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
        body = secret.split("_", 2)[-1] if secret.startswith(("hf_", "api_org_")) else ""
        if len(body) >= 8:  # the token without its prefix (e.g. echoed in a URL-safe form)
            text = text.replace(body, "***")
    text = _TOKENISH.sub(lambda m: m.group(1) + "***", text)
    return _BEARER.sub(lambda m: m.group(1) + "***", text)


def _one_line(text: str, secrets: Iterable[str], limit: int = 240) -> str:
    text = " ".join(_scrub(str(text), secrets).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def _hub_error(
    exc: BaseException,
    action: str,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    api: Any = None,
    endpoint: str | None = None,
    write: bool = True,
) -> EfexportError:
    """Map anything huggingface_hub raised to a three-line EfexportError (``write``: a push, not a download)."""
    if isinstance(exc, EfexportError):
        return exc
    from huggingface_hub import errors as hf_errors

    secrets = _secrets(token, api)
    where = endpoint or getattr(api, "endpoint", None) or "the Hub"
    repo = repo_id or "the repository"
    rerun = (
        "re-run the same command: files already stored on the Hub are not uploaded again"
        if write
        else "re-run the same command: files already in the cache are not downloaded again"
    )
    access = "write" if write else "read"

    for err in _chain(exc):
        if isinstance(err, hf_errors.LocalTokenNotFoundError):
            return EfexportError(
                f"{action}: no Hugging Face token found",
                f"create a token with {access} access at {_TOKEN_URL} and pass it with --token, "
                "set the HF_TOKEN environment variable, or run `hf auth login`",
                _SEE_AUTH,
            )
        if isinstance(err, hf_errors.HFValidationError):
            return EfexportError(
                f"{action}: {_one_line(err, secrets)}",
                "pass the repository as OWNER/NAME (letters, digits, '-', '_', '.'; no '--' or '..')",
                _SEE_REPOS,
            )
        if isinstance(err, hf_errors.OfflineModeIsEnabled):
            return EfexportError(
                f"{action}: HF_HUB_OFFLINE is set, so huggingface_hub refuses to use the network",
                "unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) for pushes and downloads",
                _SEE_DOCS,
            )

    http_err = next(
        (e for e in _chain(exc) if isinstance(e, hf_errors.HfHubHTTPError) and e.response is not None), None
    )
    if http_err is not None:
        status = http_err.response.status_code
        server = http_err.server_message or ""
        detail = f": {_one_line(server, secrets)}" if server.strip() else ""
        if isinstance(http_err, hf_errors.GatedRepoError):
            return EfexportError(
                f"{action}: {repo} is gated and this token's account has not been granted access ({status}{detail})",
                f"request access on {where}/{repo}, then use a token of that account (--token or HF_TOKEN)",
                _SEE_AUTH,
            )
        if status == 401:
            return EfexportError(
                f"{action}: {where} rejected the token from {_token_source(token)} (401 Unauthorized{detail})",
                f"create a token with {access} access at {_TOKEN_URL} and pass it with --token or set HF_TOKEN "
                "(HF_TOKEN takes precedence over `hf auth login`)",
                _SEE_AUTH,
            )
        if status == 403 and not write:
            return EfexportError(
                f"{action}: the token has no read access to {repo} (403 Forbidden{detail})",
                "use a token of an account that can see the repository (--token or HF_TOKEN)",
                _SEE_TOKENS,
            )
        if status == 403:
            return EfexportError(
                f"{action}: the token has no write access to {repo} (403 Forbidden{detail})",
                f"use a token with write permission on that namespace ({_TOKEN_URL}: a 'write' token, "
                "or a fine-grained token with repo.write on it), or push to a repository under your own name",
                _SEE_TOKENS,
            )
        if status == 404:
            if isinstance(http_err, hf_errors.RevisionNotFoundError):
                return EfexportError(
                    f"{action}: revision {revision or 'main'!r} does not exist in {repo} (404{detail})",
                    "check the --revision spelling, or omit it to use main",
                    _SEE_BRANCHES,
                )
            if isinstance(http_err, hf_errors.RemoteEntryNotFoundError):
                return EfexportError(
                    f"{action}: a file is missing from {repo} (404{detail})",
                    "check that the repository holds an efexport artifact (efexport.json at its root)",
                    _SEE_FORMAT,
                )
            return EfexportError(
                f"{action}: {repo} was not found on {where}, or is private to this token (404{detail})",
                "check the OWNER/NAME spelling and --endpoint; for a private repository use a token "
                "of an account that can see it",
                _SEE_REPOS,
            )
        if status in (409, 412):
            return EfexportError(
                f"{action}: {repo}@{revision or 'main'} changed during the push ({status} Conflict{detail})",
                f"make sure no other job pushes to the same branch at the same time, then {rerun}",
                _SEE_UPLOAD,
            )
        if status == 429:
            retry_after = http_err.response.headers.get("Retry-After")
            wait = f"wait {retry_after} s" if retry_after and retry_after.isdigit() else "wait a few minutes"
            return EfexportError(
                f"{action}: {where} rate-limited the requests (429 Too Many Requests{detail})",
                f"{wait}, then {rerun}",
                _SEE_RATE,
            )
        if status >= 500:
            return EfexportError(
                f"{action}: {where} answered {status} (server error{detail})",
                f"try again later (huggingface_hub already retried what it safely could); {rerun}",
                _SEE_STATUS,
            )
        if status == 413:
            return EfexportError(
                f"{action}: {where} refused a request as too large (413{detail})",
                "check the repository storage limits and the file sizes in the artifact",
                _SEE_UPLOAD,
            )
        return EfexportError(
            f"{action}: {where} refused the request ({status}{detail})",
            f"check the repository id, --revision and the artifact, then {rerun}",
            _SEE_UPLOAD,
        )

    try:
        import httpx2

        transport: tuple[type[BaseException], ...] = (httpx2.TransportError, ConnectionError, TimeoutError)
    except ImportError:  # pragma: no cover - huggingface_hub >= 2.4 depends on httpx2
        transport = (ConnectionError, TimeoutError)
    net_err = next((e for e in _chain(exc) if isinstance(e, transport)), None)
    if net_err is not None:
        return EfexportError(
            f"{action}: the connection to {where} failed ({type(net_err).__name__}: "
            f"{_one_line(net_err, secrets, 160) or 'no answer'})",
            f"check the network, proxy and --endpoint / HF_ENDPOINT; then {rerun}",
            _SEE_STATUS,
        )
    return EfexportError(
        f"{action}: {type(exc).__name__}: {_one_line(exc, secrets) or 'unexpected error'}",
        f"check the artifact and the repository, then {rerun}",
        _SEE_UPLOAD,
    )


# --------------------------------------------------------------------------- preflight


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("efexport")
    except Exception:
        return "0"


def _make_api(token: str | None, endpoint: str | None) -> "HfApi":
    from huggingface_hub import HfApi

    return HfApi(
        endpoint=_resolve_endpoint(endpoint),
        token=token or None,
        library_name="efexport",
        library_version=_library_version(),
    )


def _validate_repo_id(repo_id: Any) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    fix = "pass the repository as OWNER/NAME (letters, digits, '-', '_', '.'; no '--' or '..'), e.g. alice/my-model"
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise EfexportError("use an empty repository id", fix, _SEE_REPOS)
    repo_id = repo_id.strip()
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise EfexportError(f"use {repo_id!r} as a Hub repository id: {_one_line(exc, [])}", fix, _SEE_REPOS) from None
    return repo_id


def _validate_revision(revision: str | None) -> str | None:
    if revision is None:
        return None
    rev = revision.strip()
    fix = "pass a branch name such as `release` or `v1.0` (created from main when missing), or omit --revision"
    if not rev:
        raise EfexportError("push to an empty --revision", fix, _SEE_BRANCHES)
    if _COMMIT_ID.fullmatch(rev):
        raise EfexportError(f"push to {rev}: it is a commit id, and commits cannot be pushed to", fix, _SEE_BRANCHES)
    if rev.startswith("refs/") and not _PR_REF.fullmatch(rev):
        raise EfexportError(f"push to {rev!r}: only branch names and refs/pr/N are accepted", fix, _SEE_BRANCHES)
    if (
        _REF_FORBIDDEN.search(rev)
        or rev.startswith(("/", "-", "."))
        or rev.endswith(("/", ".", ".lock"))
        or rev == "@"
        or len(rev) > 200
    ):
        raise EfexportError(f"push to {rev!r}: it is not a valid git branch name", fix, _SEE_BRANCHES)
    return rev


def _full_repo_id(repo_id: str, whoami: dict) -> str:
    if "/" in repo_id:
        return repo_id
    name = whoami.get("name")
    return f"{name}/{repo_id}" if name else repo_id


def _check_write_access(repo_id: str, whoami: dict) -> None:
    """Refuse early when whoami already shows the token cannot write to the namespace.

    Only what whoami states plainly is used; anything it leaves open is left to the
    Hub, which answers 403 on the first write.
    """
    namespace = repo_id.split("/", 1)[0]
    auth = whoami.get("auth") or {}
    access = auth.get("accessToken") or {}
    role = access.get("role")
    fix = (
        f"create a token with write access at {_TOKEN_URL} (a 'write' token, or fine-grained with repo.write "
        "on the namespace) and pass it with --token or HF_TOKEN"
    )
    if role == "read":
        raise EfexportError(f"push to {repo_id}: the token is read-only (403 Forbidden)", fix, _SEE_TOKENS)
    fine = access.get("fineGrained")
    if role == "fineGrained" and isinstance(fine, dict) and isinstance(fine.get("scoped"), list):
        allowed = "repo.write" in (fine.get("global") or [])
        for scope in fine["scoped"]:
            entity = (scope or {}).get("entity") or {}
            if "repo.write" in ((scope or {}).get("permissions") or []) and entity.get("name") in (namespace, repo_id):
                allowed = True
        if not allowed:
            raise EfexportError(
                f"push to {repo_id}: the fine-grained token has no repo.write permission on {namespace} (403 Forbidden)",
                fix,
                _SEE_TOKENS,
            )
    if whoami.get("type", "user") == "user" and namespace != whoami.get("name"):
        orgs = {org.get("name"): org.get("roleInOrg") for org in whoami.get("orgs") or [] if isinstance(org, dict)}
        if namespace not in orgs:
            raise EfexportError(
                f"push to {repo_id}: the token belongs to {whoami.get('name')!r}, who is not a member of {namespace!r} (403 Forbidden)",
                f"push to {whoami.get('name')}/<name>, or use a token of an account with write access to {namespace}",
                _SEE_TOKENS,
            )
        if orgs[namespace] == "read":
            raise EfexportError(
                f"push to {repo_id}: {whoami.get('name')!r} has the read role in {namespace!r} (403 Forbidden)",
                f"ask an admin of {namespace} for the write role, or push under your own name",
                _SEE_TOKENS,
            )


def preflight(
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create: bool = True,
) -> "HfApi":
    """Check everything a push needs before any long work starts; return the configured HfApi.

    Validates the repo id and branch name, checks the token (``whoami``), creates the
    repository or finds it (``create_repo(exist_ok=True)``), refuses ``private=True``
    on an existing public repository, and creates ``revision`` from main when missing
    (``create_branch(exist_ok=True)``). Raises :class:`EfexportError` on any failure.

    ``create=False`` (for ``--dry-run``) changes nothing on the Hub: the token and the
    namespace are checked the same way, an existing repository is read (``repo_info``)
    for the --private check, and a missing repository or branch is left to the push.
    """
    repo_id = _validate_repo_id(repo_id)
    rev = _validate_revision(revision)
    api = _make_api(token, endpoint)
    where = api.endpoint
    try:
        who = api.whoami(cache=True)
    except Exception as exc:
        raise _hub_error(exc, "check the Hugging Face token", repo_id=repo_id, token=token, api=api) from None
    repo_id = _full_repo_id(repo_id, who)
    _check_write_access(repo_id, who)
    if not create:
        return _preflight_read_only(api, repo_id, private=private, token=token)
    action = f"create or open {repo_id} on {where}"
    try:
        # private=None keeps the namespace default (an org may default to private); it only
        # applies when the repository is created: an existing one keeps its visibility.
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if private:
            info = api.repo_info(repo_id)
            if info.private is False:
                raise _refuse_private_on_public(repo_id, where)
        if rev is not None and rev != "main" and not _PR_REF.fullmatch(rev):
            action = f"create branch {rev!r} in {repo_id}"
            api.create_branch(repo_id, branch=rev, exist_ok=True)
    except Exception as exc:
        raise _hub_error(exc, action, repo_id=repo_id, revision=rev, token=token, api=api) from None
    return api


def _refuse_private_on_public(repo_id: str, where: str) -> EfexportError:
    return EfexportError(
        f"push to {repo_id} as private: the repository already exists and is public",
        f"make it private first (Settings on {where}/{repo_id}, or "
        f"HfApi().update_repo_settings({repo_id!r}, private=True)), or drop --private",
        _SEE_REPOS,
    )


def _preflight_read_only(api: "HfApi", repo_id: str, *, private: bool, token: str | None) -> "HfApi":
    """The preflight of a dry run: reads only (the repository may not exist yet)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = api.repo_info(repo_id)
    except RepositoryNotFoundError as exc:
        if isinstance(exc, GatedRepoError):
            raise _hub_error(exc, f"open {repo_id} on {api.endpoint}", repo_id=repo_id, token=token, api=api) from None
        return api  # the push would create it
    except Exception as exc:
        raise _hub_error(exc, f"open {repo_id} on {api.endpoint}", repo_id=repo_id, token=token, api=api) from None
    if private and info.private is False:
        raise _refuse_private_on_public(repo_id, api.endpoint)
    return api


# --------------------------------------------------------------------------- push


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def verify_remote(api: "HfApi", repo_id: str, revision: str, manifest: dict, folder: Path) -> None:
    """Compare the Hub's metadata of every artifact file with ``efexport.json``.

    LFS files: the Hub's ``lfs.sha256`` must equal the manifest's sha256 (and sizes
    agree). Regular files: the Hub's ``blob_id`` must equal the git blob id of the
    local bytes. ``efexport.json`` itself is checked against the local copy. No file
    content is downloaded. Raises :class:`EfexportError` naming the file.
    """
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils.sha import git_hash

    folder = Path(folder)
    expected: dict[str, tuple[str, int]] = {
        rel: (str(entry["sha256"]).lower(), int(entry["size"])) for rel, entry in manifest["files"].items()
    }
    manifest_path = folder / MANIFEST_NAME
    expected[MANIFEST_NAME] = (_sha256_file(manifest_path), manifest_path.stat().st_size)
    paths = sorted(expected)

    remote: dict[str, Any] = {}
    try:
        for chunk in _chunks(paths, _PATHS_INFO_BATCH):
            for item in api.get_paths_info(repo_id, chunk, revision=revision):
                remote[item.path] = item
    except Exception as exc:
        raise _hub_error(
            exc, f"verify the push to {repo_id}@{revision}", repo_id=repo_id, revision=revision, api=api
        ) from None

    problems: list[tuple[str, str]] = []  # (file, what is wrong)
    for rel in paths:
        sha, size = expected[rel]
        info = remote.get(rel)
        if not isinstance(info, RepoFile):
            problems.append((rel, f"{rel} is missing on the Hub"))
        elif info.lfs is not None:
            if str(info.lfs.sha256).lower() != sha:
                problems.append((rel, f"the Hub stores {rel} with sha256 {info.lfs.sha256}, efexport.json says {sha}"))
            elif int(info.lfs.size) != size:
                problems.append((rel, f"the Hub stores {rel} with {info.lfs.size} bytes, efexport.json says {size}"))
        else:
            local_blob = git_hash((folder / rel).read_bytes())
            if info.blob_id != local_blob:
                problems.append((rel, f"the Hub stores {rel} as git blob {info.blob_id}, the local file is {local_blob}"))
            elif info.size is not None and int(info.size) != size:
                problems.append((rel, f"the Hub stores {rel} with {info.size} bytes, efexport.json says {size}"))
    if problems:
        more = ""
        if len(problems) > 1:
            more = f" (also: {', '.join(rel for rel, _ in problems[1:])})"
        raise EfexportError(
            f"verify the push to {repo_id}@{revision}: {problems[0][1]}{more}",
            "re-run the push; if it persists, delete the file on the Hub and push again "
            "(the local artifact matched efexport.json before the upload)",
            _SEE_UPLOAD,
        )


def _default_commit_message(manifest: dict) -> str:
    parts = [str(manifest.get(key)) for key in ("layout", "precision") if manifest.get(key)]
    what = f" ({', '.join(parts)})" if parts else ""
    return f"Upload efexport artifact{what}"


def push_artifact(
    folder: Path,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    api: "HfApi | None" = None,
) -> PushResult:
    """Verify ``folder``, push it to ``repo_id`` with ``upload_folder``, verify the Hub's copy.

    Only the files listed in efexport.json (plus efexport.json) are uploaded. Weight
    files from an earlier push that the artifact does not contain are deleted in the
    same commit. Pass ``api`` (from :func:`preflight`) to skip the preflight; ``token``,
    ``endpoint`` and ``private`` are then the preflight's (``token`` is still scrubbed
    from messages).
    """
    folder = Path(folder)
    manifest = verify_local(folder)
    rev = _validate_revision(revision)
    if api is None:
        api = preflight(repo_id, token=token, endpoint=endpoint, private=private, revision=rev)
    repo_id = _validate_repo_id(repo_id)
    if "/" not in repo_id:
        try:
            repo_id = _full_repo_id(repo_id, api.whoami(cache=True))
        except Exception as exc:
            raise _hub_error(exc, "check the Hugging Face token", repo_id=repo_id, token=token, api=api) from None
    branch = rev or "main"
    files = sorted(manifest["files"]) + [MANIFEST_NAME]
    action = f"push {folder} to {repo_id}@{branch}"
    try:
        remote_files = api.list_repo_files(repo_id, revision=branch)
        wanted = set(files)
        stale = sorted(p for p in remote_files if p.endswith(_STALE_WEIGHT_SUFFIXES) and p not in wanted)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=rev,
            commit_message=commit_message or _default_commit_message(manifest),
            allow_patterns=[glob.escape(rel) for rel in files],
            delete_patterns=[glob.escape(rel) for rel in stale] or None,
        )
    except Exception as exc:
        raise _hub_error(exc, action, repo_id=repo_id, revision=branch, token=token, api=api) from None
    commit_id = info.oid
    verify_remote(api, repo_id, commit_id, manifest, folder)
    return PushResult(
        repo_id=repo_id,
        url=f"{api.endpoint.rstrip('/')}/{repo_id}",
        commit_id=commit_id,
        revision=branch,
        files=len(files),
        verified=True,
        commit_url=str(info.commit_url),
        deleted=tuple(stale),
    )


# --------------------------------------------------------------------------- download


def download_artifact(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    verify: bool = False,
) -> Path:
    """Download ``repo_id`` with ``snapshot_download``; return the local snapshot folder.

    The folder must hold an efexport.json (checked here, cheaply). The file hashes are
    checked with ``verify=True``; by default that is left to the caller, so that the
    runtime loader (which verifies before loading) does not hash the weights twice.
    Raises :class:`EfexportError` when the download fails or a check does not pass.
    """
    repo_id = _validate_repo_id(repo_id)
    from huggingface_hub import snapshot_download

    resolved = _resolve_endpoint(endpoint)
    action = f"download {repo_id}@{revision or 'main'}"
    try:
        path = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            token=token or None,
            endpoint=resolved,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
        )
    except Exception as exc:
        raise _hub_error(
            exc, action, repo_id=repo_id, revision=revision, token=token, endpoint=resolved, write=False
        ) from None
    folder = Path(path)
    if verify:
        verify_local(folder)
    elif not (folder / MANIFEST_NAME).is_file():
        raise EfexportError(
            f"load {repo_id}@{revision or 'main'}: the repository has no efexport.json, so it is not an efexport artifact",
            "load it with transformers directly, or push an artifact with `efexport push DIR REPO_ID`",
            _SEE_FORMAT,
        )
    return folder
