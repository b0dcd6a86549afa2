"""The federated personalization benchmark: every approach, the same budget, one report.

Simulated users write restaurant descriptions (E2E-style records, simulations/personas.py)
each in a persistent style, with non-IID amounts of data. With the same number of
optimizer steps per user, compared on each user's held-out prompts:

- base model, zero-shot;
- shared prefix only, FedAvg over all users (Flower);
- personal prefix only, trained locally;
- shared + personal (the default federation);
- for one user: full fine-tuning of a copy of the base, and a local LoRA (PEFT) adapter of
  about the personal prefix's parameter count (the paper's low-data comparison);
- for one user: prefix length 4 / 8 / 16 / 32 (MLP-reparameterized, the default) and a
  direct (no MLP) prefix.

Metrics: held-out loss per completion token; style adherence (does the greedy output
follow the user's style, per a per-style checker); slot realization (share of the record's
values in the output: content fidelity, so a prefix that learned one fixed sentence shows).

    python -m fedprefix.simulations.report --out results/report            # built-in base, ~40 min
    python -m fedprefix.simulations.report --quick --out results/quick     # tiny model, ~1 min

Writes OUT/results.json, OUT/report.md and OUT/*.png (matplotlib, the `report` extra).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from fedprefix.client import Personalizer
from fedprefix.client.data import read_rows, tokenize_rows
from fedprefix.client.node import simulation_key
from fedprefix.client.training import completion_loss, evaluate_examples
from fedprefix.common.base_model import BaseModelHandle, load_base
from fedprefix.common.chat import format_prompt
from fedprefix.common.config import FederationConfig
from fedprefix.common.generation import SamplingParams, generate
from fedprefix.common.precision import describe_host, host_info
from fedprefix.common.prefix import Prefix, PrefixConfig
from fedprefix.common.protocol import row_prefix
from fedprefix.coordinator.records import load_shared_prefix
from fedprefix.coordinator.simulate import simulate

from .arguments import require
from .personas import slot_realization, style_ok, training_rows, user_dataset, write_federation_data


@dataclass
class Settings:
    """One report's budget and scope."""

    base: str
    users: list[int]  # persona indices (style = index mod 6)
    examples: int | None  # rows per user; None = non-IID sizes from 10 to 200
    steps: int  # optimizer steps per user, every approach
    rounds: int  # federated rounds (local steps = steps / rounds)
    personal_tokens: int = 16
    shared_tokens: int = 8
    prefix_lengths: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    ablation_user: int = 1
    generations: int = 6  # held-out prompts generated per user
    max_new_tokens: int = 60
    eval_size: int = 8
    learning_rate: float = 5e-3
    max_length: int = 256


QUICK = Settings(
    base="tiny-llama",
    users=[0, 1],
    examples=12,
    steps=4,
    rounds=2,
    personal_tokens=4,
    shared_tokens=4,
    prefix_lengths=[2, 4],
    generations=2,
    max_new_tokens=8,
    eval_size=4,
    learning_rate=3e-2,
    max_length=96,
)
FULL = Settings(base="smollm2-135m-instruct", users=[0, 1, 2, 3], examples=None, steps=45, rounds=3)


@dataclass
class Scores:
    """An approach's result for one user."""

    loss: float
    style: float
    slots: float
    trainable_parameters: int = 0  # trained on the device (an MLP reparameterization counts in full)
    user_parameters: int = 0  # kept and served per user (the MLP folded away; the shared prefix is common)
    seconds: float = 0.0


