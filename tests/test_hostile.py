"""Artifacts and runs made by someone else (issue 22): edited after export, manifest re-hashed.

Each hostile folder starts as a real export; the attacker edits files and recomputes
efexport.json's hashes, as anyone editing an artifact would. For each: no code runs (a
marker file never appears), nothing outside the folder is opened, ``load_artifact`` raises
the three-line ValueError (or, where the attack is inert, loads without running anything),
and ``efexport verify`` exits non-zero with the same three lines, no traceback.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from converter.errors import EfexportError
from converter.manifest import MANIFEST, sha256_file
from converter.runtime import load_artifact
from helpers import assert_three_lines
from test_bad_input import assert_nothing_beside, assert_refused, copy_run, run_cli

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def exported(run_factory, tmp_path_factory) -> dict[str, Path]:
    """Real artifacts: dense fp32 (with parity recorded) and compact (moe_expert_lora)."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for key, strategy, extra in (("dense", "dense_lora", []), ("compact", "moe_expert_lora", ["--moe-layout", "compact",
                                                                                              "--no-verify"])):
        run = run_factory("qwen3", strategy, kind="checkpoint_dir").path
        code, _, err = run_cli([run, "--out", root / key, "-q", *extra])
        assert code == 0, err
        out[key] = root / key
    return out


def rehash(folder: Path, extra: dict[str, Path] | None = None) -> None:
    """Recompute efexport.json's entries for every listed file (and list ``extra`` names -> files)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    files = manifest["files"]
    for rel, path in (extra or {}).items():
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    for rel in files:
        p = folder / rel
        if p.is_file() and (not extra or rel not in extra):
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path passed to open / os.open while the test runs (absolute, resolved)."""
    seen: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **k):
        if isinstance(file, (str, os.PathLike)):
            seen.append(os.path.realpath(file))
        return real_open(file, *a, **k)

    def spy_os_open(path, *a, **k):
        seen.append(os.path.realpath(path))
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    return seen


def assert_load_refused(folder: Path, *needles: str) -> None:
    with pytest.raises(ValueError) as info:
        load_artifact(folder, device="cpu")
    assert isinstance(info.value, EfexportError)
    assert_three_lines(info.value)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def assert_verify_refused(folder: Path, *needles: str) -> None:
    code, _, err = run_cli(["verify", folder])
    assert code != 0
    assert "Traceback" not in err
    assert_three_lines(err.strip())
    for needle in needles:
        assert needle in err, (needle, err)


# --------------------------------------------------------------------------- manifest names


@pytest.mark.parametrize("name", ["../outside.txt", "sub/../../outside.txt", "OUTSIDE_ABS", "..\\outside.txt",
                                  "C:/outside.txt", "./README.md/../../outside.txt"])
def test_a_manifest_name_outside_the_folder_is_refused_before_anything_is_opened(exported, tmp_path, opened, name):
    art = copy_run(exported["dense"], tmp_path / "art")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    name = str(outside) if name == "OUTSIDE_ABS" else name
    rehash(art, {name: outside})
    opened.clear()
    assert_load_refused(art, "efexport.json", "not a plain relative path" if "\\" not in name else "invalid file name")
    code, _, err = run_cli(["verify", art])
    assert code != 0 and "Traceback" not in err
    assert_three_lines(err.strip())
    assert str(outside.resolve()) not in opened
    assert not any(p.startswith(str(tmp_path.resolve())) and not p.startswith(str(art.resolve())) for p in opened)


# --------------------------------------------------------------------------- safetensors headers


