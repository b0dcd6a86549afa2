"""`fedprefix store`: inspect, check, re-key and export encrypted prefixes.

Secrets never come as plain command-line arguments (they would land in shell history
and ``ps``): a raw key comes from ``--key-file``, a passphrase from the environment
variable named by ``--passphrase-env``, else from a hidden prompt.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from fedprefix.common.errors import FedPrefixError
from fedprefix.coordinator.views import printable
from rich.table import Table
from rich.text import Text

from .main import app, console, fail

if TYPE_CHECKING:  # the store imports torch: each command imports it when it runs, so --help stays quick
    from fedprefix.common.store import PrefixStore, StoredPrefixInfo

KEY_BYTES = 32  # a raw key's size (common/store/keys.py; a test checks they agree)

store_app = typer.Typer(
    name="store",
    help="Encrypted per-user prefix store: list, verify, rotate keys, reset rollback records, export to PEFT.",
    no_args_is_help=True,
    suggest_commands=False,  # click already suggests
)
app.add_typer(store_app, name="store")

StoreOpt = Annotated[Path, typer.Option("--store", help="Store folder.", file_okay=False)]
KeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        help=f"File holding the raw key: {KEY_BYTES} bytes, or {2 * KEY_BYTES} hex digits.",
        dir_okay=False,
    ),
]
PassEnvOpt = Annotated[
    str | None, typer.Option("--passphrase-env", help="Name of the environment variable holding the passphrase.")
]
NewKeyFileOpt = Annotated[
    Path | None, typer.Option("--new-key-file", help="File holding the new raw key (as --key-file).", dir_okay=False)
]
NewPassEnvOpt = Annotated[
    str | None,
    typer.Option("--new-passphrase-env", help="Name of the environment variable holding the new passphrase."),
]
UserArg = Annotated[str, typer.Argument(help="User id.")]


def _read_key(user_id: str, key_file: Path | None, passphrase_env: str | None, new: bool = False) -> str | bytes:
    """The key from --key-file, --passphrase-env, a hidden prompt, or stdin's next line when piped
    (`new`: the --new-* options, and a prompt that asks twice)."""
    from fedprefix.common.store import BadKeyError
    from fedprefix.common.store.key_files import read_key_file

    options = "--new-key-file or --new-passphrase-env" if new else "--key-file or --passphrase-env"
    if key_file is not None and passphrase_env is not None:
        raise BadKeyError(f"give {options}, not both (user {user_id!r})")
    if key_file is not None:
        return read_key_file(key_file)
    # passphrases are read as UTF-8 bytes: under a non-UTF-8 locale (LC_ALL=C with PYTHONUTF8=0,
    # Latin-1) a UTF-8 passphrase was refused as "not valid Unicode", or read as another one
    if passphrase_env is not None:
        raw = os.environb.get(passphrase_env.encode()) if os.supports_bytes_environ else None
        value = _utf8(raw, passphrase_env) if raw is not None else os.environ.get(passphrase_env)
        if not value:
            raise BadKeyError(f"environment variable {passphrase_env} is not set or empty")
        return value
    if sys.stdin is None or not sys.stdin.isatty():  # piped in (no terminal to hide the input on): its next line
        stream = getattr(sys.stdin, "buffer", sys.stdin)
        try:
            line = stream.readline() if stream is not None else ""
        except OSError:  # closed or unreadable (nohup's stdin): no key came
            line = ""
        line = (_utf8(line, "standard input") if isinstance(line, bytes) else line).rstrip("\r\n")
        if not line:
            raise BadKeyError(f"no key for {user_id!r}: give {options}, or pipe the passphrase in")
        return line
    what = "New passphrase" if new else "Passphrase"
    try:
        return typer.prompt(f"{what} for {user_id}", hide_input=True, confirmation_prompt=new)
    except click.exceptions.Abort as exc:  # click's for Ctrl-C and Ctrl-D alike: only Ctrl-C is an interruption
        if isinstance(exc.__context__, EOFError):
            raise BadKeyError(f"no key for {user_id!r}: the input ended at the passphrase prompt (Ctrl-D)") from None
        raise


def _utf8(raw: bytes, source: str) -> str:
    from fedprefix.common.store import BadKeyError

    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadKeyError(f"the passphrase from {source} is not UTF-8 text") from None


def _open_store(path: Path) -> PrefixStore:
    from fedprefix.common.store import PrefixStore, existing_store_folder

    return PrefixStore(existing_store_folder(path))


def _info_dict(info: StoredPrefixInfo) -> dict:
    return info.model_dump(mode="json")


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def _info_table(infos: list[StoredPrefixInfo], title: str) -> Table:
    table = Table(title=Text(printable(title)))  # names a path or a user: not markup
    columns = ("user", "base", "L×H×D", "P", "proj", "dtype", "counter", "parts", "key id", "kdf", "size", "modified")
    for column in columns:
        table.add_column(column)
    for info in infos:
        if info.problem is not None:
            problem = Text(printable(info.problem), style="red")
            table.add_row(Text(printable(info.user_id)), problem, *[""] * 9, f"{info.modified:%Y-%m-%d %H:%M}")
            continue
        spec = info.spec
        table.add_row(
            Text(printable(info.user_id)),  # a file's name: no markup, no escape codes
            f"{info.base_fingerprint[:12]}…",
            f"{spec.num_layers}×{spec.num_kv_heads}×{spec.head_dim}",
            str(spec.num_virtual_tokens),
            "yes" if info.prefix_projection else "no",
            info.dtype,
            str(info.counter),
            "+".join(info.parts) if info.parts else "- (format 1)",
            info.key_id,
            info.kdf,
            _size(info.size_bytes),
            f"{info.modified:%Y-%m-%d %H:%M:%S}",
        )
    return table


@store_app.command("list")
def list_cmd(
    store: StoreOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List stored prefixes from their headers (no key needed).

    Example: fedprefix store list --store store --json
    """
    try:
        infos = _open_store(store).list()
    except (FedPrefixError, OSError) as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps([_info_dict(i) for i in infos], indent=2))
    else:
        console.print(_info_table(infos, f"prefixes in {store}"))