def _examples(tokenizer, rows: list[dict], settings: Settings) -> list:
    """Rows as Personalizer.fit tokenizes them (chat-framed on instruct bases)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    return tokenize_rows(read_rows(training_rows(rows)), tokenizer, settings.max_length, chat)


def _prompt(tokenizer, text: str) -> str:
    """A prompt as Personalizer.generate frames it."""
    return format_prompt(tokenizer, text) if getattr(tokenizer, "chat_template", None) else text


def score(base: BaseModelHandle, kv, data: dict, settings: Settings, model=None) -> Scores:
    """Held-out loss, style adherence and slot realization of `kv` (or `model`) for one user."""
    use = base if model is None else BaseModelHandle(base.name, model, base.tokenizer, base.fingerprint)
    tok = base.tokenizer
    loss = evaluate_examples(use, kv, _examples(tok, data["test"], settings)).loss
    rows = data["test"][: settings.generations]
    prompts = [tok(_prompt(tok, r["prompt"]), add_special_tokens=False).input_ids for r in rows]
    with torch.no_grad():
        outputs = generate(
            use.model, tok, prompts, [kv] * len(prompts), SamplingParams(max_new_tokens=settings.max_new_tokens)
        )
    return Scores(
        loss=loss,
        style=sum(style_ok(data["style"], o) for o in outputs) / len(outputs),
        slots=sum(slot_realization(r["record"], o) for r, o in zip(rows, outputs, strict=True)) / len(outputs),
    )


def local_prefix(base, data, settings: Settings, tokens: int, projection: bool = True) -> tuple[Scores, Personalizer]:
    """Personal prefix only, trained on the device."""
    started = time.perf_counter()
    me = Personalizer(
        base_model=base,
        num_virtual_tokens=tokens,
        prefix_projection=projection,
        progress=False,
        max_steps=settings.steps,
        learning_rate=settings.learning_rate,
        max_length=settings.max_length,
        eval_fraction=0.0,
    )
    me.fit(training_rows(data["train"] + data["val"]))
    seconds = time.perf_counter() - started
    trained = sum(p.numel() for p in me.trainable_parameters())  # before folding the MLP away
    me.personal = me.personal.folded() if projection else me.personal
    result = score(base, me.key_values().detach(), data, settings)
    result.trainable_parameters, result.seconds = trained, seconds
    result.user_parameters = me.personal.num_trainable()  # folded: P x flat
    return result, me


def federated(base, datasets, settings: Settings, mode: str, out: Path) -> tuple[dict, list]:
    """A Flower federation of all users in `mode`; scores per user with the final prefixes."""
    persona_data = write_federation_data(
        out / "data", len(settings.users), settings.examples, test_size=settings.eval_size
    )
    config = FederationConfig(
        base=settings.base,
        mode=mode,
        num_users=len(settings.users),
        num_rounds=settings.rounds,
        local_steps=max(1, settings.steps // settings.rounds),
        learning_rate=settings.learning_rate,
        personal_tokens=settings.personal_tokens,
        personal_projection=True,  # as its local personal prefix (the MLP: what won on personas)
        shared_only_rounds=0 if mode == "shared+personal" else -1,  # both parts every round, as measured
        personal_init="text",  # [shared ; personal]: the recipe measured on personas
        shared_tokens=settings.shared_tokens if mode != "shared" else settings.personal_tokens + settings.shared_tokens,
        data=str(persona_data),
        max_length=settings.max_length,
        run_dir=str(out / f"run-{mode.replace('+', '-')}"),  # a run id: shared-personal
        store_root=str(out / f"stores-{mode}"),
    )
    # Node i is persona user i: map the report's users onto partitions 0..n-1.
    if settings.users != list(range(len(settings.users))):
        raise ValueError("federated experiments need users 0..n-1 (node partition ids)")
    for old in (config.run_dir, config.store_root):  # a rerun starts afresh, never from the last run's prefixes
        shutil.rmtree(old, ignore_errors=True)
    started = time.perf_counter()
    rounds = simulate(config)
    seconds = time.perf_counter() - started
    shared_state = load_shared_prefix(config.run_dir)
    spec = base.prefix_spec(config.shared_tokens)
    shared = Prefix.from_state(PrefixConfig(spec=spec, base_fingerprint=base.fingerprint), shared_state)
    scores = {}
    for index, user in enumerate(settings.users):
        kv = shared.key_values().detach()
        personal_counts = 0, 0  # (trained, kept per user)
        if mode == "shared+personal":
            me = Personalizer.load(
                user_id=f"user{index:03d}",
                store=Path(config.store_root) / f"user{index:03d}",
                key=simulation_key(config, f"user{index:03d}"),
                base_model=base,
            )
            kv = row_prefix(kv, me.personal.key_values().detach())
            personal_counts = me.personal.num_trainable(), me.personal.folded().num_trainable()
        result = score(base, kv, datasets[user], settings)
        result.seconds = seconds / len(settings.users)
        result.trainable_parameters = shared.num_trainable() + personal_counts[0]
        result.user_parameters = personal_counts[1]
        scores[user] = result
    return scores, [r.model_dump() for r in rounds]


def full_finetune(base, data, settings: Settings) -> Scores:
    """Every weight of a copy of the base trained on one user's data (AdamW, lr 5e-5)."""
    model = copy.deepcopy(base.model)
    model.requires_grad_(True)
    model.train()
    return _train_model(base, model, list(model.parameters()), data, settings, lr=5e-5)


