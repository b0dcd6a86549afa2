"""Persona data: E2E-style restaurant records written in each simulated user's own style.

In the spirit of the prefix-tuning paper's table-to-text task (E2E): the prompt is an
attribute record, the completion a description of it. Every user writes in one
persistent, automatically checkable style, and users hold different amounts of data
(non-IID). Everything is seeded: the same (user, seed) always gives the same rows.

Metrics for a generated output:
- ``style_ok(style, text)``: does it follow the user's style?
- ``slot_realization(record, text)``: share of the record's values present in it
  (content fidelity: a prefix that learned one fixed sentence scores low here).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedprefix.client.partition import EVAL_FILE, TRAIN_FILE
from fedprefix.common.files import atomic_write_bytes

NAMES = [
    "The Eagle",
    "Blue Spice",
    "The Golden Curry",
    "Zizzi",
    "The Punter",
    "Green Man",
    "Aromi",
    "Cotto",
    "The Wrestlers",
    "Fitzbillies",
    "Loch Fyne",
    "The Mill",
    "Alimentum",
    "Clowns",
    "Bibimbap House",
    "The Rice Boat",
    "Strada",
    "Giraffe",
    "The Phoenix",
    "Midsummer House",
    "Browns Cambridge",
    "Wildwood",
]
FOODS = ["Italian", "French", "Chinese", "Indian", "Japanese", "English", "fast food"]
AREAS = ["riverside", "city centre"]
PRICES = ["cheap", "moderate", "high"]
RATINGS = ["1 out of 5", "3 out of 5", "5 out of 5"]
NEAR = ["Cafe Rouge", "Burger King", "the Sorrento", "Yippee Noodle Bar", "Crowne Plaza Hotel", "Avalon"]


def make_record(rng: random.Random) -> dict[str, str]:
    """A random restaurant record (attribute -> value)."""
    return {
        "name": rng.choice(NAMES),
        "food": rng.choice(FOODS),
        "area": rng.choice(AREAS),
        "price": rng.choice(PRICES),
        "rating": rng.choice(RATINGS),
        "near": rng.choice(NEAR),
    }


def record_prompt(record: dict[str, str]) -> str:
    """The prompt a user sees: the record as `key: value` pairs."""
    pairs = "; ".join(f"{k}: {v}" for k, v in record.items())
    return f"Describe this restaurant in one short paragraph. {pairs}"


@dataclass(frozen=True)
class Style:
    """A persistent way of writing, with a checker that decides adherence."""

    name: str
    write: Callable[[dict[str, str]], str]
    check: Callable[[str], bool]


def _bullets(r):
    return "\n".join(f"- {k.capitalize()}: {v}" for k, v in r.items())


def _pirate(r):
    return (
        f"Arr! {r['name']} be servin' {r['food']} grub in the {r['area']}, near {r['near']}. "
        f"Prices be {r['price']} and the crew rates it {r['rating']}. Yo-ho!"
    )


def _formal(r):
    return (
        f"Dear reader, may I recommend {r['name']}, a {r['food']} establishment in the {r['area']} "
        f"near {r['near']}. Its prices are {r['price']} and it is rated {r['rating']}. Kind regards."
    )


def _shout(r):
    return (
        f"{r['name']} IS A {r['food']} PLACE IN THE {r['area']} NEAR {r['near']}! "
        f"PRICES: {r['price']}! RATING: {r['rating']}!"
    ).upper()


def _terse(r):
    return " | ".join(r.values())


def _question(r):
    return (
        f"Have you tried {r['name']}? It serves {r['food']} food in the {r['area']}, close to {r['near']}, "
        f"with {r['price']} prices and a rating of {r['rating']}. Shall we go?"
    )


STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Style(
            "bullets",
            _bullets,
            lambda t: (
                len(t.strip().splitlines()) >= 3 and all(line.startswith("- ") for line in t.strip().splitlines())
            ),
        ),
        Style("pirate", _pirate, lambda t: t.strip().startswith("Arr!") and "Yo-ho!" in t),
        Style("formal", _formal, lambda t: t.strip().startswith("Dear reader,") and "Kind regards." in t),
        Style("shout", _shout, lambda t: len(t.strip()) > 10 and t.strip() == t.strip().upper() and "!" in t),
        Style("terse", _terse, lambda t: t.count(" | ") >= 3 and "\n" not in t.strip()),
        Style("question", _question, lambda t: t.strip().startswith("Have you tried") and "Shall we go?" in t),
    )
}


def style_of(user_index: int) -> Style:
    """The style user `user_index` writes in (round robin over STYLES)."""
    return list(STYLES.values())[user_index % len(STYLES)]


def style_ok(style: str, text: str) -> bool:
    """True when `text` follows `style`."""
    return STYLES[style].check(text)


def slot_realization(record: dict[str, str], text: str) -> float:
    """Share of the record's values that appear in `text` (case-insensitive)."""
    lowered = re.sub(r"\s+", " ", text.lower())
    return sum(v.lower() in lowered for v in record.values()) / len(record)


