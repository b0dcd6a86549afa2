"""The run folder a federated run writes, and the CLI and dashboard read.

    RUN_DIR/run.json      RunInfo: config, base fingerprint, start/end, status
    RUN_DIR/rounds.jsonl  one RoundRecord per line, appended as each round ends
    RUN_DIR/shared_prefix.safetensors  the final aggregated shared prefix (shared modes)

Readers tolerate a run in progress (status "running", a partial last line) and report
a corrupt line by its number while still returning the others.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fedprefix.common.errors import FedPrefixError, first_error
from fedprefix.common.files import atomic_write_bytes
from fedprefix.common.protocol import SHARED_ARRAY_PREFIX
from pydantic import BaseModel, Field, ValidationError

RUN_FILE = "run.json"
ROUNDS_FILE = "rounds.jsonl"
SHARED_PREFIX_FILE = "shared_prefix.safetensors"  # the final aggregated shared prefix (shared.* tensors)


class RunFolderError(FedPrefixError):
    """A run folder is missing or unreadable."""


class Rejection(BaseModel):
    node: int
    reason: str


class PrivacyRecord(BaseModel):
    noise_multiplier: float
    clipping_norm: float
    epsilon: float | None  # None where Flower's accountant cannot tell (see reason)
    delta: float | None
    reason: str | None = None


class RoundRecord(BaseModel):
    """What one round did."""

    round: int
    sampled_users: list[int]  # node ids sent a training message
    replies_accepted: int
    replies_rejected: int
    rejected: list[Rejection] = Field(default_factory=list)  # training and evaluation, with reasons
    clipped: list[int] = Field(default_factory=list)  # nodes whose update was clipped to the round's bound
    train_loss: float | None
    eval_loss_base: float | None
    eval_loss_shared: float | None
    eval_loss_personal: float | None
    shared_update_norm: float | None  # L2 norm of this round's change of the shared prefix
    uplink_bytes: int  # payload bytes clients sent: array data + 8 per metric value
    train_seconds_sum: float  # sum of the clients' local training times
    seconds: float  # wall time of the round at the coordinator
    privacy: PrivacyRecord | None = None

    @property
    def personalization_gain(self) -> float | None:
        """Held-out loss of the base minus that with shared + personal prefix; None if either is missing."""
        if self.eval_loss_base is None or self.eval_loss_personal is None:
            return None
        return self.eval_loss_base - self.eval_loss_personal


class RunInfo(BaseModel):
    """run.json."""

    run_id: str
    status: str  # running, finished, failed
    config: dict
    base: str
    base_fingerprint: str
    shared_prefix_parameters: int
    compute_dtype: str | None = None  # what config dtype resolved to on the coordinator's host
    host: dict | None = None  # the coordinator's host (common.precision.HostInfo); simulated nodes share it
    started: float  # unix time
    ended: float | None = None
    error: str | None = None


class RunRecorder:
    """Writes a run folder as the ServerApp goes."""

    def __init__(self, run_dir: str | os.PathLike, info: RunInfo) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.info = info
        (self.dir / ROUNDS_FILE).write_text("")  # a fresh run starts with no rounds
        self._write_info()

    def _write_info(self) -> None:
        atomic_write_bytes(self.dir / RUN_FILE, self.info.model_dump_json(indent=2).encode())

    def append_round(self, record: RoundRecord) -> None:
        """Append one line; flushed and synced so a reader sees whole rounds."""
        with open(self.dir / ROUNDS_FILE, "a", encoding="utf-8") as fh:
            fh.write(record.model_dump_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def finish(self, status: str = "finished", error: str | None = None) -> None:
        self.info = self.info.model_copy(update={"status": status, "ended": time.time(), "error": error})
        self._write_info()


def read_run(run_dir: str | os.PathLike) -> tuple[RunInfo, list[RoundRecord], list[str]]:
    """(run info, rounds, problems): problems name each unreadable line by number."""
    folder = Path(run_dir)
    info_path = folder / RUN_FILE
    if not info_path.is_file():
        raise RunFolderError(f"{folder} is not a run folder: {RUN_FILE} is missing")
    try:
        info = RunInfo.model_validate_json(info_path.read_text())
    except ValidationError as exc:
        raise RunFolderError(f"{info_path} is not a valid run record: {': '.join(first_error(exc, 'run'))}") from exc
    rounds, problems = [], []
    rounds_path = folder / ROUNDS_FILE
    if rounds_path.is_file():
        for number, line in enumerate(rounds_path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rounds.append(RoundRecord.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError) as exc:
                problems.append(f"{rounds_path} line {number}: unreadable round record ({str(exc).splitlines()[0]})")
    return info, rounds, problems


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
