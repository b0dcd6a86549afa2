"""What a stored prefix's header tells without the key: StoredPrefixInfo (store list, info), the listing."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ..prefix import PrefixSpec
from .errors import StoreError, UnknownUserError
from .format import FILE_SUFFIX, FileHeader, check_owner, read_header, validate_store_name

__all__ = ["StoredPrefixInfo", "info_of_header", "list_infos"]


class StoredPrefixInfo(BaseModel):
    """What the header of one stored prefix says (readable without the key).

    For a file that cannot be read, only user_id/path/size_bytes/modified are set and
    ``problem`` says what is wrong.
    """

    model_config = ConfigDict(frozen=True)

    user_id: str
    path: Path
    size_bytes: int
    modified: datetime
    base_fingerprint: str | None = None
    spec: PrefixSpec | None = None
    prefix_projection: bool | None = None
    dtype: str | None = None
    counter: int | None = None
    key_id: str | None = None
    kdf: str | None = None
    parts: list[str] | None = None  # the user's parts at this file's write (None: format 1)
    problem: str | None = None


def info_of_header(path: Path, header: FileHeader, stat: os.stat_result) -> StoredPrefixInfo:
    """The info of the file at `path` (its parsed header, its stat)."""
    return StoredPrefixInfo(
        user_id=header.user_id,
        path=path,
        size_bytes=stat.st_size,
        modified=datetime.fromtimestamp(stat.st_mtime, tz=UTC),
        base_fingerprint=header.base_fingerprint,
        spec=header.prefix_config.spec,
        prefix_projection=header.prefix_config.prefix_projection,
        dtype=header.dtype,
        counter=header.counter,
        key_id=header.key_id,
        kdf=header.kdf.name,
        parts=header.parts,
    )


def list_infos(root: Path) -> list[StoredPrefixInfo]:
    """The info of every ``.fpx`` file in `root`, sorted by name; bad files get `problem`."""
    infos = []
    for path in sorted(root.glob(f"*{FILE_SUFFIX}")):
        name = path.name[: -len(FILE_SUFFIX)]
        try:
            stat = path.stat()
        except OSError:  # a link to nothing or a loop (read_header names it), or deleted while listing
            try:
                stat = path.lstat()
            except FileNotFoundError:
                continue
        base = {
            "user_id": name,
            "path": path,
            "size_bytes": stat.st_size,
            "modified": datetime.fromtimestamp(stat.st_mtime, tz=UTC),
        }
        try:
            validate_store_name(name)
            header, stat = read_header(path, name)
            check_owner(name, header)
        except UnknownUserError:  # deleted while listing
            continue
        except StoreError as exc:
            infos.append(StoredPrefixInfo(**base, problem=str(exc)))
            continue
        infos.append(info_of_header(path, header, stat))
    return infos
