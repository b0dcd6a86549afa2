"""Finding and summarizing run folders (for `fedprefix runs|show` and the dashboard)."""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from pydantic import BaseModel

from .records import ROUNDS_FILE, RUN_FILE, RoundRecord, RunFolderError, RunInfo, read_run, writer_gone

RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # fullmatch: `$` would let a trailing newline in


class RunSummary(BaseModel):
    """One line of the runs table."""

    id: str  # the run folder's name
    status: str
    mode: str
    base: str
    users: int
    rounds_planned: int
    rounds_done: int
    last_eval_loss_base: float | None
    last_eval_loss_shared: float | None
    last_eval_loss_personal: float | None
    started: float
    problems: list[str]


def is_run_id(name: str) -> bool:
    """Whether `name` can name a run folder (`show ID`, the dashboard's URLs): no way out of the runs folder."""
    return bool(RUN_ID.fullmatch(name)) and name not in (".", "..")


def run_folder(runs_dir: str | os.PathLike, run_id: str) -> Path:
    """The folder of `run_id` under `runs_dir`; refuses ids that could leave the folder."""
    if not is_run_id(run_id):
        raise RunFolderError(
            f"invalid run id {run_id!r} (letters, digits, '.', '_', '-'): open the folder by its path "
            "(fedprefix show PATH), or rename it"
        )
    folder = Path(runs_dir) / run_id
    if folder.is_symlink():  # it may lead anywhere: the runs folder holds the runs it serves
        raise RunFolderError(f"run {run_id!r} in {runs_dir} is a symbolic link (not followed)")
    if not os.path.lexists(folder / RUN_FILE):
        raise RunFolderError(f"no run {run_id!r} in {runs_dir}")
    return folder


def load_run(runs_dir: str | os.PathLike, run_id: str) -> tuple[RunInfo, list[RoundRecord], list[str]]:
    return read_run_cached(run_folder(runs_dir, run_id))


# The cache holds as many runs as a runs folder may (with 32, an index of 500 runs read every
# one of them again on each request: 1-1.7 s), whose record files come to CACHED_BYTES at most
# (their records take ~5x that in memory), and at least the run read last. A rounds.jsonl past
# MAX_ROUNDS_BYTES is not read (a 1 GB file took 2.2 GB to read, and one past the memory failed
# the whole runs list); 256 MiB is some 10,000 rounds of 1,000 users (~25 KB a round).
CACHED_RUNS = 4096
MAX_ROUNDS_BYTES = 256 << 20
MAX_INFO_BYTES = 16 << 20  # run.json: settings and a status, a few KB
CACHED_BYTES = 256 << 20
_cache: OrderedDict[Path, tuple[tuple, tuple]] = OrderedDict()  # folder -> (record files' stats, read_run)
_cache_lock = threading.Lock()  # the dashboard answers on several threads
# One read at a time: four parallel first loads of a file held four copies. A large read holds
# up other runs' first loads for its seconds, rather than the memory of several at once.
_read_lock = threading.Lock()


def read_run_cached(folder: Path) -> tuple[RunInfo, list[RoundRecord], list[str]]:
    """read_run, reused while the folder's record files are unchanged (inode, size, mtime): the
    dashboard's index reads every run on each request, and a run's page polls every 2 s. A
    record file over its cap (MAX_INFO_BYTES, MAX_ROUNDS_BYTES), or one that memory cannot hold, is
    a RunFolderError."""
    return with_writer_checked(*_read_run_as_written(folder, _record_stats(folder)))


def _record_stats(folder: Path) -> tuple:
    return tuple(_stat_key(folder / name) for name in (RUN_FILE, ROUNDS_FILE))


def _read_run_as_written(folder: Path, key: tuple) -> tuple[RunInfo, list[RoundRecord], list[str]]:
    hit = _cached(folder, key)
    if hit is None:
        with _read_lock:
            hit = _cached(folder, key)  # another thread may have read it meanwhile
            if hit is None:
                for name, stats, limit in ((RUN_FILE, key[0], MAX_INFO_BYTES), (ROUNDS_FILE, key[1], MAX_ROUNDS_BYTES)):
                    if stats and stats[1] > limit:
                        raise RunFolderError(
                            f"{folder.name}/{name} holds {stats[1] / 2**20:.0f} MiB, more than the "
                            f"{limit >> 20} MiB read here (open it with `fedprefix show PATH`)"
                        )
                try:
                    hit = (key, read_run(folder))  # an error is raised, never cached
                except MemoryError:
                    raise RunFolderError(f"{folder.name}/{ROUNDS_FILE}: too large for the memory left") from None
                with _cache_lock:
                    _cache[folder] = hit
                    _cache.move_to_end(folder)  # a re-read run is the newest, not where it was
                    while len(_cache) > CACHED_RUNS or (len(_cache) > 1 and _cached_bytes() > CACHED_BYTES):
                        _cache.popitem(last=False)
    return hit[1]


# What the runs list needs of each run, kept apart from the records: where a runs folder's
# records passed CACHED_BYTES, each list read every run again, evicting each before its next
# turn (300 runs of 1.4 MB: 12.5 s a request, every request).
_outlines: OrderedDict[Path, tuple[tuple, tuple[RunInfo, int, list[RoundRecord], list[str]]]] = OrderedDict()


