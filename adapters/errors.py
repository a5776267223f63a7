"""The one error type for user mistakes.

The CLI turns a `MoetuneError` into a single line on stderr and exit code 2 (no traceback unless
`--debug`). Raise it for anything the user can fix: a bad recipe key, a missing file, a malformed
record, an adapter for another base. The message names the file, the place and the fix.
It lives in `adapters` because `adapters` may not import `finetune`; `finetune` re-exports it.
"""

from __future__ import annotations


class MoetuneError(Exception):
    """A user-fixable problem; the message is one line: what, where, and how to fix it."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Keep it to one line so the CLI prints exactly one line.
        super().__init__(" ".join(str(message).split()))
