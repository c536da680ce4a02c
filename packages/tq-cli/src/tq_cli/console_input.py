"""Reading the next typed message from stdin for `tq chat` and `tq generate --chat`."""

from __future__ import annotations

import sys

QUIT_COMMANDS = ("/quit", "/exit", "/q")


def read_message(interactive: bool) -> str | None:
    """The next stdin line, stripped (``">> "`` shown first on a terminal); None at EOF or
    a quit command."""
    if interactive:
        print(">> ", end="", flush=True)
    line = sys.stdin.readline()
    if not line:
        return None
    line = line.strip()
    if line in QUIT_COMMANDS:
        return None
    return line
