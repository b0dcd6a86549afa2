"""Terminal views of run records: the per-round table, loss sparklines and live round progress (rich)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .records import RoundRecord

SPARKS = "▁▂▃▄▅▆▇█"
ASCII_SPARKS = "_.-~=+*#"  # where the output's encoding has no block characters (LC_ALL=C, Latin-1)


def progress_bars_on_terminals_only() -> None:
    """Off a terminal (a log file, CI), Hugging Face's progress bars are walls of \\r-joined lines:
    turn them off there, unless the user chose (HF_HUB_DISABLE_PROGRESS_BARS)."""
    if (sys.stderr is not None and sys.stderr.isatty()) or "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:  # imported already: it read the setting then
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def make_console(stderr: bool = False) -> Console:
    """A rich console; 120 columns when output is not a terminal (logs, pipes), so tables fit. A
    closed stream (a daemon's `>&-`) is no terminal: every command had failed at import. Lines of
    text are never folded by it (soft wrap), so a long path or command printed stays whole to
    paste (macOS's /var/folders/... temp paths pass 120 characters)."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream is not None and stream.isatty() else 120
    return Console(stderr=stderr, width=width, soft_wrap=True)


def sparkline(values: Sequence[float | None], width: int = 60, levels: str = SPARKS) -> str:
    """At most `width` characters of `levels`, scaled between the smallest and largest value; gaps for None.

    Past `width` values, each character is the mean of an equal run of them (a run's gap only
    where all of its values are missing)."""
    if len(values) > width:
        runs = [values[len(values) * i // width : len(values) * (i + 1) // width] for i in range(width)]
        # each value divided before the sum: a sum of losses near 1e308 overflows to inf
        values = [sum(v / len(p) for v in p) if (p := [v for v in run if v is not None]) else None for run in runs]
    present = [v for v in values if v is not None]
    if not present:
        return ""
    # halves: high - low of two huge losses (1e308, -1e308) overflows to inf, and inf / inf is NaN
    low, high = min(present) / 2, max(present) / 2
    span = (high - low) or 1.0
    return "".join(" " if v is None else levels[int((v / 2 - low) / span * (len(levels) - 1))] for v in values)


# C0 and C1 controls (not \t, \n), line and paragraph separators, and the invisible format
# characters (soft hyphen, zero-width, bidi overrides and isolates, word joiners, BOM)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def printable(text: object) -> str:
    """`text` with its control characters shown as \\xNN or \\uNNNN: a run record, a folder or a file name
    (a node's error reply, say) must not send a terminal escape codes (clear the screen, retitle it)."""
    return _CONTROL.sub(lambda found: _escaped(ord(found.group())), str(text))


def _escaped(code: int) -> str:
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"  # as Python writes them


def plain(text: object) -> str:
    """`text` for rich output: printable, and its [brackets] not read as rich markup."""
    return escape(printable(text))


def fmt_num(value: float | None, digits: int = 3) -> str:
    """A number for tables, "-" when missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def mode_label(config: dict) -> str:
    """A run's mode as run.json records it, with the personal recipe that ran in shared+personal."""
    mode = str(config.get("mode", "?"))
    recipe = config.get("personal_init")
    return f"{mode} ({recipe})" if mode == "shared+personal" and recipe else mode


def numbers_table(title) -> Table:
    """A table of short columns, under a rule and without vertical ones: the twelve columns of
    rounds_table fit an 80-column terminal (boxed, rich cut their numbers to "5.5…")."""
    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)


def rounds_table(records: Sequence[RoundRecord], title: str = "rounds", latest: int = 0) -> Table:
    """Round, users sampled, replies ok / rejected, train loss, held-out loss with the base, shared
    and shared+personal prefix, personalization gain (base - personal), update norm, uplink, time.

    latest: only the latest N rounds (0: all); the title then says how many of how many."""
    if 0 < latest < len(records):
        title = f"{title} (the latest {latest} of {len(records)})"
        records = records[-latest:]
    table = numbers_table(title)
    dp = any(r.privacy is not None for r in records)  # a DP run: its epsilon so far, beside each round
    columns = ("rnd", "users", "ok", "rej", "train", "base", "shared", "pers", "gain", "norm", "up kB", "s")
    for column in (*columns, *(["DP eps"] if dp else [])):
        table.add_column(column, justify="right", no_wrap=True)
    for r in records:
        epsilon = [fmt_num(r.privacy.epsilon if r.privacy else None, 3)] if dp else []
        table.add_row(
            str(r.round),
            str(len(r.sampled_users)),
            str(r.replies_accepted),
            str(r.replies_rejected),
            fmt_num(r.train_loss),
            fmt_num(r.eval_loss_base),
            fmt_num(r.eval_loss_shared),
            fmt_num(r.eval_loss_personal),
            fmt_num(r.personalization_gain),
            fmt_num(r.shared_update_norm, 2),
            f"{r.uplink_bytes / 1000:.1f}",
            f"{r.seconds:.1f}",
            *epsilon,
        )
    return table


def round_line(record: RoundRecord, total: int) -> str:
    """One round as a line: "round k/N: train loss …, held-out loss base … shared … personal …"."""
    return (
        f"round {record.round}/{total}: train loss {fmt_num(record.train_loss)}, "
        f"held-out loss base {fmt_num(record.eval_loss_base)} shared {fmt_num(record.eval_loss_shared)} "
        f"personal {fmt_num(record.eval_loss_personal)}{privacy_text(record)}"
    )


def privacy_text(record: RoundRecord) -> str:
    """ ", DP epsilon 1.23 at delta 1e-05" for a round under differential privacy, else ""."""
    dp = record.privacy
    if dp is None:
        return ""
    if dp.epsilon is None:
        return f", DP epsilon unknown ({dp.reason or 'no accountant'})"
    delta = f" at delta {dp.delta:.0e}" if dp.delta is not None else ""
    replaced = f" ({dp.epsilon_replace_one:.3g} if one user's data is replaced)" if dp.epsilon_replace_one else ""
    return f", DP epsilon {dp.epsilon:.3g}{delta}{replaced}"


@contextmanager
def round_progress(console: Console, total: int, description: str) -> Iterator[Callable[[RoundRecord], None]]:
    """Yields an on_round callback for simulate(): in a terminal a live bar of rounds done of `total`
    with one line per round above it; elsewhere (a file, a pipe, CI, TERM=dumb, where the bar's
    line came out last) plain flushed lines, no ANSI codes."""
    if console.is_terminal and not console.is_dumb_terminal:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task(description, total=total)

            def show(record: RoundRecord) -> None:
                progress.console.print(round_line(record, total), highlight=False, markup=False)
                progress.update(task, completed=record.round)

            yield show
        return
    print(description, file=console.file, flush=True)
    yield lambda record: print(round_line(record, total), file=console.file, flush=True)
