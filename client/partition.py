"""Natural-id partitioning of a federation's data: one node per user, and each user's held-out rows.

The run setting `data` names one of:

    rows.jsonl | rows.csv | rows.parquet   one file; each row carries its user id in column `user-field`
    DATA/alice.jsonl, DATA/bob.csv, ...    a folder of per-user files: the user id is the file stem
    DATA/alice/train.jsonl (+ eval.jsonl)  a folder of per-user folders; eval.jsonl: held-out rows, as given
                                           (train.csv, eval.parquet, ...: any row file format)

Every row, without its user column, is a row `fit` accepts (client/data.py, client/tables.py).

Partitioning has the semantics of flwr-datasets' `NaturalIdPartitioner` (one partition per
distinct user id, ids sorted, each user's rows in file order), done here because flwr-datasets
would pull in Hugging Face `datasets`. Ids are compared as text, so a file and its per-user
split number users alike. Users with fewer than `min-rows` rows (held-out rows included) are
dropped first; node partition-id i is the i-th user left. Every node computes the same list.

Held-out rule: file order is taken as time order. Of a user's n rows the last
ceil(eval-fraction x n) are held out for evaluation rounds, at least 1 and never all n, so a
user needs 2 rows; the rest train. eval-fraction 0 evaluates on the training rows.

Nodes reopen the data for every message: a parsed source is kept per process while its
files' (path, mtime, size) stay the same.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from fedprefix.common.errors import DataError
from fedprefix.common.store import validate_user_id

from .data import ChatRow, PromptCompletion, Row, read_file_rows, report_ignored, validate_row
from .tables import FORMATS, check_format, is_row_file, read_records

TRAIN_FILE = "train.jsonl"  # what the project writes; a user folder may hold train.csv etc. as well
EVAL_FILE = "eval.jsonl"
_CACHE: dict[tuple, dict[str, UserRows]] = {}
_CACHE_SIZE = 4  # sources kept per process


@dataclass(frozen=True)
class UserRows:
    """One user's rows in file order, and the held-out rows a user folder gives (None: split by the rule).

    Every node process keeps every user's rows (each numbers the users alike), so they are kept
    packed, as the compact JSON of each validated row: row objects took 1.3 KB a row, 130 MB per
    100,000 rows in each process; a user's rows are unpacked when that user's node asks."""

    packed: tuple[bytes, ...]
    packed_held_out: tuple[bytes, ...] | None = None

    @classmethod
    def of(cls, rows: list[Row], held_out: list[Row] | None = None) -> UserRows:
        return cls(tuple(map(_pack, rows)), None if held_out is None else tuple(map(_pack, held_out)))

    @property
    def rows(self) -> list[Row]:
        return [_unpack(row) for row in self.packed]

    @property
    def held_out(self) -> list[Row] | None:
        return None if self.packed_held_out is None else [_unpack(row) for row in self.packed_held_out]

    @property
    def count(self) -> int:
        return len(self.packed) + len(self.packed_held_out or ())


def _pack(row: Row) -> bytes:
    return (json.dumps(row, ensure_ascii=False) if isinstance(row, str) else row.model_dump_json()).encode()


def _unpack(packed: bytes) -> Row:
    row = json.loads(packed)
    if isinstance(row, str):
        return row
    return (ChatRow if "messages" in row else PromptCompletion).model_validate(row)  # validated once before


def read_users(data: str | Path, user_field: str = "user") -> dict[str, UserRows]:
    """Every user of `data` with its rows, ids sorted; raises DataError naming the file, line and problem."""
    kind, files = _source(Path(data))
    stamp = tuple((str(f), (s := f.stat()).st_mtime_ns, s.st_size) for f in files)
    key = (str(Path(data).resolve()), kind, user_field if kind == "file" else "", stamp)
    if key not in _CACHE:
        if kind == "file":
            users = _from_column(files[0], user_field)
        elif kind == "files":
            users = {_user_id(f.stem, str(f)): UserRows.of(read_file_rows(f)) for f in files}
        else:
            users = _from_user_folders(files)
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = dict(sorted(users.items()))
    return _CACHE[key]


def partition_users(data: str | Path, user_field: str = "user", min_rows: int = 2) -> list[str]:
    """The users of `data` with at least `min_rows` rows, in partition order (sorted ids)."""
    users = read_users(data, user_field)
    kept = [user for user, rows in users.items() if rows.count >= min_rows]
    if not kept:
        raise DataError(
            f"no user of {data} has {min_rows} rows or more (min-rows): all {len(users)} users were dropped"
        )
    return kept


def split_held_out(rows: list[Row], eval_fraction: float, user: str = "") -> tuple[list[Row], list[Row]]:
    """(training rows, held-out rows) by the rule above: the last ceil(eval_fraction x n) rows, 1 to n-1."""
    if eval_fraction == 0:
        return rows, rows
    if len(rows) < 2:
        raise DataError(
            f"user {user} has {len(rows)} row: holding rows out needs at least 2 "
            "(drop such users with min-rows 2, or evaluate on the training rows with eval-fraction 0)"
        )
    # Fraction of the decimal text: 0.7 x 10 is 7.000000000000001 in floats, whose ceil is 8
    held = min(len(rows) - 1, max(1, math.ceil(Fraction(repr(eval_fraction)) * len(rows))))
    return rows[:-held], rows[-held:]


def user_split(
    data: str | Path, user: str, user_field: str = "user", min_rows: int = 2, eval_fraction: float = 0.2
) -> tuple[list[Row], list[Row]]:
    """(training rows, held-out rows) of `user` in `data`; the user must be one that partitioning keeps."""
    users = read_users(data, user_field)
    if user not in users:
        raise DataError(f"user {user} is not in {data} ({len(users)} users)")
    rows = users[user]
    if rows.count < min_rows:
        raise DataError(f"user {user} has {rows.count} rows in {data}, fewer than min-rows {min_rows}")
    if rows.held_out is not None:
        return rows.rows, rows.held_out
    return split_held_out(rows.rows, eval_fraction, user)


def _source(path: Path) -> tuple[str, list[Path]]:
    """What kind of source `path` is ("file", "files", "folders") and the files it is made of."""
    if path.is_file():
        check_format(path)
        return "file", [path]
    if not path.is_dir():
        what = "is not a file or a folder" if os.path.lexists(path) else "does not exist"  # a FIFO, a device
        raise DataError(f"federation data {path} {what}")
    with os.scandir(path) as found:  # its entries know their type: no stat of each on every node message
        scanned = sorted((e for e in found if not e.name.startswith(".")), key=lambda e: e.name)
    entries = [Path(e.path) for e in scanned]
    # each user folder listed once: looking up every name one might hold took 0.5 s a node
    # message with 1,000 users
    listings = {Path(e.path): _listing(e.path) for e in scanned if e.is_dir()}
    # whatever is there counts: a FIFO or a folder named like a data file is refused, never skipped
    folders = [p for p, names in listings.items() if _user_files(p, names, "train")]
    files = [Path(e.path) for e in scanned if e.is_file()]
    named = [p for p in entries if is_row_file(p)] + [q for p in folders for q in _user_files(p, listings[p])]
    for f in named:
        if os.path.lexists(f) and not f.is_file():
            raise DataError(f"federation data: {f} is not a regular file")
    if folders and any(is_row_file(f) for f in files):
        raise DataError(
            f"federation data folder {path} mixes user folders ({folders[0].name}/) and per-user files "
            f"({next(f.name for f in files if is_row_file(f))}): keep one layout"
        )
    if folders:
        _check_user_folders(path, listings, folders)
        return "folders", [f for p in folders for f in _user_files(p, listings[p])]
    if not files:
        raise DataError(
            f"federation data folder {path} has no per-user files ({', '.join(FORMATS)}) "
            f"and no user folders with a {TRAIN_FILE} (or train.csv, ...)"
        )
    for f in files:
        check_format(f)  # every file of such a folder is a user's data
    stems = [f.stem for f in files]
    if twice := sorted({s for s in stems if stems.count(s) > 1}):
        raise DataError(f"federation data folder {path}: user {twice[0]} has more than one file")
    return "files", files


def _listing(folder: str) -> frozenset[str]:
    try:
        return frozenset(os.listdir(folder))
    except OSError as exc:
        raise DataError(f"federation data: cannot list {folder}: {exc.strerror}") from None


def _user_files(folder: Path, names: frozenset[str], *stems: str) -> list[Path]:
    """The train and eval files (or those of `stems`) among the `names` a user folder holds, of
    any row file format."""
    wanted = (f"{stem}{ext}" for stem in stems or ("train", "eval") for ext in FORMATS)
    return [folder / name for name in wanted if name in names]


def _check_user_folders(path: Path, listings: dict[Path, frozenset[str]], folders: list[Path]) -> None:
    """DataError for a folder beside the user folders that is no user's (bob/ with a train.txt:
    a user silently dropped), a file in a user folder that is not train or eval data (an
    EVAL.jsonl: held-out rows silently split from the training rows instead), or two of either."""
    layout = f"a user folder holds {TRAIN_FILE} (or train.csv, ...) and optionally {EVAL_FILE}"
    users = set(folders)  # a set: a list made this check quadratic (3,000 users took 23 s)
    for entry in listings:
        if entry not in users:
            raise DataError(f"federation data folder {path}: {entry.name}/ has no {TRAIN_FILE} ({layout})")
    for folder in folders:
        names = listings[folder]
        for stem in ("train", "eval"):
            if len(twice := _user_files(folder, names, stem)) > 1:
                raise DataError(f"federation data: {folder} holds {twice[0].name} and {twice[1].name}: keep one")
        known = {f.name for f in _user_files(folder, names)}
        for name in sorted(names):
            if not name.startswith(".") and name not in known:
                raise DataError(f"federation data: {folder / name} is not {TRAIN_FILE} or {EVAL_FILE} ({layout})")


def _user_id(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: the user id must be text or an integer, got {type(value).__name__}")
    try:
        return validate_user_id(str(value))
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from None


def _from_column(path: Path, user_field: str) -> dict[str, UserRows]:
    """A single file's rows grouped by the value of `user_field`, in file order."""
    grouped: dict[str, list[bytes]] = {}
    ignored: set[str] = set()
    records = read_records(path)
    for where, raw in records:
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object with a user column {user_field!r}, got {type(raw).__name__}")
        if user_field not in raw and any(isinstance(r, dict) and user_field in r for _, r in records):
            raise DataError(f"{where}: the user {user_field!r} is missing or empty (other rows have it)")  # a null cell
        if user_field not in raw:
            raise DataError(
                f"{where}: no user column {user_field!r} (columns found: {', '.join(sorted(raw)) or 'none'}); "
                "name the right one with user-field (--user-field)"
            )
        rest = {k: v for k, v in raw.items() if k != user_field}
        row = validate_row(rest, where, ignored, allow_user=True)
        grouped.setdefault(_user_id(raw[user_field], where), []).append(_pack(row))
    if not grouped:
        raise DataError(f"{path} has no rows")
    report_ignored(ignored)
    return {user: UserRows(tuple(rows)) for user, rows in grouped.items()}


def _from_user_folders(files: list[Path]) -> dict[str, UserRows]:
    users = {}
    held_out = {f.parent: f for f in files if f.stem == "eval"}
    for train in (f for f in files if f.stem == "train"):
        held = held_out.get(train.parent)
        user = _user_id(train.parent.name, str(train.parent))
        users[user] = UserRows.of(read_file_rows(train), read_file_rows(held) if held else None)
    return users
