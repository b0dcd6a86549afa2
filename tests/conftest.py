"""Shared fixtures: tiny in-process base models of every supported architecture."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest
import torch
from fedprefix.common.base_model import load_base
from fedprefix.common.config import FederationConfig
from fedprefix.common.prefix import Prefix, PrefixConfig
from fedprefix.common.resources import raise_open_files_limit
from fedprefix.simulations.personas import write_federation_data
from hypothesis import settings

raise_open_files_limit()  # macOS shells start at 256; the load tests hold 250 connections at both ends

TINY_BASES = ("tiny-gpt2", "tiny-llama", "tiny-qwen2")
FEDPREFIX_CLI = str(Path(sys.executable).parent / "fedprefix")  # the console script, for tests run as a user would

# The property tests draw the same examples every run, so that a red CI means a change, not a
# draw; HYPOTHESIS_PROFILE=fuzz draws new ones each run (run it a few times after changing a parser).
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("fuzz", database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Fingerprints and conversions of tests go to a temp cache, never the user's."""
    if "FEDPREFIX_CACHE" not in os.environ:
        os.environ["FEDPREFIX_CACHE"] = str(tmp_path_factory.mktemp("fedprefix-cache"))


@pytest.fixture(scope="session", params=TINY_BASES)
def tiny_base(request):
    """A frozen tiny base model, one per architecture."""
    return load_base(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return load_base("tiny-llama")


def random_prefix(base, tokens: int, seed: int = 0, scale: float = 1.0, projection: bool = False) -> Prefix:
    """A seeded random prefix for `base`, large enough to change the logits visibly."""
    generator = torch.Generator().manual_seed(seed)
    config = PrefixConfig(
        spec=base.prefix_spec(tokens), prefix_projection=projection, base_fingerprint=base.fingerprint
    )
    prefix = Prefix(config, init="random", generator=generator)
    if scale != 1.0:
        with torch.no_grad():
            prefix.embedding.weight.mul_(scale)
    return prefix


def federation_config(tmp_path, **settings) -> FederationConfig:
    """Settings for a small, fast federation of tiny-llama users under tmp_path."""
    defaults = dict(
        base="tiny-llama",
        num_users=3,
        num_rounds=2,
        local_steps=2,
        data=str(write_federation_data(tmp_path / "data", settings.get("num_users", 3), 10, test_size=4)),
        max_length=96,
        batch_size=4,
        personal_tokens=4,
        shared_tokens=4,
        run_dir=str(tmp_path / "run"),
        store_root=str(tmp_path / "stores"),
        audit_dir=str(tmp_path / "audit"),
        # [shared ; personal], both parts trained in the last round: every round sends the shared
        # part, which the tests of aggregation, DP and hostile nodes need; the default recipe
        # (a personal copy of the shared part) has its own tests in test_federation.py
        personal_init="text",
    )
    return FederationConfig(**{**defaults, **settings})


MARK = "FEDPREFIX_TEST_MARK"  # a test sets it in its environment; every process started from there inherits it


def killed_writer():
    """A run record's writer (records.WriterProcess) that was this host's process and is gone."""
    import subprocess

    from fedprefix.coordinator.records import this_process

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    writer = this_process().model_copy(update={"pid": child.pid, "started": psutil.Process(child.pid).create_time()})
    child.kill()
    child.wait()
    return writer


def marked_processes(mark: str) -> list[psutil.Process]:
    """Live processes whose environment carries MARK=mark: what a test started, however deep."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARK) == mark and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def interruptible() -> None:
    """preexec_fn for a CLI a test will Ctrl-C: a shell that runs the suite as a background job
    starts it with SIGINT ignored, which Python keeps; a terminal user's Ctrl-C is the default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
