"""Row files: read a .jsonl, .json, .csv or .parquet file into raw records, each labelled with where it came from.

- ``.jsonl``: one JSON value per line (an object, or a string for plain text); blank lines skipped.
- ``.json``: one JSON array of such values (or JSON lines, as Hugging Face's json loader takes both).
- ``.csv``: a header row, then one record per row; cells are strings. A ``messages`` cell holds
  the conversation as JSON text. A cell may span lines: records are labelled by the line they start on.
- ``.parquet``: one record per row (needs pyarrow: ``pip install 'fedprefix[parquet]'``); null cells
  are left out, so one file may mix row forms in different columns, and so are the null fields
  parquet gives every message of a column where some message has that field. A ``messages``
  cell may also hold JSON text, as in CSV. Rows are numbered from 0.

Validation of what a record holds is client/data.py's job; this file only reads.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from pathlib import Path

from fedprefix.common.errors import DataError
from fedprefix.common.files import open_regular

FORMATS = (".jsonl", ".json", ".csv", ".parquet")
FORMAT_NAMES = ", ".join(FORMATS[:-1]) + " or " + FORMATS[-1]
PARQUET_HINT = "pip install 'fedprefix[parquet]'"
CSV_CELL_LIMIT = 1 << 26  # characters of one csv cell (the csv module's default, 128 Ki, refused long texts)

Record = tuple[str, object]  # (where: "PATH line 3" / "PATH row 0", the raw value)


def is_row_file(path: str | os.PathLike) -> bool:
    """Whether `path` names a file of a format read here (by its extension)."""
    return Path(path).suffix.lower() in FORMATS


def check_format(path: str | os.PathLike) -> None:
    """Raise DataError unless `path` has the extension of a format read here."""
    if not is_row_file(path):
        suffix = Path(path).suffix or "(no extension)"
        raise DataError(f"{path}: unknown file type {suffix!r}; data files end in {FORMAT_NAMES}")


def read_records(path: str | os.PathLike) -> list[Record]:
    """Every record of the file at `path`, in file order; raises DataError naming the file and line."""
    check_format(path)
    path = Path(path)
    try:  # opened once, as a regular file: a FIFO or folder put there between a check and a read is refused
        with open_regular(path) as fh:
            if path.suffix.lower() == ".parquet":
                return _parquet(path, fh)
            data = fh.read()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # a folder, a FIFO, a device
            raise DataError(f"data file {path} {exc.strerror}") from None
        raise DataError(f"data file {path} cannot be read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM, as spreadsheet exports write, is not data
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path} line {line} is not UTF-8 text (byte {exc.start} is invalid): save the file as UTF-8 "
            "(in Excel: CSV UTF-8)"
        ) from exc
    suffix = path.suffix.lower()
    if suffix == ".json" and text.lstrip().startswith("["):
        return _json_array(path, text)
    if suffix == ".json" and text.lstrip().startswith("{") and "\n" in text.strip():
        _one_json_object(path, text)
    return _jsonl(path, text) if suffix in (".jsonl", ".json") else _csv(path, text)


def _one_json_object(path: Path, text: str) -> None:
    """DataError where a .json file spread over lines is one object (not JSON lines)."""
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError):
        return  # JSON lines, or broken: read line by line, which names the line
    if isinstance(whole, dict):
        raise DataError(f"{path} is one JSON object; a .json file holds an array of rows, or one row per line")


def _json_array(path: Path, text: str) -> list[Record]:
    rows = _json_value(text, str(path), "JSON array of rows")
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of rows")
    return [(f"{path} item {i}", row) for i, row in enumerate(rows)]


def _jsonl(path: Path, text: str) -> list[Record]:
    records = []
    # JSON Lines ends lines with \n (and \r\n) only: str.splitlines() would also split inside a
    # string at U+2028, U+2029 or U+0085, which JSON writes as they are (ensure_ascii=False)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if not records and line.lstrip().startswith("[") and path.suffix.lower() == ".jsonl":
            raise DataError(
                f"{path} line {number}: a JSON array; a .jsonl file holds one row per line (or name it .json)"
            )
        records.append((f"{path} line {number}", _json_value(line, f"{path} line {number}", "JSON row")))
    return records


def _json_value(text: str, where: str, what: str):
    """`text` parsed as JSON (`what`: a .jsonl line's row, a CSV cell's chat messages), or a
    DataError naming `where` and the problem, the same for both."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from exc
    except (ValueError, RecursionError) as exc:  # a repeated key, a number past the parser's limit, deep nesting
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DataError(f"{where}: not a usable {what} ({reason})") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all distinct: `{"user": "ann", "user": "ben"}` is refused, as CSV
    and parquet refuse a repeated column, where json.loads would silently keep the last."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"the key {repeated!r} appears twice")
    return dict(pairs)


def _csv(path: Path, text: str) -> list[Record]:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_CELL_LIMIT))  # a long text is data, as in .jsonl
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # a stray quote is an error, not one huge cell
    try:
        header = next(reader, None)
        if header is None:
            return []
        if len(set(header)) != len(header) or not all(header):
            raise DataError(f"{path} line 1: the header needs distinct, non-empty column names, got {header}")
        if not ({"prompt", "completion"} <= set(header) or {"text", "messages"} & set(header)):
            raise DataError(
                f"{path} line 1: columns {header}; rows need prompt and completion, text, or messages columns"
                + _header_hint(header)
            )
        records, start = [], reader.line_num + 1
        for cells in reader:
            where, start = f"{path} line {start}", reader.line_num + 1
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                raise DataError(f"{where}: {len(cells)} cells, but the header has {len(header)} columns {header}")
            record = dict(zip(header, cells, strict=True))
            if "messages" in record:
                record["messages"] = _json_value(record["messages"], f"{where}: column 'messages'", "JSON value")
            records.append((where, record))
    except csv.Error as exc:
        hint = ": a quoted cell is never closed" if "unexpected end of data" in str(exc) else ""
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({exc}){hint}") from exc
    return records


def _header_hint(header: list[str]) -> str:
    """Why a CSV header lacks the columns rows need, where it shows: another separator, odd names."""
    if len(header) == 1 and (separator := next((c for c in ";\t|" if c in header[0]), None)):
        return f" (the header seems separated by {separator!r}; a .csv here is separated by commas)"
    names = {"prompt", "completion", "text", "messages"}
    if near := [name for name in header if name.strip().lower() in names and name not in names]:
        return f" (column names are exact, lower case and without spaces: {near[0]!r})"
    return ""


def _parquet(path: Path, fh) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: {PARQUET_HINT}") from None
    try:
        rows = pq.read_table(fh).to_pylist()
    except Exception as exc:  # pyarrow raises its own error types for a damaged or foreign file
        raise DataError(f"{path} is not a readable parquet file ({type(exc).__name__}: {exc})") from exc
    records = []
    for i, row in enumerate(rows):
        record = {k: v for k, v in row.items() if v is not None}
        nulls = [k for k, v in row.items() if v is None]  # named if the row is refused ("Field required" misled)
        where = f"{path} row {i}" + (f" (null cells: {', '.join(nulls)})" if nulls else "")
        messages = record.get("messages")
        if isinstance(messages, str):
            record["messages"] = _json_value(messages, f"{where}: column 'messages'", "JSON value")
        elif isinstance(messages, list):  # a struct column has every field any message has: None elsewhere
            record["messages"] = [
                {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages
            ]
        records.append((where, record))
    return records
