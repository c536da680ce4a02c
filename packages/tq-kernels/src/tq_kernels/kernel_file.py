"""CUDA kernel text handed to NVRTC as files, so that a launch records one line, not the text.

MLX builds a custom kernel's whole source string again for every call it records and hashes
it again in every ``eval_gpu`` (``mlx/backend/cuda/custom_kernel.cpp``: ``build_kernel``,
then ``std::hash`` of the source to find the compiled module), so a launch's host cost grows
with the text: on the H100 host a 30 KB kernel cost 3.1 + 9.1 us (build + eval) a call against
1.7 + 3.0 us for a one-line one (benchmarks/device/probe_call_cost.py). The tensor-core attend
kernel is 29 KB and each weight kernel 8.5 KB, and a decode step runs them on every layer.

NVRTC reads ``#include`` files from disk, so the header and the body are written once to
files named by their content, and the kernel MLX records is two ``#include`` lines. Metal
compiles from the string alone, so its text is passed as it is.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import cache
from pathlib import Path

__all__ = ["by_file", "kernel_text_dir", "TEXT_BY_FILE"]

#: ``TQ_KERNEL_TEXT_BY_FILE=0`` hands MLX the text itself.
TEXT_BY_FILE = os.environ.get("TQ_KERNEL_TEXT_BY_FILE", "1") != "0"

#: The per-input arguments MLX passes a kernel whose source names them.
_SHAPE_SUFFIXES = ("_shape", "_strides", "_ndim")


def kernel_text_dir() -> Path:
    """Where kernel text files go: ``TQ_KERNEL_TEXT_DIR``, else ``$XDG_CACHE_HOME/tq/kernels``
    (``~/.cache/tq/kernels``)."""
    env = os.environ.get("TQ_KERNEL_TEXT_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tq" / "kernels"


@cache
def _written(directory: str, text: str, suffix: str) -> str | None:
    """The path of a file holding ``text``, named by its digest (written now if absent: to a
    temporary name, then renamed, so a reader never sees half a file), or ``None`` where it
    cannot be written or its path cannot stand in an include line."""
    if any(c in directory for c in '"\\\n'):
        return None
    path = Path(directory) / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}{suffix}"
    try:
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tq-", suffix=suffix)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
    except OSError:
        return None
    return str(path.resolve())


def by_file(header: str, body: str, input_names) -> tuple[str, str]:
    """``(header, source)`` to give ``mx.fast.cuda_kernel`` for this text: ``#include`` lines
    of files holding it, or the text itself (``TQ_KERNEL_TEXT_BY_FILE=0``, or a directory
    that cannot be written).

    MLX decides from the source string which inputs get their shape, strides and ndim passed
    (it searches it for ``a_shape`` and so on), so the source line also names, in a comment,
    every such argument the body uses: the kernel's parameters stay the same."""
    if not TEXT_BY_FILE:
        return header, body
    directory = str(kernel_text_dir())
    head = _written(directory, header, ".cuh") if header else None
    main = _written(directory, body, ".cu")
    if main is None or (header and head is None):
        return header, body
    used = [n + s for n in input_names for s in _SHAPE_SUFFIXES if n + s in body]
    source = f'#include "{main}"\n'
    if used:
        source += "// " + " ".join(used) + "\n"
    return (f'#include "{head}"\n' if head else ""), source
