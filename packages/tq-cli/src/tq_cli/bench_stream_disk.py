"""Page cache control and the plain sequential read of `tq bench stream`'s checkpoint files."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from pathlib import Path

CHUNK = 16 << 20  # sequential read chunk


def drop_page_cache(files: list[Path]) -> None:
    """Ask the kernel to drop the cached pages of ``files`` (clean pages only: the files
    were synced when built)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), None where unsupported."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    cached = total = 0
    for f in files:
        size = f.stat().st_size
        if not size:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            rc = libc.mincore(addr, size, vec)
            libc.munmap(addr, size)
            if rc != 0:
                return None
            cached += sum(b & 1 for b in vec)
            total += pages
        finally:
            os.close(fd)
    return cached / total if total else 0.0


def sequential_read(files: list[Path]) -> dict:
    """Read every file start to end in CHUNK-sized os.read calls, page cache dropped first."""
    drop_page_cache(files)
    cached = cached_fraction(files)
    total, seconds = 0, 0.0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            while True:
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                total += len(chunk)
            seconds += time.perf_counter() - t0
        finally:
            os.close(fd)
    drop_page_cache(files)
    return {
        "bytes": total,
        "seconds": seconds,
        "gb_per_s": total / seconds / 1e9 if seconds else 0.0,
        "chunk_bytes": CHUNK,
        "cached_fraction_before": cached,
    }
