"""A live one-line status on stderr for the steps a person waits on (model load, prefill)."""

from __future__ import annotations

import sys
import threading
import time


class StatusLine:
    """``with StatusLine("loading model") as status: ...; status.update("3/10 layers")``.

    On a terminal the line is redrawn in place every ``interval`` seconds with the elapsed
    time; elsewhere (logs, pipes, CI) it prints one line when the step starts and one when it
    ends, so captured output stays readable. The final line says how long the step took.
    """

    def __init__(self, label: str, stream=None, interval: float = 0.2, prefix: str = "tq"):
        self.label = label
        self.stream = stream or sys.stderr
        self.interval = interval
        self.prefix = prefix
        self.detail = ""
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._width = 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def __enter__(self) -> StatusLine:
        self._start = time.perf_counter()
        if self.live:
            self._thread = threading.Thread(target=self._redraw, daemon=True)
            self._thread.start()
        else:
            self._print(f"{self.prefix}: {self.label} ...")
        return self

    def update(self, detail: str) -> None:
        """Replace the detail shown after the label (redrawn at the next tick on a terminal)."""
        with self._lock:
            self.detail = detail

    def _line(self) -> str:
        detail = f" {self.detail}" if self.detail else ""
        return f"{self.prefix}: {self.label}{detail} ({self.elapsed:.1f} s)"

    def _redraw(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                line = self._line()
                pad = " " * max(0, self._width - len(line))
                self._width = len(line)
                self.stream.write(f"\r{line}{pad}")
                self.stream.flush()

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.stream.write("\r" + " " * self._width + "\r")
        outcome = "failed" if exc_type is not None else "done"
        with self._lock:
            self._print(f"{self._line()} {outcome}")


def prefill_progress(status: StatusLine):
    """An mlx-lm ``prompt_progress_callback`` that shows ``prefill N/M tokens``."""

    def callback(processed: int, total: int) -> None:
        status.update(f"{processed}/{total} tokens")

    return callback
