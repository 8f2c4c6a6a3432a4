"""Export every tiny fixture case and record the sha256 of every file written.

Run it on two versions of the code (e.g. before and after a refactor) and compare:

    python benchmarks/byte_identity.py record new.json
    PYTHONPATH=/path/to/old/checkout python benchmarks/byte_identity.py record old.json
    python benchmarks/byte_identity.py compare old.json new.json

Both runs build the same runs into the same work folder (``--work``), so anything that
records a path records the same one. Only the public surface is used: the fixture builder
of ``tests/fixtures`` and the ``efexport`` command, so old and new code see the same calls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

HF_PRECISIONS = ("keep", "fp32", "fp16", "bf16", "int8", "int4")
GGUF_PRECISIONS = ("fp32", "fp16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k_m", "q5_k_m", "q6_k")
VERIFIED = {("hf", "qwen3", "dense_lora", "bf16"), ("hf", "llama", "moe_expert_lora", "int4"),
            ("gguf", "qwen3", "dense_lora", "q8_0"), ("peft", "qwen3", "dense_lora", "keep")}


def cases() -> list[dict]:
    """Every format x backbone x strategy x precision x layout the exporter accepts."""
    out = []
    for backbone in ("qwen3", "llama", "gemma3"):
        for strategy in ("none", "dense_lora", "moe_expert_lora", "mixture_lora"):
            layouts = [None]
            if strategy == "moe_expert_lora" and backbone != "gemma3":
                layouts = ["native", "compact"]
            for layout in layouts:
                for precision in HF_PRECISIONS:
                    out.append(dict(fmt="hf", backbone=backbone, strategy=strategy, precision=precision, layout=layout))
            gguf_ok = strategy in ("none", "dense_lora") or (strategy == "moe_expert_lora" and backbone != "gemma3")
            if gguf_ok:
                for precision in GGUF_PRECISIONS:
                    out.append(dict(fmt="gguf", backbone=backbone, strategy=strategy, precision=precision, layout=None))
        out.append(dict(fmt="peft", backbone=backbone, strategy="dense_lora", precision="keep", layout=None))
    for backbone in ("qwen3", "llama", "gemma3"):
        for precision in ("keep", "bf16", "int4"):
            out.append(dict(fmt="hf", backbone=backbone, strategy="adapter", precision=precision, layout=None))
        out.append(dict(fmt="gguf", backbone=backbone, strategy="adapter", precision="q8_0", layout=None))
    return out


def case_id(c: dict) -> str:
    return "/".join(str(c[k]) for k in ("fmt", "backbone", "strategy", "precision", "layout") if c[k] is not None)


def make_adapter(base: Path, out: Path) -> Path:
    """A PEFT adapter on ``base`` with non-zero factors (as tests/test_adapters.py makes them)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                               LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules="all-linear"))
        g = torch.Generator().manual_seed(1000)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        model.save_pretrained(str(out))
    return out


def build_inputs(work: Path) -> dict[tuple[str, str], Path]:
    from fixtures.runs import make_run

    paths: dict[tuple[str, str], Path] = {}
    for backbone in ("qwen3", "llama", "gemma3"):
        for strategy in ("none", "dense_lora", "moe_expert_lora", "mixture_lora"):
            paths[backbone, strategy] = make_run(work / f"{backbone}_{strategy}", backbone, strategy).path
        base = make_run(work / f"{backbone}_base", backbone, "none", kind="checkpoint_dir", seed=7).path
        paths[backbone, "adapter"] = make_adapter(base, work / f"{backbone}_adapter")
        paths[backbone, "adapter_base"] = base
    return paths


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def export_case(c: dict, paths: dict, out: Path) -> dict[str, str] | str:
    from click.testing import CliRunner

    from converter.cli import main

    args = [str(paths[c["backbone"], c["strategy"]]), "--out", str(out), "--format", c["fmt"], "--quiet", "--force"]
    if c["precision"] != "keep":
        args += ["--precision", c["precision"]]
    if c["layout"]:
        args += ["--moe-layout", c["layout"]]
    if c["strategy"] == "adapter":
        args += ["--base-model", str(paths[c["backbone"], "adapter_base"])]
    if (c["fmt"], c["backbone"], c["strategy"], c["precision"]) not in VERIFIED:
        args.append("--no-verify")
    result = CliRunner().invoke(main, ["export", *args])
    if result.exit_code != 0:
        return "refused: " + (result.output.strip().splitlines() or ["?"])[0]
    return {str(f.relative_to(out)): sha256(f) for f in sorted(out.rglob("*")) if f.is_file()}


def record(target: Path, work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    paths = build_inputs(work / "inputs")
    results = {}
    all_cases = cases()
    for i, c in enumerate(all_cases):
        results[case_id(c)] = export_case(c, paths, work / "out")
        print(f"[{i + 1}/{len(all_cases)}] {case_id(c)}", file=sys.stderr)
    target.write_text("".join(json.dumps({"case": k, "files": v}, sort_keys=True) + "\n" for k, v in results.items()))


def compare(old: Path, new: Path) -> int:
    read = lambda p: {r["case"]: r["files"] for r in map(json.loads, p.read_text().splitlines())}  # noqa: E731
    a, b = read(old), read(new)
    print("| case | files | identical |\n|---|---:|---|")
    bad = 0
    for case in a:
        fa, fb = a[case], b.get(case)
        if isinstance(fa, str) or isinstance(fb, str):
            same = fa == fb
            print(f"| {case} | - | {'yes (same refusal)' if same else f'NO: {fa!r} vs {fb!r}'} |")
        else:
            diff = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
            same = not diff
            print(f"| {case} | {len(fa)} | {'yes' if same else 'NO: ' + ', '.join(diff)} |")
        bad += not same
    print(f"\n{len(a) - bad} of {len(a)} cases byte-identical")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("target", type=Path)
    r.add_argument("--work", type=Path, default=Path("/tmp/efexport-byte-identity"))
    c = sub.add_parser("compare")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.target, args.work)
        return 0
    return compare(args.old, args.new)


if __name__ == "__main__":
    raise SystemExit(main())
