"""The run folder a federated run writes, and the CLI and dashboard read.

    RUN_DIR/run.json      RunInfo: config, base fingerprint, start/end, status
    RUN_DIR/rounds.jsonl  one RoundRecord per line, appended as each round ends
    RUN_DIR/shared_prefix.safetensors  the final aggregated shared prefix (shared modes)

Readers tolerate a run in progress (status "running", a partial last line) and report
a corrupt line by its number while still returning the others. run.json names the folder's
format (FORMAT_VERSION; none: 1) and the process writing it (`writer`), so that a reader on
its host can tell a run whose process was killed from one still running (`writer_gone`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Annotated, Literal

import psutil
from fedprefix.common.errors import FedPrefixError, first_error
from fedprefix.common.files import atomic_write_bytes, read_regular
from fedprefix.common.protocol import SHARED_ARRAY_PREFIX
from pydantic import BaseModel, BeforeValidator, Field, ValidationError

FORMAT_VERSION = 1  # of run.json and rounds.jsonl together
RUN_FILE = "run.json"
MAX_PROBLEMS = 20  # unreadable round lines named one by one; the rest are counted
ROUNDS_FILE = "rounds.jsonl"
SHARED_PREFIX_FILE = "shared_prefix.safetensors"  # the final aggregated shared prefix (shared.* tensors)


class RunFolderError(FedPrefixError):
    """A run folder is missing or unreadable."""


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


# What a record may hold: pages and JSON render every value, so none is NaN, infinite or beyond
# what a date or a byte count can be (one run folder's odd values must not break every page).
Loss = Annotated[float | None, BeforeValidator(_finite_or_none)]  # a diverged (NaN) loss reads as missing
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
UnixTime = Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
RunStatus = Literal["running", "finished", "failed", "interrupted"]  # a page's header and poll read it


def _finite_json(value):
    """`value` (parsed JSON) with every NaN or infinite number read as missing (None)."""
    try:  # the encoder writes them as NaN / Infinity tokens, which parse_constant then replaces
        return json.loads(json.dumps(value), parse_constant=lambda _: None)
    except (RecursionError, TypeError, ValueError) as exc:
        raise ValueError(f"not plain JSON: {type(exc).__name__}") from None


FiniteDict = Annotated[dict, BeforeValidator(_finite_json)]


class Rejection(BaseModel):
    node: int
    reason: str


class PrivacyRecord(BaseModel):
    noise_multiplier: NonNegative
    clipping_norm: NonNegative
    epsilon: Loss  # one user's data zeroed (Flower's accountant); None where it cannot tell (see reason)
    epsilon_replace_one: Loss = None  # one user's data replaced by another's (strategy.replace_one_epsilon)
    delta: Loss
    reason: str | None = None


class RoundRecord(BaseModel):
    """What one round did."""

    round: Count
    sampled_users: list[int]  # node ids sent a training message
    replies_accepted: Count
    replies_rejected: Count
    rejected: list[Rejection] = Field(default_factory=list)  # training and evaluation, with reasons
    clipped: list[int] = Field(default_factory=list)  # nodes whose update was clipped to the round's bound
    train_loss: Loss
    eval_loss_base: Loss
    eval_loss_shared: Loss
    eval_loss_personal: Loss
    shared_update_norm: Loss  # L2 norm of this round's change of the shared prefix
    uplink_bytes: Count  # payload bytes clients sent: array data + 8 per metric value
    train_seconds_sum: NonNegative  # sum of the clients' local training times
    seconds: NonNegative  # wall time of the round at the coordinator
    privacy: PrivacyRecord | None = None

    @property
    def personalization_gain(self) -> float | None:
        """Held-out loss of the base minus that with shared + personal prefix; None if either is missing."""
        if self.eval_loss_base is None or self.eval_loss_personal is None:
            return None
        return self.eval_loss_base - self.eval_loss_personal


class WriterProcess(BaseModel):
    """The process that writes a run's records: its host, that host's boot, its pid and start
    time (a pid reused by another process is not taken for it)."""

    host: str
    boot_id: str | None = None
    pid_namespace: int | None = None  # a container sharing the host's name and boot has pids of its own
    pid: Count
    started: UnixTime


class RunInfo(BaseModel):
    """run.json."""

    format_version: Annotated[int, Field(ge=1)] = 1
    run_id: str
    status: RunStatus
    config: FiniteDict
    base: str
    base_fingerprint: str
    shared_prefix_parameters: Count
    compute_dtype: str | None = None  # what config dtype resolved to on the coordinator's host
    host: FiniteDict | None = None  # the coordinator's host (common.precision.HostInfo); simulated nodes share it
    started: UnixTime
    ended: UnixTime | None = None
    error: str | None = None
    writer: WriterProcess | None = None  # None: a run written before it was recorded


PROC = Path("/proc")  # Linux's; macOS has none


def this_process() -> WriterProcess:
    """The current process, as RunInfo.writer."""
    return WriterProcess(
        host=socket.gethostname(),
        boot_id=_boot_id(),
        pid_namespace=_pid_namespace(),
        pid=os.getpid(),
        started=psutil.Process().create_time(),
    )


def _pid_namespace() -> int | None:
    try:  # Linux: which pids a pid means (a container with the host's network has its own)
        return os.stat(PROC / "self/ns/pid").st_ino
    except OSError:
        return None


def _boot_id() -> str | None:
    try:  # Linux: one per boot (pids start again after a reboot)
        return (PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        if PROC.is_dir():  # a Linux hiding it: psutil's boot time there moves with clock adjustments
            return None
    try:  # macOS, the BSDs: no /proc; the boot's time stands for it
        return f"boot-time:{int(psutil.boot_time())}"
    except (psutil.Error, OSError):
        return None


def writer_gone(info: RunInfo) -> str | None:
    """Why a run recorded as running is not (its process was killed, or its host restarted),
    where this host can tell; None: it may still run."""
    writer = info.writer
    if info.status != "running" or writer is None or writer.host != socket.gethostname():
        return None
    if writer.pid_namespace != _pid_namespace():
        return None  # its pid means another process here
    if writer.pid_namespace is None and PROC.is_dir():
        return None  # a Linux that hid its pid namespace: a container may share the host's name
    # (no /proc at all, as on macOS: one pid space per host, so the pid and its start time decide)
    if writer.boot_id is not None and writer.boot_id != _boot_id():
        return "its host restarted since"
    try:
        if abs(psutil.Process(writer.pid).create_time() - writer.started) < 1:
            return None
    except psutil.Error:
        pass
    return f"the process writing it (pid {writer.pid}) is gone"


class RunRecorder:
    """Writes a run folder as the ServerApp goes (`start`), or ends one written already."""

    def __init__(self, run_dir: str | os.PathLike, info: RunInfo) -> None:
        self.dir = Path(run_dir)
        self.info = info

    @classmethod
    def start(cls, run_dir: str | os.PathLike, info: RunInfo) -> RunRecorder:
        """A fresh run folder: `info`, and no rounds (nor an earlier run's shared prefix)."""
        recorder = cls(run_dir, info)
        recorder.dir.mkdir(parents=True, exist_ok=True)
        # rounds are emptied and the record replaced atomically just below; only the prefix goes
        (recorder.dir / SHARED_PREFIX_FILE).unlink(missing_ok=True)
        # a new file, 0600 as run.json is (also in place of an older one readable by all)
        atomic_write_bytes(recorder.dir / ROUNDS_FILE, b"")
        recorder._write_info()
        return recorder

    def _write_info(self) -> None:
        atomic_write_bytes(self.dir / RUN_FILE, self.info.model_dump_json(indent=2).encode())

    def append_round(self, record: RoundRecord) -> None:
        """Append one line, synced so a reader sees whole rounds; a write that fails (a full disk)
        is cut back off, where its part line had glued the next round's to it (both lost)."""
        line = (record.model_dump_json() + "\n").encode()
        fd = os.open(self.dir / ROUNDS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    def finish(self, status: str = "finished", error: str | None = None) -> None:
        self.info = self.info.model_copy(update={"status": status, "ended": time.time(), "error": error})
        self._write_info()


def nothing_accepted(rounds: list[RoundRecord]) -> str | None:
    """Why a run whose rounds ran but accepted no node's reply has failed (None: some was): it
    taught nobody anything (every node failing on its data, say), which must not read "finished"."""
    if not rounds or any(r.replies_accepted for r in rounds):
        return None
    first = next((r.rejected[0] for r in rounds if r.rejected), None)
    reason = f" (the first: node {first.node}: {first.reason})" if first is not None else ""
    return f"no node's reply was accepted in any round{reason}"


def end_unfinished(run_dir: str | os.PathLike, status: str, error: str, ended: tuple[str, ...] = ("running",)) -> None:
    """Give a run whose status is one of `ended` (by default: still running) its end (`status`:
    interrupted, failed), as its ServerApp would have: one stopped from outside (Ctrl-C,
    SIGTERM) never wrote it."""
    try:
        info = read_info(run_dir)
    except RunFolderError:
        return  # nothing started, or nothing of ours to end
    if info.status in ended:
        RunRecorder(run_dir, info).finish(status, error)


def read_info(run_dir: str | os.PathLike) -> RunInfo:
    """run.json of `run_dir` (a regular file in the folder itself), or RunFolderError."""
    info_path = Path(run_dir) / RUN_FILE
    if not os.path.lexists(info_path):
        raise RunFolderError(f"{run_dir} is not a run folder: {RUN_FILE} is missing")
    try:
        raw = read_regular(info_path, follow_links=False)
        _check_version(info_path, raw)
        return RunInfo.model_validate_json(raw)
    except OSError as exc:
        raise RunFolderError(f"{info_path} {exc.strerror}") from None
    except ValidationError as exc:
        raise RunFolderError(f"{info_path} is not a valid run record: {': '.join(first_error(exc, 'run'))}") from exc


def _check_version(info_path: Path, raw: bytes) -> None:
    """RunFolderError naming the version of a folder a newer fedprefix wrote (its records may
    mean something else, which the fields read here would not show)."""
    try:
        version = json.loads(raw).get("format_version")
    except (ValueError, RecursionError, AttributeError):
        return  # validation names what is wrong
    if type(version) is int and version > FORMAT_VERSION:
        raise RunFolderError(
            f"{info_path} is format {version}, written by a newer fedprefix (this one reads {FORMAT_VERSION})"
        )


def read_run(run_dir: str | os.PathLike) -> tuple[RunInfo, list[RoundRecord], list[str]]:
    """(run info, rounds, problems): problems name each unreadable line by number.

    Record files are read only as regular files in the folder itself: a link (out of the runs
    folder a dashboard serves), a FIFO or a device is refused."""
    folder = Path(run_dir)
    info = read_info(folder)
    rounds, problems = [], []
    rounds_path = folder / ROUNDS_FILE
    try:
        data = read_regular(rounds_path, follow_links=False) if os.path.lexists(rounds_path) else b""
    except OSError as exc:
        return info, rounds, [f"{rounds_path} {exc.strerror}"]
    lines = data.decode("utf-8", errors="replace").split("\n")
    if info.status == "running":
        lines = lines[:-1]  # after the last newline: nothing, or a round still being written
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            json.dumps(record, ensure_ascii=False).encode()  # UnicodeEncodeError: a lone surrogate ("\udcff")
            rounds.append(RoundRecord.model_validate(record))
        except ValidationError as exc:  # named: "field eval_loss_base: ..."
            field, message = first_error(exc, "round")
            problems.append(f"{rounds_path} line {number}: unreadable round record (field {field}: {message})")
        except UnicodeEncodeError:  # JSON may escape one, but no page, reply or terminal can carry it
            problems.append(f"{rounds_path} line {number}: unreadable round record (text with a lone surrogate)")
        except (ValueError, RecursionError) as exc:  # not JSON, or numbers past its limits
            problems.append(f"{rounds_path} line {number}: unreadable round record ({str(exc).splitlines()[0]})")
    if len(problems) > MAX_PROBLEMS:  # each is printed, and a page that lists them is polled
        problems[MAX_PROBLEMS:] = [f"{rounds_path}: {len(problems) - MAX_PROBLEMS} more unreadable lines"]
    return info, rounds, problems


def clear_run_outputs(run_dir: Path) -> None:
    """Remove what a run writes into its folder (record, rounds, shared prefix): a rerun into the
    folder must not pass off an earlier run's shared prefix or rounds as its own, even if it fails."""
    for name in (RUN_FILE, ROUNDS_FILE, SHARED_PREFIX_FILE):
        (run_dir / name).unlink(missing_ok=True)


def save_shared_prefix(arrays, run_dir: str | os.PathLike) -> None:
    """The final aggregated shared prefix (never a personal one) into the run folder, as wire arrays."""
    import torch
    from safetensors.torch import save

    tensors = {name: torch.from_numpy(array.numpy().copy()) for name, array in arrays.items()}
    atomic_write_bytes(Path(run_dir) / SHARED_PREFIX_FILE, save(tensors))


def load_shared_prefix(run_dir: str | os.PathLike) -> dict:
    """The final shared prefix of a run as the shared Prefix's tensors by name (wire names unpacked)."""
    from safetensors.torch import load_file

    path = Path(run_dir) / SHARED_PREFIX_FILE
    if not path.is_file():
        raise RunFolderError(f"run folder {run_dir} has no {SHARED_PREFIX_FILE} (a personal-mode or unfinished run)")
    wire = load_file(str(path))
    return {name.removeprefix(SHARED_ARRAY_PREFIX): tensor for name, tensor in wire.items()}
