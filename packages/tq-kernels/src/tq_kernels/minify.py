"""Kernel text as MLX compiles it: comments, indentation and blank lines removed.

MLX's custom kernels rebuild and hash the whole source on every call (its CUDA backend
hashes it again at every launch to find the compiled module), so a launch's host cost grows
with the text: about 0.35 us per KB on the H100 host (benchmarks/device/probe_launch.py).
The readable text stays in the source modules; this is applied where kernels are created.
"""

from __future__ import annotations

import re

__all__ = ["minify"]

_LINE_COMMENT = re.compile(r"//[^\n]*")
_BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_SPACES = re.compile(r"[ \t]+")


def minify(text: str) -> str:
    """``text`` without comments and redundant whitespace. Lines stay lines (preprocessor
    directives need their own); kernel text has no string literals, which is checked."""
    text = _BLOCK_COMMENT.sub(" ", _LINE_COMMENT.sub("", text))
    if '"' in text or "'" in text:  # a literal could hold "//": refuse rather than cut it
        raise ValueError("minify: kernel text with string or character literals")
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line) + "\n"
