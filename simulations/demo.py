"""`make demo`: a small federation of simulated users on the built-in base, on this machine.

Four users, each writing in their own style, train [shared ; personal] prefixes in
Flower rounds; only the shared part is aggregated. Then one user's encrypted personal
prefix is unlocked on "their device" and compared with the base on held-out prompts.

    python -m fedprefix.simulations.demo [--base NAME] [--users N] [--rounds R] [--local]

`--local` skips Flower: one user personalizes on one device with Personalizer.fit.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import tempfile
from pathlib import Path

from fedprefix.client import Personalizer
from fedprefix.client.node import simulation_key
from fedprefix.common.base_model import DEFAULT_BASE, load_base
from fedprefix.common.config import FederationConfig
from fedprefix.common.errors import FedPrefixError
from fedprefix.coordinator.run_folder import check_run_folder, claim_run_folder, run_folder_lock
from fedprefix.coordinator.simulate import simulate
from fedprefix.coordinator.views import make_console, progress_bars_on_terminals_only, round_progress, rounds_table
from fedprefix.simulations.arguments import positive
from fedprefix.simulations.personas import (
    slot_realization,
    style_ok,
    training_rows,
    user_dataset,
    write_federation_data,
)
from rich.table import Table

console = make_console()
EVAL_SIZE = 8  # held-out prompts per user


def compare(me: Personalizer, data: dict, title: str) -> None:
    """Base vs personalized outputs and metrics on held-out prompts."""
    test = data["test"][:4]
    prompts = [row["prompt"] for row in test]
    console.print(f"answering {len(prompts)} held-out prompts with the base alone, then personalized ...")
    before = me.generate(prompts, max_new_tokens=60, parts="none")
    after = me.generate(prompts, max_new_tokens=60)
    table = Table(title=title)
    table.add_column("base model")
    table.add_column("personalized")
    for b, a in zip(before, after, strict=True):
        table.add_row(b, a)
    console.print(table)
    console.print(f"held-out loss of the base and the personalized model on {len(data['test'])} rows ...")
    summary = Table(title=f"held-out metrics (style: {data['style']})")
    for column in ("", "loss / token", "style followed", "slots realized"):
        summary.add_column(column)
    for name, parts, outs in (("base", "none", before), ("personalized", "all", after)):
        loss = me.evaluate(training_rows(data["test"]), parts=parts).loss
        style = sum(style_ok(data["style"], o) for o in outs) / len(outs)
        slots = sum(slot_realization(r["record"], o) for r, o in zip(test, outs, strict=True)) / len(outs)
        summary.add_row(name, f"{loss:.3f}", f"{style:.0%}", f"{slots:.0%}")
    console.print(summary)


def federated(args) -> None:
    work = Path(args.out)
    # A demo starts fresh (no data of an earlier run; simulate() empties the node stores), but
    # removes nothing before check_run_folder has passed, which refuses a folder no run made:
    # `--out .` must not take a checkout's data/.
    folder = FederationConfig(run_dir=str(work))
    check_run_folder(folder)
    with run_folder_lock(work):  # another run into it would replace its data under this one
        shutil.rmtree(work / "data", ignore_errors=True)
        claim_run_folder(folder)  # before its data is written into it
        config = FederationConfig(
            base=args.base,
            num_users=args.users,
            num_rounds=args.rounds,
            local_steps=args.local_steps,
            data=str(write_federation_data(work / "data", args.users, args.examples, test_size=EVAL_SIZE)),
            personal_tokens=16,
            shared_tokens=8,
            # [shared ; personal]: personas write in styles no other user shares, and on them a
            # personal part of its own behind the shared one is what was measured (make report-personas)
            personal_init="text",
            # as `fedprefix simulate --out runs/demo`: `fedprefix show demo --runs runs` finds it, and its
            # node stores (run_dir/stores) carry the mark that lets a later simulate reuse the folder
            run_dir=str(work),
        )
        console.print(
            f"[bold]federation[/bold]: {args.users} users x {args.rounds} rounds on {args.base}, "
            f"{args.local_steps} local steps per round; run folder {config.run_dir}"
        )
        description = "training (Flower simulation; the first round also starts the nodes)"
        with round_progress(console, args.rounds, description) as on_round:
            rounds = simulate(config, on_round=on_round)
    console.print(rounds_table(rounds, title="rounds: held-out loss with base / shared / shared+personal"))
    index = min(1, args.users - 1)  # the second user, or the only one
    user = f"user{index:03d}"
    me = Personalizer.load(
        user_id=user,
        store=Path(config.node_store_root) / user,
        key=simulation_key(config, user),
        base_model=load_base(args.base),
    )
    compare(
        me,
        user_dataset(index, args.examples, test_size=EVAL_SIZE),
        f"{user}, personal prefix unlocked from its encrypted store",
    )


def local(args) -> None:
    data = user_dataset(1, args.examples)
    store = Path(tempfile.mkdtemp(prefix="fedprefix-demo-")) / "store"
    key = secrets.token_bytes(32)  # the user's key; in an app it comes from the device keychain
    me = Personalizer(
        base_model=args.base,
        user_id="user001",
        store=store,
        key=key,
        num_virtual_tokens=16,
        max_steps=args.local_steps * args.rounds,
    )
    report = me.fit(training_rows(data["train"] + data["val"]))
    me.save()
    again = Personalizer.load(user_id=me.user_id, store=store, key=key, base_model=me.base)
    compare(again, data, f"one device, {report.steps} steps in {report.seconds:.0f} s, reloaded from {store}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--users", type=positive, default=4)
    parser.add_argument("--rounds", type=positive, default=3)
    parser.add_argument("--local-steps", type=positive, default=10)
    parser.add_argument("--examples", type=positive, default=40, help="rows per user")
    parser.add_argument("--out", default="runs/demo", help="run folder and node stores")
    parser.add_argument("--local", action="store_true", help="one device, no federation")
    args = parser.parse_args(argv)
    progress_bars_on_terminals_only()
    try:
        local(args) if args.local else federated(args)
    except FedPrefixError as exc:  # one line, as the CLI's (a refused folder, a failed federation)
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
