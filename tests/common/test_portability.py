"""What differs off Linux (macOS above all), emulated here: no /proc, F_FULLFSYNC, a 256 open
files limit, the MPS device (an auditor's findings)."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from fedprefix.common import files
from fedprefix.common.base_model import load_base
from fedprefix.common.errors import ConfigError
from fedprefix.common.resources import raise_open_files_limit
from fedprefix.common.store import PrefixStore
from fedprefix.coordinator import records

from tests.common.test_store_hardening import RAW, make_prefix, same
from tests.conftest import killed_writer

resource = pytest.importorskip("resource")


@pytest.mark.parametrize("refused", [False, True])
def test_store_writes_flush_the_drive_with_f_fullfsync_where_there_is_one(tmp_path, monkeypatch, refused):
    """macOS's fsync leaves data in the drive's cache: the power-loss guarantee needs F_FULLFSYNC
    (51 there); a filesystem refusing it gets fsync."""
    calls = []

    class FakeFcntl:
        @staticmethod
        def fcntl(fd, op):
            calls.append(op)
            if refused:
                raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(files, "FULL_FSYNC", 51)
    monkeypatch.setattr(files, "fcntl", FakeFcntl)
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    store = PrefixStore(tmp_path / "store", scrypt_n=2**10)
    store.save("u", make_prefix(1), RAW)
    assert calls and set(calls) == {51}
    assert (len(fsyncs) == len(calls)) if refused else not fsyncs
    assert same(store.load("u", RAW), make_prefix(1))


def test_a_failed_full_flush_is_an_error_not_retried_with_fsync(tmp_path, monkeypatch):
    """After a flush fails (EIO) a second fsync can report success with the data lost."""

    class FailingFcntl:
        @staticmethod
        def fcntl(fd, op):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "FULL_FSYNC", 51)
    monkeypatch.setattr(files, "fcntl", FailingFcntl)
    with pytest.raises(OSError, match="Input/output error"):
        files.atomic_write_bytes(tmp_path / "f", b"data")


def test_the_open_files_limit_is_raised_within_the_hard_one_and_never_lowered():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # macOS's default
        expected = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
        assert raise_open_files_limit() == expected == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raise_open_files_limit(wanted=1000) == expected  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _running(writer: records.WriterProcess) -> records.RunInfo:
    info = records.RunInfo(
        run_id="r", status="running", config={}, base="b", base_fingerprint="f", shared_prefix_parameters=0, started=1
    )
    return info.model_copy(update={"writer": writer})


def test_a_killed_run_reads_as_interrupted_without_proc(tmp_path, monkeypatch):
    """With no /proc (macOS) every writer's pid namespace and boot id were None, and a killed
    run read "running" for ever; there the boot time stands for the boot."""
    monkeypatch.setattr(records, "PROC", tmp_path / "no-proc")
    writer = killed_writer()
    assert writer.pid_namespace is None and writer.boot_id.startswith("boot-time:")
    assert "is gone" in records.writer_gone(_running(writer))
    alive = records.this_process()
    assert records.writer_gone(_running(alive)) is None
    rebooted = alive.model_copy(update={"boot_id": "boot-time:1"})
    assert records.writer_gone(_running(rebooted)) == "its host restarted since"


def test_a_linux_that_hides_its_pid_namespace_cannot_tell(tmp_path, monkeypatch):
    (tmp_path / "proc").mkdir()  # /proc there, its ns/pid not readable: a container may share a host name
    monkeypatch.setattr(records, "PROC", tmp_path / "proc")
    writer = killed_writer()
    assert writer.boot_id is None  # not psutil's boot time, which moves with clock adjustments there
    assert records.writer_gone(_running(writer)) is None


def test_load_base_refuses_a_device_the_cli_refuses():
    """load_base("tiny-llama", device="mps") loaded, and fit ran there, where nothing is tested."""
    with pytest.raises(ConfigError, match="device 'mps' is not supported"):
        load_base("tiny-llama", device="mps")


def test_a_macs_cpu_is_named_by_sysctl_in_benchmark_records(monkeypatch):
    """Benchmarks record their host: without /proc/cpuinfo a Mac's CPU had been just "arm"."""
    import builtins
    import platform

    from fedprefix.common import precision

    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(
        precision.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "Apple M2 Pro\n", "")
    )
    assert precision._cpu_model() == "Apple M2 Pro"