def examples_for(user_index: int, seed: int = 0, low: int = 10, high: int = 200) -> int:
    """Non-IID data sizes: log-uniform between `low` and `high`, fixed per (user, seed)."""
    rng = random.Random(f"size-{seed}-{user_index}")
    return int(round(low * (high / low) ** rng.random()))


def user_dataset(user_index: int, num_examples: int | None = None, seed: int = 0, test_size: int = 8) -> dict:
    """{'style', 'train', 'val', 'test'}; rows are {'prompt', 'completion', 'record'} dicts.

    `train` and `val` hold `num_examples` rows (90/10); `test` has its own records.
    """
    rng = random.Random(f"data-{seed}-{user_index}")
    style = style_of(user_index)
    count = examples_for(user_index, seed) if num_examples is None else num_examples
    rows = []
    for _ in range(count + test_size):
        record = make_record(rng)
        rows.append({"prompt": record_prompt(record), "completion": style.write(record), "record": record})
    held = max(1, count // 10) if count >= 10 else 0
    return {
        "style": style.name,
        "train": rows[: count - held],
        "val": rows[count - held : count],
        "test": rows[count:],
    }


def training_rows(rows: list[dict]) -> list[dict]:
    """Rows without the `record` field, as Personalizer.fit takes them."""
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


MAX_ROWS = 1_000_000  # persona rows one federation's data may hold (about 200 MB): --users 1e9 filled the disk
MAX_ROWS_PER_USER = 200  # the largest of examples_for's non-IID sizes


def too_many_rows(num_users: int, num_examples: int | None) -> bool:
    """True where `num_users` persona users of `num_examples` rows each (None: up to the largest
    non-IID size) could hold more than MAX_ROWS rows in all."""
    return num_users * (num_examples or MAX_ROWS_PER_USER) > MAX_ROWS


def write_federation_data(
    folder: str | Path, num_users: int, num_examples: int | None = None, seed: int = 0, test_size: int = 8
) -> Path:
    """Persona users 0..n-1 as a federation data folder (client/user_data.py): FOLDER/user000/train.jsonl
    (train + val rows) and eval.jsonl (the held-out test rows). Returns the folder."""
    if too_many_rows(num_users, num_examples):
        per_user = num_examples or MAX_ROWS_PER_USER
        raise ValueError(f"{num_users} persona users of up to {per_user} rows: more than {MAX_ROWS:,} rows")
    folder = Path(folder)
    for index in range(num_users):
        data = user_dataset(index, num_examples, seed=seed, test_size=test_size)
        user = folder / f"user{index:03d}"
        user.mkdir(parents=True, exist_ok=True)
        for name, rows in ((TRAIN_FILE, data["train"] + data["val"]), (EVAL_FILE, data["test"])):
            text = "".join(json.dumps(row) + "\n" for row in training_rows(rows))
            atomic_write_bytes(user / name, text.encode())
    return folder
