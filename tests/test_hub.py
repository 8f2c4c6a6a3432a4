"""converter.hub (push) and converter.fetch (download) against the real huggingface_hub client
and a local Hub-compatible server.

The fake Hub (tests/hub_server.py) runs on 127.0.0.1; the client is pointed at it with
``endpoint=`` and a temporary HF_HOME. Xet is disabled so the client speaks plain LFS;
huggingface_hub's retry sleeps are recorded instead of slept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import huggingface_hub.constants as hf_constants  # noqa: E402
import huggingface_hub.utils._http as hf_http  # noqa: E402
from huggingface_hub.utils.sha import git_hash  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from converter import hub  # noqa: E402
from converter.errors import EfexportError  # noqa: E402
from converter.fetch import download_artifact  # noqa: E402
from converter.manifest import verify_folder  # noqa: E402
from hub_server import FakeHub  # noqa: E402

TOKEN = "hf_efexportTestTokenAlice0123456789abcd"
READ_TOKEN = "hf_efexportTestTokenBobRead0123456789ab"
BAD_TOKEN = "hf_efexportTestTokenNotKnown0123456789"
TOKENS = (TOKEN, READ_TOKEN, BAD_TOKEN)

LFS_THRESHOLD = 10 * 1024 * 1024


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """A clean huggingface_hub environment: temp HF_HOME, no token, no Xet, fast retries."""
    home = tmp_path / "hf_home"
    home.mkdir()
    for var in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_OIDC_RESOURCE",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_ASSETS_CACHE", str(home / "assets"))
    monkeypatch.setattr(hf_constants, "HF_XET_CACHE", str(home / "xet"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    sleeps: list[float] = []
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=sleeps.append, time=time.time, monotonic=time.monotonic))
    return SimpleNamespace(home=home, sleeps=sleeps)


@pytest.fixture
def hub_server(hf_env):
    """The fake Hub, with alice (write; member of acme, reader of museum) and bob (read-only token)."""
    server = FakeHub(lfs_threshold=LFS_THRESHOLD)
    server.add_user(TOKEN, "alice", orgs={"acme": "write", "museum": "read"})
    server.add_user(READ_TOKEN, "bob", role="read")
    server.start()
    yield server
    server.stop()
    assert server.errors == [], server.errors


# --------------------------------------------------------------------------- helpers


def make_artifact(root: Path, *, name: str = "artifact", shards: int = 2, big_tokenizer: bool = False, seed: int = 0) -> Path:
    """Write a small but real artifact folder: config, card, tokenizer, safetensors shards, efexport.json."""
    out = root / name
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    (out / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "seed": seed}, indent=2))
    (out / "README.md").write_text(
        "---\nlibrary_name: transformers\nbase_model: Qwen/Qwen3-0.6B\ntags:\n- efexport\n---\n\n# Test artifact\n\nExported by efexport.\n"
    )
    tokenizer = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}
    if big_tokenizer:  # > 10 MiB: LFS by size, not by extension
        tokenizer["padding"] = "x" * (LFS_THRESHOLD + 512 * 1024)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    weight_map = {}
    for k in range(1, shards + 1):
        fname = "model.safetensors" if shards == 1 else f"model-{k:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{k}.weight": rng.standard_normal((256, 512 + 64 * k)).astype(np.float32)}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({t: fname for t in tensors})
    if shards > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            files[path.relative_to(out).as_posix()] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest = {
        "format": "efexport",
        "format_version": 1,
        "strategy": "dense_lora",
        "layout": "dense",
        "structure_preserved": False,
        "backbone": "qwen3",
        "architecture": "Qwen3ForCausalLM",
        "base_model": "Qwen/Qwen3-0.6B",
        "precision": "bf16",
        "quantization": None,
        "lora_config": {"lora_r": 16, "lora_alpha": 32.0},
        "num_parameters": 1,
        "source": {"kind": "eulerforge_run", "run_name": "run_test", "checkpoint": "best", "step": 1, "weights_sha256": None},
        "files": files,
        "parity": None,
        "created_with": {"efexport": "0.1.0"},
    }
    (out / "efexport.json").write_text(json.dumps(manifest, indent=2))
    return out


def artifact_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_three_lines(err: EfexportError) -> str:
    text = str(err)
    lines = text.split("\n")
    assert len(lines) == 3, text
    assert lines[0].startswith("Cannot "), text
    assert lines[1].startswith("Fix: "), text
    assert lines[2].startswith("See: "), text
    for token in TOKENS:
        assert token not in text
    return text


def push(server: FakeHub, folder: Path, repo_id: str = "alice/demo", **kwargs) -> hub.PushResult:
    kwargs.setdefault("token", TOKEN)
    return hub.push_artifact(folder, repo_id, endpoint=server.url, **kwargs)


# --------------------------------------------------------------------------- push


def test_push_small_and_lfs_files_byte_for_byte(hub_server, tmp_path):
    folder = make_artifact(tmp_path, big_tokenizer=True)
    manifest = json.loads((folder / "efexport.json").read_text())

    result = push(hub_server, folder)

    head = hub_server.head("alice/demo")
    assert result.verified is True
    assert result.repo_id == "alice/demo"
    assert result.url == f"{hub_server.url}/alice/demo"
    assert result.commit_id == head.oid
    assert result.commit_url.endswith(f"/alice/demo/commit/{head.oid}")
    assert result.revision == "main"
    assert result.files == len(manifest["files"]) + 1
    assert json.loads(json.dumps(result.to_dict()))["commit_id"] == head.oid
    assert hub_server.repos["alice/demo"].private is False

    stored = hub_server.files("alice/demo")
    local = artifact_files(folder)
    assert set(stored) == set(local) | {".gitattributes"}
    for rel, data in local.items():
        assert hub_server.file_bytes("alice/demo", rel) == data, rel
    # The server decides: *.safetensors by .gitattributes, tokenizer.json by size (> 10 MiB).
    lfs = {rel for rel, entry in stored.items() if entry.lfs_oid}
    assert lfs == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json"}
    for rel in lfs:
        assert stored[rel].lfs_oid == manifest["files"][rel]["sha256"]
    assert stored["config.json"].blob_id == git_hash(local["config.json"])

    # The client spoke the protocol in the documented order, one commit, no weights downloaded.
    order = [f"{e.method} {e.path}" for e in hub_server.log]
    def first(pattern: str) -> int:
        return next(i for i, line in enumerate(order) if re.search(pattern, line))
    assert first(r"GET /api/whoami-v2") < first(r"POST /api/repos/create") < first(r"/preupload/main")
    assert first(r"/preupload/main") < first(r"objects/batch") < first(r"PUT /lfs-upload/") < first(r"/commit/main")
    assert first(r"/commit/main") < first(r"/paths-info/")
    assert len(hub_server.requests("POST", r"/commit/")) == 1
    assert len(hub_server.requests("PUT", r"^/lfs-upload/")) == 3
    assert hub_server.requests("GET", r"/resolve/") == []
    assert all(e.authenticated for e in hub_server.log if not e.path.startswith("/lfs-upload/"))


def test_push_again_is_a_verified_no_op(hub_server, tmp_path):
    folder = make_artifact(tmp_path)
    first = push(hub_server, folder)
    puts = len(hub_server.requests("PUT"))

    second = push(hub_server, folder)

    assert second.verified and second.commit_id == first.commit_id
    assert len(hub_server.requests("PUT")) == puts  # nothing re-sent
    assert len(hub_server.requests("POST", r"/commit/")) == 1  # no empty commit


def test_private_and_revision(hub_server, tmp_path):
    folder = make_artifact(tmp_path)

    result = push(hub_server, folder, "alice/secret", private=True, revision="release/v1", commit_message="Release v1")

    repo = hub_server.repos["alice/secret"]
    assert repo.private is True
    assert result.revision == "release/v1"
    assert set(repo.branches) == {"main", "release/v1"}
    main_before = hub_server.head("alice/secret", "main")
    branch_head = hub_server.head("alice/secret", "release/v1")
    assert set(main_before.tree) == {".gitattributes"}  # main untouched
    assert branch_head.parent == main_before.oid  # branch created from main
    assert branch_head.title == "Release v1"
    assert result.commit_id == branch_head.oid
    for rel, data in artifact_files(folder).items():
        assert hub_server.file_bytes("alice/secret", rel, "release/v1") == data
    assert hub_server.requests("POST", r"/api/models/alice/secret/branch/release%2Fv1")

    # The branch exists now: create_branch answers 409, exist_ok swallows it, the push goes on.
    folder2 = make_artifact(tmp_path, name="artifact2", seed=1)
    again = push(hub_server, folder2, "alice/secret", private=True, revision="release/v1")
    assert hub_server.requests("POST", r"/branch/")[-1].status == 409
    assert hub_server.head("alice/secret", "release/v1").oid == again.commit_id
    assert hub_server.head("alice/secret", "release/v1").parent == branch_head.oid

    # Private really is private: an anonymous download does not see it.
    with pytest.raises(EfexportError) as info:
        download_artifact("alice/secret", revision="release/v1", endpoint=hub_server.url, cache_dir=tmp_path / "dl")
    assert "404" in assert_three_lines(info.value)


def test_private_refuses_existing_public_repo(hub_server, tmp_path):
    hub_server.create_repo("alice/public", private=False)
    folder = make_artifact(tmp_path)
    with pytest.raises(EfexportError) as info:
        push(hub_server, folder, "alice/public", private=True)
    text = assert_three_lines(info.value)
    assert "is public" in text and "--private" in text
    assert hub_server.requests("POST", r"/preupload/") == []


def test_push_deletes_stale_weights_of_an_earlier_export(hub_server, tmp_path):
    push(hub_server, make_artifact(tmp_path, name="sharded", shards=2))
    single = make_artifact(tmp_path, name="single", shards=1, seed=3)

    result = push(hub_server, single)

    stored = hub_server.files("alice/demo")
    assert "model.safetensors" in stored
    assert not any(p.startswith("model-0000") or p.endswith(".index.json") for p in stored)
    assert result.deleted == (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    )


def test_name_without_owner_goes_to_the_token_user(hub_server, tmp_path):
    result = push(hub_server, make_artifact(tmp_path), "bare-name")
    assert result.repo_id == "alice/bare-name"
    assert "alice/bare-name" in hub_server.repos


def test_multipart_lfs_upload(hub_server, tmp_path):
    hub_server.multipart_chunk_size = 256 * 1024  # shards are ~0.5-0.6 MB: 3 parts each
    folder = make_artifact(tmp_path)
    push(hub_server, folder)
    assert len(hub_server.requests("PUT", r"^/lfs-part/")) >= 6
    for rel, data in artifact_files(folder).items():
        assert hub_server.file_bytes("alice/demo", rel) == data


# --------------------------------------------------------------------------- verification


def test_verify_remote_catches_a_changed_lfs_hash(hub_server, tmp_path):
    folder = make_artifact(tmp_path)
    hub_server.lie("alice/demo", "model-00002-of-00002.safetensors", lfs_sha256="0" * 64)
    with pytest.raises(EfexportError) as info:
        push(hub_server, folder)
    text = assert_three_lines(info.value)
    assert "model-00002-of-00002.safetensors" in text and "0" * 64 in text


def test_verify_remote_catches_a_changed_blob_id(hub_server, tmp_path):
    folder = make_artifact(tmp_path)
    hub_server.lie("alice/demo", "config.json", blob_id="f" * 40)
    with pytest.raises(EfexportError) as info:
        push(hub_server, folder)
    assert "config.json" in assert_three_lines(info.value)


def test_verify_remote_reports_a_missing_file(hub_server, tmp_path):
    folder = make_artifact(tmp_path)
    result = push(hub_server, folder)
    manifest = json.loads((folder / "efexport.json").read_text())
    manifest["files"]["extra.txt"] = {"sha256": "1" * 64, "size": 3}
    api = hub.preflight("alice/demo", token=TOKEN, endpoint=hub_server.url)
    with pytest.raises(EfexportError) as info:
        hub.verify_remote(api, "alice/demo", result.commit_id, manifest, folder)
    assert "extra.txt is missing on the Hub" in assert_three_lines(info.value)


def test_push_refuses_a_tampered_folder_before_any_request(hub_server, tmp_path):
    folder = make_artifact(tmp_path)
    (folder / "config.json").write_text('{"architectures": ["Evil"]}')
    with pytest.raises(EfexportError) as info:
        push(hub_server, folder)
    assert "config.json" in assert_three_lines(info.value)
    assert hub_server.log == []


# --------------------------------------------------------------------------- verify_folder (before a push)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda f: (f / "model-00001-of-00002.safetensors").unlink(), "model-00001-of-00002.safetensors: the file is missing"),
        (lambda f: (f / "tokenizer.json").write_text("{}"), "tokenizer.json: size 2 differs"),
        (lambda f: (f / "README.md").write_text((f / "README.md").read_text().replace("Test", "Tost")), "README.md: its sha256 differs"),
        (lambda f: (f / "extra.gguf").write_bytes(b"GGUF"), "extra.gguf: this weight file is not listed"),
        (lambda f: (f / "sub").mkdir() or (f / "sub" / "w.bin").write_bytes(b"x"), "sub/w.bin: this weight file is not listed"),
        (lambda f: (f / "efexport.json").write_text("{not json"), "read efexport.json"),
        (lambda f: (f / "efexport.json").write_text("[1, 2]"), "not a JSON object"),
        (lambda f: (f / "efexport.json").unlink(), "no efexport.json"),
    ],
)
def test_verify_local_names_the_offending_file(tmp_path, damage, needle):
    folder = make_artifact(tmp_path)
    assert verify_folder(folder)["format"] == "efexport"
    damage(folder)
    with pytest.raises(EfexportError) as info:
        verify_folder(folder)
    assert needle in assert_three_lines(info.value)


def test_verify_local_rejects_paths_outside_the_folder(tmp_path):
    folder = make_artifact(tmp_path)
    manifest = json.loads((folder / "efexport.json").read_text())
    manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "size": 0}
    (folder / "efexport.json").write_text(json.dumps(manifest))
    with pytest.raises(EfexportError) as info:
        verify_folder(folder)
    assert "not a plain relative path" in assert_three_lines(info.value)


def test_verify_local_refuses_newer_format(tmp_path):
    folder = make_artifact(tmp_path)
    manifest = json.loads((folder / "efexport.json").read_text())
    manifest["format_version"] = 2
    (folder / "efexport.json").write_text(json.dumps(manifest))
    with pytest.raises(EfexportError) as info:
        verify_folder(folder)
    assert "format_version 2" in assert_three_lines(info.value)


# --------------------------------------------------------------------------- preflight


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad--name", "x/.hidden", "", "white space/x"])
def test_preflight_rejects_bad_repo_ids_without_network(hub_server, repo_id):
    with pytest.raises(EfexportError) as info:
        hub.preflight(repo_id, token=TOKEN, endpoint=hub_server.url)
    assert_three_lines(info.value)
    assert hub_server.log == []


@pytest.mark.parametrize("revision", ["", "0123456789abcdef0123456789abcdef01234567", "refs/heads/x", "a..b", "has space", "x.lock"])
def test_preflight_rejects_bad_revisions_without_network(hub_server, revision):
    with pytest.raises(EfexportError) as info:
        hub.preflight("alice/demo", token=TOKEN, endpoint=hub_server.url, revision=revision)
    assert_three_lines(info.value)
    assert hub_server.log == []


def test_preflight_creates_repo_and_branch_before_any_upload(hub_server):
    api = hub.preflight("alice/pre", token=TOKEN, endpoint=hub_server.url, revision="dev")
    assert api.endpoint == hub_server.url
    assert set(hub_server.repos["alice/pre"].branches) == {"main", "dev"}
    assert [(e.method, e.path) for e in hub_server.log] == [
        ("GET", "/api/whoami-v2"),
        ("POST", "/api/repos/create"),
        ("POST", "/api/models/alice/pre/branch/dev"),
    ]
    # An existing repo: 409 from create, exist_ok finds it.
    hub.preflight("alice/pre", token=TOKEN, endpoint=hub_server.url)
    assert hub_server.requests("POST", "/api/repos/create")[-1].status == 409


def test_preflight_reads_hf_token_then_cached_login(hub_server, hf_env, monkeypatch):
    with pytest.raises(EfexportError) as info:
        hub.preflight("alice/demo", endpoint=hub_server.url)
    text = assert_three_lines(info.value)
    assert "no Hugging Face token" in text and "HF_TOKEN" in text and "--token" in text
    assert hub_server.log == []

    Path(hf_constants.HF_TOKEN_PATH).write_text(TOKEN)  # what `hf auth login` leaves behind
    hub.preflight("alice/from-cache", endpoint=hub_server.url)
    assert "alice/from-cache" in hub_server.repos

    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)  # HF_TOKEN wins over the cached login
    with pytest.raises(EfexportError) as info:
        hub.preflight("alice/from-env", endpoint=hub_server.url)
    assert "read-only" in assert_three_lines(info.value)


def test_endpoint_from_hf_endpoint(hub_server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url + "/")
    api = hub.preflight("alice/env-endpoint", token=TOKEN)
    assert api.endpoint == hub_server.url
    assert "alice/env-endpoint" in hub_server.repos


# --------------------------------------------------------------------------- HTTP failures


def test_401_bad_token(hub_server, tmp_path):
    with pytest.raises(EfexportError) as info:
        push(hub_server, make_artifact(tmp_path), token=BAD_TOKEN)
    text = assert_three_lines(info.value)
    assert "401" in text and "--token" in text and "HF_TOKEN" in text
    assert [e.path for e in hub_server.log] == ["/api/whoami-v2"]  # nothing else attempted


def test_403_read_only_token_is_refused_in_preflight(hub_server, tmp_path):
    with pytest.raises(EfexportError) as info:
        push(hub_server, make_artifact(tmp_path), "bob/model", token=READ_TOKEN)
    text = assert_three_lines(info.value)
    assert "403" in text and "read-only" in text
    assert [e.path for e in hub_server.log] == ["/api/whoami-v2"]


@pytest.mark.parametrize(
    ("repo_id", "needle"),
    [("carol/model", "not a member of 'carol'"), ("museum/model", "read role in 'museum'")],
)
def test_403_foreign_namespace_is_refused_in_preflight(hub_server, tmp_path, repo_id, needle):
    with pytest.raises(EfexportError) as info:
        push(hub_server, make_artifact(tmp_path), repo_id)
    assert needle in assert_three_lines(info.value)
    assert [e.path for e in hub_server.log] == ["/api/whoami-v2"]


def test_403_from_the_server_on_upload(hub_server, tmp_path):
    hub_server.create_repo("acme/locked")
    hub_server.deny_write("acme/locked", "alice")
    with pytest.raises(EfexportError) as info:
        push(hub_server, make_artifact(tmp_path), "acme/locked")
    text = assert_three_lines(info.value)
    assert "403" in text and "write access" in text
    assert hub_server.requests("POST", r"/preupload/")[-1].status == 403
    assert hub_server.requests("POST", r"/commit/") == []


def test_500_once_is_retried_by_the_client(hub_server, hf_env, tmp_path):
    hub_server.fail(r"/preupload/", 500, times=1)
    result = push(hub_server, make_artifact(tmp_path))
    assert result.verified
    assert [e.status for e in hub_server.requests("POST", r"/preupload/")] == [500, 200]
    assert hf_env.sleeps == [1]


def test_500_twice_on_the_lfs_batch_is_retried(hub_server, hf_env, tmp_path):
    hub_server.fail(r"/info/lfs/objects/batch$", 503, times=2)
    assert push(hub_server, make_artifact(tmp_path)).verified
    assert [e.status for e in hub_server.requests("POST", r"objects/batch")] == [503, 503, 200]
    assert hf_env.sleeps == [1, 2]


def test_500_persistent_gives_a_clear_error(hub_server, hf_env, tmp_path):
    hub_server.fail(r"/preupload/", 500, times=None)
    with pytest.raises(EfexportError) as info:
        push(hub_server, make_artifact(tmp_path))
    text = assert_three_lines(info.value)
    assert "500" in text and "server error" in text and "re-run" in text
    assert len(hub_server.requests("POST", r"/preupload/")) == 6  # 1 + 5 retries
    assert hf_env.sleeps == [1, 2, 4, 8, 8]
    assert hub_server.requests("POST", r"/commit/") == []


@pytest.mark.parametrize(
    ("pattern", "status", "headers", "needles"),
    [
        (r"/preupload/", 404, {"X-Error-Code": "RepoNotFound"}, ["404", "not found"]),
        (r"/paths-info/", 404, {"X-Error-Code": "RevisionNotFound"}, ["404", "revision"]),
        (r"/commit/", 409, {}, ["409", "changed during the push", "re-run"]),
        (r"/preupload/", 429, {"Retry-After": "7"}, ["429", "rate-limited", "wait 7 s"]),
        (r"/commit/", 502, {}, ["502", "server error"]),
        (r"/api/repos/create", 500, {}, ["500", "server error"]),
        (r"/api/whoami-v2", 503, {}, ["503", "server error"]),
    ],
)
def test_http_errors_map_to_three_lines(hub_server, tmp_path, pattern, status, headers, needles):
    hub_server.fail(pattern, status, times=None, headers=headers)
    with pytest.raises(EfexportError) as info:
        push(hub_server, make_artifact(tmp_path))
    text = assert_three_lines(info.value)
    for needle in needles:
        assert needle in text, (needle, text)


def test_server_text_echoing_the_token_is_scrubbed(hub_server, tmp_path):
    hub_server.fail(r"/preupload/", 400, times=None, body={"error": f"bad request from Bearer {TOKEN} ({TOKEN[3:]})"})
    with pytest.raises(EfexportError) as info:
        push(hub_server, make_artifact(tmp_path))
    text = assert_three_lines(info.value)
    assert TOKEN[3:] not in text
    assert "400" in text and "***" in text


def test_connection_refused(hf_env, tmp_path):
    with pytest.raises(EfexportError) as info:
        hub.preflight("alice/demo", token=TOKEN, endpoint="http://127.0.0.1:9")
    text = assert_three_lines(info.value)
    assert "connection" in text and "HF_ENDPOINT" in text


# --------------------------------------------------------------------------- interrupted push


def test_interrupted_push_resumes_without_resending_stored_files(hub_server, hf_env, tmp_path):
    folder = make_artifact(tmp_path, shards=3)
    manifest = json.loads((folder / "efexport.json").read_text())
    shard_oids = {
        manifest["files"][rel]["sha256"]: rel for rel in manifest["files"] if rel.endswith(".safetensors")
    }
    hub_server.drop_lfs_puts_after = 1  # the first large file arrives; then the connection drops

    with pytest.raises(EfexportError) as info:
        push(hub_server, folder)
    text = assert_three_lines(info.value)
    assert "connection" in text and "re-run" in text
    repo = hub_server.repos["alice/demo"]
    assert len(repo.lfs) == 1  # exactly one large file made it
    (stored_oid,) = repo.lfs
    assert set(hub_server.files("alice/demo")) == {".gitattributes"}  # no commit happened
    first_run = len(hub_server.log)
    dropped = [e for e in hub_server.log if e.status == "dropped"]
    assert dropped and all(e.oid != stored_oid for e in dropped)

    hub_server.clear_faults()
    result = push(hub_server, folder)

    assert result.verified
    rerun = hub_server.log[first_run:]
    rerun_puts = [e for e in rerun if e.method == "PUT"]
    assert {e.oid for e in rerun_puts} == set(shard_oids) - {stored_oid}
    assert stored_oid not in {e.oid for e in rerun_puts}  # the stored large file was not sent twice
    batch = [e for e in rerun if e.path.endswith("objects/batch")]
    assert f"present:{stored_oid}" in batch[-1].note  # the LFS batch said "already there"
    stored_puts = [e for e in hub_server.log if e.method == "PUT" and e.note == "stored"]
    assert sorted(e.oid for e in stored_puts) == sorted(shard_oids)  # each shard stored exactly once
    for rel, data in artifact_files(folder).items():
        assert hub_server.file_bytes("alice/demo", rel) == data


# --------------------------------------------------------------------------- download


def test_download_roundtrip(hub_server, tmp_path):
    folder = make_artifact(tmp_path)
    result = push(hub_server, folder, revision="v1")

    snapshot = download_artifact(
        "alice/demo", revision="v1", token=TOKEN, endpoint=hub_server.url, cache_dir=tmp_path / "cache"
    )

    assert snapshot.name == result.commit_id
    assert verify_folder(snapshot)["format"] == "efexport"
    downloaded = artifact_files(snapshot)
    for rel, data in artifact_files(folder).items():
        assert downloaded[rel] == data
    assert hub_server.requests("GET", r"/resolve/")


def test_download_detects_a_corrupted_file(hub_server, tmp_path):
    folder = make_artifact(tmp_path)
    push(hub_server, folder)
    # The server serves other bytes for a shard than the ones efexport.json describes.
    repo = hub_server.repos["alice/demo"]
    oid = hub_server.files("alice/demo")["model-00001-of-00002.safetensors"].lfs_oid
    repo.lfs[oid] = bytes(len(repo.lfs[oid]))
    snapshot = download_artifact("alice/demo", token=TOKEN, endpoint=hub_server.url, cache_dir=tmp_path / "cache")
    with pytest.raises(EfexportError) as info:  # hashes are the caller's (the runtime loader's) job ...
        verify_folder(snapshot)
    assert "model-00001-of-00002.safetensors: its sha256 differs" in assert_three_lines(info.value)
    with pytest.raises(EfexportError) as info:  # ... or download_artifact's when asked
        download_artifact("alice/demo", token=TOKEN, endpoint=hub_server.url, cache_dir=tmp_path / "cache", verify=True)
    assert "model-00001-of-00002.safetensors: its sha256 differs" in assert_three_lines(info.value)


def test_download_missing_repo_and_revision(hub_server, tmp_path):
    with pytest.raises(EfexportError) as info:
        download_artifact("alice/nothing", token=TOKEN, endpoint=hub_server.url, cache_dir=tmp_path / "c")
    assert "404" in assert_three_lines(info.value)
    push(hub_server, make_artifact(tmp_path))
    with pytest.raises(EfexportError) as info:
        download_artifact("alice/demo", revision="nope", token=TOKEN, endpoint=hub_server.url, cache_dir=tmp_path / "c")
    assert "revision 'nope'" in assert_three_lines(info.value)


# --------------------------------------------------------------------------- token hygiene


def test_token_never_printed_logged_or_written(hub_server, hf_env, tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    hf_logger = logging.getLogger("huggingface_hub")
    old_level = hf_logger.level
    hf_logger.setLevel(logging.DEBUG)
    messages = []
    try:
        folder = make_artifact(tmp_path)
        result = push(hub_server, folder, private=True, revision="dev")
        print(json.dumps(result.to_dict()))
        download_artifact("alice/demo", revision="dev", token=TOKEN, endpoint=hub_server.url)
        hub_server.fail(r"/preupload/", 500, times=None)
        for kwargs in ({"token": TOKEN}, {"token": BAD_TOKEN}):
            with pytest.raises(EfexportError) as info:
                push(hub_server, make_artifact(tmp_path, name=f"a{len(messages)}", seed=len(messages) + 5), **kwargs)
            messages.append(str(info.value))
    finally:
        hf_logger.setLevel(old_level)

    out, err = capfd.readouterr()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert result.commit_id in out  # the capture works: what was printed is here,
    assert "Retrying in" in err + logged  # and so are huggingface_hub's retry warnings
    for token in TOKENS:
        assert token not in out and token not in err and token not in logged
        assert all(token not in m for m in messages)
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for token in TOKENS:
                assert token.encode() not in data, path
    for blob in hub_server.blobs.values():
        assert TOKEN.encode() not in blob


def test_fake_hub_accepts_chunked_lfs_uploads(hub_server):
    """huggingface_hub may stream an upload with Transfer-Encoding: chunked; the fake Hub reads it."""
    import http.client
    from urllib.parse import urlsplit

    hub_server.create_repo("alice/chunked")
    data = os.urandom(300_000)
    oid = hashlib.sha256(data).hexdigest()
    host = urlsplit(hub_server.url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
    body = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]})
    conn.request("POST", "/alice/chunked.git/info/lfs/objects/batch", body=body, headers={"Authorization": f"Bearer {TOKEN}"})
    href = json.loads(conn.getresponse().read())["objects"][0]["actions"]["upload"]["href"]
    conn.request("PUT", urlsplit(href).path, body=iter([data[:100_000], data[100_000:]]), encode_chunked=True)
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200
    assert hub_server.repos["alice/chunked"].lfs[oid] == data
    assert hub_server.requests("PUT")[-1].chunked is True


def test_download_of_a_repo_without_efexport_json(hub_server, tmp_path, monkeypatch):
    hub_server.create_repo("alice/plain")
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)  # what the runtime loader relies on (no endpoint argument)
    with pytest.raises(EfexportError) as info:
        download_artifact("alice/plain", token=TOKEN, cache_dir=tmp_path / "c")
    assert "no efexport.json" in assert_three_lines(info.value)


@pytest.mark.parametrize(
    ("status", "headers", "needles"),
    [
        (401, {"X-Error-Code": "GatedRepo"}, ["gated", "request access"]),
        (403, {}, ["403", "no read access"]),
        (500, {}, ["500", "server error", "cache"]),
    ],
)
def test_download_errors_map_to_three_lines(hub_server, tmp_path, status, headers, needles):
    push(hub_server, make_artifact(tmp_path))
    hub_server.fail(r"^/api/models/alice/demo/revision/", status, times=None, headers=headers)
    with pytest.raises(EfexportError) as info:
        download_artifact("alice/demo", token=TOKEN, endpoint=hub_server.url, cache_dir=tmp_path / "c")
    text = assert_three_lines(info.value)
    for needle in needles:
        assert needle in text, (needle, text)
