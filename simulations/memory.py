"""Peak resident memory of processes while a block runs, sampled in a background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil


class PeakMemory:
    """Peak RSS per process chosen by `select` (default: this process), sampled every `interval` s.

    `peaks` maps pid -> bytes; `extra_mib` is this process's peak above its level at entry.
    """

    def __init__(self, select: Callable[[psutil.Process], bool] | None = None, interval: float = 0.005) -> None:
        self.select, self.interval = select, interval
        self.peaks: dict[int, int] = {}

    def __enter__(self) -> PeakMemory:
        self.start = psutil.Process().memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _processes(self):
        if self.select is None:
            return [psutil.Process()]
        return [p for p in psutil.process_iter(["cmdline"]) if self._chosen(p)]

    def _chosen(self, proc) -> bool:
        try:
            return self.select(proc)
        except psutil.Error:
            return False

    def _sample(self) -> None:
        while self.running:
            for proc in self._processes():
                try:
                    self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), proc.memory_info().rss)
                except psutil.Error:
                    continue
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()

    @property
    def extra_mib(self) -> float:
        """This process's peak RSS above its level at entry, in MiB."""
        return (max(self.peaks.values(), default=self.start) - self.start) / 2**20
