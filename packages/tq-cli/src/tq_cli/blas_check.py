"""Detect MLX's slow reference BLAS on Linux CPU and say how to get a fast one, once."""

from __future__ import annotations

import os
import sys

import mlx.core as mx

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
_FAST = ("libopenblas", "libmkl", "libblis", "libflexiblas", "accelerate")
_warned = False


def reference_blas_loaded(maps_path: str = "/proc/self/maps") -> bool:
    """True when this process runs MLX's bundled reference BLAS and no optimized BLAS."""
    try:
        with open(maps_path) as f:
            libs = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return False
    if any(any(tag in lib.lower() for tag in _FAST) for lib in libs):
        return False
    return any("mlx_cpu.libs/libblas" in lib for lib in libs)


def blas_in_use(maps_path: str = "/proc/self/maps") -> str:
    """ "openblas", "mkl", ... when an optimized BLAS is mapped; "reference" for MLX's bundled
    one; "unknown" where the maps cannot be read (macOS uses Accelerate)."""
    try:
        with open(maps_path) as f:
            libs = " ".join(line.split()[-1].lower() for line in f if ".so" in line)
    except OSError:
        return "unknown"
    for tag in _FAST:
        if tag in libs:
            return tag.removeprefix("lib")
    return "reference" if "mlx_cpu.libs/libblas" in libs else "unknown"


def warn_if_reference_blas() -> None:
    """Print one hint on stderr when CPU matmuls would run on the reference BLAS."""
    global _warned
    if _warned or not sys.platform.startswith("linux") or mx.default_device() != mx.cpu:
        return
    mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))  # make sure the BLAS library is loaded
    if reference_blas_loaded():
        _warned = True
        print(
            "tq: MLX is using its bundled reference BLAS, ~100x slower for CPU matmuls. Install "
            "OpenBLAS (apt-get install libopenblas0-pthread) and run with "
            f"LD_PRELOAD={OPENBLAS}",
            file=sys.stderr,
        )


def preload_openblas_and_reexec() -> None:
    """For the `tq` console command on Linux: when MLX would run on its reference BLAS and
    OpenBLAS is installed, re-run this same command with OpenBLAS preloaded (it must be in
    LD_PRELOAD before the process starts). ``TQ_NO_BLAS_PRELOAD=1`` turns this off."""
    if (
        not sys.platform.startswith("linux")
        or os.environ.get("TQ_NO_BLAS_PRELOAD")
        or os.environ.get("_TQ_BLAS_REEXEC")
        or not os.path.exists(OPENBLAS)
        or "openblas" in os.environ.get("LD_PRELOAD", "")
        or mx.default_device() != mx.cpu
    ):
        return
    env = dict(os.environ, _TQ_BLAS_REEXEC="1")
    env["LD_PRELOAD"] = ":".join(p for p in (OPENBLAS, os.environ.get("LD_PRELOAD")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv keeps `-m tq_cli`: re-running sys.argv[0] (tq_cli/__main__.py) as a
    # script would break its relative imports.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
