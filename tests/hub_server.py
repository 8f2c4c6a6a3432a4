"""A small Hugging Face Hub–compatible HTTP server for tests (stdlib only + git_hash).

It speaks the subset of the Hub's HTTP API that ``huggingface_hub`` (>= 2.4, with
``HF_HUB_DISABLE_XET``) uses to create repos and branches, commit files through the
preupload / LFS batch / ndjson commit protocol, list and describe files, and download
them. State lives in memory. Blob ids are git blob ids (``git_hash``) and LFS oids
are sha256, computed exactly as the Hub does; an LFS file's blob id is the git blob
id of its pointer file.

Test hooks:

* ``log``: one :class:`LogEntry` per request (method, path, status, body size, LFS oid,
  note). Tokens are never stored: only whether the request was authenticated.
* ``fail(pattern, status, times=1, method=None, headers=None, body=None)``: answer
  ``status`` to the next ``times`` requests whose path matches ``pattern`` (``times=None``:
  every one). ``status="drop"`` closes the connection without an answer.
* ``drop_lfs_puts_after = N``: accept the first N LFS data PUTs (by arrival), then drop
  the connection of every later one (after reading its body) until set back to None.
* ``lie(repo_id, path, lfs_sha256=..., blob_id=...)``: report other hashes for a file in
  tree / paths-info / model-info answers (downloads still serve the stored bytes).
* ``add_user(token, name, role="write", orgs={org: roleInOrg})`` and
  ``deny_write(repo_id, user)``: authentication and per-repo write permission.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from huggingface_hub.utils.sha import git_hash

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"

# The start of the Hub's default .gitattributes (the patterns that matter here).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet",
        "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*",
        "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class User:
    name: str
    role: str = "write"  # whoami's auth.accessToken.role: "read" | "write"
    orgs: dict[str, str] = field(default_factory=dict)  # org name -> roleInOrg


@dataclass
class Entry:
    size: int
    blob_id: str
    lfs_oid: str | None = None  # sha256 when the file is stored in LFS
    pointer_size: int | None = None


@dataclass
class Commit:
    oid: str
    parent: str | None
    tree: dict[str, Entry]
    title: str
    description: str = ""
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    denied: set[str] = field(default_factory=set)
    created_at: str = field(default_factory=_now)


@dataclass
class Fault:
    pattern: re.Pattern
    status: int | str
    remaining: int | None
    method: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None


@dataclass
class LogEntry:
    method: str
    path: str
    status: int | str = 0
    bytes_in: int = 0
    oid: str | None = None
    note: str = ""
    authenticated: bool = False
    chunked: bool = False  # the request body came with Transfer-Encoding: chunked


class _Answer(Exception):
    """Raised inside a route to answer with an error status."""

    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None, extra: dict | None = None):
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers or {}
        self.extra = extra or {}


class _Drop(Exception):
    """Raised inside a route to close the connection without an answer."""


def _not_found(code: str, error: str, commit: str | None = None) -> _Answer:
    headers = {"X-Error-Code": code, "X-Error-Message": error}
    if commit:
        headers["X-Repo-Commit"] = commit
    return _Answer(404, error, headers)


class FakeHub:
    """In-memory Hub. ``start()`` serves it on 127.0.0.1 (random port); ``url`` is the endpoint."""

    def __init__(self, *, lfs_threshold: int = 10 * 1024 * 1024) -> None:
        self.users: dict[str, User] = {}
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # git blob id -> content of regular files
        self.log: list[LogEntry] = []
        self.faults: list[Fault] = []
        self.lies: dict[tuple[str, str], dict[str, str]] = {}
        self.lfs_threshold = lfs_threshold
        self.multipart_chunk_size: int | None = None
        self.drop_lfs_puts_after: int | None = None
        self.lfs_put_arrivals = 0
        self.errors: list[str] = []  # unexpected server-side exceptions (a test bug)
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._parts: dict[tuple[str, str], dict[int, bytes]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ test hooks

    def add_user(self, token: str, name: str, *, role: str = "write", orgs: dict[str, str] | None = None) -> User:
        user = User(name=name, role=role, orgs=dict(orgs or {}))
        with self.lock:
            self.users[token] = user
        return user

    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        """Create a repository directly (as the Hub does: one commit with .gitattributes)."""
        with self.lock:
            if repo_id in self.repos:
                return self.repos[repo_id]
            repo = Repo(repo_id=repo_id, private=private)
            content = DEFAULT_GITATTRIBUTES.encode()
            tree = {".gitattributes": self._store_regular(content)}
            commit = self._new_commit(repo, None, tree, "initial commit")
            repo.branches["main"] = commit.oid
            self.repos[repo_id] = repo
            return repo

    def deny_write(self, repo_id: str, user: str) -> None:
        with self.lock:
            self.repos[repo_id].denied.add(user)

    def fail(
        self,
        pattern: str,
        status: int | str,
        *,
        times: int | None = 1,
        method: str | None = None,
        headers: dict[str, str] | None = None,
        body: Any = None,
    ) -> Fault:
        fault = Fault(re.compile(pattern), status, times, method, dict(headers or {}), body)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()
            self.drop_lfs_puts_after = None

    def lie(self, repo_id: str, path: str, *, lfs_sha256: str | None = None, blob_id: str | None = None) -> None:
        with self.lock:
            self.lies[(repo_id, path)] = {k: v for k, v in (("lfs", lfs_sha256), ("blob", blob_id)) if v}

    def head(self, repo_id: str, revision: str = "main") -> Commit:
        with self.lock:
            repo = self.repos[repo_id]
            return repo.commits[self._resolve(repo, revision)]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, Entry]:
        return dict(self.head(repo_id, revision).tree)

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        with self.lock:
            entry = self.head(repo_id, revision).tree[path]
            return self._content(self.repos[repo_id], entry)

    def requests(self, method: str | None = None, pattern: str | None = None) -> list[LogEntry]:
        with self.lock:
            entries = list(self.log)
        return [
            e
            for e in entries
            if (method is None or e.method == method) and (pattern is None or re.search(pattern, e.path))
        ]

    # ------------------------------------------------------------------ storage

    def _store_regular(self, content: bytes) -> Entry:
        blob_id = git_hash(content)
        self.blobs[blob_id] = content
        return Entry(size=len(content), blob_id=blob_id)

    @staticmethod
    def _lfs_entry(oid: str, size: int) -> Entry:
        pointer = LFS_POINTER.format(oid=oid, size=size).encode()
        return Entry(size=size, blob_id=git_hash(pointer), lfs_oid=oid, pointer_size=len(pointer))

    def _content(self, repo: Repo, entry: Entry) -> bytes:
        return repo.lfs[entry.lfs_oid] if entry.lfs_oid else self.blobs[entry.blob_id]

    def _new_commit(self, repo: Repo, parent: str | None, tree: dict[str, Entry], title: str, description: str = "") -> Commit:
        seed = json.dumps(
            [parent, sorted((p, e.blob_id) for p, e in tree.items()), title, next(self._counter)]
        ).encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, tree, title, description)
        repo.commits[commit.oid] = commit
        return commit

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise _not_found("RevisionNotFound", f"Invalid rev id: {revision}")

    def _lfs_patterns(self, repo: Repo, tree: dict[str, Entry]) -> list[str]:
        entry = tree.get(".gitattributes")
        if entry is None:
            return []
        patterns = []
        for line in self._content(repo, entry).decode("utf-8", "replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                patterns.append(parts[0])
        return patterns

    @staticmethod
    def _matches(path: str, pattern: str) -> bool:
        if "/" in pattern:
            return fnmatch.fnmatchcase(path, pattern)
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)

    def _file_json(self, repo: Repo, path: str, entry: Entry) -> dict:
        lie = self.lies.get((repo.repo_id, path), {})
        data: dict[str, Any] = {"type": "file", "oid": lie.get("blob", entry.blob_id), "size": entry.size, "path": path}
        if entry.lfs_oid:
            data["lfs"] = {"oid": lie.get("lfs", entry.lfs_oid), "size": entry.size, "pointerSize": entry.pointer_size}
        return data

    @staticmethod
    def _dirs(tree: dict[str, Entry]) -> set[str]:
        dirs = set()
        for path in tree:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs

    @staticmethod
    def _dir_json(commit: Commit, path: str) -> dict:
        return {"type": "directory", "oid": hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest(), "size": 0, "path": path}

    # ------------------------------------------------------------------ permissions

    def can_write_namespace(self, user: User | None, namespace: str) -> bool:
        if user is None or user.role != "write":
            return False
        return namespace == user.name or user.orgs.get(namespace) in ("admin", "write", "contributor")

    def can_read(self, user: User | None, repo: Repo) -> bool:
        if not repo.private:
            return True
        namespace = repo.repo_id.split("/", 1)[0]
        return user is not None and (namespace == user.name or namespace in user.orgs)

    def can_write(self, user: User | None, repo: Repo) -> bool:
        namespace = repo.repo_id.split("/", 1)[0]
        return self.can_write_namespace(user, namespace) and user is not None and user.name not in repo.denied


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stalls

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr access log
        pass

    # ------------------------------------------------------------------ plumbing

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.entry.chunked = True
            chunks = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        self.raw_path = split.path
        self.query = parse_qs(split.query, keep_blank_values=True)
        auth = self.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        self.entry = LogEntry(self.command, self.raw_path, authenticated=token is not None)
        with hub.lock:
            hub.log.append(self.entry)
        self.body = b""
        try:
            self.body = self._read_body()
            self.entry.bytes_in = len(self.body)
            fault = self._take_fault()
            if fault is not None:
                if fault.status == "drop":
                    raise _Drop()
                body = fault.body if fault.body is not None else {"error": f"injected {fault.status}"}
                self.entry.note = "injected"
                self._send_json(int(fault.status), body, fault.headers)
                return
            self.user = None
            if token is not None:
                self.user = hub.users.get(token)
                if self.user is None:
                    raise _Answer(
                        401,
                        "Invalid credentials in Authorization header",
                        {"X-Error-Message": "Invalid credentials in Authorization header"},
                    )
            self._route()
        except _Drop:
            self.entry.status = "dropped"
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except _Answer as answer:
            self._send_json(answer.status, {"error": answer.error, **answer.extra}, answer.headers)
        except Exception as exc:  # a bug in the fake: make it visible
            hub.errors.append(f"{self.command} {self.raw_path}: {exc!r}")
            self._send_json(500, {"error": f"fake hub crashed: {exc!r}"})

    def _take_fault(self) -> Fault | None:
        hub = self.hub
        with hub.lock:
            for fault in hub.faults:
                if fault.method and fault.method != self.command:
                    continue
                if not fault.pattern.search(self.raw_path):
                    continue
                if fault.remaining is not None:
                    if fault.remaining <= 0:
                        continue
                    fault.remaining -= 1
                return fault
        return None

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
        self.entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if not any(k.lower() == "content-length" for k in (headers or {})):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
        self._send(status, json.dumps(data).encode(), headers, content_type)

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError:
            raise _Answer(400, "Invalid JSON body") from None

    # ------------------------------------------------------------------ routing

    def _route(self) -> None:
        segs = [unquote(s) for s in self.raw_path.split("/")[1:]]
        method = self.command
        if segs == ["api", "whoami-v2"] and method == "GET":
            return self._whoami()
        if segs == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if segs == ["api", "validate-yaml"] and method == "POST":
            return self._send_json(200, {"errors": [], "warnings": []})
        if len(segs) >= 4 and segs[:2] == ["api", "models"]:
            repo_id, rest = f"{segs[2]}/{segs[3]}", segs[4:]
            if not rest and method == "GET":
                return self._model_info(repo_id, "main")
            if len(rest) == 2 and rest[0] == "revision" and method == "GET":
                return self._model_info(repo_id, rest[1])
            if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if len(rest) == 2 and rest[0] == "paths-info" and method == "POST":
                return self._paths_info(repo_id, rest[1])
            if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
                return self._preupload(repo_id, rest[1])
            if len(rest) == 2 and rest[0] == "commit" and method == "POST":
                return self._commit(repo_id, rest[1])
            if len(rest) == 2 and rest[0] == "branch" and method == "POST":
                return self._create_branch(repo_id, rest[1])
            if rest == ["refs"] and method == "GET":
                return self._refs(repo_id)
        if len(segs) == 6 and segs[1].endswith(".git") and segs[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{segs[0]}/{segs[1][:-4]}"
            if segs[5] == "batch" and method == "POST":
                return self._lfs_batch(repo_id)
            if segs[5] == "verify" and method == "POST":
                return self._lfs_verify(repo_id)
        if len(segs) == 4 and segs[0] == "lfs-upload":
            repo_id, oid = f"{segs[1]}/{segs[2]}", segs[3]
            if method == "PUT":
                return self._lfs_put(repo_id, oid)
            if method == "POST":
                return self._lfs_complete(repo_id, oid)
        if len(segs) == 5 and segs[0] == "lfs-part" and method == "PUT":
            return self._lfs_part(f"{segs[1]}/{segs[2]}", segs[3], int(segs[4]))
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        raise _Answer(404, f"no route for {method} {self.raw_path}")

    # ------------------------------------------------------------------ helpers

    def _require_user(self) -> User:
        if self.user is None:
            raise _Answer(401, "Unauthorized: a token is required", {"X-Error-Message": "Unauthorized"})
        return self.user

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        hub = self.hub
        repo = hub.repos.get(repo_id)
        if repo is None or not hub.can_read(self.user, repo):
            raise _not_found("RepoNotFound", "Repository not found")
        if write:
            if self.user is None:
                raise _Answer(401, "Unauthorized: a token is required", {"X-Error-Message": "Unauthorized"})
            if not hub.can_write(self.user, repo):
                message = f"You don't have write access to {repo_id}"
                raise _Answer(403, message, {"X-Error-Message": message})
        return repo

    def _base(self) -> str:
        return self.hub.url

    # ------------------------------------------------------------------ endpoints

    def _whoami(self) -> None:
        user = self._require_user()
        self._send_json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(user.name.encode()).hexdigest()[:24],
                "name": user.name,
                "fullname": user.name.title(),
                "email": f"{user.name}@example.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "avatarUrl": "/avatars/none.svg",
                "periodEnd": None,
                "orgs": [{"type": "org", "name": org, "roleInOrg": role} for org, role in user.orgs.items()],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test token", "role": user.role}},
            },
        )

    def _create_repo(self) -> None:
        hub = self.hub
        user = self._require_user()
        payload = self._json_body()
        name = payload.get("name") or ""
        namespace = payload.get("organization") or user.name
        if payload.get("type") not in (None, "model"):
            raise _Answer(400, "only model repositories are supported by the fake hub")
        if not hub.can_write_namespace(user, namespace):
            message = f"You don't have the rights to create a model under the namespace \"{namespace}\""
            raise _Answer(403, message, {"X-Error-Message": message})
        repo_id = f"{namespace}/{name}"
        url = f"{self._base()}/{repo_id}"
        with hub.lock:
            if repo_id in hub.repos:
                raise _Answer(409, "You already created this model repo", extra={"url": url})
            hub.create_repo(repo_id, private=payload.get("visibility") == "private")
        self._send_json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _model_info(self, repo_id: str, revision: str) -> None:
        hub = self.hub
        with hub.lock:
            repo = self._repo(repo_id)
            commit = repo.commits[hub._resolve(repo, revision)]
            blobs = (self.query.get("blobs") or ["false"])[0].lower() in ("1", "true")
            siblings = []
            for path, entry in sorted(commit.tree.items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    file = hub._file_json(repo, path, entry)
                    sibling.update(size=entry.size, blobId=file["oid"])
                    if "lfs" in file:
                        sibling["lfs"] = {"sha256": file["lfs"]["oid"], "size": entry.size, "pointerSize": entry.pointer_size}
                siblings.append(sibling)
            data = {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/", 1)[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        self._send_json(200, data)

    def _tree(self, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        recursive = (self.query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        with hub.lock:
            repo = self._repo(repo_id)
            commit = repo.commits[hub._resolve(repo, revision)]
            prefix = f"{path.strip('/')}/" if path.strip("/") else ""
            dirs = hub._dirs(commit.tree)
            if prefix and prefix[:-1] not in dirs:
                raise _not_found("EntryNotFound", f"{path} does not exist on {revision}", commit.oid)
            out = []
            for d in sorted(dirs):
                if d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
                    out.append(hub._dir_json(commit, d))
            for p, entry in sorted(commit.tree.items()):
                if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):]):
                    out.append(hub._file_json(repo, p, entry))
        self._send_json(200, out)

    def _paths_info(self, repo_id: str, revision: str) -> None:
        hub = self.hub
        form = parse_qs(self.body.decode(), keep_blank_values=True)
        with hub.lock:
            repo = self._repo(repo_id)
            commit = repo.commits[hub._resolve(repo, revision)]
            dirs = hub._dirs(commit.tree)
            out = []
            for path in form.get("paths", []):
                if path in commit.tree:
                    out.append(hub._file_json(repo, path, commit.tree[path]))
                elif path in dirs:
                    out.append(hub._dir_json(commit, path))
        self._send_json(200, out)

    def _preupload(self, repo_id: str, revision: str) -> None:
        hub = self.hub
        payload = self._json_body()
        with hub.lock:
            repo = self._repo(repo_id, write=True)
            commit = repo.commits[hub._resolve(repo, revision)]
            patterns = hub._lfs_patterns(repo, commit.tree)
            files = []
            for item in payload.get("files", []):
                path, size = item["path"], int(item["size"])
                lfs = size > hub.lfs_threshold or any(hub._matches(path, pat) for pat in patterns)
                existing = commit.tree.get(path)
                oid = None
                if existing is not None:
                    oid = existing.lfs_oid or existing.blob_id
                files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, repo_id: str) -> None:
        hub = self.hub
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise _Answer(400, "only the upload operation is supported by the fake hub")
        base = self._base()
        objects = []
        notes = []
        with hub.lock:
            repo = self._repo(repo_id, write=True)
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                if oid in repo.lfs:
                    objects.append({"oid": oid, "size": size})  # already stored: no actions
                    notes.append(f"present:{oid}")
                    continue
                href = f"{base}/lfs-upload/{repo_id}/{oid}"
                chunk = hub.multipart_chunk_size
                if chunk and size > chunk:
                    nparts = -(-size // chunk)
                    header = {"chunk_size": str(chunk)}
                    header.update({str(i): f"{base}/lfs-part/{repo_id}/{oid}/{i}" for i in range(1, nparts + 1)})
                else:
                    header = {}
                objects.append(
                    {
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {
                            "upload": {"href": href, "header": header, "expires_in": 3600},
                            "verify": {"href": f"{base}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                        },
                    }
                )
                notes.append(f"upload:{oid}")
        self.entry.note = " ".join(notes)
        self._send_json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _count_lfs_put(self) -> None:
        hub = self.hub
        with hub.lock:
            hub.lfs_put_arrivals += 1
            arrival = hub.lfs_put_arrivals
            limit = hub.drop_lfs_puts_after
        if limit is not None and arrival > limit:
            raise _Drop()

    def _lfs_put(self, repo_id: str, oid: str) -> None:
        hub = self.hub
        self.entry.oid = oid
        self._count_lfs_put()
        data = self.body
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Answer(400, "sha256 of the uploaded content does not match the oid")
        with hub.lock:
            if repo_id not in hub.repos:
                raise _Answer(404, "upload target not found")
            hub.repos[repo_id].lfs[oid] = data
        self.entry.note = "stored"
        self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _lfs_part(self, repo_id: str, oid: str, number: int) -> None:
        hub = self.hub
        self.entry.oid = oid
        self._count_lfs_put()
        with hub.lock:
            hub._parts.setdefault((repo_id, oid), {})[number] = self.body
        self.entry.note = f"part {number}"
        self._send(200, b"", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def _lfs_complete(self, repo_id: str, oid: str) -> None:
        hub = self.hub
        payload = self._json_body()
        self.entry.oid = oid
        with hub.lock:
            parts = hub._parts.pop((repo_id, oid), {})
            chunks = []
            for part in sorted(payload.get("parts", []), key=lambda p: p["partNumber"]):
                data = parts.get(part["partNumber"])
                if data is None or f'"{hashlib.md5(data).hexdigest()}"' != part["etag"]:
                    raise _Answer(400, f"part {part['partNumber']} missing or etag mismatch")
                chunks.append(data)
            data = b"".join(chunks)
            if hashlib.sha256(data).hexdigest() != oid:
                raise _Answer(400, "sha256 of the assembled parts does not match the oid")
            hub.repos[repo_id].lfs[oid] = data
        self.entry.note = "stored"
        self._send_json(200, {})

    def _lfs_verify(self, repo_id: str) -> None:
        hub = self.hub
        payload = self._json_body()
        with hub.lock:
            repo = self._repo(repo_id, write=True)
            data = repo.lfs.get(payload.get("oid"))
        if data is None or len(data) != int(payload.get("size", -1)):
            raise _Answer(404, "object not found")
        self._send_json(200, {})

    def _commit(self, repo_id: str, revision: str) -> None:
        hub = self.hub
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Answer(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        with hub.lock:
            repo = self._repo(repo_id, write=True)
            if revision not in repo.branches:
                raise _not_found("RevisionNotFound", f"Invalid rev id: {revision}")
            head = repo.branches[revision]
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise _Answer(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[head].tree)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value.get("path")
                if key == "file":
                    content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
                    tree[path] = hub._store_regular(content)
                elif key == "lfsFile":
                    oid = value["oid"]
                    data = repo.lfs.get(oid)
                    if data is None:
                        raise _Answer(422, f"LFS object {oid} for {path} was never uploaded")
                    if value.get("size") is not None and int(value["size"]) != len(data):
                        raise _Answer(422, f"size of {path} does not match the stored LFS object")
                    tree[path] = hub._lfs_entry(oid, len(data))
                elif key == "deletedFile":
                    if path not in tree:
                        raise _not_found("EntryNotFound", f"A file with this name doesn't exist: {path}")
                    del tree[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in tree if p.startswith(prefix)]:
                        del tree[p]
                else:
                    raise _Answer(400, f"unsupported commit operation {key}")
            commit = hub._new_commit(repo, head, tree, header.get("summary", ""), header.get("description", ""))
            repo.branches[revision] = commit.oid
        self.entry.note = f"commit {commit.oid}"
        self._send_json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._base()}/{repo_id}/commit/{commit.oid}",
                "hookOutput": "",
            },
        )

    def _create_branch(self, repo_id: str, branch: str) -> None:
        hub = self.hub
        payload = self._json_body()
        with hub.lock:
            repo = self._repo(repo_id, write=True)
            if branch.startswith("refs/") or not branch or ".." in branch:
                raise _Answer(400, f"Invalid reference for a branch: {branch}")
            if branch in repo.branches:
                raise _Answer(409, "Reference already exists")
            start = payload.get("startingPoint") or "main"
            repo.branches[branch] = hub._resolve(repo, start)
        self._send_json(200, {})

    def _refs(self, repo_id: str) -> None:
        hub = self.hub
        with hub.lock:
            repo = self._repo(repo_id)
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in sorted(repo.branches.items())
            ]
        data: dict[str, Any] = {"branches": branches, "tags": [], "converts": []}
        if self.query.get("include_prs"):
            data["pullRequests"] = []
        self._send_json(200, data)

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub.lock:
            repo = self._repo(repo_id)
            oid = hub._resolve(repo, revision)
            entry = repo.commits[oid].tree.get(path)
            if entry is None:
                raise _not_found("EntryNotFound", f"{path} does not exist on {revision}", oid)
            data = hub._content(repo, entry)
        etag = entry.lfs_oid or entry.blob_id
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry.lfs_oid:
            headers["X-Linked-Etag"] = f'"{entry.lfs_oid}"'
            headers["X-Linked-Size"] = str(entry.size)
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if match and self.command == "GET":
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start : end + 1]
            status = 206
        self._send(status, data, headers, content_type="application/octet-stream")
