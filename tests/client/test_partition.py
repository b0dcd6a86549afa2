"""Bring your own data: one file with a user column, or per-user files or folders, partitioned by
natural id (one node per user), each user's held-out rows by the stated rule, and every bad input
refused with an error that names the file, line and problem."""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest
from fedprefix.client import partition
from fedprefix.client.data import PromptCompletion, read_rows
from fedprefix.client.partition import partition_users, read_users, split_held_out, user_split
from fedprefix.client.user_data import node_rows, node_user_id
from fedprefix.common.config import FederationConfig
from fedprefix.common.errors import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

# Rows of four users, interleaved as a log would hold them; dave has 1 row only.
SIZES = {"carol": 6, "alice": 5, "bob": 3, "dave": 1}


def _log() -> list[dict]:
    rows, left = [], dict(SIZES)
    while any(left.values()):
        for user in SIZES:
            if left[user]:
                n = SIZES[user] - left[user]
                rows.append({"user": user, "prompt": f"{user} asks {n}", "completion": f"{user} answer {n}"})
                left[user] -= 1
    return rows


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _csv(path, rows, columns=("user", "prompt", "completion")) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _parquet(path, rows) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist takes the first row's only
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), path)
    return str(path)


def _without_user(rows, user) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "user"} for r in rows if r["user"] == user]


def _sources(tmp_path) -> dict[str, str]:
    """The same log in every layout."""
    log = _log()
    files, folders = tmp_path / "files", tmp_path / "folders"
    files.mkdir()
    writers = {"alice": _jsonl, "bob": _csv, "carol": _parquet, "dave": _jsonl}
    for user, write in writers.items():
        rows = _without_user(log, user)
        suffix = {_jsonl: "jsonl", _csv: "csv", _parquet: "parquet"}[write]
        write(files / f"{user}.{suffix}", rows, *([("prompt", "completion")] if write is _csv else []))
        (folders / user).mkdir(parents=True)
        _jsonl(folders / user / "train.jsonl", rows)
    return {
        "jsonl": _jsonl(tmp_path / "log.jsonl", log),
        "csv": _csv(tmp_path / "log.csv", log),
        "parquet": _parquet(tmp_path / "log.parquet", log),
        "per-user files": str(files),
        "per-user folders": str(folders),
    }


def test_every_layout_partitions_the_same_way(tmp_path):
    sources = _sources(tmp_path)
    expected_users = ["alice", "bob", "carol"]  # sorted ids; dave (1 row) is below min-rows 2
    splits = {}
    for name, data in sources.items():
        assert partition_users(data) == expected_users, name
        splits[name] = [user_split(data, user) for user in expected_users]
    reference = splits.pop("per-user folders")
    for name, split in splits.items():
        assert split == reference, name
    alice_train, alice_eval = reference[0]
    assert [r.prompt for r in alice_eval] == ["alice asks 4"], "the last rows in file order are held out"
    assert [r.prompt for r in alice_train] == [f"alice asks {i}" for i in range(4)]


