"""How many CPUs and how much memory this process may use, and torch's threads fitted to them.

A container limited by a CPU quota (``docker run --cpus 2``, a Kubernetes CPU limit) on a big
host sees every core of the host: torch starts one thread per core, and its threads then stall
one another each time the quota throttles them. Measured on a 2-core AMD EPYC under a quota of
one CPU, a decode-shaped loop took 165 ms on 1 thread, 219 ms on 2 and 405 ms on 32. So a
quota counts here as that many cores (rounded down, at least one).

Likewise a container's memory limit is not in the OS's free memory (`/proc/meminfo` is the
host's): what its cgroup leaves counts too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

__all__ = [
    "available_memory",
    "cpu_quota",
    "fit_torch_threads",
    "no_core_dumps",
    "raise_open_files_limit",
    "usable_cores",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
OWN_CGROUPS = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
NO_LIMIT = 1 << 60  # cgroup v1 writes "no memory limit" as a page-rounded 2**63 - 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:  # "max" (no limit), or garbage
        return None


def _ratio(quota: str, period: str) -> float | None:
    """CPUs of a quota over a period ('max' or -1: none)."""
    q, p = _int(quota), _int(period)
    return q / p if q is not None and p is not None and q > 0 and p > 0 else None


def _upward(mount: Path, path: str) -> Iterator[Path]:
    """mount/path, then each parent up to mount itself: a limit set on a parent holds too, and a
    container whose cgroup namespace starts at the mount reads its own limit at the mount."""
    parts = PurePosixPath(path).parts[1:]
    for end in range(len(parts), -1, -1):
        yield mount.joinpath(*parts[:end])


def _cgroup_folders(controller: str) -> Iterator[tuple[int, Path]]:
    """(cgroup version, folder) for each folder of this process's cgroups that may hold
    `controller`'s files, from its own group up to the root (v2, and v1's `controller` hierarchy)."""
    for line in (_read(OWN_CGROUPS) or "").splitlines():
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
        if controllers == "":  # cgroup v2: "0::/path"
            for folder in _upward(CGROUP_ROOT, path):
                yield 2, folder
        elif controller in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            for mount in dict.fromkeys((CGROUP_ROOT / controllers, CGROUP_ROOT / controller)):
                for folder in _upward(mount, path):
                    yield 1, folder


def cpu_quota() -> float | None:
    """CPUs this process's cgroup allows (quota / period; the smallest along its path, v2's
    cpu.max or v1's cfs quota); None where none is set or none can be read (not Linux)."""
    limits = []
    for version, folder in _cgroup_folders("cpu"):
        if version == 2:
            values = (_read(folder / "cpu.max") or "").split()
            limits.append(_ratio(*values) if len(values) == 2 else None)
        else:
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            limits.append(_ratio(quota, period) if quota and period else None)
    return min((limit for limit in limits if limit is not None), default=None)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return affinity if quota is None else max(1, min(affinity, math.floor(quota)))


def fit_torch_threads() -> int:
    """Lower torch's threads to a cgroup's CPU quota, which torch does not read (its affinity it
    does); never raises them, and without a quota leaves a host application's setting alone.
    Returns the count."""
    import torch  # here: the CLI reads the cores without loading torch

    if cpu_quota() is not None and torch.get_num_threads() > (cores := usable_cores()):
        torch.set_num_threads(cores)
    return torch.get_num_threads()


def raise_open_files_limit(wanted: int = 4096) -> int | None:
    """Raise this process's soft limit on open files to `wanted`, within its hard limit (as Ray
    does for itself): macOS starts shells at 256, fewer than a server's queue of connections.
    Never lowers it. Returns the soft limit now; None where there is none to read (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # macOS refuses above kern.maxfilesperproc
        return soft
    return target


def no_core_dumps() -> None:
    """No core file from this process or those it starts (a server's Ray replicas): a crash would
    write its memory, decrypted prefixes and keys derived from passphrases among it, to disk (as
    gpg-agent and Vault refuse to). The hard limit is left, so an operator can lift it to debug."""
    try:
        import resource
    except ImportError:  # Windows
        return
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))


def _field(text: str | None, name: str) -> int | None:
    """The number after `name` in a `name value` or `name: value unit` listing (memory.stat,
    /proc/meminfo)."""
    for line in (text or "").splitlines():
        parts = line.replace(":", " ", 1).split()
        if parts and parts[0] == name:
            return _int(parts[1]) if len(parts) > 1 else None
    return None


def _cgroup_room(version: int, folder: Path) -> int | None:
    """Bytes a cgroup's memory limit leaves: limit - usage, its inactive file cache (which the
    kernel reclaims first) not counted as used; None: no limit here. (Ray leaves the active file
    cache out of the usage too; counting it keeps this on the safe side.)"""
    if version == 2:
        limit, usage = _int(_read(folder / "memory.max")), _int(_read(folder / "memory.current"))
        cache = _field(_read(folder / "memory.stat"), "inactive_file")
    else:
        limit, usage = _int(_read(folder / "memory.limit_in_bytes")), _int(_read(folder / "memory.usage_in_bytes"))
        cache = _field(_read(folder / "memory.stat"), "total_inactive_file")
    if limit is None or usage is None or limit <= 0 or limit >= NO_LIMIT:
        return None
    return max(0, limit - max(0, usage - (cache or 0)))


def available_memory() -> int | None:
    """Bytes this process could still take: the OS's available memory (MemAvailable; psutil's
    where there is no /proc, as on macOS), capped by what each cgroup memory limit along its
    path leaves; None where none can be read."""
    kib = _field(_read(MEMINFO), "MemAvailable")
    rooms = [kib * 1024 if kib is not None else _psutil_available()]
    rooms += [_cgroup_room(version, folder) for version, folder in _cgroup_folders("memory")]
    return min((room for room in rooms if room is not None), default=None)


def _psutil_available() -> int | None:
    """psutil's estimate of the memory available (macOS, the BSDs, Windows); None where it fails."""
    import psutil

    try:
        return int(psutil.virtual_memory().available)
    except Exception:  # psutil raises several types where a platform hides the figures
        return None
