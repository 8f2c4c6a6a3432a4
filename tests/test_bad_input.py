"""Bad input never gets past the checks (issue 19): broken copies of good runs end in three lines.

Each case breaks one thing in a copy of a fixture run (or a PEFT adapter folder written here)
and runs the real CLI entry point in-process: exit code 2, the Cannot / Fix / See message
and nothing else on stderr, nothing left next to --out. The helpers are shared with
test_hostile.py and test_fuzz.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter import cli
from converter.export.staging import LOCK_MARK
from fixtures.runs import make_run
from helpers import assert_three_lines, run_cli

ROOT = Path(__file__).resolve().parent.parent
EFEXPORT = [sys.executable, "-c", "from converter.cli import run; run()"]


# --------------------------------------------------------------------------- shared helpers


def assert_refused(code: int, err: str, *needles: str) -> None:
    """Exit 2 with exactly the three-line error (no traceback), mentioning each needle."""
    assert code == 2, err
    assert_three_lines(err.strip())
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def assert_nothing_beside(parent: Path, before: set[str]) -> None:
    """Nothing new next to --out: no artifact, no temporary folder, no lock file."""
    assert {p.name for p in parent.iterdir()} == before


def copy_run(run_path: Path, dest: Path) -> Path:
    shutil.copytree(run_path, dest)
    return dest


def edit_tensors(path: Path, change) -> None:
    """Rewrite a safetensors file with ``change(tensors)`` applied (a valid file that says something else)."""
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def write_adapter(folder: Path, base: Path, targets: list[str], *, use_dora: bool = False,
                  skip: tuple[str, ...] = (), extra: dict | None = None) -> Path:
    """A PEFT LoRA adapter folder for ``base`` written directly (the names and layout PEFT saves)."""
    folder.mkdir(parents=True)
    base_tensors = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, w in base_tensors.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in targets or w.dim() != 2:
            continue
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.1
        tensors[f"{key}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.1
        if use_dora:
            tensors[f"{key}.lora_magnitude_vector"] = w.norm(dim=1) * 1.1
    for name in skip:
        del tensors[name]
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets, "use_dora": use_dora,
           "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", **(extra or {})}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A plain Qwen3 model folder (a PEFT adapter's base)."""
    return make_run(tmp_path_factory.mktemp("base") / "qwen3", "qwen3", "none", kind="checkpoint_dir", seed=5).path


# --------------------------------------------------------------------------- 1. incomplete LoRA sets