def _outline(folder: Path) -> tuple[RunInfo, int, list[RoundRecord], list[str]]:
    """(run info, rounds done, the last round alone, problems) as written, reused while the
    folder's record files are unchanged."""
    key = _record_stats(folder)
    with _cache_lock:
        hit = _outlines.get(folder)
    if hit is None or hit[0] != key:
        info, rounds, problems = _read_run_as_written(folder, key)
        hit = (key, (info, len(rounds), rounds[-1:], problems))
        with _cache_lock:
            _outlines[folder] = hit
            _outlines.move_to_end(folder)
            while len(_outlines) > CACHED_RUNS:
                _outlines.popitem(last=False)
    return hit[1]


def with_writer_checked(
    info: RunInfo, rounds: list[RoundRecord], problems: list[str]
) -> tuple[RunInfo, list[RoundRecord], list[str]]:
    """The run as read, copied (callers add problems to theirs); one recorded as running whose
    process is gone (killed: SIGKILL, the OOM killer) reads as interrupted, with the reason."""
    problems = list(problems)
    if reason := writer_gone(info):
        info = info.model_copy(update={"status": "interrupted"})
        problems.append(f"{RUN_FILE} says running, but {reason}: the run ended without recording it")
    elif info.status == "running" and info.writer is None:  # a record of a version before `writer`
        problems.append(
            f"{RUN_FILE} says running, written by a fedprefix that did not record its process: "
            "if the run is not going on, it was stopped without recording its end"
        )
    return info, list(rounds), problems


def _cached(folder: Path, key: tuple) -> tuple | None:
    with _cache_lock:
        hit = _cache.get(folder)
        if hit is None or hit[0] != key:
            return None
        _cache.move_to_end(folder)
        return hit


def _cached_bytes() -> int:
    return sum(stats[1] for key, _ in _cache.values() for stats in key if stats)


def _stat_key(path: Path) -> tuple | None:
    try:
        stat = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def summarize(
    run_id: str, info: RunInfo, rounds: list[RoundRecord], problems: list[str], rounds_done: int | None = None
) -> RunSummary:
    """A run's line in the runs list; `rounds` may be its last round alone, given `rounds_done`."""
    last = rounds[-1] if rounds else None
    return RunSummary(
        id=run_id,
        status=info.status,
        mode=str(info.config.get("mode", "?")),
        base=info.base,
        users=_count(info.config, "num_users", problems),
        rounds_planned=_count(info.config, "num_rounds", problems),
        rounds_done=len(rounds) if rounds_done is None else rounds_done,
        last_eval_loss_base=last.eval_loss_base if last else None,
        last_eval_loss_shared=last.eval_loss_shared if last else None,
        last_eval_loss_personal=last.eval_loss_personal if last else None,
        started=info.started,
        problems=problems,
    )


def _count(config: dict, key: str, problems: list[str]) -> int:
    """A count from a run's config (a record the run wrote: still, an odd value is a problem, not an error)."""
    value = config.get(key, 0)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    problems.append(f"run.json: config {key} is not a count ({str(value)[:40]!r})")
    return 0


def require_runs_folder(runs_dir: str | os.PathLike) -> Path:
    """`runs_dir` as a Path, or RunFolderError naming what is wrong with it."""
    root = Path(runs_dir)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise RunFolderError(f"runs folder {root} {problem}")
    return root


def _unicode(text: str) -> str:
    """`text` with the lone surrogates of a name that is not UTF-8 (b"\\xff" reads as "\\udcff") as
    U+FFFD: no page or JSON reply can encode them, and one such folder failed the whole list."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def list_runs(runs_dir: str | os.PathLike) -> list[RunSummary]:
    """Every run folder under `runs_dir`, newest first; unreadable ones are listed with their problem."""
    root = require_runs_folder(runs_dir)
    summaries = []
    for folder in sorted(p for p in root.iterdir() if os.path.lexists(p / RUN_FILE)):
        try:
            if folder.is_symlink():
                raise RunFolderError(f"{folder} is a symbolic link (not followed)")
            info, rounds_done, last, problems = _outline(folder)
            summary = summarize(folder.name, *with_writer_checked(info, last, problems), rounds_done)
            if not is_run_id(folder.name):  # listed, but `show ID` and the dashboard cannot name it
                summary.problems.append(
                    f"{folder.name!r} is not a valid run id (letters, digits, '.', '_', '-'): "
                    "rename the folder, or open it with `fedprefix show PATH`"
                )
            summaries.append(summary)
        except RunFolderError as exc:
            summaries.append(
                RunSummary(
                    id=folder.name,
                    status="unreadable",
                    mode="?",
                    base="?",
                    users=0,
                    rounds_planned=0,
                    rounds_done=0,
                    last_eval_loss_base=None,
                    last_eval_loss_shared=None,
                    last_eval_loss_personal=None,
                    started=0.0,
                    problems=[str(exc)],
                )
            )
    for summary in summaries:
        summary.id, summary.problems = _unicode(summary.id), [_unicode(problem) for problem in summary.problems]
    return sorted(summaries, key=lambda s: s.started, reverse=True)