def lora(base, data, settings: Settings) -> Scores:
    """A PEFT LoRA adapter on q_proj/v_proj (or GPT-2's c_attn) with about the prefix's parameter count."""
    import peft

    target = ["c_attn"] if base.model.config.model_type == "gpt2" else ["q_proj", "v_proj"]
    prefix_params = settings.personal_tokens * base.prefix_spec(1).flat_dim
    probe = peft.get_peft_model(copy.deepcopy(base.model), peft.LoraConfig(r=1, target_modules=target))
    per_rank = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    rank = max(1, round(prefix_params / per_rank))
    wrapped = peft.get_peft_model(
        copy.deepcopy(base.model), peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target)
    )
    model = wrapped.get_base_model()  # LoRA layers injected in place; same interface as the base
    params = [p for p in model.parameters() if p.requires_grad]
    return _train_model(base, model, params, data, settings, lr=settings.learning_rate * 2)


def _train_model(base, model, params, data, settings: Settings, lr: float) -> Scores:
    handle = BaseModelHandle(base.name, model, base.tokenizer, base.fingerprint)
    examples = _examples(base.tokenizer, data["train"] + data["val"], settings)
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(settings.steps):
        order = torch.randperm(len(examples), generator=generator)[:8].tolist()
        loss_sum, tokens = completion_loss(handle, None, [examples[i] for i in order])
        optimizer.zero_grad()
        (loss_sum / max(tokens, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    seconds = time.perf_counter() - started
    model.eval()
    model.requires_grad_(False)
    result = score(base, None, data, settings, model=model)
    result.trainable_parameters = result.user_parameters = sum(p.numel() for p in params)
    result.seconds = seconds
    return result


def run(settings: Settings, out: Path) -> dict:
    """All experiments; returns (and writes) results.json."""
    out.mkdir(parents=True, exist_ok=True)
    base = load_base(settings.base)
    datasets = {u: user_dataset(u, settings.examples, test_size=settings.eval_size) for u in settings.users}
    results: dict = {
        "settings": asdict(settings),
        "machine": describe_host(),
        "host": host_info().model_dump(),
        "users": {u: {"style": d["style"], "train_rows": len(d["train"]) + len(d["val"])} for u, d in datasets.items()},
        "approaches": {},
        "ablation": {},
        "rounds": {},
    }
    started = time.perf_counter()
    approaches = results["approaches"]
    approaches["base"] = {u: asdict(score(base, None, d, settings)) for u, d in datasets.items()}
    approaches["personal"] = {
        u: asdict(local_prefix(base, d, settings, settings.personal_tokens)[0]) for u, d in datasets.items()
    }
    for mode in ("shared", "shared+personal"):
        scores, rounds = federated(base, datasets, settings, mode, out)
        approaches[mode] = {u: asdict(s) for u, s in scores.items()}
        results["rounds"][mode] = rounds
    one = settings.ablation_user
    approaches["full fine-tuning"] = {one: asdict(full_finetune(base, datasets[one], settings))}
    approaches["LoRA"] = {one: asdict(lora(base, datasets[one], settings))}
    for tokens in settings.prefix_lengths:
        results["ablation"][f"P={tokens}, MLP"] = asdict(local_prefix(base, datasets[one], settings, tokens)[0])
    results["ablation"][f"P={settings.personal_tokens}, direct"] = asdict(
        local_prefix(base, datasets[one], settings, settings.personal_tokens, projection=False)[0]
    )
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


TABLE_HEAD = (
    "| approach | held-out loss / token | style followed | slots realized | parameters trained "
    "| parameters kept per user |"
)


def _row(name: str, v: dict) -> str:
    return (
        f"| {name} | {v['loss']:.3f} | {v['style']:.0%} | {v['slots']:.0%} | {v['trainable_parameters']:,} "
        f"| {v.get('user_parameters', 0):,} |"
    )


def _mean(scores: dict, metric: str) -> float:
    return statistics.mean(s[metric] for s in scores.values())


def write_report(results: dict, out: Path) -> str:
    """report.md (tables) and the plots; returns the markdown."""
    s = results["settings"]
    lines = [
        "# fedprefix personalization benchmark",
        "",
        f"Base `{s['base']}`; users {s['users']} ("
        + ", ".join(f"{u}: {v['style']}, {v['train_rows']} rows" for u, v in results["users"].items())
        + f"); {s['steps']} optimizer steps per user for every approach ({s['rounds']} federated rounds); "
        f"personal prefix P={s['personal_tokens']}, shared P={s['shared_tokens']}. "
        f"Held-out: {s['eval_size']} prompts per user, {s['generations']} generated greedily. "
        f"Total {results['seconds']:.0f} s on {results['machine']}.",
        "",
        "## All users (mean over users)",
        "",
        TABLE_HEAD,
        "|---|---|---|---|---|---|",
    ]
    for name in ("base", "shared", "personal", "shared+personal"):
        scores = results["approaches"][name]
        trained = max(v["trainable_parameters"] for v in scores.values())
        kept = max(v.get("user_parameters", 0) for v in scores.values())
        lines.append(
            f"| {name} | {_mean(scores, 'loss'):.3f} | {_mean(scores, 'style'):.0%} | "
            f"{_mean(scores, 'slots'):.0%} | {trained:,} | {kept:,} |"
        )
    one = str(s["ablation_user"])  # results went through JSON: user keys are strings
    lines += [
        "",
        f"## One user ({one}, {results['users'][one]['style']}): low-data comparison",
        "",
        TABLE_HEAD,
        "|---|---|---|---|---|---|",
    ]
    for name in ("base", "personal", "shared+personal", "LoRA", "full fine-tuning"):
        lines.append(_row(name, results["approaches"][name][one]))
    lines += [
        "",
        "## Prefix length and reparameterization (same user, personal prefix only)",
        "",
        TABLE_HEAD.replace("approach", "prefix"),
        "|---|---|---|---|---|---|",
    ]
    for name, v in results["ablation"].items():
        lines.append(_row(name, v))
    lines += [
        "",
        "## Per user (held-out loss / token)",
        "",
        "| user | style | base | shared | personal | shared+personal |",
        "|---|---|---|---|---|---|",
    ]
    for u, info in results["users"].items():
        row = [f"{results['approaches'][a][u]['loss']:.3f}" for a in ("base", "shared", "personal", "shared+personal")]
        lines.append(f"| {u} | {info['style']} | " + " | ".join(row) + " |")
    lines += ["", "![loss per round](loss_per_round.png)", "", "![per-user gain](per_user_gain.png)", ""]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    plot(results, out)
    return markdown


def plot(results: dict, out: Path) -> None:
    """loss_per_round.png (federated run) and per_user_gain.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both, shared_only = results["rounds"]["shared+personal"], results["rounds"]["shared"]
    tokens = results["settings"]["shared_tokens"], results["settings"]["personal_tokens"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = [r["round"] for r in both]
    for rounds, key, label, style in (
        (both, "eval_loss_base", "base, zero-shot", "-"),
        (shared_only, "eval_loss_shared", f"shared-only run (P={sum(tokens)})", "-"),
        (both, "eval_loss_shared", f"shared+personal run: its shared part alone (P={tokens[0]})", "--"),
        (both, "eval_loss_personal", f"shared+personal run: shared + personal (P={tokens[0]}+{tokens[1]})", "-"),
    ):
        ax.plot([r["round"] for r in rounds], [r[key] for r in rounds], style, marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss per token")
    ax.set_title(f"Federated personalization, {results['settings']['base']}")
    ax.set_xticks(xs)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_per_round.png", dpi=110)
    plt.close(fig)

    users = list(results["users"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.2
    for i, name in enumerate(("base", "shared", "personal", "shared+personal")):
        values = [results["approaches"][name][u]["loss"] for u in users]
        ax.bar([j + (i - 1.5) * width for j in range(len(users))], values, width, label=name)
    ax.set_xticks(range(len(users)), [f"{u}\n{results['users'][u]['style']}" for u in users])
    ax.set_ylabel("held-out loss per token")
    ax.set_title("Per user: loss by approach (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "per_user_gain.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, about a minute")
    parser.add_argument("--out", default=None, help="results folder (default results/report or results/quick)")
    args = parser.parse_args(argv)
    require("peft", "matplotlib")
    settings = QUICK if args.quick else FULL
    out = Path(args.out or ("results/quick" if args.quick else "results/report"))
    results = run(settings, out)
    print(write_report(json.loads(json.dumps(results)), out))
    return results


if __name__ == "__main__":
    main()
