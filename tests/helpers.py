"""Small assertions shared by test files (fixtures themselves live in tests/fixtures/)."""

from __future__ import annotations

import contextlib
import io
import sys

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


def run_cli(args: list[object], stderr: object = None) -> tuple[int, str, str]:
    """``efexport ARGS`` through the console entry point, in-process: (exit code, stdout, stderr).

    Anything but an EfexportError or a clean exit propagates, so a traceback fails the test.
    ``stderr``: a stream to write stderr to instead of the returned string.
    """
    from converter import cli

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["efexport", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(stderr or err):
            cli.run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()
