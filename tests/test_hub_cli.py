"""Publishing real exported artifacts end to end: the ``efexport`` command, the export API and
the runtime loader against the fake Hub (tests/hub_server.py, through test_hub.py's fixtures).

Everything here is a real export of a fixture run (no hand-made folders). The command runs
as a subprocess (the installed console script) with HF_HOME in tmp_path, Xet off and the
endpoint pointed at the fake Hub; no fault injection happens here (huggingface_hub's retry
sleeps cannot be patched in a subprocess; faults are test_hub.py's). Each test ends with a
scan for the tokens in everything printed and every file under tmp_path (artifacts, HF_HOME
and the download cache) and in what the server stored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from converter import hub  # noqa: E402
from converter.errors import EfexportError  # noqa: E402
from converter.export import ExportOptions, PushOptions, export  # noqa: E402
from converter.fetch import download_artifact  # noqa: E402
from converter.manifest import sha256_file, verify_folder  # noqa: E402
from converter.runtime import load_artifact  # noqa: E402
from fixtures.reference import reference_logits  # noqa: E402
from fixtures.runs import probe_ids  # noqa: E402
from helpers import assert_three_lines, max_diff  # noqa: E402
from test_hub import BAD_TOKEN, READ_TOKEN, TOKEN, TOKENS, hf_env, hub_server  # noqa: E402,F401  (fixtures reused, not copied)

_SCRIPT = shutil.which("efexport", path=str(Path(sys.executable).parent))
EFEXPORT = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "converter.cli"]
# huggingface_hub's best-effort, unauthenticated fetch of its agent-harness registry ({ENDPOINT}/api/agent-harnesses,
# made while building the User-Agent): not part of the push; left out of the request-order checks.
HOUSEKEEPING = "GET /api/agent-harnesses"


# --------------------------------------------------------------------------- helpers


def efexport_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed command, with the test's environment (hf_env: HF_HOME in tmp, Xet off, no HF_TOKEN)."""
    full_env = {**os.environ, "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    full_env.update(env or {})
    return subprocess.run([*EFEXPORT, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=300)


def efexport_in_process(*args: str) -> tuple[str, str]:
    """The same click command in this process (no interpreter start-up); returns (stdout, stderr).

    For the checks that do not need a fresh process; the command's transformers logging
    settings are put back afterwards so that other tests see the defaults.
    """
    from click.testing import CliRunner
    from transformers.utils import logging as hf_logging

    from converter.cli import main

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def snapshot_files(snapshot: Path) -> dict[str, bytes]:
    """A downloaded snapshot's files, less the .gitattributes every Hub repo starts with."""
    files = local_files(Path(snapshot))
    files.pop(".gitattributes")
    return files


def assert_stored_equals_local(server, repo_id: str, folder: Path, revision: str = "main") -> dict:
    """The repo at ``revision`` holds exactly the artifact's files, byte for byte; LFS oids are the manifest's sha256."""
    manifest = json.loads((folder / "efexport.json").read_text())
    local = local_files(folder)
    assert set(local) == set(manifest["files"]) | {"efexport.json"}  # the export wrote nothing unlisted
    stored = server.files(repo_id, revision)
    assert set(stored) == set(local) | {".gitattributes"}, sorted(stored)
    for rel, data in local.items():
        assert server.file_bytes(repo_id, rel, revision) == data, rel
    for rel, entry in stored.items():
        if entry.lfs_oid:
            assert entry.lfs_oid == manifest["files"][rel]["sha256"], rel
    return stored


def assert_no_token(server, root: Path, *texts: str) -> None:
    """No token in what was printed, in any file under ``root`` (artifacts, HF_HOME, caches) or on the server."""
    for token in TOKENS:
        for text in texts:
            assert token not in text
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for token in TOKENS:
                assert token.encode() not in data, path
    for store in [server.blobs.values(), *(repo.lfs.values() for repo in server.repos.values())]:
        for blob in store:
            for token in TOKENS:
                assert token.encode() not in blob


def no_upload(server) -> None:
    """Nothing but (at most) the token check reached the server: no repo, no preupload, no LFS, no commit."""
    paths = [f"{e.method} {e.path}" for e in server.log]
    assert all(p in ("GET /api/whoami-v2", HOUSEKEEPING) for p in paths), paths
    assert not any(e.authenticated for e in server.log if f"{e.method} {e.path}" == HOUSEKEEPING)
    assert server.repos == {}


class _WatchedLog(list):
    """The fake Hub's request log, also noting what ``root`` held when each request arrived."""

    def __init__(self, root: Path, items=()) -> None:
        super().__init__(items)
        self.root = root
        self.seen: list[tuple[str, list[str]]] = []

    def append(self, entry) -> None:
        if f"{entry.method} {entry.path}" != HOUSEKEEPING:
            self.seen.append((f"{entry.method} {entry.path}", sorted(p.name for p in self.root.iterdir())))
        super().append(entry)


def watch(server, root: Path) -> _WatchedLog:
    """Record the folder ``root`` at every request (the server appends each request to ``log`` as it arrives)."""
    server.log = _WatchedLog(root, server.log)
    return server.log


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def fp32_artifact(tmp_path_factory, run_factory):
    """One real fp32 export of a qwen3 dense_lora run (checkpoint best), shared read-only by the push tests."""
    run = run_factory("qwen3", "dense_lora")
    out = tmp_path_factory.mktemp("hub_cli") / "qwen3-fp32"
    export(ExportOptions(run=str(run.path), out=out, checkpoint="best", precision="fp32", verify=False, progress=False))
    return run, out


# --------------------------------------------------------------------------- efexport RUN --push-to-hub


def test_cli_export_int4_and_push_to_hub(run_factory, hub_server, tmp_path):
    """The issue's command line: export, push, verify; the --json record names the URL and the commit."""
    run = run_factory("qwen3", "dense_lora")
    seen = watch(hub_server, tmp_path).seen
    proc = efexport_cli(str(run.path), "--checkpoint", "best", "--precision", "int4", "--out", "dir",
                        "--push-to-hub", "alice/qwen3-int4", "--token", TOKEN, "--json",
                        cwd=tmp_path, env={"HF_ENDPOINT": hub_server.url})
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "dir"
    record = json.loads(proc.stdout)
    head = hub_server.head("alice/qwen3-int4")
    assert record["push"] == {"repo_id": "alice/qwen3-int4", "url": f"{hub_server.url}/alice/qwen3-int4",
                               "commit_id": head.oid, "revision": "main"}
    assert record["precision"] == "int4" and record["source"]["checkpoint"] == "best"
    assert record["files"] == json.loads((out / "efexport.json").read_text())["files"]
    assert hub_server.repos["alice/qwen3-int4"].private is False

    stored = assert_stored_equals_local(hub_server, "alice/qwen3-int4", out)
    assert stored["model.safetensors"].lfs_oid == sha256_file(out / "model.safetensors")
    assert 'load_artifact("alice/qwen3-int4")' in (out / "README.md").read_text()  # the card names the repo
    # One commit, after the preflight; verification read metadata only, nothing was downloaded.
    order = [f"{e.method} {e.path}" for e in hub_server.log if f"{e.method} {e.path}" != HOUSEKEEPING]
    first = lambda pattern: next(i for i, line in enumerate(order) if re.search(pattern, line))  # noqa: E731
    assert first(r"/api/whoami-v2") < first(r"POST /api/repos/create") < first(r"/preupload/") < first(r"/commit/main")
    assert len(hub_server.requests("POST", r"/commit/")) == 1
    assert hub_server.requests("GET", r"/resolve/") == []
    # What the folder held as each request arrived: the preflight ran before the export wrote a byte,
    # the upload after the artifact was moved into place.
    assert [names for request, names in seen if "/preupload/" not in request][:2] == [["hf_home"], ["hf_home"]]
    assert seen[0][0] == "GET /api/whoami-v2" and seen[1][0] == "POST /api/repos/create"
    assert all(names == ["dir", "hf_home"] for request, names in seen if re.search(r"preupload|lfs|commit", request))
    assert "Traceback" not in proc.stderr
    assert_no_token(hub_server, tmp_path, proc.stdout, proc.stderr)


def test_cli_bad_token_fails_before_anything_is_written(run_factory, hub_server, tmp_path):
    """An unknown token is refused by the preflight: three lines, exit 2, no --out, no upload."""
    run = run_factory("qwen3", "dense_lora")
    seen = watch(hub_server, tmp_path).seen
    proc = efexport_cli(str(run.path), "--checkpoint", "best", "--out", "dir", "--push-to-hub", "alice/qwen3",
                        "--token", BAD_TOKEN, "--endpoint", hub_server.url, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    message = proc.stderr.strip()
    assert_three_lines(message)
    assert "401" in message and "the --token value" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_home"]  # no dir/, no .dir.efexport-tmp-*
    assert seen == [("GET /api/whoami-v2", ["hf_home"])]  # the token check came before any write
    no_upload(hub_server)

    # The same through the API, with a read-only token: refused from whoami alone.
    with pytest.raises(EfexportError) as info:
        export(ExportOptions(run=str(run.path), out=tmp_path / "api", verify=False, progress=False,
                             push=PushOptions(repo_id="alice/qwen3", token=READ_TOKEN, endpoint=hub_server.url)))
    assert_three_lines(info.value)
    assert "read-only" in str(info.value)
    assert not (tmp_path / "api").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf_home"]
    assert seen[1:] == [("GET /api/whoami-v2", ["hf_home"])]
    no_upload(hub_server)
    assert_no_token(hub_server, tmp_path, proc.stdout, proc.stderr, str(info.value))


# --------------------------------------------------------------------------- efexport push DIR REPO_ID


def test_cli_push_existing_artifact_then_load_it_from_the_hub(fp32_artifact, hub_server, tmp_path, monkeypatch):
    """`efexport push` on an fp32 export; load_artifact("owner/name") downloads it and matches the reference."""
    run, art = fp32_artifact
    before = local_files(art)
    proc = efexport_cli("push", str(art), "alice/qwen3-fp32", "--token", TOKEN, "--endpoint", hub_server.url, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    head = hub_server.head("alice/qwen3-fp32")
    files = len(before)
    assert proc.stdout.strip() == f"Pushed {files} files to {hub_server.url}/alice/qwen3-fp32 (commit {head.oid}, verified)"
    assert local_files(art) == before  # the push never touches the folder
    assert_stored_equals_local(hub_server, "alice/qwen3-fp32", art)

    # The runtime loader: HF_ENDPOINT is all it gets; the cache is hf_env's HF_HOME.
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    loaded = load_artifact("alice/qwen3-fp32", device="cpu")
    snapshot = Path(loaded.metadata.checkpoint_dir)
    assert snapshot.is_relative_to(tmp_path / "hf_home")
    assert snapshot_files(snapshot) == before
    ids = probe_ids(run.checkpoints["best"])
    diff = max_diff(logits(loaded.model, ids), reference_logits(run.checkpoints["best"], ids))
    assert diff <= 1e-5, diff
    assert loaded.metadata.load_precision == "fp32"
    assert_no_token(hub_server, tmp_path, proc.stdout, proc.stderr)


def test_cli_push_private_to_a_branch(fp32_artifact, hub_server, tmp_path):
    """--private --revision --commit-message --json: a private repo, files on the new branch only."""
    _, art = fp32_artifact
    proc = efexport_cli("push", str(art), "alice/secret", "--private", "--revision", "release/v1",
                        "--commit-message", "efexport: first release", "--json", cwd=tmp_path,
                        env={"HF_ENDPOINT": hub_server.url, "HF_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    head = hub_server.head("alice/secret", "release/v1")
    assert data == {"repo_id": "alice/secret", "url": f"{hub_server.url}/alice/secret", "commit_id": head.oid,
                    "revision": "release/v1", "files": len(local_files(art)), "verified": True,
                    "commit_url": f"{hub_server.url}/alice/secret/commit/{head.oid}", "deleted": []}
    assert hub_server.repos["alice/secret"].private is True
    assert head.title == "efexport: first release"
    assert set(hub_server.files("alice/secret", "main")) == {".gitattributes"}  # main untouched
    assert_stored_equals_local(hub_server, "alice/secret", art, revision="release/v1")

    # Private: invisible without a token, byte-identical with one.
    with pytest.raises(EfexportError) as info:
        download_artifact("alice/secret", revision="release/v1", endpoint=hub_server.url)
    assert "404" in str(info.value)
    snapshot = download_artifact("alice/secret", revision="release/v1", token=TOKEN, endpoint=hub_server.url,
                                     verify=True)
    assert snapshot_files(snapshot) == local_files(art)
    assert_no_token(hub_server, tmp_path, proc.stdout, proc.stderr, str(info.value))


def test_cli_push_refuses_a_tampered_artifact(fp32_artifact, hub_server, tmp_path):
    """One flipped byte in model.safetensors: refused, the file named, not a single request sent."""
    _, art = fp32_artifact
    copy = tmp_path / "tampered"
    shutil.copytree(art, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    proc = efexport_cli("push", str(copy), "alice/tampered", "--token", TOKEN, "--endpoint", hub_server.url,
                        cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    message = proc.stderr.strip()
    assert_three_lines(message)
    assert "model.safetensors" in message.splitlines()[0] and "sha256" in message
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert [e.path for e in hub_server.log if f"{e.method} {e.path}" != HOUSEKEEPING] == []  # checked before the preflight
    no_upload(hub_server)
    assert_no_token(hub_server, tmp_path, proc.stdout, proc.stderr)


# --------------------------------------------------------------------------- the export API and other layouts


def test_api_export_compact_private_branch_and_load(run_factory, hub_server, tmp_path, monkeypatch):
    """A compact (mixture_lora) export pushed by export(push=...) to a private branch; loaded back by revision."""
    run = run_factory("qwen3", "mixture_lora")
    out = tmp_path / "compact"
    result = export(ExportOptions(run=str(run.path), out=out, moe_layout="compact", precision="fp32", verify=False,
                                  progress=False,
                                  push=PushOptions(repo_id="alice/mix", token=TOKEN, endpoint=hub_server.url,
                                                   private=True, revision="v1", commit_message=None)))
    record = result.record
    assert record["layout"] == "compact"
    head = hub_server.head("alice/mix", "v1")
    assert result.push == {"repo_id": "alice/mix", "url": f"{hub_server.url}/alice/mix", "commit_id": head.oid,
                               "revision": "v1"}
    assert head.title == "Upload efexport artifact (compact, fp32)"
    assert hub_server.repos["alice/mix"].private is True
    stored = assert_stored_equals_local(hub_server, "alice/mix", out, revision="v1")
    assert "modeling_efexport.py" in stored and not stored["modeling_efexport.py"].lfs_oid

    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    loaded = load_artifact("alice/mix", device="cpu", revision="v1", token=TOKEN)
    assert snapshot_files(loaded.metadata.checkpoint_dir) == local_files(out)
    assert loaded.metadata.strategy == "mixture_lora" and loaded.metadata.structure_preserved is True
    ids = probe_ids(run.checkpoints["final"])
    diff = max_diff(logits(loaded.model, ids), reference_logits(run.checkpoints["final"], ids))
    assert diff <= 1e-5, diff
    assert_no_token(hub_server, tmp_path)


def test_api_gguf_folder_pushes_unchanged(run_factory, hub_server, tmp_path):
    pytest.importorskip("llama_cpp")
    run = run_factory("qwen3", "dense_lora")
    out = tmp_path / "gguf"
    result = export(ExportOptions(run=str(run.path), out=out, fmt="gguf", precision="q8_0", progress=False,
                                  push=PushOptions(repo_id="alice/qwen3-gguf", token=TOKEN, endpoint=hub_server.url)))
    record = result.record
    assert record["layout"] == "gguf" and record["precision"] == "q8_0"
    assert record["parity"].get("engine", "").startswith("llama.cpp")
    before = local_files(out)
    stored = assert_stored_equals_local(hub_server, "alice/qwen3-gguf", out)
    ggufs = [rel for rel in stored if rel.endswith(".gguf")]
    assert len(ggufs) == 1 and stored[ggufs[0]].lfs_oid == sha256_file(out / ggufs[0])
    assert "Modelfile" in stored and not stored["Modelfile"].lfs_oid
    assert result.push["commit_id"] == hub_server.head("alice/qwen3-gguf").oid
    assert local_files(out) == before
    assert_no_token(hub_server, tmp_path)


def test_cli_peft_folder_pushes_unchanged(run_factory, hub_server, tmp_path, monkeypatch):
    """`efexport RUN --format peft --push-to-hub` (in process; token from HF_TOKEN): the text output names
    the URL and the commit, and the adapter folder is stored byte for byte."""
    run = run_factory("qwen3", "dense_lora")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "adapter"
    stdout, stderr = efexport_in_process(str(run.path), "--format", "peft", "--out", str(out),
                                         "--push-to-hub", "alice/qwen3-lora", "--endpoint", hub_server.url, "--quiet")
    head = hub_server.head("alice/qwen3-lora")
    lines = stdout.strip().splitlines()
    assert lines[0].startswith(f"Wrote {out} (peft_adapter")
    assert lines[-1] == f"Pushed to {hub_server.url}/alice/qwen3-lora (commit {head.oid})"
    stored = assert_stored_equals_local(hub_server, "alice/qwen3-lora", out)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(stored)
    assert stored["adapter_model.safetensors"].lfs_oid == sha256_file(out / "adapter_model.safetensors")
    assert json.loads(hub_server.file_bytes("alice/qwen3-lora", "efexport.json"))["layout"] == "peft_adapter"
    assert_no_token(hub_server, tmp_path, stdout, stderr)


# --------------------------------------------------------------------------- after-the-fact and dry runs


def test_failed_push_leaves_a_complete_artifact_that_efexport_push_publishes(run_factory, hub_server, tmp_path):
    """The Hub refuses the upload (403, not retried) after the export: the artifact stays whole at --out
    and nothing is committed; `efexport push` publishes that folder later without re-exporting."""
    run = run_factory("qwen3", "dense_lora")
    hub_server.create_repo("alice/locked")
    hub_server.deny_write("alice/locked", "alice")  # whoami says alice may write alice/*: only the upload fails
    initial = hub_server.head("alice/locked").oid
    out = tmp_path / "art"
    with pytest.raises(EfexportError) as info:
        export(ExportOptions(run=str(run.path), out=out, precision="fp32", verify=False, progress=False,
                             push=PushOptions(repo_id="alice/locked", token=TOKEN, endpoint=hub_server.url)))
    assert_three_lines(info.value)
    assert "403" in str(info.value) and "alice/locked" in str(info.value)
    verify_folder(out)  # complete and matching its manifest
    assert hub_server.head("alice/locked").oid == initial and hub_server.requests("PUT") == []

    hub_server.repos["alice/locked"].denied.clear()
    stdout, stderr = efexport_in_process("push", str(out), "alice/locked", "--token", TOKEN,
                                         "--endpoint", hub_server.url, "--json")
    assert json.loads(stdout)["commit_id"] == hub_server.head("alice/locked").oid != initial
    assert_stored_equals_local(hub_server, "alice/locked", out)
    assert_no_token(hub_server, tmp_path, stdout, stderr, str(info.value))


def test_preflight_without_create_changes_nothing_on_the_hub(hub_server):
    """hub.preflight(create=False), for --dry-run: the same token/namespace checks, read-only requests."""
    api = hub.preflight("alice/new", token=TOKEN, endpoint=hub_server.url, private=True, revision="dev", create=False)
    assert api.endpoint == hub_server.url
    assert hub_server.repos == {}
    assert all(e.method == "GET" for e in hub_server.log), [(e.method, e.path) for e in hub_server.log]
    with pytest.raises(EfexportError) as info:  # a read-only token is still refused
        hub.preflight("bob/new", token=READ_TOKEN, endpoint=hub_server.url, create=False)
    assert "read-only" in str(info.value)
    hub_server.create_repo("alice/public")
    with pytest.raises(EfexportError) as info:  # --private on an existing public repo is still refused
        hub.preflight("alice/public", token=TOKEN, endpoint=hub_server.url, private=True, create=False)
    assert_three_lines(info.value)
    assert "already exists and is public" in str(info.value)
    assert set(hub_server.repos) == {"alice/public"} and list(hub_server.repos["alice/public"].branches) == ["main"]
    assert all(e.method == "GET" for e in hub_server.log)
