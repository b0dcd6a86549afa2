"""How many CPUs this process may use, and torch's threads fitted to them.

A container limited by a CPU quota (``docker run --cpus 2``, a Kubernetes CPU limit) on a big
host sees every core of the host: torch starts one thread per core, and its threads then stall
one another each time the quota throttles them. Measured on a 2-core AMD EPYC under a quota of
one CPU, a decode-shaped loop took 165 ms on 1 thread, 219 ms on 2 and 405 ms on 32. So a
quota counts here as that many cores (rounded down, at least one).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

__all__ = ["cpu_quota", "fit_torch_threads", "usable_cores"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
OWN_CGROUPS = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ratio(quota: str, period: str) -> float | None:
    """CPUs of a quota over a period ('max' or -1: none)."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _upward(mount: Path, path: str) -> Iterator[Path]:
    """mount/path, then each parent up to mount itself: a limit set on a parent holds too, and a
    container whose cgroup namespace starts at the mount reads its own limit at the mount."""
    parts = PurePosixPath(path).parts[1:]
    for end in range(len(parts), -1, -1):
        yield mount.joinpath(*parts[:end])


def cpu_quota() -> float | None:
    """CPUs this process's cgroup allows (quota / period; the smallest along its path, v2's
    cpu.max or v1's cfs quota); None where none is set or none can be read (not Linux)."""
    limits = []
    for line in (_read(OWN_CGROUPS) or "").splitlines():
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
        if controllers == "":  # cgroup v2: "0::/path"
            for folder in _upward(CGROUP_ROOT, path):
                values = (_read(folder / "cpu.max") or "").split()
                limits.append(_ratio(*values) if len(values) == 2 else None)
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            for mount in dict.fromkeys((CGROUP_ROOT / controllers, CGROUP_ROOT / "cpu")):
                for folder in _upward(mount, path):
                    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
                    limits.append(_ratio(quota, period) if quota and period else None)
    return min((limit for limit in limits if limit is not None), default=None)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return affinity if quota is None else max(1, min(affinity, math.floor(quota)))


def fit_torch_threads() -> int:
    """Lower torch's threads to usable_cores() where torch counted more (a quota it does not
    read); never raises them, so a lower setting of the caller's stays. Returns the count."""
    import torch  # here: the CLI reads the cores without loading torch

    cores = usable_cores()
    if torch.get_num_threads() > cores:
        torch.set_num_threads(cores)
    return torch.get_num_threads()
