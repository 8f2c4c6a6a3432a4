"""Shared pytest fixtures: tiny runs are built once per session through tests/fixtures/runs.py."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

from fixtures.runs import make_run  # noqa: E402


@pytest.fixture(scope="session")
def run_factory(tmp_path_factory):
    """get(backbone, strategy, **make_run_kwargs) -> FixtureRun, cached for the session."""
    cache: dict[tuple, object] = {}
    root = tmp_path_factory.mktemp("runs")

    def get(backbone: str, strategy: str, **kw):
        key = (backbone, strategy, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            cache[key] = make_run(root / f"r{len(cache)}_{backbone}_{strategy}", backbone, strategy, **kw)
        return cache[key]

    return get

