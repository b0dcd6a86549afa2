"""pydantic models for training settings and the reports training and evaluation return."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """How a device trains its prefix. Defaults are tuned on the built-in base (see README)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    learning_rate: float = Field(5e-3, gt=0, le=1.0)
    max_steps: int = Field(60, ge=1)  # optimizer steps; the device budget
    max_seconds: float | None = Field(None, gt=0)  # wall-clock budget; stops after the step that crosses it
    batch_size: int = Field(8, ge=1)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)  # linear warm-up, then cosine decay to 10%
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_fraction: float = Field(0.1, ge=0, lt=1)  # held-out share of the data for early stopping
    eval_every: int = Field(10, ge=1)  # steps between held-out evaluations
    patience: int = Field(3, ge=1)  # evaluations without improvement before stopping early
    max_length: int = Field(256, ge=8)  # tokens per example; longer prompts lose their left part
    bf16: bool = True  # train against a bfloat16 copy of the base: faster steps, loss within noise (README)
    seed: int = 0  # fixes data order, split and init: same data + seed = same prefix


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
    stop_reason: str  # "max_steps", "max_seconds", "early_stopping", "callback"


class EvalReport(BaseModel):
    """Held-out loss per completion token and its perplexity."""

    loss: float
    perplexity: float
    tokens: int
    examples: int