def test_held_out_rule_is_the_last_ceil_fraction_rows_at_least_one_never_all():
    for n in range(2, 30):
        rows = [f"row {i}" for i in range(n)]
        for fraction in (0.01, 0.1, 0.2, 0.25, 0.5, 0.7, 0.99):
            train, held = split_held_out(rows, fraction)
            exact = -(-round(fraction * 100) * n // 100)  # ceil in integers
            assert len(held) == min(n - 1, max(1, exact)), (n, fraction)
            assert train + held == rows
    assert [len(split_held_out(list(range(10)), 0.7)[1])] == [7], "0.7 x 10 is 7 (8 with float ceil)"
    assert split_held_out(["a", "b", "c"], 0) == (["a", "b", "c"], ["a", "b", "c"])  # 0: evaluate on train rows
    with pytest.raises(DataError, match="user solo has 1 row: holding rows out needs at least 2"):
        split_held_out(["only"], 0.2, "solo")


def test_a_user_folders_eval_jsonl_is_used_as_given(tmp_path):
    (tmp_path / "ann").mkdir()
    _jsonl(tmp_path / "ann" / "train.jsonl", ["t1"])
    _jsonl(tmp_path / "ann" / "eval.jsonl", ["e1", "e2"])
    assert user_split(tmp_path, "ann") == (["t1"], ["e1", "e2"])  # 3 rows: kept at min-rows 2 and 3
    assert partition_users(tmp_path, min_rows=3) == ["ann"]


def test_min_rows_drops_users_before_numbering(tmp_path):
    data = _sources(tmp_path)["jsonl"]
    assert partition_users(data, min_rows=1) == ["alice", "bob", "carol", "dave"]
    assert partition_users(data, min_rows=4) == ["alice", "carol"]
    config = FederationConfig(data=data, min_rows=4)
    assert node_user_id({"partition-id": 1}, config) == "carol"
    with pytest.raises(DataError, match="no user of .* has 7 rows or more \\(min-rows\\): all 4 users were dropped"):
        partition_users(data, min_rows=7)
    with pytest.raises(DataError, match="partition-id 2, but the data .* has 2 users \\(with min-rows 4\\)"):
        node_user_id({"partition-id": 2}, config)
    with pytest.raises(DataError, match="user bob has 3 rows in .*, fewer than min-rows 4"):
        node_rows({"user-id": "bob"}, config, "bob")


def test_row_forms_in_tables(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text_csv = _csv(tmp_path / "t.csv", [{"user": "u", "text": "one"}, {"user": "u", "text": "two"}], ("user", "text"))
    assert read_users(text_csv)["u"].rows == ["one", "two"]
    chat_csv = _csv(tmp_path / "c.csv", [{"user": "u", "messages": json.dumps(chat)}] * 2, ("user", "messages"))
    assert read_users(chat_csv)["u"].rows[0].messages[-1].content == "yo"
    mixed = [{"user": "u", "messages": chat}, {"user": "u", "prompt": "p", "completion": "c"}, {"user": 7, "text": "t"}]
    as_text = [{**row, "user": str(row["user"])} for row in mixed]  # a parquet column has one type
    for data in (_parquet(tmp_path / "m.parquet", as_text), _jsonl(tmp_path / "m.jsonl", mixed)):
        users = read_users(data)
        assert list(users) == ["7", "u"] and users["7"].rows == ["t"]  # ids as text, sorted
        assert users["u"].rows[1] == PromptCompletion(prompt="p", completion="c")
    # `fit` takes the same files when they have no user column
    plain = _csv(tmp_path / "plain.csv", [{"prompt": "p", "completion": "c"}], ("prompt", "completion"))
    assert read_rows(plain) == [PromptCompletion(prompt="p", completion="c")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("rows.txt", "x", r"rows.txt: unknown file type '.txt'; data files end in .jsonl, .json, .csv or .parquet"),
        ("rows.jsonl", '{"who": "a", "text": "x"}\n', r"line 1: no user column 'user' \(columns found: text, who\)"),
        ("rows.csv", "who,text\na,x\n", r"line 2: no user column 'user' \(columns found: text, who\)"),
        ("rows.jsonl", '{"user": "a", "text": "x"}\n{"user": "a", "prompt": "p"}\n', "line 2: field 'completion'"),
        ("rows.jsonl", '{"user": "a", "text": "x"}\n{oops\n', "line 2: not valid JSON"),
        ("rows.jsonl", '"just text"\n', "line 1: expected an object with a user column 'user', got str"),
        ("rows.jsonl", '{"user": "../b", "text": "x"}\n', "line 1: invalid user id '../b'"),
        ("rows.jsonl", '{"user": 1.5, "text": "x"}\n', "line 1: the user id must be text or an integer, got float"),
        ("rows.jsonl", "\n\n", "rows.jsonl has no rows"),
        ("rows.csv", "user,text\na,x\nb,y,z\n", r"line 3: 3 cells, but the header has 2 columns"),
        ("rows.csv", "user,text\na,x\nb,\n", "line 3: empty text"),
        ("rows.csv", 'user,messages\na,"[{"\n', "line 2: column 'messages': not valid JSON"),
        ("rows.csv", "user,user\na,b\n", "line 1: the header needs distinct, non-empty column names"),
        ("rows.parquet", "not parquet", "is not a readable parquet file"),
        # json.loads keeps the last of a repeated key: this row would have trained as ben
        ("rows.jsonl", '{"user": "ann", "user": "ben", "text": "x"}\n', "line 1: .*the key 'user' appears twice"),
        ("rows.jsonl", '{"user": "a", "text": "x"}\n' + "[" * 100_000 + "\n", "line 2: not a usable JSON row"),
        ("rows.jsonl", '{"user": ' + "9" * 5000 + ', "text": "x"}\n', "line 1: not a usable JSON row"),
        # a chat cell reads as a .jsonl row does: a repeated key turned the user's message into the assistant's
        (
            "rows.csv",
            'user,messages\na,"[{""role"": ""user"", ""content"": ""hi"", ""role"": ""assistant""}]"\n',
            "line 2: column 'messages': not a usable JSON value .the key 'role' appears twice",
        ),
        ("rows.csv", "user,messages\na," + "[" * 100_000 + "\n", "line 2: column 'messages': not a usable JSON value"),
        ("rows.csv", "user,messages\na," + "1" * 5000 + "\n", "line 2: column 'messages': not a usable JSON value"),
    ],
)
def test_bad_input_is_refused_by_name(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_users(path)


def test_bad_parquet_row_and_missing_sources(tmp_path):
    bad = _parquet(tmp_path / "bad.parquet", [{"user": "a", "text": "x"}, {"user": "a", "text": " "}])
    with pytest.raises(DataError, match="bad.parquet row 1: empty text"):
        read_users(bad)
    null = _parquet(tmp_path / "null.parquet", [{"user": "a", "text": "x"}, {"user": None, "text": "y"}])
    with pytest.raises(DataError, match=r"null.parquet row 1 \(null cells: user\): the user 'user' is missing"):
        read_users(null)  # it said "no user column 'user'", which the file has
    with pytest.raises(DataError, match="federation data .*nowhere does not exist"):
        read_users(tmp_path / "nowhere")
    with pytest.raises(DataError, match="data file .*gone.jsonl does not exist"):
        read_rows(tmp_path / "gone.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no per-user files .* and no user folders with a train.jsonl"):
        read_users(tmp_path / "empty")


def test_folders_must_hold_one_layout_of_known_files(tmp_path):
    folder = tmp_path / "users"
    folder.mkdir()
    _jsonl(folder / "alice.jsonl", ["a", "b"])
    (folder / ".DS_Store").write_text("hidden files are not data")
    assert list(read_users(folder)) == ["alice"]
    (folder / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: unknown file type '.txt'"):
        read_users(folder)
    (folder / "notes.txt").unlink()
    _csv(folder / "alice.csv", [{"text": "c"}], ("text",))
    with pytest.raises(DataError, match="user alice has more than one file"):
        read_users(folder)
    (folder / "alice.csv").unlink()
    (folder / "bob").mkdir()
    _jsonl(folder / "bob" / "train.jsonl", ["x", "y"])
    with pytest.raises(DataError, match="mixes user folders \\(bob/\\) and per-user files \\(alice.jsonl\\)"):
        read_users(folder)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    data = _parquet(tmp_path / "rows.parquet", [{"user": "a", "text": "x"}])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"rows.parquet needs pyarrow: pip install 'fedprefix\[parquet\]'"):
        read_users(data)


def test_a_source_is_parsed_once_per_process_until_it_changes(tmp_path):
    data = _jsonl(tmp_path / "rows.jsonl", [{"user": "a", "text": "x"}, {"user": "a", "text": "y"}])
    first = read_users(data)
    assert read_users(data) is first
    _jsonl(tmp_path / "rows.jsonl", [{"user": "a", "text": "x"}, {"user": "b", "text": "y"}])
    os.utime(data, ns=(1, 1))  # even with an old mtime, the changed size is seen
    assert list(read_users(data)) == ["a", "b"]
    assert len(partition._CACHE) <= partition._CACHE_SIZE


def test_a_device_file_is_split_by_the_same_rule(tmp_path):
    config = FederationConfig(eval_fraction=0.5)
    rows = _csv(tmp_path / "mine.csv", [{"text": f"t{i}"} for i in range(5)], ("text",))
    assert node_rows({"data-path": rows}, config, "me") == (["t0", "t1"], ["t2", "t3", "t4"])
    given = _jsonl(tmp_path / "held.jsonl", ["h"])
    assert node_rows({"data-path": rows, "eval-path": given}, config, "me")[1] == ["h"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_fifo_or_folder_where_data_belongs_is_refused_not_skipped(tmp_path):
    """Each of these was skipped without a word (a user dropped, an eval file ignored) or called missing."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(DataError, match="pipe.jsonl is not a file or a folder"):
        read_users(tmp_path / "pipe.jsonl")
    files, folders = tmp_path / "files", tmp_path / "folders"
    files.mkdir()
    _jsonl(files / "alice.jsonl", ["a", "b"])
    os.mkfifo(files / "bob.jsonl")
    with pytest.raises(DataError, match="bob.jsonl is not a regular file"):
        read_users(files)
    (files / "bob.jsonl").unlink()
    (files / "bob.jsonl").mkdir()
    with pytest.raises(DataError, match="bob.jsonl is not a regular file"):
        read_users(files)
    for user in ("alice", "bob"):
        (folders / user).mkdir(parents=True)
        _jsonl(folders / user / "train.jsonl", ["a", "b"])
    os.mkfifo(folders / "bob" / "eval.jsonl")
    with pytest.raises(DataError, match="bob/eval.jsonl is not a regular file"):
        read_users(folders)
    (folders / "bob" / "eval.jsonl").unlink()
    (folders / "bob" / "train.jsonl").unlink()
    os.mkfifo(folders / "bob" / "train.jsonl")
    with pytest.raises(DataError, match="bob/train.jsonl is not a regular file"):
        read_users(folders)


def test_user_folders_drop_no_user_and_no_held_out_file_silently(tmp_path):
    folders = tmp_path / "users"
    (folders / "alice").mkdir(parents=True)
    _jsonl(folders / "alice" / "train.jsonl", ["a", "b"])
    (folders / "bob").mkdir()
    (folders / "bob" / "train.txt").write_text("x\n")  # a user in a form no reader takes
    with pytest.raises(DataError, match="bob/ has no train.jsonl"):
        read_users(folders)
    (folders / "bob" / "train.txt").unlink()
    (folders / "bob" / "train.csv").write_text("text\nx\ny\n")  # any row file format (an auditor's case)
    (folders / "bob" / "eval.parquet").write_bytes(b"")  # named as held-out rows: read as such, so refused
    with pytest.raises(DataError, match="eval.parquet is not a readable parquet file"):
        read_users(folders)
    (folders / "bob" / "eval.parquet").unlink()
    assert read_users(folders)["bob"].rows == ["x", "y"]
    (folders / "bob" / "train.jsonl").write_text('"z"\n')
    with pytest.raises(DataError, match=r"bob holds train.jsonl and train.csv: keep one"):
        read_users(folders)
    for name in ("train.jsonl", "train.csv"):
        (folders / "bob" / name).unlink()
    (folders / "bob").rmdir()
    _jsonl(folders / "alice" / "EVAL.jsonl", ["held out"])  # not eval.jsonl: would be split from train
    with pytest.raises(DataError, match="EVAL.jsonl is not train.jsonl or eval.jsonl"):
        read_users(folders)
    (folders / "alice" / "EVAL.jsonl").unlink()
    (folders / "alice" / ".hidden").write_text("skipped")
    assert list(read_users(folders)) == ["alice"]


def test_a_user_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    folders = tmp_path / "users"
    for user in ("alice", "bob"):
        (folders / user).mkdir(parents=True)
        _jsonl(folders / user / "train.jsonl", ["a", "b"])
    real = os.listdir

    def listdir(path="."):
        if str(path).endswith("bob"):  # as a folder without read permission (tests may run as root)
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(partition.os, "listdir", listdir)
    with pytest.raises(DataError, match=r"cannot list .*users/bob: Permission denied"):
        read_users(folders)


def test_every_row_form_comes_back_as_read_from_the_packed_form_nodes_keep(tmp_path):
    """Each node process keeps every user's rows packed (compact JSON: row objects took 1.3 KB a row)."""
    rows = [
        'plain text: ünïcode ✓ and "quotes"',
        {"prompt": "a question\nover lines", "completion": "an answer"},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "context only", "weight": 0},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "trained"},
            ]
        },
    ]
    _jsonl(tmp_path / "all.jsonl", [{"user": "ann", "text": rows[0]}, *({"user": "ann", **row} for row in rows[1:])])
    kept = read_users(tmp_path / "all.jsonl")["ann"]
    assert kept.rows == read_rows(rows) and kept.count == 3 and kept.held_out is None
    assert all(isinstance(packed, bytes) for packed in kept.packed)
