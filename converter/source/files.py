"""Small files every source reads: JSON configs, parsed with a clear error on damage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SEE_LOADING, fail


def read_json(path: Path, see: str = SEE_LOADING) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is the three-line error naming the file.

    Files come from other people: bytes that are not UTF-8, nesting deeper than Python's
    parser recurses and unreadable files are refused like a syntax error, never a traceback.
    """
    def bad(why: str) -> Exception:
        return fail(f"read {path.name}: {why}", f"repair or regenerate {path}.", see)

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise bad(f"it is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise bad("it is not UTF-8 text") from None
    except RecursionError:
        raise bad("it nests too deeply to be a configuration file") from None
    except OSError as exc:
        raise bad(f"it cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    return data


def typed(data: dict[str, Any], key: str, kinds: type | tuple[type, ...], where: str, what: str,
          see: str = SEE_LOADING) -> Any:
    """``data[key]`` when it is absent/null or of ``kinds``; otherwise the three-line error naming the field.

    Every field read from a run is checked where it is read, so a wrong type reads as
    "field X in file Y is a string, expected a number", not as a traceback further on.
    ``true`` is never taken for a number.
    """
    value = data.get(key)
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if value is None or (isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))):
        return value
    raise fail(f"read {where}: field {key!r} is {describe(value)}, expected {what}", f"fix {key!r} in {where}.", see)


def describe(value: Any) -> str:
    """A JSON value's kind and a short excerpt, for error messages."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
    try:
        text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    except (RecursionError, ValueError):
        text = "..."
    return f"{kind} ({text[:40] + '...' if len(text) > 40 else text})"
