"""Write a small EulerForge demo run (dense_lora on a tiny Qwen3, random weights) to DIR.

    python examples/make_demo_run.py demo_run

It uses the same writer as the test suite (tests/fixtures/runs.py), so the demo is
exactly the format efexport reads: resolved_config.json, final/, checkpoint-best/,
checkpoint-latest/, tokenizer with a chat template. Nothing is downloaded.

The weights are random and tiny, so the run names no base model: its cards and adapters
then say "unknown" instead of pointing users at a real model it was never trained from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fixtures.runs import make_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to create (must not exist)")
    parser.add_argument("--backbone", default="qwen3", choices=["qwen3", "llama", "gemma3"])
    parser.add_argument("--strategy", default="dense_lora",
                        choices=["none", "dense_lora", "moe_expert_lora", "mixture_lora"])
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} already exists")
    run = make_run(args.out, args.backbone, args.strategy)
    resolved = run.path / "resolved_config.json"
    config = json.loads(resolved.read_text())
    config["model"].pop("name_or_path", None)  # random weights: no public base model to name
    resolved.write_text(json.dumps(config, indent=2) + "\n")
    print(f"Wrote a {args.strategy} demo run ({args.backbone}, random weights, no base model) to {run.path}")
    print("checkpoints:", ", ".join(run.checkpoints))


if __name__ == "__main__":
    main()
