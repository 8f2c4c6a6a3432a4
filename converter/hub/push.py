"""Push an artifact folder to the Hub and check that what arrived is what efexport.json says.

The upload is ``HfApi.upload_folder`` (hashing, resumable transfer, retries and
backoff are the library's); this module decides *what* is pushed and checks *what
arrived*, from the Hub's metadata alone (no file content is downloaded back).
"""

from __future__ import annotations

import glob
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import fail
from ..fetch import SEE_PUBLISHING, hub_error, validate_repo_id
from ..manifest import MANIFEST, WEIGHT_SUFFIXES, sha256_file, verify_folder
from .preflight import full_repo_id, preflight, validate_revision

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import HfApi

#: Remote files matching these are weights left over from an earlier push; the push
#: deletes those that the new artifact does not contain (so a repo never mixes the
#: shards of two exports, e.g. a stale model.safetensors shadowing a new index).
_STALE_WEIGHT_SUFFIXES = WEIGHT_SUFFIXES + (".safetensors.index.json", ".bin.index.json")
_PATHS_INFO_BATCH = 500  # the Hub caps paths-info requests; the client does not split them


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


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def verify_remote(api: "HfApi", repo_id: str, revision: str, manifest: dict[str, Any], folder: Path) -> None:
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
    manifest_path = folder / MANIFEST
    expected[MANIFEST] = (sha256_file(manifest_path), manifest_path.stat().st_size)
    paths = sorted(expected)

    remote: dict[str, Any] = {}
    try:
        for chunk in _chunks(paths, _PATHS_INFO_BATCH):
            for item in api.get_paths_info(repo_id, chunk, revision=revision):
                remote[item.path] = item
    except Exception as exc:
        raise hub_error(exc, f"verify the push to {repo_id}@{revision}", repo_id=repo_id, revision=revision,
                        api=api) from None

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
        more = f" (also: {', '.join(rel for rel, _ in problems[1:])})" if len(problems) > 1 else ""
        raise fail(f"verify the push to {repo_id}@{revision}: {problems[0][1]}{more}",
                   "re-run the push; if it persists, delete the file on the Hub and push again "
                   "(the local artifact matched efexport.json before the upload)", SEE_PUBLISHING)


def _default_commit_message(manifest: dict[str, Any]) -> str:
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
    manifest = verify_folder(folder)  # before any request: a broken artifact is never half-published
    rev = validate_revision(revision)
    if api is None:
        api = preflight(repo_id, token=token, endpoint=endpoint, private=private, revision=rev)
    repo_id = validate_repo_id(repo_id, SEE_PUBLISHING)
    if "/" not in repo_id:
        try:
            repo_id = full_repo_id(repo_id, api.whoami(cache=True))
        except Exception as exc:
            raise hub_error(exc, "check the Hugging Face token", repo_id=repo_id, token=token, api=api) from None
    branch = rev or "main"
    files = sorted(manifest["files"]) + [MANIFEST]
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
        raise hub_error(exc, f"push {folder} to {repo_id}@{branch}", repo_id=repo_id, revision=branch, token=token,
                        api=api) from None
    verify_remote(api, repo_id, info.oid, manifest, folder)
    return PushResult(
        repo_id=repo_id,
        url=f"{api.endpoint.rstrip('/')}/{repo_id}",
        commit_id=info.oid,
        revision=branch,
        files=len(files),
        verified=True,
        commit_url=str(info.commit_url),
        deleted=tuple(stale),
    )