@pytest.mark.parametrize("part", ["lora_A", "lora_B"])
def test_dense_lora_module_missing_a_lora_factor_is_refused_by_name(run_factory, tmp_path, part):
    run = copy_run(run_factory("qwen3", "dense_lora", kind="checkpoint_dir").path, tmp_path / "run")
    module = "model.layers.1.self_attn.v_proj"
    edit_tensors(run / "model.safetensors", lambda t: t.pop(f"{module}.{part}.weight"))
    code, _, err = run_cli([run, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert_refused(code, err, module, f"{part}.weight")
    assert_nothing_beside(tmp_path, {"run"})


@pytest.mark.parametrize("strategy,layout,victim", [
    ("moe_expert_lora", "native", "model.layers.1.mlp.experts.2.up_proj.lora_B.weight"),
    ("moe_expert_lora", "compact", "model.layers.0.mlp.experts.3.gate_proj.lora_A.weight"),
    ("moe_expert_lora", "native", "model.layers.0.mlp.router.weight"),
    ("mixture_lora", "compact", "model.layers.1.self_attn.o_proj.experts.1.lora_B.weight"),
    ("mixture_lora", "compact", "model.layers.0.mlp.up_proj.router.weight"),
])
def test_expert_sets_and_routers_must_be_complete(run_factory, tmp_path, strategy, layout, victim):
    run = copy_run(run_factory("qwen3", strategy, kind="checkpoint_dir").path, tmp_path / "run")
    edit_tensors(run / "model.safetensors", lambda t: t.pop(victim))
    code, _, err = run_cli([run, "--out", tmp_path / "out", "--moe-layout", layout, "--no-verify", "-q"])
    owner = victim.split(".experts.")[0].removesuffix(".router.weight")
    assert_refused(code, err, owner)
    assert_nothing_beside(tmp_path, {"run"})


def test_peft_adapter_whose_keys_miss_a_targeted_module_is_refused(base_dir, tmp_path):
    missing = "model.layers.1.self_attn.v_proj"
    adapter = write_adapter(tmp_path / "adapter", base_dir, ["q_proj", "v_proj"],
                            skip=(f"base_model.model.{missing}.lora_A.weight", f"base_model.model.{missing}.lora_B.weight"))
    code, _, err = run_cli([adapter, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert_refused(code, err, missing, "target_modules")
    assert_nothing_beside(tmp_path, {"adapter"})


def test_dora_adapter_missing_a_magnitude_vector_is_refused(base_dir, tmp_path):
    module = "model.layers.0.self_attn.q_proj"
    adapter = write_adapter(tmp_path / "adapter", base_dir, ["q_proj"], use_dora=True,
                            skip=(f"base_model.model.{module}.lora_magnitude_vector",))
    code, _, err = run_cli([adapter, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert_refused(code, err, module, "magnitude")


def test_peft_adapter_targeting_a_module_the_base_lacks_is_refused(base_dir, tmp_path):
    adapter = write_adapter(tmp_path / "adapter", base_dir, ["q_proj"])
    edit_tensors(adapter / "adapter_model.safetensors", lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight": torch.ones(4, 64),
        "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight": torch.ones(64, 4)}))
    code, _, err = run_cli([adapter, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert_refused(code, err, "qkv_proj")


def test_a_complete_peft_adapter_still_exports(base_dir, tmp_path):
    adapter = write_adapter(tmp_path / "adapter", base_dir, ["q_proj", "v_proj"], use_dora=True)
    code, out, err = run_cli([adapter, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert code == 0, err
    assert (tmp_path / "out" / "efexport.json").is_file()


# --------------------------------------------------------------------------- 2-5. damaged files and fields


def test_resolved_config_that_is_not_utf8_is_refused(run_factory, tmp_path):
    run = copy_run(run_factory("qwen3", "dense_lora").path, tmp_path / "run")
    (run / "resolved_config.json").write_bytes(b'{"run_name": "caf\xe9 \xff"}')
    code, _, err = run_cli([run, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert_refused(code, err, "resolved_config.json", "UTF-8")
    assert_nothing_beside(tmp_path, {"run"})


@pytest.mark.parametrize("field,value", [
    ("lora_alpha", "abc"), ("lora_alpha", [8]), ("lora_r", "4"), ("lora_r", 2.5),
    ("use_rslora", "yes"), ("target_modules", "q_proj"), ("num_experts", True), ("top_k", [2]),
    ("moe_layers", ["0"]), ("strategy", 7), ("lora_alpha", float("inf")),
])
def test_every_injection_field_is_type_checked_and_named(run_factory, tmp_path, field, value):
    run = copy_run(run_factory("qwen3", "dense_lora").path, tmp_path / "run")
    for path, key in ((run / "resolved_config.json", "injection"), (run / "final" / "config.json", "eulerforge")):
        edit_json(path, lambda d, key=key: d[key].__setitem__(field, value))
    code, _, err = run_cli([run, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert_refused(code, err, repr(field))
    assert_nothing_beside(tmp_path, {"run"})


@pytest.mark.parametrize("path,change,needle", [
    ("resolved_config.json", lambda d: d.__setitem__("model", "Qwen/Qwen3-0.6B"), "'model'"),
    ("resolved_config.json", lambda d: d["model"].__setitem__("name_or_path", 3), "'name_or_path'"),
    ("resolved_config.json", lambda d: d.__setitem__("run_name", ["x"]), "'run_name'"),
    ("resolved_config.json", lambda d: d.__setitem__("backbone", {"x": 1}), "'backbone'"),
    ("resolved_config.json", lambda d: d.__setitem__("injection", [1]), "'injection'"),
    ("final/config.json", lambda d: d.__setitem__("hidden_size", "abc"), "hidden_size"),
    ("final/config.json", lambda d: d.__setitem__("model_type", 3), "'model_type'"),
    ("final/trainer_state.json", lambda d: d.__setitem__("global_step", "300"), "'global_step'"),
])
def test_run_fields_are_type_checked_where_they_are_read(run_factory, tmp_path, path, change, needle):
    run = copy_run(run_factory("qwen3", "dense_lora").path, tmp_path / "run")
    edit_json(run / path, change)
    code, _, err = run_cli([run, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert_refused(code, err, needle)


def test_config_nested_thousands_of_levels_deep_is_refused(run_factory, tmp_path):
    run = copy_run(run_factory("qwen3", "none", kind="checkpoint_dir").path, tmp_path / "run")
    text = (run / "config.json").read_text().rstrip().removesuffix("}")
    (run / "config.json").write_text(text + ', "deep": ' + "[" * 50_000 + "]" * 50_000 + "}")
    code, _, err = run_cli([run, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert_refused(code, err, "config.json", "nests too deeply")
    assert_nothing_beside(tmp_path, {"run"})


def test_model_type_transformers_does_not_know_is_refused(run_factory, tmp_path):
    run = copy_run(run_factory("qwen3", "none", kind="checkpoint_dir").path, tmp_path / "run")
    edit_json(run / "config.json", lambda d: d.update(model_type="qwen17", eulerforge={"strategy": "none"}))
    code, _, err = run_cli([run, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert_refused(code, err, "config.json", "'qwen17'")
    assert_nothing_beside(tmp_path, {"run"})


def test_a_config_that_no_longer_matches_the_weights_is_refused_before_writing(run_factory, tmp_path):
    run = copy_run(run_factory("qwen3", "none", kind="checkpoint_dir").path, tmp_path / "run")
    edit_json(run / "config.json", lambda d: d.update(vocab_size=d["vocab_size"] + 8))
    code, _, err = run_cli([run, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert_refused(code, err, "has shape", "config.json")


def test_renamed_tensor_is_refused_not_left_to_random_init(run_factory, tmp_path):
    run = copy_run(run_factory("qwen3", "none", kind="checkpoint_dir").path, tmp_path / "run")
    name = "model.layers.0.mlp.gate_proj.weight"
    edit_tensors(run / "model.safetensors", lambda t: t.__setitem__(name.replace("gate", "gat"), t.pop(name)))
    code, _, err = run_cli([run, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert_refused(code, err, "gat_proj")


# --------------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_weights_holding_nan_or_inf_are_refused_naming_the_tensor(run_factory, tmp_path, bad):
    run = copy_run(run_factory("qwen3", "dense_lora", kind="checkpoint_dir").path, tmp_path / "run")
    name = "model.layers.1.self_attn.q_proj.lora_B.weight"

    def poison(t):
        t[name][3, 1] = bad

    edit_tensors(run / "model.safetensors", poison)
    code, _, err = run_cli([run, "--out", tmp_path / "out", "--no-verify", "-q"])
    assert_refused(code, err, name, "NaN or infinite")
    assert_nothing_beside(tmp_path, {"run"})


# --------------------------------------------------------------------------- --out


def test_missing_parents_of_out_are_created(run_factory, tmp_path):
    run = run_factory("qwen3", "none", kind="checkpoint_dir").path
    out = tmp_path / "exports" / "team" / "qwen3-fp32"
    code, _, err = run_cli([run, "--out", out, "--no-verify", "-q"])
    assert code == 0, err
    assert (out / "efexport.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["qwen3-fp32"]  # no temporary folder, no lock


def test_parents_created_by_a_failed_export_are_removed(run_factory, tmp_path):
    run = copy_run(run_factory("qwen3", "none", kind="checkpoint_dir").path, tmp_path / "run")
    edit_tensors(run / "model.safetensors", lambda t: t["model.norm.weight"].fill_(float("nan")))
    code, _, err = run_cli([run, "--out", tmp_path / "exports" / "a" / "b", "--no-verify", "-q"])
    assert_refused(code, err, "model.norm.weight")
    assert_nothing_beside(tmp_path, {"run"})


def test_an_out_below_a_file_is_refused_before_anything_is_created(run_factory, tmp_path):
    (tmp_path / "plain").write_text("x")
    run = run_factory("qwen3", "none", kind="checkpoint_dir").path
    code, _, err = run_cli([run, "--out", tmp_path / "plain" / "sub" / "out", "--no-verify", "-q"])
    assert_refused(code, err, "is a file")
    assert_nothing_beside(tmp_path, {"plain"})


def test_an_export_while_another_holds_the_out_lock_fails_in_three_lines(run_factory, tmp_path):
    import fcntl
    import os

    run = run_factory("qwen3", "none", kind="checkpoint_dir").path
    lock = tmp_path / f".out{LOCK_MARK}"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, _, err = run_cli([run, "--out", tmp_path / "out", "--no-verify", "-q"])
    finally:
        os.close(fd)
    assert_refused(code, err, "another efexport is writing there")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.name]  # the holder's file, untouched


def test_two_processes_exporting_to_one_out_give_one_complete_artifact(run_factory, tmp_path):
    run = run_factory("qwen3", "dense_lora", kind="checkpoint_dir").path
    out = tmp_path / "out"
    cmd = [*EFEXPORT, str(run), "--out", str(out), "--no-verify", "-q"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    failed = next(err for code, err in results if code == 2)
    assert_three_lines(failed.strip())
    assert "another efexport is writing there" in failed or "exists and is not empty" in failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    code, _, err = run_cli(["verify", out, "--no-parity"])
    assert code == 0, err


# --------------------------------------------------------------------------- See lines and artifact config


def test_every_see_line_names_a_readme_section_or_a_real_command():
    """See lines point at what the user has: README.md#<existing heading> or `efexport <command> --help`."""
    headings = re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.M)
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
    commands = set(cli.main.commands)
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "converter").rglob("*.py"))
    sees = re.findall(r"docs: README\.md(?:#([\w-]+))?", sources)
    helps = re.findall(r"efexport (\w+) --help", sources)
    assert sees and {s for s in sees if s} <= anchors
    assert set(helps) <= commands
    assert "github.com/efexport" not in sources


def test_the_see_lines_of_refusals_resolve(run_factory, tmp_path):
    headings = re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.M)
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
    run = copy_run(run_factory("qwen3", "dense_lora").path, tmp_path / "run")
    (run / "resolved_config.json").write_bytes(b"\xff")
    for args in ([run, "--out", tmp_path / "o"], [tmp_path / "nowhere", "--out", tmp_path / "o"],
                 ["verify", tmp_path], ["inspect", run]):
        code, _, err = run_cli(args)
        see = err.strip().splitlines()[-1]
        assert code != 0 and see.startswith("See: "), err
        m = re.fullmatch(r"See: (?:docs: README\.md(?:#([\w-]+))?|efexport (\w+) --help)", see)
        assert m and (m.group(1) in anchors | {None}) and (m.group(2) in set(cli.main.commands) | {None}), see


def test_artifact_config_keeps_hub_ids_and_drops_local_paths(run_factory, tmp_path):
    for i, (name_or_path, kept) in enumerate((("/home/me/models/qwen3", False), ("../qwen3", False),
                                              ("runs/a/b", False), ("Qwen/Qwen3-0.6B", True))):
        run = copy_run(run_factory("qwen3", "none", kind="checkpoint_dir").path, tmp_path / f"r{i}")
        edit_json(run / "config.json", lambda d: d.__setitem__("_name_or_path", name_or_path))
        out = tmp_path / f"o{i}"
        code, _, err = run_cli([run, "--out", out, "--no-verify", "-q"])
        assert code == 0, err
        config = json.loads((out / "config.json").read_text())
        assert config.get("_name_or_path") == (name_or_path if kept else None)
        assert name_or_path not in (out / "config.json").read_text() or kept
