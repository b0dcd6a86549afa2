"""`make demo`: personalize the built-in base for one simulated user, on this machine.

Fits a private prefix on ~50 of the user's examples, compares held-out loss and
greedy outputs before and after, saves the prefix encrypted and loads it back.

    python -m fedprefix.simulations.demo [--base NAME] [--steps N] [--user I]
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile

from fedprefix.client import Personalizer
from fedprefix.common.base_model import DEFAULT_BASE
from fedprefix.simulations.personas import slot_realization, style_ok, training_rows, user_dataset
from rich.console import Console
from rich.table import Table

console = Console()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--user", type=int, default=1, help="persona index (style = index mod 6)")
    parser.add_argument("--examples", type=int, default=55)
    args = parser.parse_args(argv)

    data = user_dataset(args.user, args.examples)
    key = secrets.token_bytes(32)  # the user's key; in an app it comes from the device keychain
    store = os.path.join(tempfile.mkdtemp(prefix="fedprefix-demo-"), "store")
    console.print(
        f"[bold]user {args.user}[/bold] writes in style [bold]{data['style']}[/bold]; "
        f"{len(data['train'])} training rows, {len(data['test'])} held-out prompts"
    )
    me = Personalizer(
        base_model=args.base,
        user_id=f"user{args.user}",
        store=store,
        key=key,
        num_virtual_tokens=16,
        max_steps=args.steps,
    )
    test = data["test"][:4]
    prompts = [row["prompt"] for row in test]
    before_loss = me.evaluate(training_rows(data["test"]), parts="none").loss
    before = me.generate(prompts, max_new_tokens=60, parts="none")

    report = me.fit(training_rows(data["train"] + data["val"]))
    after_loss = me.evaluate(training_rows(data["test"])).loss
    after = me.generate(prompts, max_new_tokens=60)
    me.save()
    again = Personalizer.load(user_id=me.user_id, store=store, key=key, base_model=me.base)
    assert again.generate(prompts[0], max_new_tokens=60) == after[0], "stored prefix must give the same output"

    table = Table(title=f"held-out prompts, before (base) and after ({report.steps} steps, {report.seconds:.0f} s)")
    table.add_column("base model")
    table.add_column("personalized")
    for b, a in zip(before, after, strict=True):
        table.add_row(b, a)
    console.print(table)
    summary = Table(title="metrics on held-out prompts")
    for column in ("", "loss / token", "style followed", "slots realized"):
        summary.add_column(column)
    for name, loss, outs in (("base", before_loss, before), ("personalized", after_loss, after)):
        style = sum(style_ok(data["style"], o) for o in outs) / len(outs)
        slots = sum(slot_realization(r["record"], o) for r, o in zip(test, outs, strict=True)) / len(outs)
        summary.add_row(name, f"{loss:.3f}", f"{style:.0%}", f"{slots:.0%}")
    console.print(summary)
    console.print(f"encrypted prefix stored in {store} (AES-256-GCM); reloaded and checked.")


if __name__ == "__main__":
    main()
