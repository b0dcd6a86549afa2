"""CPUs and memory a process may use: a container's CPU quota caps torch's threads, its memory
limit caps the memory free (cgroup v1 and v2)."""

from __future__ import annotations

import os

import pytest
import torch
from fedprefix.common import resources


@pytest.fixture
def cgroups(tmp_path, monkeypatch):
    """A fake /sys/fs/cgroup and /proc/self/cgroup; returns a writer of files under the former."""
    root, own = tmp_path / "cgroup", tmp_path / "self-cgroup"
    monkeypatch.setattr(resources, "CGROUP_ROOT", root)
    monkeypatch.setattr(resources, "OWN_CGROUPS", own)
    monkeypatch.setattr(resources, "MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(resources, "_psutil_available", lambda: None)  # no figure beside the files written

    def write(relative: str, text: str) -> None:
        path = {"/proc/self/cgroup": own, "/proc/meminfo": tmp_path / "meminfo"}.get(relative, root / relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return write


def affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def test_no_quota_leaves_the_affinity(cgroups):
    cgroups("/proc/self/cgroup", "0::/\n")
    cgroups("cpu.max", "max 100000\n")
    assert resources.cpu_quota() is None and resources.usable_cores() == affinity()


def test_cgroup_v2_quota_of_the_own_group_or_a_parent(cgroups):
    cgroups("/proc/self/cgroup", "0::/kubepods/pod1/box\n")
    cgroups("kubepods/pod1/box/cpu.max", "max 100000\n")
    cgroups("kubepods/pod1/cpu.max", "150000 100000\n")  # the pod's limit holds for the box inside it
    cgroups("kubepods/cpu.max", "max 100000\n")
    assert resources.cpu_quota() == 1.5
    assert resources.usable_cores() == 1  # rounded down: 2 threads would be throttled


def test_a_container_whose_namespace_starts_at_the_mount(cgroups):
    cgroups("/proc/self/cgroup", "0::/\n")
    cgroups("cpu.max", "50000 100000\n")
    assert resources.cpu_quota() == 0.5 and resources.usable_cores() == 1  # at least one


def test_cgroup_v1_quota(cgroups):
    cgroups("/proc/self/cgroup", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n")
    cgroups("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    cgroups("cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    cgroups("cpu,cpuacct/docker/cpu.cfs_quota_us", "100000\n")
    cgroups("cpu,cpuacct/docker/cpu.cfs_period_us", "100000\n")
    assert resources.cpu_quota() == 1.0 and resources.usable_cores() == 1


def test_torch_threads_are_lowered_to_the_quota_never_raised(cgroups):
    threads = torch.get_num_threads()
    cgroups("/proc/self/cgroup", "0::/\n")
    try:
        torch.set_num_threads(4)
        cgroups("cpu.max", "200000 100000\n")
        assert resources.fit_torch_threads() == min(2, affinity()) == torch.get_num_threads()
        torch.set_num_threads(1)
        assert resources.fit_torch_threads() == 1  # a lower setting of the caller's stays
    finally:
        torch.set_num_threads(threads)


def test_without_a_quota_a_host_applications_thread_count_stays(cgroups):
    """torch reads the affinity itself; above it, the count is a host application's own choice."""
    threads = torch.get_num_threads()
    cgroups("/proc/self/cgroup", "0::/\n")
    cgroups("cpu.max", "max 100000\n")
    try:
        torch.set_num_threads(affinity() + 2)
        assert resources.fit_torch_threads() == affinity() + 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)


def test_load_base_fits_torch_threads_before_any_compute(monkeypatch):
    from fedprefix.common.base_model import load_base

    threads = torch.get_num_threads()
    monkeypatch.setattr(resources, "cpu_quota", lambda: 1.0)
    monkeypatch.setattr(resources, "usable_cores", lambda: 1)
    try:
        torch.set_num_threads(2)
        load_base("tiny-llama")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


MEMINFO = "MemTotal:       24684084 kB\nMemFree:        1000 kB\nMemAvailable:   8388608 kB\n"  # 8 GiB available


def test_memory_free_is_the_os_s_without_a_limit(cgroups):
    cgroups("/proc/meminfo", MEMINFO)
    cgroups("/proc/self/cgroup", "0::/user.slice\n4:memory:/\n")
    cgroups("user.slice/memory.max", "max\n")
    cgroups("memory/memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    cgroups("memory/memory.usage_in_bytes", "5000000000\n")
    assert resources.available_memory() == 8 << 30


def test_a_cgroup_v2_limit_leaves_less_and_its_file_cache_counts_as_free(cgroups):
    cgroups("/proc/meminfo", MEMINFO)
    cgroups("/proc/self/cgroup", "0::/kubepods/pod1/box\n")
    cgroups("kubepods/pod1/box/memory.max", "max\n")
    cgroups("kubepods/pod1/memory.max", f"{4 << 30}\n")  # the pod's limit holds for the box inside it
    cgroups("kubepods/pod1/memory.current", f"{3 << 30}\n")
    cgroups("kubepods/pod1/memory.stat", f"anon 1000\ninactive_file {1 << 29}\nactive_file 7\n")
    assert resources.available_memory() == (1 << 30) + (1 << 29)


def test_a_cgroup_v1_limit_counts_its_hierarchy_s_inactive_file_cache_as_free(cgroups):
    cgroups("/proc/meminfo", "MemAvailable:\t8388608 kB\n\n")  # a tab, a blank line: still read
    cgroups("/proc/self/cgroup", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    cgroups("memory/docker/abc/memory.limit_in_bytes", f"{4 << 30}\n")
    cgroups("memory/docker/abc/memory.usage_in_bytes", f"{3 << 30}\n")
    # v1 counts a group's own cache in inactive_file and its whole subtree's in total_inactive_file
    cgroups("memory/docker/abc/memory.stat", f"cache 5\ninactive_file 0\ntotal_inactive_file {1 << 30}\n")
    assert resources.available_memory() == 2 << 30
    cgroups("memory/docker/abc/memory.usage_in_bytes", f"{6 << 30}\n")  # over its limit: nothing left
    assert resources.available_memory() == 0


@pytest.mark.parametrize(
    "reading, proc, files",
    [
        ("cpu_quota", "", {}),  # not Linux: nothing to read
        ("cpu_quota", "garbage line\n0::/x\n", {"x/cpu.max": "lots 100000"}),
        ("cpu_quota", "0::/x\n", {"x/cpu.max": "0 100000"}),
        ("cpu_quota", "3:cpu:/x\n", {"cpu/x/cpu.cfs_quota_us": "100000"}),  # no period
        ("available_memory", "", {}),
        ("available_memory", "0::/x\n", {"/proc/meminfo": "MemAvailable: lots kB\n", "x/memory.max": "garbage"}),
        ("available_memory", "0::/x\n", {"x/memory.max": "1000"}),  # a limit without its usage
        ("available_memory", "0::/x\n", {"x/memory.max": "-1", "x/memory.current": "5"}),  # not a limit
    ],
)
def test_unreadable_or_odd_files_mean_no_limit(cgroups, reading, proc, files):
    if proc:
        cgroups("/proc/self/cgroup", proc)
    for path, text in files.items():
        cgroups(path, text)
    assert getattr(resources, reading)() is None


def test_without_proc_meminfo_the_memory_free_is_psutils_capped_by_a_limit(cgroups, monkeypatch):
    """macOS has no /proc: the KV budget, node and replica sizing then read psutil's figure."""
    monkeypatch.setattr(resources, "_psutil_available", lambda: 8 << 30)
    assert resources.available_memory() == 8 << 30
    cgroups("/proc/self/cgroup", "0::/box\n")
    cgroups("box/memory.max", f"{4 << 30}\n")
    cgroups("box/memory.current", f"{3 << 30}\n")
    assert resources.available_memory() == 1 << 30
    monkeypatch.undo()
    assert resources._psutil_available() > 0  # the real one, on this machine
