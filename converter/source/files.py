"""Small files every source reads: JSON configs, parsed with a clear error on damage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SEE_LOADING, fail


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is the three-line error naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise fail(
            f"read {path.name}: it is not valid JSON ({exc.msg} at line {exc.lineno})",
            f"repair or regenerate {path}.",
            SEE_LOADING,
        ) from None
    if not isinstance(data, dict):
        raise fail(f"read {path.name}: expected a JSON object", f"repair or regenerate {path}.", SEE_LOADING)
    return data