@store_app.command("verify")
def verify_cmd(
    user_id: UserArg, store: StoreOpt, key_file: KeyFileOpt = None, passphrase_env: PassEnvOpt = None
) -> None:
    """Decrypt and check every stored part of one user's prefix (key, integrity, owner, rollback).

    Example: fedprefix store verify alice --store store --key-file alice.key
    """
    try:
        key = _read_key(user_id, key_file, passphrase_env)
        infos = _open_store(store).verify_user(user_id, key)
    except (FedPrefixError, OSError) as exc:
        fail(exc)
    console.print(_info_table(infos, f"verified: every stored part of {user_id} is intact"))


@store_app.command("rotate-key")
def rotate_key_cmd(
    user_id: UserArg, store: StoreOpt, key_file: KeyFileOpt = None, passphrase_env: PassEnvOpt = None
) -> None:
    """Re-encrypt one user's prefix under a new data key (same passphrase or key unlocks it).

    Example: fedprefix store rotate-key alice --store store --key-file alice.key
    """
    try:
        key = _read_key(user_id, key_file, passphrase_env)
        prefixes = _open_store(store)
        prefixes.rotate_data_key(user_id, key)  # every stored part, the shared one included
        infos = [prefixes.info(name) for name in _part_names(user_id) if prefixes.exists(name)]
    except (FedPrefixError, OSError) as exc:
        fail(exc)
    console.print(_info_table(infos, f"new data key for every stored part of {user_id}"))


@store_app.command("change-passphrase")
def change_passphrase_cmd(
    user_id: UserArg,
    store: StoreOpt,
    key_file: KeyFileOpt = None,
    passphrase_env: PassEnvOpt = None,
    new_key_file: NewKeyFileOpt = None,
    new_passphrase_env: NewPassEnvOpt = None,
) -> None:
    """Protect one user's prefix (every part) by a new passphrase or raw key; the old one stops working.

    Only the data key is re-wrapped: after a leak run rotate-key too, since whoever kept a copy
    of the old file and knew the old passphrase still has the data key.

    Example: fedprefix store change-passphrase alice --store store --key-file alice.key --new-passphrase-env NEW
    """
    try:
        key = _read_key(user_id, key_file, passphrase_env)
        new_key = _read_key(user_id, new_key_file, new_passphrase_env, new=True)
        prefixes = _open_store(store)
        prefixes.change_passphrase(user_id, key, new_key)
        infos = [prefixes.info(name) for name in _part_names(user_id) if prefixes.exists(name)]
    except (FedPrefixError, OSError) as exc:
        fail(exc)
    console.print(_info_table(infos, f"new key for every stored part of {user_id}"))


def _part_names(user_id: str) -> list[str]:
    from fedprefix.common.protocol import shared_store_id

    return [user_id, shared_store_id(user_id)]


@store_app.command("reset-rollback")
def reset_rollback_cmd(
    user_id: UserArg, store: StoreOpt, key_file: KeyFileOpt = None, passphrase_env: PassEnvOpt = None
) -> None:
    """Accept a user's current files as the newest: re-anchor their rollback records (needs the key).

    Use it only when a load reports a missing or damaged rollback record, or a part deleted or
    put back, and you know the current files are the ones to keep (e.g. after restoring them
    on purpose).

    Example: fedprefix store reset-rollback alice --store store --key-file alice.key
    """
    try:
        key = _read_key(user_id, key_file, passphrase_env)
        infos = _open_store(store).reset_rollback(user_id, key)
    except (FedPrefixError, OSError) as exc:
        fail(exc)
    console.print(_info_table(infos, f"rollback records of {user_id} re-anchored at the current files"))


@store_app.command("export-peft")
def export_peft_cmd(
    user_id: UserArg,
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the PEFT adapter to.", file_okay=False)],
    store: StoreOpt,
    key_file: KeyFileOpt = None,
    passphrase_env: PassEnvOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a folder that is not empty.")] = False,
) -> None:
    """Decrypt one user's prefix (its shared part, then its personal part, as served) and write it as a PEFT
    prefix-tuning adapter folder (unencrypted!). A folder that is not empty (another adapter,
    the current folder) is refused without --overwrite.

    Example: fedprefix store export-peft alice alice-adapter --store store --key-file alice.key
    """
    from fedprefix.common.peft_format import export_peft  # imports transformers; only this command needs it
    from fedprefix.common.prefix import Prefix
    from fedprefix.common.protocol import stored_row_prefix

    try:
        if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
            raise FedPrefixError(f"{out_dir} is not empty (an adapter there would be replaced): pass --overwrite")
        key = _read_key(user_id, key_file, passphrase_env)
        parts = _open_store(store).load_parts(user_id, key)
        kv = stored_row_prefix(parts)
        prefix = Prefix.from_key_values(kv, next(iter(parts.values())).config.base_fingerprint)
        folder = export_peft(prefix, out_dir)
    except (FedPrefixError, OSError) as exc:
        fail(exc)
    console.print(f"wrote PEFT adapter of {user_id} to {folder} (plaintext: protect this folder)", markup=False)
