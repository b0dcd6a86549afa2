"""The Shakespeare report's markdown, goal checks and plot, from its results.json."""

from __future__ import annotations

import statistics
from pathlib import Path

from .shakespeare import BUCKETS

ORDER = ("base", "personal", "shared", "shared+personal", "shared then copy", "LoRA", "full fine-tuning")


def _gain(results: dict, name: str, user: str) -> float:
    """Loss reduction from the base (nats per token; larger is better)."""
    return results["approaches"]["base"][user]["loss"] - results["approaches"][name][user]["loss"]


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def goals(results: dict) -> list[tuple[str, str, bool]]:
    """The issue's goals: (goal, measured, met)."""
    a, roles = results["approaches"], results["roles"]
    users = [r["user"] for r in roles]
    small = [r["user"] for r in roles if r["bucket"] == "<=30"]
    out = []
    if {"base", "personal"} <= a.keys():
        share = _share([a["personal"][u]["loss"] < a["base"][u]["loss"] for u in users])
        out.append(("personal beats base for >= 95% of roles", f"{share:.0%}", share >= 0.95))
    if {"personal", "shared+personal"} <= a.keys():
        mean_p = statistics.mean(a["personal"][u]["loss"] for u in users)
        mean_sp = statistics.mean(a["shared+personal"][u]["loss"] for u in users)
        out.append(("shared+personal beats personal on the mean", f"{mean_sp:.3f} vs {mean_p:.3f}", mean_sp < mean_p))
        share = _share([a["shared+personal"][u]["loss"] < a["personal"][u]["loss"] for u in small])
        out.append(("... and for >= 90% of roles with <= 30 rows", f"{share:.0%}", share >= 0.9))
    if {"shared", "shared+personal"} <= a.keys():
        share = _share([a["shared+personal"][u]["loss"] < a["shared"][u]["loss"] for u in users])
        out.append(("shared+personal beats shared-only for >= 90% of roles", f"{share:.0%}", share >= 0.9))
    if {"shared", "shared then copy"} <= a.keys():  # not a goal: one more round's steps than the budget
        share = _share([a["shared then copy"][u]["loss"] < a["shared"][u]["loss"] for u in users])
        out.append(("(beyond the budget) shared then copy beats shared-only", f"{share:.0%}", share >= 0.9))
    if {"base", "shared+personal", "LoRA"} <= a.keys():
        for name, _, _ in BUCKETS:
            members = [r["user"] for r in roles if r["bucket"] == name]
            prefix = statistics.mean(_gain(results, "shared+personal", u) for u in members)
            lora = statistics.mean(_gain(results, "LoRA", u) for u in members)
            ratio = prefix / lora if lora > 0 else float("inf")
            out.append(
                (
                    f"prefix gain >= 90% of LoRA's, {name} rows",
                    f"{ratio:.0%} ({prefix:.3f} vs {lora:.3f})",
                    ratio >= 0.9,
                )
            )
    return out


def _recipe(s: dict):
    """The shared+personal run's FederationConfig, as far as the report's settings name it."""
    from fedprefix.common.config import FederationConfig

    return FederationConfig(
        num_rounds=s["rounds"],
        shared_only_rounds=s["shared_only_rounds"],
        personal_only_rounds=s["personal_only_rounds"],
        personal_init=s.get("personal_init", "text"),  # results written before the setting existed: "text"
    )


def _schedule(s: dict) -> str:
    """The shared+personal run's rounds in words."""
    config = _recipe(s)
    parts = [config.round_parts(r) for r in range(1, s["rounds"] + 1)]
    personal = "each user's copy of the shared part" if config.copies_shared else "the personal part alone"
    words = {"shared": "the shared part alone", "all": "both parts", "personal": personal}
    rounds = [f"round {r}: {words[p]}" for r, p in enumerate(parts, 1)]
    if config.secure_last_round:
        rounds[-1] = (
            f"round {s['rounds']}: each user's copy trained at the federated rate and aggregated under SecAgg+, "
            f"then each user keeps the new shared prefix moved {s.get('interpolation')} of the way toward its copy"
        )
    return ", ".join(rounds)


