"""The Shakespeare benchmark: does a personal prefix, and the federated shared one, help real users?

One user per (play, role) (simulations/shakespeare.py), roles spread over three size
buckets by training rows (<=30, 30-100, >100); the last 20% of each role's speeches,
in play order, are held out. Every approach gets the same optimizer-step budget per user:

- base: the frozen model, zero-shot;
- personal: a personal prefix only, trained on the device (Personalizer.fit);
- shared: a shared prefix only, federated over all roles (Flower simulation, FedAvg);
- shared+personal: the default federation (Flower simulation): the shared prefix federated,
  then in the last round each role trains its own copy, the copies are averaged under
  secure aggregation, and each role keeps the average moved toward its own copy
  (FederationConfig.personal_init "interpolate"; "shared": the copy fine-tuned alone);
- shared then copy (beyond the budget): each role's copy of the shared-only run's final
  prefix, fine-tuned on the device for one more round's steps: what the personal stage adds
  to the very prefix it starts from;
- LoRA: a PEFT LoRA adapter per role on q_proj/v_proj, rank chosen so that it has at least
  as many parameters as the personal prefix keeps per user;
- full fine-tuning: every weight, for one role per bucket.

Metrics per role on its held-out speeches: loss per completion token and next-token
accuracy; wall time per approach. Outputs OUT/results.json, OUT/report.md, OUT/*.png.

    python -m fedprefix.simulations.shakespeare_report --out results/shakespeare          # 24 roles
    python -m fedprefix.simulations.shakespeare_report --quick --out results/shakespeare-quick
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fedprefix.client import Personalizer
from fedprefix.client.data import read_rows, tokenize_rows
from fedprefix.client.node import simulation_key
from fedprefix.client.training import (
    capped_schedule,
    completion_loss,
    evaluate_examples,
    seeded_batches,
)
from fedprefix.common.base_model import BaseModelHandle, load_base
from fedprefix.common.config import FederationConfig, TrainConfig
from fedprefix.common.precision import describe_host, host_info, resolve_dtype
from fedprefix.common.prefix import Prefix, PrefixConfig
from fedprefix.common.protocol import row_prefix
from fedprefix.coordinator.records import load_shared_prefix
from fedprefix.coordinator.simulate import simulate

from .arguments import require
from .shakespeare import Role, all_roles, pick_roles, role_table, write_federation_data


def _default(config: type, name: str):
    """A setting's default where the report measures what a user gets (FederationConfig, TrainConfig)."""
    return config.model_fields[name].default


@dataclass
class Settings:
    """One report's scope and budget (the same for every approach)."""

    base: str = "smollm2-135m-instruct"
    per_bucket: int = 8  # roles per size bucket
    steps: int = 40  # optimizer steps per user, every approach
    rounds: int = 4  # federated rounds; local steps per round = steps / rounds
    # shared+personal: FederationConfig's default recipe (all rounds but the last train the shared
    # part only, the last each user's copy of it, at its own rate)
    shared_only_rounds: int = _default(FederationConfig, "shared_only_rounds")
    personal_only_rounds: int = _default(FederationConfig, "personal_only_rounds")
    personal_init: str = _default(FederationConfig, "personal_init")
    copy_learning_rate: float = _default(FederationConfig, "copy_learning_rate")
    interpolation: float = _default(FederationConfig, "interpolation")
    batch_size: int = 8
    personal_tokens: int = 16
    shared_tokens: int = 16
    learning_rate: float = _default(TrainConfig, "learning_rate")  # personal-only (Personalizer.fit's)
    federation_learning_rate: float = _default(FederationConfig, "learning_rate")  # the federated rounds
    lora_learning_rate: float = 1e-3
    full_ft_learning_rate: float = 5e-5
    full_ft_roles: int = 1  # per bucket
    seed: int = 0


QUICK = Settings(per_bucket=2, steps=12, rounds=2)
FULL = Settings()


@dataclass
class Score:
    """An approach's result for one role."""

    loss: float
    accuracy: float
    seconds: float = 0.0  # training wall time for this role (federated: the run's, per role)
    user_parameters: int = 0  # kept per user (the personal prefix folded, the adapter, the model)


