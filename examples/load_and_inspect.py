"""Load a run and print what load_model detected: strategy, backbone, checkpoint, LoRA.

    python examples/load_and_inspect.py <run_dir or checkpoint_dir> [--checkpoint best]
"""

from __future__ import annotations

import argparse

from converter import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--checkpoint", default="final")
    args = parser.parse_args()

    result = load_model(args.path, checkpoint=args.checkpoint, device="cpu")
    m = result.metadata
    print(f"Strategy: {m.strategy}")
    print(f"Backbone: {m.backbone}")
    print(f"Path type: {m.path_type}")
    print(f"Checkpoint: {m.checkpoint_dir}")
    print(f"Structure preserved: {m.structure_preserved}")
    print(f"Load precision: {m.load_precision}")
    if m.lora_config:
        print(f"LoRA r: {m.lora_config['lora_r']}")
        print(f"LoRA alpha: {m.lora_config['lora_alpha']}")
    n = sum(p.numel() for p in result.model.parameters())
    print(f"Parameters: {n:,}")
    print(f"Model class: {type(result.model).__name__}")


if __name__ == "__main__":
    main()
