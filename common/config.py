"""pydantic models for training settings and the reports training and evaluation return."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The registry's default base (common/base_model.py) and the devices one may name
# (common/precision.py): here, beside the settings, so that the CLI's options and help need no torch.
DEFAULT_BASE = "smollm2-135m-instruct"
DEVICE_HELP = "auto (a CUDA GPU where torch sees one, else cpu), cpu, cuda or cuda:N"


def sample_size(fraction: float, num_users: int) -> int:
    """Nodes to sample: the fraction of all users, at least one."""
    return max(1, math.ceil(fraction * num_users))


def a_number(value):
    """A setting's number as given, refusing True and "2": pydantic's lax mode reads them as 1
    and 2 (a fit with max_steps=True ran one step), while numpy's numbers pass as numbers."""
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"must be a number, got {type(value).__name__} {value!r}")
    return value


class TrainConfig(BaseModel):
    """How a device trains its prefix. Defaults are tuned on the built-in base (see README)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    learning_rate: float = Field(1e-2, gt=0, le=1.0)
    max_steps: int = Field(60, ge=1)  # optimizer steps; the device budget
    # ... and at most this many passes over the training rows: on real text (the Shakespeare
    # report) a user with 10 rows lost the prefix's gain, and more, after 30 epochs
    max_epochs: float | None = Field(10.0, gt=0, le=1e6)  # a step count must come out of it
    max_seconds: float | None = Field(None, gt=0)  # wall-clock budget; stops after the step that crosses it
    batch_size: int = Field(8, ge=1)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)  # linear warm-up, then cosine decay to 10%
    # ... over at least this many steps (at most half the budget): every fit starts AdamW afresh,
    # and its first updates move each value by about the learning rate whatever the gradient.
    # One full-rate first step undid a trained prefix each federated round (10 local steps).
    min_warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_fraction: float = Field(0.1, ge=0, lt=1)  # held-out share of the data for early stopping
    # ... and at most this many rows: each is scored at every evaluation, and 10% of 50,000 rows
    # made the held-out loss at step 0 alone take over three minutes on 2 cores
    max_eval_rows: int = Field(128, ge=1)
    eval_every: int = Field(10, ge=1)  # steps between held-out evaluations
    patience: int = Field(3, ge=1)  # evaluations without improvement before stopping early
    max_length: int = Field(256, ge=8)  # tokens per example; longer prompts lose their left part
    # Compute dtype of the frozen base while training (common/precision.py): "auto" is bfloat16
    # only where the hardware computes it natively and faster; prefix parameters stay float32.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # fixes data order, split and init: same data + seed = same prefix (on the same dtype and
    # torch thread count: float32 sums split over threads round differently)
    seed: int = Field(0, ge=0, le=2**63 - 1)

    _numbers = field_validator(
        *("learning_rate", "max_steps", "max_epochs", "max_seconds", "batch_size", "warmup_fraction"),
        *("min_warmup_steps", "weight_decay", "max_grad_norm", "eval_fraction", "eval_every", "patience"),
        *("max_eval_rows", "max_length", "seed"),
        mode="before",
    )(a_number)


class EvalPoint(BaseModel):
    step: int
    loss: float


class FitReport(BaseModel):
    """What one `fit` did."""

    steps: int
    seconds: float
    examples_per_second: float
    num_train_examples: int
    num_eval_examples: int
    train_loss: list[float]  # per optimizer step, mean per completion token
    eval_loss: list[EvalPoint]  # held-out loss at step 0 and every eval_every steps
    best_eval_loss: float | None
    stop_reason: str  # "max_steps", "max_epochs", "max_seconds", "early_stopping", "callback"
    dtype: str  # the compute dtype the base ran in ("float32" or "bfloat16")


class EvalReport(BaseModel):
    """Held-out loss per completion token, its perplexity, and next-token accuracy if asked for."""

    loss: float
    perplexity: float
    tokens: int
    examples: int
    accuracy: float | None = None  # share of completion tokens the model ranks first


DP_AGGREGATORS = ("fedavg", "fedprox")  # whose output one clipped update moves by at most clip / n


class FederationConfig(BaseModel):
    """A federated run's settings: `[tool.flwr.app.config]` in pyproject.toml, overridable
    with `flwr run . --run-config "key=value ..."` (keys use dashes there)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base: str = "tiny-llama"
    mode: Literal["personal", "shared", "shared+personal"] = "shared+personal"
    # fedavg/fedadam/fedprox average; krum, multikrum, trimmedavg and median are Flower's robust
    # aggregators, for federations that may hold malicious nodes
    aggregator: Literal["fedavg", "fedadam", "fedprox", "krum", "multikrum", "trimmedavg", "median"] = "fedavg"
    # bounded, so that a typo is refused before anything runs (a run's records take no more)
    num_rounds: int = Field(3, ge=1, le=100_000)
    num_users: int = Field(4, ge=1, le=1_000_000)  # nodes in the federation; sampling sizes are computed from it
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    personal_tokens: int = Field(8, ge=0)
    shared_tokens: int = Field(8, ge=0)
    personal_projection: bool = False  # MLP-reparameterized personal prefix: off, as measured on real text
    local_steps: int = Field(10, ge=1, le=1_000_000)  # optimizer steps per user per round
    # shared+personal: the first rounds train the shared part only (-1, the default: every round
    # but the personal ones, or with personal_init "text" every round but the last), the rounds
    # after them both parts (personal_init "text" only), and the last personal-only-rounds the
    # personal part only against a shared prefix that then no longer changes. The shared part
    # learns what all users share first, and each user's part then learns its own voice.
    shared_only_rounds: int = Field(-1, ge=-1)
    personal_only_rounds: int = Field(0, ge=0)
    # shared+personal: what each user's personal part starts as. "auto" (the default) is
    # "interpolate" where the run allows a secure last round (FedAvg, no DP, 2+ users per round),
    # else "shared" (`personal_recipe`). "interpolate" (it won on real text, README): in the last
    # round each user trains a copy of the shared prefix at the federated rate; the copies' updates
    # are averaged under secure aggregation (SecAgg+: the coordinator learns only their average,
    # coordinator/secure_round.py), and each user keeps the new shared prefix moved `interpolation`
    # of the way toward its own copy (model interpolation), used *instead of* the shared prefix.
    # "shared": that copy, made after the shared-only rounds, fine-tuned on the device at
    # copy_learning_rate and kept as it is (FedAvg then local fine-tuning; any aggregator, DP).
    # Both need personal_tokens = shared_tokens; no round trains both parts. "text": the init
    # text's KV, used behind the shared part, [shared ; personal].
    personal_init: Literal["auto", "interpolate", "shared", "text"] = "auto"
    interpolation: float = Field(0.1, gt=0, le=1)  # "interpolate": how far toward the user's own copy
    # ... and (personal_init "shared") the learning rate of the rounds that fine-tune that copy: it
    # starts trained, and at the shared rounds' rate it overfit users with few rows (README)
    copy_learning_rate: float = Field(3e-3, gt=0, le=1.0)  # as TrainConfig's: every node would refuse more
    # the federated rounds' rate: 0.03 beat 0.01 for the shared prefix on real text (held-out loss
    # 3.865 vs 3.911, README's Shakespeare report); a user's own Personalizer.fit keeps 0.01
    learning_rate: float = Field(3e-2, gt=0, le=1.0)
    lr_decay: float = Field(1.0, gt=0, le=1)  # round r trains with learning_rate * lr_decay**(r-1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(256, ge=8)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # each node resolves "auto" for its own hardware
    proximal_mu: float = Field(0.01, ge=0)  # FedProx only
    server_lr: float = Field(0.1, gt=0)  # FedAdam's eta
    max_update_norm: float = Field(1e4, gt=0)  # replies whose shared update is larger are rejected
    # each accepted update is clipped to this multiple of the round's median update norm (0 = off),
    # so that no single reply moves the shared prefix further than its weight share of that bound
    update_clip_factor: float = Field(3.0, ge=0)
    max_num_examples: int = Field(100_000, ge=1)  # a reply claiming more examples is rejected
    # seconds a round (the secure one too) waits for its nodes' replies, then goes on with those
    # it has: a stalled node holds no round longer (Flower's default for a round: 1 hour)
    round_timeout: float = Field(3600.0, gt=0, allow_inf_nan=False)
    byzantine_nodes: int = Field(1, ge=0)  # krum / multikrum: malicious nodes to tolerate
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)  # trimmedavg: share cut at each end per value
    dp_noise_multiplier: float = Field(0.0, ge=0)  # > 0 turns on client-side-clipping DP
    dp_clipping_norm: float = Field(1.0, gt=0)
    dp_target_delta: float = Field(1e-5, gt=0, lt=1)
    # The federation's data (client/partition.py): a .jsonl/.csv/.parquet file with a user column, a
    # folder of per-user files (alice.jsonl, bob.csv) or of per-user folders (alice/train.jsonl).
    # Node partition-id i is the i-th user in id order. Empty: every node must bring `data-path`.
    data: str = ""
    user_field: str = Field("user", min_length=1)  # the user column of a single data file
    min_rows: int = Field(2, ge=1)  # users with fewer rows are dropped before numbering
    # each user's last ceil(eval_fraction * rows) rows are held out for evaluation rounds (at least
    # one, never all); 0 evaluates on the training rows. A user folder's eval.jsonl is used as is.
    eval_fraction: float = Field(0.2, ge=0, lt=1)
    # users sampled per round, for training and evaluation alike (0: fraction-train decides)
    users_per_round: int = Field(0, ge=0)
    data_seed: int = 0  # node i trains with seed data_seed + i
    run_dir: str = Field("runs/latest", pattern=r"\S")  # blank would be the current folder
    # simulation: each node's encrypted store lives below; "" = RUN_DIR/stores, so runs never share
    # a node's prefixes (a second run would start from the first one's)
    store_root: str = ""
    key_seed: str = "simulation-only"  # simulation: node keys derive from this; real nodes bring key files
    audit_dir: str = ""  # non-empty: each node logs every reply it sends there (client/audit.py)

    @property
    def node_store_root(self) -> str:
        """The folder that holds one encrypted store per simulated node."""
        return self.store_root or str(Path(self.run_dir) / "stores")

    @classmethod
    def from_run_config(cls, run_config: dict, ignore_unknown: bool = False) -> FederationConfig:
        """Parse Flower's run_config (dash-separated keys), naming any bad key or value.

        `ignore_unknown` skips keys that are not settings (a message's ConfigRecord also
        carries Flower's own keys such as server-round).
        """
        values = {key.replace("-", "_"): value for key, value in run_config.items()}
        if ignore_unknown:
            values = {k: v for k, v in values.items() if k in cls.model_fields}
        return cls.model_validate(values)

    def to_run_config(self) -> dict:
        return {key.replace("_", "-"): value for key, value in self.model_dump().items()}

    @model_validator(mode="after")
    def _mode_has_tokens(self) -> FederationConfig:
        if self.mode != "personal" and self.shared_tokens == 0:
            raise ValueError(f"mode {self.mode!r} needs shared_tokens > 0")
        if self.mode != "shared" and self.personal_tokens == 0:
            raise ValueError(f"mode {self.mode!r} needs personal_tokens > 0")
        if self.dp_noise_multiplier > 0:
            self._check_dp()
        if self.users_per_round > self.num_users:
            raise ValueError(f"users_per_round {self.users_per_round} is more than num_users {self.num_users}")
        if self.users_per_round and self.fraction_train != 1.0:
            raise ValueError("set users_per_round or fraction_train, not both")
        explicit = self.model_fields_set & {"shared_only_rounds", "personal_only_rounds"}
        phases = max(self.shared_only_rounds, 0) + self.personal_only_rounds
        if self.mode != "shared+personal" and any(getattr(self, name) > 0 for name in explicit):
            raise ValueError(
                f"shared_only_rounds and personal_only_rounds need mode 'shared+personal', not {self.mode!r}"
            )
        if phases > self.num_rounds:
            raise ValueError(
                f"shared_only_rounds + personal_only_rounds = {phases} exceeds num_rounds = {self.num_rounds}"
            )
        if self.personal_init == "interpolate" and (problem := self._secure_round_problem()):
            raise ValueError(f"personal_init 'interpolate' {problem}; or set personal_init 'shared'")
        if self.copies_shared and self.personal_tokens != self.shared_tokens:
            raise ValueError(
                f"personal_init {self.personal_recipe!r} copies the shared prefix: personal_tokens "
                f"({self.personal_tokens}) must equal shared_tokens ({self.shared_tokens}), or set personal_init 'text'"
            )
        return self

    def _check_dp(self) -> None:
        """Flower's noise is sized for a plain mean of clipped updates, which one user moves by at
        most clip / users per round: other aggregators let one user move their output further
        (median, krum, a trimmed mean), or keep raw means in their state (FedAdam's moments)."""
        if self.mode == "personal":
            raise ValueError("differential privacy protects the shared prefix; mode 'personal' sends none")
        if self.aggregator not in DP_AGGREGATORS:
            raise ValueError(
                f"differential privacy needs aggregator {' or '.join(map(repr, DP_AGGREGATORS))}, not "
                f"{self.aggregator!r}: the noise is sized for their plain mean, and one user moves the output "
                "of the others further"
            )
        if self.dp_clipping_norm > self.max_update_norm:
            raise ValueError(
                f"dp_clipping_norm {self.dp_clipping_norm} is above max_update_norm {self.max_update_norm}: honest "
                "clipped updates would be rejected, each voiding the round"
            )

    def _secure_round_problem(self) -> str | None:
        """Why this run cannot end in a secure round (None: it can). Secure aggregation hides each
        reply: only their plain average is possible, no per-reply check, noise or robust rule."""
        if self.aggregator != "fedavg" or self.dp_noise_multiplier > 0:
            return (
                "aggregates its last round securely, which needs aggregator 'fedavg' without differential "
                f"privacy (got aggregator {self.aggregator!r}, dp_noise_multiplier {self.dp_noise_multiplier})"
            )
        if self.personal_only_rounds > 1 or self.shared_only_rounds not in (-1, self.num_rounds - 1):
            return (
                "federates the shared part in every round but the last: "
                "set shared_only_rounds -1 and personal_only_rounds <= 1"
            )
        if (self.users_per_round or sample_size(self.fraction_train, self.num_users)) < 2:
            return "needs at least 2 users in the last round (secure aggregation)"
        return None

    @property
    def round_sizes(self) -> tuple[int, int]:
        """(users trained, users evaluated) per round: `users_per_round` where set (LEAF's clients
        per round; evaluation samples as many, or fewer if fraction_evaluate says so), else the fractions."""
        train_nodes = self.users_per_round or sample_size(self.fraction_train, self.num_users)
        eval_nodes = sample_size(self.fraction_evaluate, self.num_users) if self.fraction_evaluate > 0 else 0
        return train_nodes, min(eval_nodes, train_nodes) if self.users_per_round else eval_nodes

    @property
    def personal_recipe(self) -> str:
        """personal_init with "auto" resolved: "interpolate" where this run allows a secure last
        round (FedAvg, no DP, 2+ users per round), else "shared"."""
        if self.personal_init != "auto":
            return self.personal_init
        return "shared" if self._secure_round_problem() else "interpolate"

    @property
    def copies_shared(self) -> bool:
        """True when each user's personal part starts as a copy of the shared one and replaces it."""
        return self.mode == "shared+personal" and self.personal_recipe in ("shared", "interpolate")

    @property
    def secure_last_round(self) -> bool:
        """True when the last round is aggregated securely and each user interpolates."""
        return self.mode == "shared+personal" and self.personal_recipe == "interpolate"

    def is_secure_round(self, server_round: int) -> bool:
        return self.secure_last_round and server_round == self.num_rounds

    def shared_only_count(self) -> int:
        """How many rounds, from the first, train the shared part only (mode shared+personal)."""
        if self.shared_only_rounds >= 0:
            return self.shared_only_rounds
        if self.copies_shared:  # the default: every round before the personal ones (at least the last)
            return max(self.num_rounds - max(self.personal_only_rounds, 1), 0)
        return max(self.num_rounds - 1 - self.personal_only_rounds, 0)  # ... and one round of both parts

    def round_learning_rate(self, server_round: int) -> float:
        """Nodes' learning rate in `server_round`, decayed by lr_decay per round."""
        copy_round = self.copies_shared and self.round_parts(server_round) == "personal"
        copy_round = copy_round and not self.is_secure_round(server_round)  # it federates: the federated rate
        return (self.copy_learning_rate if copy_round else self.learning_rate) * self.lr_decay ** (server_round - 1)

    def round_parts(self, server_round: int) -> str:
        """The prefix parts nodes train in `server_round`: 'all', 'shared' or 'personal'."""
        if self.mode != "shared+personal":
            return "shared" if self.mode == "shared" else "personal"
        if server_round <= self.shared_only_count():
            return "shared"
        if self.copies_shared or server_round > self.num_rounds - self.personal_only_rounds:
            return "personal"
        return "all"

    @property
    def sends_shared(self) -> bool:
        return self.mode != "personal" and self.shared_tokens > 0

    @property
    def trains_personal(self) -> bool:
        return self.mode != "shared" and self.personal_tokens > 0

    @property
    def node_positions(self) -> int:
        """The most positions a node's rows take: its prefix parts and max_length (each node
        refuses more than its base's context)."""
        return (
            (self.personal_tokens if self.trains_personal else 0)
            + (self.shared_tokens if self.sends_shared else 0)
            + self.max_length
        )
