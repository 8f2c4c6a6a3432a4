"""User-facing errors in three lines: what failed, what to do, where to read.

Every failure a user can fix is an :class:`EfexportError` (a ``ValueError``) whose
message reads::

    Cannot <what failed and why>
    Fix: <what to do>
    See: <where to read more>

The CLI prints the message alone (no traceback) and exits non-zero.
"""

from __future__ import annotations

# See lines point at what the user has: a README section or a command's --help.
DOCS = "docs: README.md"
SEE_LOADING = "docs: README.md#loading-a-run"


class EfexportError(ValueError):
    """A failure the user can act on, formatted as Cannot / Fix / See."""

    def __init__(self, cannot: str, fix: str, see: str = DOCS) -> None:
        self.cannot = cannot.removeprefix("Cannot ").strip()
        self.fix = fix.removeprefix("Fix: ").strip()
        self.see = see.removeprefix("See: ").strip()
        super().__init__(f"Cannot {self.cannot}\nFix: {self.fix}\nSee: {self.see}")


def fail(cannot: str, fix: str, see: str = DOCS) -> EfexportError:
    """Build an error to ``raise``; kept short so call sites read as one sentence."""
    return EfexportError(cannot, fix, see)
