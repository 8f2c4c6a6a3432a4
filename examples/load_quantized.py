"""Compare the memory of a run loaded in fp16 and quantized (load_model with load_precision).

    python examples/load_quantized.py <path> --precision int4
"""

from __future__ import annotations

import argparse

from converter import load_model


def param_bytes(model) -> int:
    return sum(p.nelement() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--precision", default="int4", choices=["int8", "int4"])
    args = parser.parse_args()

    r1 = load_model(args.path, load_precision="fp16")
    mem1 = param_bytes(r1.model)
    r2 = load_model(args.path, load_precision=args.precision)
    mem2 = param_bytes(r2.model)
    print(f"fp16: {mem1 / 1024**2:.3f} MB")
    print(f"{args.precision}: {mem2 / 1024**2:.3f} MB")
    print(f"Savings: {(1 - mem2 / mem1) * 100:.0f}%")


if __name__ == "__main__":
    main()
