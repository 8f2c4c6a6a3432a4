"""Small assertions shared by test files (fixtures themselves live in tests/fixtures/)."""

from __future__ import annotations

import torch


def assert_three_lines(message: object) -> None:
    lines = str(message).splitlines()
    assert len(lines) == 3, message
    assert lines[0].startswith("Cannot "), message
    assert lines[1].startswith("Fix: "), message
    assert lines[2].startswith("See: "), message


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return max_diff(out, ref) / max(1.0, ref.abs().max().item())


def top1(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
