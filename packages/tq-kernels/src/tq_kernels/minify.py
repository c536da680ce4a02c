"""Kernel text as MLX compiles it: comments, indentation and blank lines removed.

MLX's custom kernels build the whole source string again for every call they record
(``build_kernel`` in MLX's ``mlx/backend/cuda/custom_kernel.cpp``), so a launch's host cost
grows with the text: about 0.35 us per KB on the H100 host (benchmarks/device/probe_launch.py).
The readable text stays in the source modules; this is applied where kernels are created.
"""

from __future__ import annotations

import re

__all__ = ["minify"]

# A string literal (kept as written: inline PTX lives in them), or a comment, or a run of
# blanks; scanned left to right so "//" inside a literal is never taken for a comment.
_TOKEN = re.compile(r'"(?:\\.|[^"\\\n])*"|//[^\n]*|/\*.*?\*/|[ \t]+', re.S)


def _squeeze(m: re.Match) -> str:
    t = m[0]
    if t[0] == '"':
        return t
    return " " if t[0] in " \t" or t.startswith("/*") else ""


def minify(text: str) -> str:
    """``text`` without comments and redundant whitespace. Lines stay lines (preprocessor
    directives need their own); string literals (inline assembly) are kept verbatim, and
    a character literal or an unterminated string is refused rather than guessed at."""
    out = _TOKEN.sub(_squeeze, text)
    if "'" in _TOKEN.sub(lambda m: "" if m[0][0] == '"' else m[0], out) or out.count('"') % 2:
        raise ValueError("minify: kernel text with character literals or unterminated strings")
    lines = (line.strip() for line in out.split("\n"))
    return "\n".join(line for line in lines if line) + "\n"
