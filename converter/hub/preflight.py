"""Everything a push needs, checked before any long work starts.

``efexport RUN --push-to-hub`` runs :func:`preflight` before the export, so a bad
token, a foreign namespace or a misspelt branch fails in seconds, not after an hour
of writing weights. Each check refuses only what the Hub would refuse anyway.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..errors import EfexportError, fail
from ..fetch import SEE_PUBLISHING, TOKEN_URL, hub_error, resolve_endpoint, validate_repo_id

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import HfApi

_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
_COMMIT_ID = re.compile(r"[0-9a-fA-F]{40}")
_PR_REF = re.compile(r"refs/pr/[0-9]+")


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("efexport")
    except Exception:
        return "0"


def make_api(token: str | None, endpoint: str | None) -> "HfApi":
    """An HfApi for ``endpoint`` (or HF_ENDPOINT) that names efexport in its User-Agent."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=resolve_endpoint(endpoint), token=token or None, library_name="efexport",
                 library_version=_library_version())


def validate_revision(revision: str | None) -> str | None:
    """A branch name (or refs/pr/N) that git accepts, stripped; None for main."""
    if revision is None:
        return None
    rev = revision.strip()
    fix = "pass a branch name such as `release` or `v1.0` (created from main when missing), or omit --revision"
    if not rev:
        raise fail("push to an empty --revision", fix, SEE_PUBLISHING)
    if _COMMIT_ID.fullmatch(rev):
        raise fail(f"push to {rev}: it is a commit id, and commits cannot be pushed to", fix, SEE_PUBLISHING)
    if rev.startswith("refs/") and not _PR_REF.fullmatch(rev):
        raise fail(f"push to {rev!r}: only branch names and refs/pr/N are accepted", fix, SEE_PUBLISHING)
    if (_REF_FORBIDDEN.search(rev) or rev.startswith(("/", "-", ".")) or rev.endswith(("/", ".", ".lock"))
            or rev == "@" or len(rev) > 200):
        raise fail(f"push to {rev!r}: it is not a valid git branch name", fix, SEE_PUBLISHING)
    return rev


def full_repo_id(repo_id: str, whoami: dict[str, Any]) -> str:
    """A bare NAME goes under the token's user, as ``hf upload`` does."""
    if "/" in repo_id:
        return repo_id
    name = whoami.get("name")
    return f"{name}/{repo_id}" if name else repo_id


def _check_write_access(repo_id: str, whoami: dict[str, Any]) -> None:
    """Refuse early when whoami already shows the token cannot write to the namespace.

    Only what whoami states plainly is used; anything it leaves open is left to the
    Hub, which answers 403 on the first write.
    """
    namespace = repo_id.split("/", 1)[0]
    access = (whoami.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    fix = (f"create a token with write access at {TOKEN_URL} (a 'write' token, or fine-grained with repo.write "
           "on the namespace) and pass it with --token or HF_TOKEN")
    if role == "read":
        raise fail(f"push to {repo_id}: the token is read-only (403 Forbidden)", fix, SEE_PUBLISHING)
    fine = access.get("fineGrained")
    if role == "fineGrained" and isinstance(fine, dict) and isinstance(fine.get("scoped"), list):
        allowed = "repo.write" in (fine.get("global") or [])
        for scope in fine["scoped"]:
            entity = (scope or {}).get("entity") or {}
            if "repo.write" in ((scope or {}).get("permissions") or []) and entity.get("name") in (namespace, repo_id):
                allowed = True
        if not allowed:
            raise fail(f"push to {repo_id}: the fine-grained token has no repo.write permission on {namespace} "
                       "(403 Forbidden)", fix, SEE_PUBLISHING)
    if whoami.get("type", "user") == "user" and namespace != whoami.get("name"):
        orgs = {org.get("name"): org.get("roleInOrg") for org in whoami.get("orgs") or [] if isinstance(org, dict)}
        if namespace not in orgs:
            raise fail(f"push to {repo_id}: the token belongs to {whoami.get('name')!r}, who is not a member of "
                       f"{namespace!r} (403 Forbidden)",
                       f"push to {whoami.get('name')}/<name>, or use a token of an account with write access to "
                       f"{namespace}", SEE_PUBLISHING)
        if orgs[namespace] == "read":
            raise fail(f"push to {repo_id}: {whoami.get('name')!r} has the read role in {namespace!r} (403 Forbidden)",
                       f"ask an admin of {namespace} for the write role, or push under your own name", SEE_PUBLISHING)


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
    repo_id = validate_repo_id(repo_id, SEE_PUBLISHING)
    rev = validate_revision(revision)
    api = make_api(token, endpoint)
    where = api.endpoint
    try:
        who = api.whoami(cache=True)
    except Exception as exc:
        raise hub_error(exc, "check the Hugging Face token", repo_id=repo_id, token=token, api=api) from None
    repo_id = full_repo_id(repo_id, who)
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
        raise hub_error(exc, action, repo_id=repo_id, revision=rev, token=token, api=api) from None
    return api


def _refuse_private_on_public(repo_id: str, where: str) -> EfexportError:
    return fail(f"push to {repo_id} as private: the repository already exists and is public",
                f"make it private first (Settings on {where}/{repo_id}, or "
                f"HfApi().update_repo_settings({repo_id!r}, private=True)), or drop --private", SEE_PUBLISHING)


def _preflight_read_only(api: "HfApi", repo_id: str, *, private: bool, token: str | None) -> "HfApi":
    """The preflight of a dry run: reads only (the repository may not exist yet)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = api.repo_info(repo_id)
    except RepositoryNotFoundError as exc:
        if isinstance(exc, GatedRepoError):
            raise hub_error(exc, f"open {repo_id} on {api.endpoint}", repo_id=repo_id, token=token, api=api) from None
        return api  # the push would create it
    except Exception as exc:
        raise hub_error(exc, f"open {repo_id} on {api.endpoint}", repo_id=repo_id, token=token, api=api) from None
    if private and info.private is False:
        raise _refuse_private_on_public(repo_id, api.endpoint)
    return api
