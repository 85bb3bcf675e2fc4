"""Append-only per-process trace files under a directory named by an environment variable (off when it is unset).

Workers are Ray actors in processes of their own; each writes its own file (``<prefix><pid>.log``), so no two
processes share a file and the reader merges them. The clock in the lines is the writer's business
(``time.perf_counter``: CLOCK_MONOTONIC on Linux, shared by the processes of one host).
"""

from __future__ import annotations

import os
import threading
from typing import TextIO


class TraceFile:
    def __init__(self, env: str, prefix: str = ""):
        self.directory: str | None = os.environ.get(env) or None
        self._prefix = prefix
        self._lock = threading.Lock()
        self._open: tuple[str, int, TextIO] | None = None  # (directory, pid, file) of this process's trace

    def write(self, line: str) -> None:
        """Append ``line`` (a no-op while off)."""
        if self.directory is None:
            return
        with self._lock:
            self._file(self.directory).write(line)

    def _file(self, directory: str) -> TextIO:
        """Opened once rather than per line (writes sit on the engine thread's path); line-buffered, so a worker
        that is killed has written every line it wrote. Reopened in a forked child or after ``directory`` moved."""
        pid = os.getpid()
        if self._open is None or self._open[:2] != (directory, pid):
            if self._open is not None:
                self._open[2].close()
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"{self._prefix}{pid}.log")
            self._open = (directory, pid, open(path, "a", buffering=1))  # noqa: SIM115
        return self._open[2]
