"""CPUs a process may use: a container's CPU quota caps torch's threads (cgroup v1 and v2)."""

from __future__ import annotations

import os

import pytest
import torch
from fedprefix.common import cores


@pytest.fixture
def cgroups(tmp_path, monkeypatch):
    """A fake /sys/fs/cgroup and /proc/self/cgroup; returns a writer of files under the former."""
    root, own = tmp_path / "cgroup", tmp_path / "self-cgroup"
    monkeypatch.setattr(cores, "CGROUP_ROOT", root)
    monkeypatch.setattr(cores, "OWN_CGROUPS", own)

    def write(relative: str, text: str) -> None:
        path = root / relative if relative != "/proc/self/cgroup" else own
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return write


def affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def test_no_quota_leaves_the_affinity(cgroups):
    cgroups("/proc/self/cgroup", "0::/\n")
    cgroups("cpu.max", "max 100000\n")
    assert cores.cpu_quota() is None and cores.usable_cores() == affinity()


def test_cgroup_v2_quota_of_the_own_group_or_a_parent(cgroups):
    cgroups("/proc/self/cgroup", "0::/kubepods/pod1/box\n")
    cgroups("kubepods/pod1/box/cpu.max", "max 100000\n")
    cgroups("kubepods/pod1/cpu.max", "150000 100000\n")  # the pod's limit holds for the box inside it
    cgroups("kubepods/cpu.max", "max 100000\n")
    assert cores.cpu_quota() == 1.5
    assert cores.usable_cores() == 1  # rounded down: 2 threads would be throttled


def test_a_container_whose_namespace_starts_at_the_mount(cgroups):
    cgroups("/proc/self/cgroup", "0::/\n")
    cgroups("cpu.max", "50000 100000\n")
    assert cores.cpu_quota() == 0.5 and cores.usable_cores() == 1  # at least one


def test_cgroup_v1_quota(cgroups):
    cgroups("/proc/self/cgroup", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n")
    cgroups("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    cgroups("cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    cgroups("cpu,cpuacct/docker/cpu.cfs_quota_us", "100000\n")
    cgroups("cpu,cpuacct/docker/cpu.cfs_period_us", "100000\n")
    assert cores.cpu_quota() == 1.0 and cores.usable_cores() == 1


@pytest.mark.parametrize(
    "proc, files",
    [
        ("", {}),  # not Linux: nothing to read
        ("garbage line\n0::/x\n", {"x/cpu.max": "lots 100000"}),
        ("0::/x\n", {"x/cpu.max": "0 100000"}),
        ("3:cpu:/x\n", {"cpu/x/cpu.cfs_quota_us": "100000"}),  # no period
    ],
)
def test_unreadable_or_odd_files_mean_no_quota(cgroups, proc, files):
    if proc:
        cgroups("/proc/self/cgroup", proc)
    for path, text in files.items():
        cgroups(path, text)
    assert cores.cpu_quota() is None


def test_torch_threads_are_lowered_to_the_quota_never_raised(cgroups):
    threads = torch.get_num_threads()
    cgroups("/proc/self/cgroup", "0::/\n")
    try:
        torch.set_num_threads(4)
        cgroups("cpu.max", "200000 100000\n")
        assert cores.fit_torch_threads() == min(2, affinity()) == torch.get_num_threads()
        torch.set_num_threads(1)
        assert cores.fit_torch_threads() == 1  # a lower setting of the caller's stays
    finally:
        torch.set_num_threads(threads)


def test_load_base_fits_torch_threads_before_any_compute(monkeypatch):
    from fedprefix.common.base_model import load_base

    threads = torch.get_num_threads()
    monkeypatch.setattr(cores, "usable_cores", lambda: 1)
    try:
        torch.set_num_threads(2)
        load_base("tiny-llama")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
