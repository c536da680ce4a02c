"""Read byte ranges of checkpoint files with ``os.pread``, merging adjacent ranges and
keeping the page cache from filling with expert weights read once."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .safetensors_index import StreamError

__all__ = ["RangeReader", "ReadStats"]


@dataclass
class ReadStats:
    reads: int = 0
    bytes: int = 0
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int, seconds: float) -> None:
        with self.lock:
            self.reads += 1
            self.bytes += nbytes
            self.seconds += seconds


class RangeReader:
    """Positional reads from a set of files kept open. ``drop_cache`` tells the OS not to
    keep what was read (``posix_fadvise(DONTNEED)`` on Linux, ``F_NOCACHE`` on macOS):
    streamed experts live in our own byte-budgeted cache, a second copy in the page cache
    would only push the rest of the system out of memory."""

    def __init__(self, drop_cache: bool = True):
        self.drop_cache = drop_cache
        self.stats = ReadStats()
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = os.open(file, os.O_RDONLY)
                except OSError as e:
                    raise StreamError(f"{file}: cannot open ({e.strerror})") from None
                if self.drop_cache and sys.platform == "darwin":
                    import fcntl

                    fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
                self._fds[file] = fd
            return fd

    def read(self, file: Path, start: int, nbytes: int) -> bytes:
        """Exactly ``nbytes`` at ``start`` of ``file``; a short read or I/O error raises a
        StreamError naming the file and range."""
        fd = self._fd(file)
        t0 = time.perf_counter()
        chunks, done = [], 0
        while done < nbytes:
            try:
                chunk = os.pread(fd, nbytes - done, start + done)
            except OSError as e:
                raise StreamError(
                    f"{file}: read error at bytes {start}-{start + nbytes} ({e.strerror})"
                ) from None
            if not chunk:
                raise StreamError(
                    f"{file}: truncated: wanted bytes {start}-{start + nbytes}, "
                    f"got {done} of {nbytes}"
                )
            chunks.append(chunk)
            done += len(chunk)
        if self.drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_DONTNEED)
        self.stats.add(nbytes, time.perf_counter() - t0)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def read_many(self, ranges: list[tuple[Path, int, int]]) -> list[bytes]:
        """The bytes of each ``(file, start, nbytes)``; ranges that touch in one file are
        read with one call and split afterwards."""
        out: list[bytes | None] = [None] * len(ranges)
        by_file: dict[Path, list[int]] = defaultdict(list)
        for i, (file, _, _) in enumerate(ranges):
            by_file[file].append(i)
        for file, idx in by_file.items():
            idx.sort(key=lambda i: ranges[i][1])
            run = [idx[0]]
            for i in idx[1:]:
                prev = ranges[run[-1]]
                if ranges[i][1] == prev[1] + prev[2]:
                    run.append(i)
                else:
                    self._read_run(file, run, ranges, out)
                    run = [i]
            self._read_run(file, run, ranges, out)
        return out  # type: ignore[return-value]

    def _read_run(self, file, run, ranges, out) -> None:
        start = ranges[run[0]][1]
        total = sum(ranges[i][2] for i in run)
        data = memoryview(self.read(file, start, total))
        pos = 0
        for i in run:
            n = ranges[i][2]
            out[i] = data[pos : pos + n]
            pos += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