def _rewrite(path: Path, header: dict | None = None, length: int | None = None) -> None:
    """Write ``path`` again with another header (or only another length field), data unchanged."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data = raw[8 + n:]
    if header is None:
        path.write_bytes(struct.pack("<Q", length) + raw[8:])
        return
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def _first(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


@pytest.mark.parametrize("attack", ["length 2^40", "offsets past the end", "overlapping", "unknown dtype",
                                    "not JSON", "negative shape"])
def test_a_lying_safetensors_header_is_refused_naming_the_file(exported, tmp_path, attack):
    art = copy_run(exported["dense"], tmp_path / "art")
    st = art / "model.safetensors"
    header = _header(st)
    first = _first(header)
    if attack == "length 2^40":
        _rewrite(st, length=2**40)
    elif attack == "not JSON":
        raw = bytearray(st.read_bytes())
        raw[8] = ord("[")
        raw[9:12] = b"\xff\xfe\x00"
        st.write_bytes(bytes(raw))
    else:
        entry = header[first]
        if attack == "offsets past the end":
            entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 2**40]
        elif attack == "overlapping":
            second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]
            header[second]["data_offsets"] = [header[second]["data_offsets"][0] - 4, header[second]["data_offsets"][1] - 4]
        elif attack == "unknown dtype":
            entry["dtype"] = "F8_E4M3"
        elif attack == "negative shape":
            entry["shape"] = [-1, *entry["shape"][1:]]
        _rewrite(st, header)
    rehash(art)
    assert_load_refused(art, "model.safetensors")
    assert_verify_refused(art, "model.safetensors")


def test_a_sharded_index_naming_a_shard_outside_is_refused(exported, tmp_path, opened):
    art = copy_run(exported["dense"], tmp_path / "art")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(art / "model.safetensors", outside)
    (art / "model.safetensors").unlink()
    index = art / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: "../outside.safetensors"
                                                                for k in _header(outside) if k != "__metadata__"}}))
    manifest = json.loads((art / MANIFEST).read_text())
    del manifest["files"]["model.safetensors"]
    (art / MANIFEST).write_text(json.dumps(manifest))
    rehash(art, {"model.safetensors.index.json": index})
    opened.clear()
    assert_load_refused(art, "outside the checkpoint folder")
    assert str(outside.resolve()) not in opened


# --------------------------------------------------------------------------- code that must never run


def test_a_payload_in_modeling_efexport_never_runs(exported, tmp_path):
    art = copy_run(exported["compact"], tmp_path / "art")
    marker = tmp_path / "MARKER"
    with open(art / "modeling_efexport.py", "a") as fh:
        fh.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    rehash(art)
    loaded = load_artifact(art, device="cpu")
    assert loaded.model is not None
    assert not marker.exists()


def test_an_auto_map_to_a_payload_module_never_runs(exported, tmp_path):
    art = copy_run(exported["dense"], tmp_path / "art")
    marker = tmp_path / "MARKER"
    (art / "payload.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import Qwen3ForCausalLM as Model\n")
    config = json.loads((art / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "payload.Model", "AutoConfig": "payload.Model"}
    (art / "config.json").write_text(json.dumps(config))
    rehash(art, {"payload.py": art / "payload.py"})
    load_artifact(art, device="cpu")
    code, _, err = run_cli(["verify", art])
    assert code == 0, err
    assert not marker.exists()


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ messages.__class__.__init__.__globals__['os'].system('touch MARKER') }}",
]


@pytest.mark.parametrize("template", ESCAPES[:2])
def test_a_sandbox_escaping_chat_template_stops_the_export_and_runs_nothing(run_factory, tmp_path, monkeypatch,
                                                                             template):
    run = copy_run(run_factory("qwen3", "none", kind="checkpoint_dir").path, tmp_path / "run")
    (run / "chat_template.jinja").write_text(template)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([run, "--out", tmp_path / "out", "-q"])
    assert_refused(code, err, "chat_template.jinja", "the template was not run")
    assert not (tmp_path / "MARKER").exists() and not (run / "MARKER").exists()
    assert_nothing_beside(tmp_path, {"run"})


def test_an_artifact_whose_chat_template_escapes_fails_verify_in_three_lines(exported, tmp_path, monkeypatch):
    art = copy_run(exported["dense"], tmp_path / "art")
    (art / "chat_template.jinja").write_text(ESCAPES[3])
    rehash(art)
    monkeypatch.chdir(tmp_path)
    assert_verify_refused(art, "chat_template.jinja", "the template was not run")
    assert not (tmp_path / "MARKER").exists()