def _copy_rate(s: dict) -> str:
    """The copy's own learning rate, where the recipe has one (not with "interpolate")."""
    return "" if _recipe(s).secure_last_round else f"the copy {s.get('copy_learning_rate', '-')}, "


def write_report(results: dict, out: Path) -> str:
    """report.md and gain_vs_rows.png; returns the markdown."""
    s, a, roles = results["settings"], results["approaches"], results["roles"]
    names = [n for n in ORDER if n in a]
    params = {n: max(v["user_parameters"] for v in a[n].values()) for n in names}
    lines = [
        "# Shakespeare: personal and shared prefixes on real users' text",
        "",
        f"Base `{s['base']}`; {len(roles)} roles (one user per play and role), {s['per_bucket']} per size bucket; "
        f"{s['steps']} optimizer steps of batch {s['batch_size']} per user for every approach "
        f"(federated: {s['rounds']} rounds; {_schedule(s)}); personal prefix "
        f"P={s['personal_tokens']}, shared P={s['shared_tokens']}; LoRA rank {results['lora_rank']} on q/v. "
        f"Learning rates: personal {s['learning_rate']}, federated rounds "
        f"{s.get('federation_learning_rate', s['learning_rate'])}, {_copy_rate(s)}"
        f"LoRA {s['lora_learning_rate']}, full fine-tuning {s['full_ft_learning_rate']}. "
        f"Held out: the last 20% of each role's speeches. Total {results['total_seconds'] / 60:.0f} min on "
        f"{results['machine']}.",
        "",
        "## By size bucket (training rows): mean held-out loss per token / next-token accuracy",
        "",
        "| approach | per-user parameters | wall time | " + " | ".join(b for b, _, _ in BUCKETS) + " | all |",
        "|---|---|---|" + "---|" * (len(BUCKETS) + 1),
    ]
    for n in names:
        cells = []
        for bucket, _, _ in [*BUCKETS, ("all", 0, 0)]:
            members = [r["user"] for r in roles if (bucket == "all" or r["bucket"] == bucket) and r["user"] in a[n]]
            if not members:
                cells.append("-")
                continue
            loss = statistics.mean(a[n][u]["loss"] for u in members)
            acc = statistics.mean(a[n][u]["accuracy"] for u in members)
            cells.append(f"{loss:.3f} / {acc:.1%}")
        wall = results["seconds"].get(n, 0)
        lines.append(f"| {n} | {params[n]:,} | {wall / 60:.1f} min | " + " | ".join(cells) + " |")
    lines += ["", "## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {'yes' if ok else '**no**'} |" for g, m, ok in goals(results)]
    lines += [
        "",
        "## Per role: held-out loss per token (next-token accuracy)",
        "",
        "| role | play | train rows | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in roles:
        cells = [
            f"{a[n][r['user']]['loss']:.3f} ({a[n][r['user']]['accuracy']:.0%})" if r["user"] in a[n] else "-"
            for n in names
        ]
        lines.append(f"| {r['speaker']} | {r['play']} | {r['train_rows']} | " + " | ".join(cells) + " |")
    lines += ["", "![gain against rows](gain_vs_rows.png)", ""]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    if "base" in a:  # gains are measured from the base
        plot(results, out)
    return markdown


def plot(results: dict, out: Path) -> None:
    """gain_vs_rows.png: each role's loss reduction from the base against its training rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = results["roles"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, marker in (("personal", "o"), ("shared", "v"), ("shared+personal", "s"), ("LoRA", "^")):
        if name not in results["approaches"]:
            continue
        xs = [r["train_rows"] for r in roles]
        ys = [_gain(results, name, r["user"]) for r in roles]
        ax.scatter(xs, ys, marker=marker, label=name, alpha=0.75)
    ax.set_xscale("log")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("training rows of the role (log scale)")
    ax.set_ylabel("held-out loss reduction from the base (nats/token)")
    ax.set_title(f"Shakespeare roles, {results['settings']['base']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gain_vs_rows.png", dpi=110)
    plt.close(fig)