def _examples(base: BaseModelHandle, rows: list[dict]) -> list:
    chat = bool(getattr(base.tokenizer, "chat_template", None))
    return tokenize_rows(read_rows(rows), base.tokenizer, 256, chat)


def _score(base: BaseModelHandle, kv, held_out: list, seconds: float = 0.0, params: int = 0) -> Score:
    report = evaluate_examples(base, kv, held_out, accuracy=True)
    return Score(loss=report.loss, accuracy=report.accuracy, seconds=seconds, user_parameters=params)


def personal(base, role: Role, settings: Settings) -> Score:
    """A personal prefix trained on the role's rows with Personalizer.fit's defaults, at the step budget."""
    train, held_out = role.split()
    me = Personalizer(
        base_model=base, user_id=role.user_id, num_virtual_tokens=settings.personal_tokens, progress=False
    )
    report = me.fit(
        train,
        max_steps=settings.steps,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        eval_fraction=0.0,  # every approach trains the full budget on all training rows
        seed=settings.seed,
    )
    kv = me.key_values().detach()
    return _score(base, kv, _examples(base, held_out), report.seconds, me.personal.folded().num_trainable())


def federated(base, roles: list[Role], settings: Settings, mode: str, out: Path) -> dict[str, Score]:
    """A Flower simulation over all roles in `mode`; each role scored with the final prefixes."""
    data = write_federation_data(out / "data", roles)
    config = FederationConfig(
        base=settings.base,
        mode=mode,
        num_users=len(roles),
        num_rounds=settings.rounds,
        local_steps=max(1, settings.steps // settings.rounds),
        shared_only_rounds=settings.shared_only_rounds if mode == "shared+personal" else 0,
        personal_only_rounds=settings.personal_only_rounds if mode == "shared+personal" else 0,
        personal_init=settings.personal_init,
        copy_learning_rate=settings.copy_learning_rate,
        interpolation=settings.interpolation,
        learning_rate=settings.federation_learning_rate,
        batch_size=settings.batch_size,
        personal_tokens=settings.personal_tokens,
        shared_tokens=settings.shared_tokens,
        data=str(data),
        fraction_evaluate=0.0,  # the report scores every role itself, below
        run_dir=str(out / f"run-{mode.replace('+', '-')}"),  # a run id: shared-personal
        store_root=str(out / f"stores-{mode}"),
        data_seed=settings.seed,
    )
    for old in (config.run_dir, config.store_root):  # a rerun starts afresh, never from the last run's prefixes
        shutil.rmtree(old, ignore_errors=True)
    started = time.perf_counter()
    simulate(config)
    seconds = (time.perf_counter() - started) / len(roles)
    shared = final_shared(base, config.run_dir, config.shared_tokens)
    scores = {}
    for role in roles:  # node i is the i-th role by user id (client/user_data.py), as written above
        kv, params = shared.key_values().detach(), 0
        if mode == "shared+personal":
            me = Personalizer.load(
                user_id=role.user_id,
                store=Path(config.store_root) / role.user_id,
                key=simulation_key(config, role.user_id),
                base_model=base,
            )
            mine = me.personal.key_values().detach()
            kv = mine if config.copies_shared else row_prefix(kv, mine)  # a copy replaces the shared part
            params = me.personal.folded().num_trainable()
        scores[role.user_id] = _score(base, kv, _examples(base, role.split()[1]), seconds, params)
    return scores


def final_shared(base, run_dir, tokens: int) -> Prefix:
    """A federated run's final shared prefix (`tokens` long), from its run folder."""
    config = PrefixConfig(spec=base.prefix_spec(tokens), base_fingerprint=base.fingerprint)
    return Prefix.from_state(config, load_shared_prefix(run_dir))


def shared_then_copy(base, roles: list[Role], settings: Settings, out: Path) -> dict[str, Score]:
    """Each role's copy of the 'shared' approach's final prefix (read from its run folder),
    fine-tuned for steps / rounds more steps at copy_learning_rate: 40 + 10 steps per user."""
    run = out / "run-shared"
    if not (run / "shared_prefix.safetensors").is_file():
        raise SystemExit(f"'shared then copy' starts from the 'shared' approach's prefix: run that first ({run})")
    shared = final_shared(base, run, settings.shared_tokens)
    scores = {}
    for role in roles:
        train, held_out = role.split()
        me = Personalizer(
            base_model=base,
            user_id=role.user_id,
            num_virtual_tokens=0,
            shared_virtual_tokens=settings.shared_tokens,
            personal_from_shared=True,
            progress=False,
        )
        me.shared = shared  # copied by fit, never changed
        report = me.fit(
            train,
            parts="personal",
            max_steps=max(1, settings.steps // settings.rounds),
            batch_size=settings.batch_size,
            learning_rate=settings.copy_learning_rate,
            eval_fraction=0.0,
            seed=settings.seed,
        )
        kv = me.key_values().detach()
        scores[role.user_id] = _score(
            base, kv, _examples(base, held_out), report.seconds, me.personal.folded().num_trainable()
        )
    return scores


def lora_rank(base, prefix_values: int) -> int:
    """The smallest LoRA rank on q_proj/v_proj with at least `prefix_values` parameters."""
    cfg = base.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_rank = cfg.num_hidden_layers * (2 * cfg.hidden_size + cfg.hidden_size + cfg.num_key_value_heads * head_dim)
    return max(1, math.ceil(prefix_values / per_rank))


def _train_weights(base, model, params, role: Role, settings: Settings, lr: float) -> Score:
    """The same loop as a prefix (AdamW, warm-up + cosine, clipping, batches, the same epoch cap)
    on model weights: a small role stops after TrainConfig.max_epochs passes, as the prefix does."""
    handle = BaseModelHandle(base.name, model, base.tokenizer, base.fingerprint)
    train, held_out = role.split()
    examples = _examples(base, train)
    optimizer = torch.optim.AdamW(params, lr=lr)
    config = TrainConfig(max_steps=settings.steps, learning_rate=lr, batch_size=settings.batch_size)
    steps, schedule = capped_schedule(config, len(examples))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = seeded_batches(examples, settings.batch_size, settings.seed)
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    model.train()
    for _ in range(steps):
        loss_sum, tokens = completion_loss(handle, None, next(batches))
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / max(tokens, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - started
    model.eval()
    model.requires_grad_(False)
    float_handle = BaseModelHandle(base.name, model.float(), base.tokenizer, base.fingerprint)
    return _score(float_handle, None, _examples(base, held_out), seconds, sum(p.numel() for p in params))


def lora(base, role: Role, settings: Settings, rank: int) -> Score:
    """A PEFT LoRA adapter (q_proj, v_proj, alpha = 2r) on a copy of the base in the training dtype."""
    import peft

    work = base.with_dtype(resolve_dtype("auto", base.device))
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(copy.deepcopy(work.model), config).get_base_model()  # adapters injected in place
    params = [p for p in model.parameters() if p.requires_grad]
    return _train_weights(base, model, params, role, settings, settings.lora_learning_rate)


def full_finetune(base, role: Role, settings: Settings) -> Score:
    """Every weight of a float32 copy of the base (bf16 weights would lose AdamW's small updates)."""
    model = copy.deepcopy(base.model).float()
    model.requires_grad_(True)
    return _train_weights(base, model, list(model.parameters()), role, settings, settings.full_ft_learning_rate)


def run(settings: Settings, out: Path, approaches: list[str] | None = None) -> dict:
    """Every approach on every chosen role; writes and returns results.json."""
    out.mkdir(parents=True, exist_ok=True)
    base = load_base(settings.base)
    roles = pick_roles(all_roles(), settings.per_bucket, settings.seed)
    rank = lora_rank(base, base.prefix_spec(settings.personal_tokens).flat_dim * settings.personal_tokens)
    previous = out / "results.json"
    if previous.is_file() and approaches:  # a partial rerun adds to the same settings' results
        kept = json.loads(previous.read_text())
        # ... or changes only settings that no approach it keeps reads
        untouched = set(kept.get("approaches", {})) - set(approaches)
        changed = {
            k
            for k, v in asdict(settings).items()
            if kept.get("settings", {}).get(k) != v and untouched & SETTING_READERS.get(k, set(APPROACHES))
        }
        if changed:
            raise SystemExit(
                f"{previous} holds results of other settings ({', '.join(sorted(changed))}); choose another --out"
            )
    else:
        kept = {"approaches": {}, "seconds": {}}
    results: dict = {
        "settings": asdict(settings),
        "machine": describe_host(),
        "host": host_info().model_dump(),
        "roles": role_table(roles),
        "lora_rank": rank,
        "approaches": kept["approaches"],
        "seconds": kept["seconds"],
    }
    wanted = approaches or list(APPROACHES)
    by_bucket: dict[str, list[Role]] = {}
    for role, info in zip(roles, results["roles"], strict=True):
        by_bucket.setdefault(info["bucket"], []).append(role)
    runs = {
        "base": lambda: {r.user_id: _score(base, None, _examples(base, r.split()[1])) for r in roles},
        "personal": lambda: {r.user_id: personal(base, r, settings) for r in roles},
        "shared": lambda: federated(base, roles, settings, "shared", out),
        "shared+personal": lambda: federated(base, roles, settings, "shared+personal", out),
        "shared then copy": lambda: shared_then_copy(base, roles, settings, out),
        "LoRA": lambda: {r.user_id: lora(base, r, settings, rank) for r in roles},
        "full fine-tuning": lambda: {
            r.user_id: full_finetune(base, r, settings)
            for group in by_bucket.values()
            for r in group[: settings.full_ft_roles]
        },
    }
    for name in wanted:
        began = time.perf_counter()
        scores = runs[name]()
        if scores:
            results["approaches"][name] = {user: asdict(s) for user, s in scores.items()}
            results["seconds"][name] = round(time.perf_counter() - began, 1)
            print(f"{name}: {results['seconds'][name]:.0f} s", flush=True)
    results["total_seconds"] = round(sum(results["seconds"].values()), 1)  # partial reruns included
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


APPROACHES = ("base", "personal", "shared", "shared+personal", "shared then copy", "LoRA", "full fine-tuning")
# The approaches that read a setting, where not every one does: a partial rerun may change it
# only if it reruns all of them ("shared then copy" starts from the shared run's prefix).
_RECIPE = {"shared+personal", "shared then copy"}
_FEDERATED = {"shared", *_RECIPE}
SETTING_READERS = {
    **dict.fromkeys(
        ("shared_only_rounds", "personal_only_rounds", "personal_init", "copy_learning_rate", "interpolation"), _RECIPE
    ),
    "federation_learning_rate": _FEDERATED,
    "rounds": _FEDERATED,
    "learning_rate": {"personal"},
    "lora_learning_rate": {"LoRA"},
    "full_ft_learning_rate": {"full fine-tuning"},
    "full_ft_roles": {"full fine-tuning"},
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 roles, 12 steps: a small version")
    parser.add_argument("--out", default=None, help="results folder")
    parser.add_argument("--approaches", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--set", action="append", default=[], help="a Settings field, KEY=VALUE")
    args = parser.parse_args(argv)
    settings = dataclasses.replace(QUICK if args.quick else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if not hasattr(settings, key):
            parser.error(
                f"--set {item}: no such setting; choose from {', '.join(f.name for f in dataclasses.fields(settings))}"
            )
        setattr(settings, key, type(getattr(settings, key))(value))
    require("peft", "matplotlib")
    out = Path(args.out or ("results/shakespeare-quick" if args.quick else "results/shakespeare"))
    approaches = [a for a in args.approaches.split(",") if a] or None
    unknown = sorted(set(approaches or ()) - set(APPROACHES))
    if unknown:
        parser.error(f"unknown approach {', '.join(unknown)}: choose from {', '.join(APPROACHES)}")
    results = run(settings, out, approaches)
    from .shakespeare_tables import write_report

    print(write_report(json.loads(json.dumps(results)), out))
    return results


if __name__ == "__main__":
    main()
