"""User-facing errors in the seed's three-line form.

Every failure a user can fix is an :class:`EfexportError` (a ``ValueError``) whose
message reads::

    Cannot <what failed and why>
    Fix: <what to do>
    See: <where to read more>

The CLI prints the message alone (no traceback) and exits non-zero.
"""

from __future__ import annotations

DOCS = "https://github.com/efexport/efexport#readme"


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
