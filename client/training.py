"""The one training loop for prefixes, used by Personalizer.fit and the Flower ClientApp.

Loss: cross-entropy per completion token. Only the completion positions go through
the LM head (the vocabulary projection is the largest matrix of a small model, and
prompt positions need no logits), and only prefix parameters get gradients.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from fedprefix.common.attention import hidden_with_prefixes, stack_prefixes
from fedprefix.common.config import EvalPoint, EvalReport, FitReport, TrainConfig
from fedprefix.common.errors import ConfigError, DataError
from fedprefix.common.generation import left_pad
from fedprefix.common.precision import dtype_name, resolve_dtype
from fedprefix.common.train_forward import lean_completion_loss, unsupported_reason
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data import Example


@dataclass
class StepInfo:
    """What a training callback sees after each optimizer step."""

    step: int
    max_steps: int
    loss: float
    learning_rate: float
    eval_loss: float | None  # set on evaluation steps


Callback = Callable[[StepInfo], bool | None]  # return False to stop training


def split_examples(
    examples: Sequence[Example], eval_fraction: float, seed: int, max_rows: int | None = None
) -> tuple[list, list]:
    """Seeded (train, held-out) split of the rows the examples came from (a chat's replies stay on
    one side: a held-out reply would otherwise be context of a trained one); held-out is empty
    with fewer than 5 rows, or where `eval_fraction` of them rounds to none (at the default 0.1:
    5 rows hold out none, 6 to 14 one), and at most `max_rows` rows (None: no bound).

    Rows are ranked by a seeded hash of their tokens, not shuffled by position: a user who fits
    again with rows added keeps the same held-out rows (and gains more as the count grows), where
    a shuffle of all rows put a third or more of the new held-out set among rows the previous
    fit had trained on, so early stopping judged the continued prefix on its own training data."""
    by_row: dict[int, list[Example]] = {}
    for example in examples:
        by_row.setdefault(example.row, []).append(example)
    rows = sorted(by_row.values(), key=lambda row: _row_rank(row, seed))
    held = min(int(round(len(rows) * eval_fraction)), len(rows) - 1) if len(rows) >= 5 else 0
    held = held if max_rows is None else min(held, max_rows)
    return [e for row in rows[held:] for e in row], [e for row in rows[:held] for e in row]


def _row_rank(row: Sequence[Example], seed: int) -> bytes:
    """A row's place in the split: a hash of the seed and its tokens (whatever rows come beside it)."""
    digest = hashlib.blake2b(str(seed).encode(), digest_size=16)
    for example in row:
        digest.update(array("q", [len(example.prompt), *example.prompt, -1, *example.completion, -2]).tobytes())
    return digest.digest()


def completion_loss(base, kv: torch.Tensor | None, batch: Sequence[Example]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over completion tokens, number of those tokens) for one batch behind `kv`.

    Llama and Qwen2 bases take the lean forward of common.train_forward (the same loss with
    fewer products: shared head once, last layer on completion positions only); others,
    and rows with an empty prompt or completion, the transformers forward below.
    """
    if unsupported_reason(base.model) is None and all(ex.prompt and ex.completion for ex in batch):
        return lean_completion_loss(base.model, kv, [ex.prompt for ex in batch], [ex.completion for ex in batch])
    with _math_attention_on_cpu(base.device):
        return transformers_completion_loss(base, kv, batch)


# sdpa_kernel sets process-wide flags: two threads leaving it out of order left the whole
# process, GPU models included, on the math kernel alone. One such forward at a time.
_SDPA_FLAGS = threading.Lock()


@contextlib.contextmanager
def _math_attention_on_cpu(device: torch.device) -> Iterator[None]:
    """The math SDPA kernel for a transformers forward on a CPU, where the flash kernel's
    backward is several times slower than plain matmuls for these short sequences (measured,
    README); a GPU keeps its fused kernels. The lean forward has its own attention."""
    if device.type != "cpu":
        yield
        return
    with _SDPA_FLAGS, sdpa_kernel([SDPBackend.MATH]):
        yield


def transformers_completion_loss(
    base, kv: torch.Tensor | None, batch: Sequence[Example], hits: list[int] | None = None
) -> tuple[torch.Tensor, int]:
    """completion_loss through transformers' own forward (any supported base).

    `hits`, if given, gets the number of completion tokens the model ranks first appended.
    """
    rows = [ex.prompt + ex.completion for ex in batch]
    ids, mask = left_pad(rows, base.tokenizer.pad_token_id)
    labels = torch.zeros_like(mask, dtype=torch.bool)  # (B, T): True at completion tokens
    width = ids.shape[1]
    for i, ex in enumerate(batch):
        labels[i, width - len(ex.completion) :] = True
    ids, mask, labels = ids.to(base.device), mask.to(base.device), labels.to(base.device)
    prefixes = stack_prefixes([kv] * len(batch), dtype=base.dtype, device=base.device)
    hidden = hidden_with_prefixes(base.model, ids, mask, prefixes)  # (B, T, hidden)
    predict = labels[:, 1:]  # position t predicts token t + 1
    selected = hidden[:, :-1][predict]  # (N, hidden), N completion tokens
    logits = base.model.get_output_embeddings()(selected).float()  # (N, V)
    targets = ids[:, 1:][predict]
    if hits is not None:
        hits.append(int((logits.argmax(-1) == targets).sum()))
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss, int(predict.sum())


@torch.no_grad()
def evaluate_examples(
    base, kv: torch.Tensor | None, examples: Sequence[Example], batch_size: int = 16, accuracy: bool = False
) -> EvalReport:
    """Mean loss per completion token over `examples` behind `kv` (None = the base alone), and
    next-token accuracy (share of completion tokens the model ranks first) when `accuracy`."""
    total, tokens, hits = 0.0, 0, []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        if accuracy:  # logits are needed: the transformers forward
            loss, count = transformers_completion_loss(base, kv, batch, hits)
        else:
            loss, count = completion_loss(base, kv, batch)
        total, tokens = total + float(loss), tokens + count
    mean = total / max(tokens, 1)
    return EvalReport(
        loss=mean,
        perplexity=math.exp(min(mean, 50.0)),
        tokens=tokens,
        examples=len(examples),
        accuracy=sum(hits) / max(tokens, 1) if accuracy else None,
    )


def train_step(work, kv_of, batch, optimizer, parameters, max_grad_norm: float | None = None, proximal=None) -> float:
    """One optimizer step on `batch`; returns the loss per completion token.

    `proximal`: (mu, [(param, anchor), ...]) adds FedProx's mu/2 * ||param - anchor||^2.
    """
    loss_sum, tokens = completion_loss(work, kv_of(), batch)
    loss = loss_sum / max(tokens, 1)
    if proximal is not None:
        mu, pairs = proximal
        loss_for_grad = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in pairs)
    else:
        loss_for_grad = loss
    optimizer.zero_grad(set_to_none=True)
    loss_for_grad.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def warmup_cosine(config: TrainConfig) -> Callable[[int], float]:
    """The learning-rate factor per step: linear warm-up (config.warmup_fraction of the steps,
    at least config.min_warmup_steps, at most half), then cosine decay to 10%."""
    wanted = max(int(config.max_steps * config.warmup_fraction), config.min_warmup_steps)
    warmup = max(1, min(wanted, config.max_steps // 2))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, config.max_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    return factor


def epoch_capped_steps(config: TrainConfig, rows: int) -> int:
    """Optimizer steps to run: config.max_steps, or fewer if that many would pass over the
    `rows` training rows more than config.max_epochs times."""
    if config.max_epochs is None:
        return config.max_steps
    return max(1, min(config.max_steps, math.ceil(config.max_epochs * rows / config.batch_size)))


def capped_schedule(config: TrainConfig, rows: int) -> tuple[int, Callable[[int], float]]:
    """(the steps to run on `rows` training rows, their learning-rate factor per step): the
    epoch cap applied, and the warm-up + cosine schedule decaying over the steps actually run."""
    steps = epoch_capped_steps(config, rows)
    return steps, warmup_cosine(config.model_copy(update={"max_steps": steps}))


def seeded_batches(examples: Sequence[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Batches forever, epoch after epoch, each epoch a fresh seeded shuffle."""
    generator, order = random.Random(seed), []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            generator.shuffle(fresh)
            order.extend(fresh)
        yield [examples[i] for i in order[:batch_size]]
        del order[:batch_size]


class StepProgress:
    """Training progress, as `simulate` shows rounds: in a terminal a rich bar (step, loss,
    elapsed); elsewhere (a file, a pipe, CI, nohup) plain flushed lines, about ten a fit and
    one at each held-out evaluation, where a bar would print only at the end; nothing when
    disabled."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        console = Console()
        self.plain = enabled and not (console.is_terminal or console.is_jupyter)  # a notebook draws the bar
        self.file, self.description, self.total = console.file, description, total
        self.every = max(1, total // 10)
        self.started = time.perf_counter()
        self.last: tuple[int, float] | None = None  # the last step and loss not yet printed
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled or self.plain,
            transient=False,
        )

    def __enter__(self) -> StepProgress:
        self.bar.__enter__()
        self.task = self.bar.add_task(self.description, total=self.total, loss="-")
        if self.plain:
            print(f"{self.description}: up to {self.total} steps", file=self.file, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)
        if self.last is not None and exc[0] is None:  # a fit that stopped early: where it ended
            self._print(*self.last, None)

    def step(self, step: int, loss: float, eval_loss: float | None) -> None:
        self.bar.update(self.task, advance=1, loss=f"{loss:.3f}")
        if not self.plain:
            return
        self.last = (step, loss)
        if step % self.every == 0 or step == self.total or eval_loss is not None:
            self._print(step, loss, eval_loss)

    def _print(self, step: int, loss: float, eval_loss: float | None) -> None:
        held = "" if eval_loss is None else f", held-out {eval_loss:.3f}"
        seconds = time.perf_counter() - self.started
        line = f"{self.description}: step {step}/{self.total}, loss {loss:.3f}{held}, {seconds:.0f} s"
        print(line, file=self.file, flush=True)
        self.last = None


def _restore(parameters: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(parameters, values, strict=True):
            param.copy_(value)


def train(
    base,
    kv_of: Callable[[], torch.Tensor],
    parameters: Sequence[torch.nn.Parameter],
    train_set: Sequence[Example],
    eval_set: Sequence[Example],
    config: TrainConfig,
    progress: bool = True,
    callback: Callback | None = None,
    description: str = "training prefix",
    proximal_parameters: Sequence[torch.nn.Parameter] = (),
    proximal_mu: float = 0.0,
) -> FitReport:
    """Optimize `parameters` so that `kv_of()` (the full row prefix) fits `train_set`.

    AdamW, linear warm-up then cosine decay, gradient clipping, early stopping on
    `eval_set` (the best parameters are restored), and the device budget of `config`.
    With `proximal_mu` > 0, `proximal_parameters` are pulled towards their starting
    values (FedProx's proximal term).
    """
    if callback is not None and not callable(callback):
        raise ConfigError(f"callback must be a function of StepInfo, got {type(callback).__name__}")
    if isinstance(proximal_mu, bool) or not isinstance(proximal_mu, (int, float)) or not 0 <= proximal_mu < math.inf:
        raise ConfigError(f"proximal_mu must be a finite number >= 0, got {proximal_mu!r}")  # NaN fails too
    parameters = list(parameters)
    proximal = None
    if proximal_mu > 0 and proximal_parameters:
        proximal = (proximal_mu, [(p, p.detach().clone()) for p in proximal_parameters])
    # No global torch seed: the batch order has its own generator (config.seed), and a
    # global one would reset a host application's random draws, in every thread, to the fit's.
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    max_steps, schedule = capped_schedule(config, len(train_set))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # A copy of the frozen base in the compute dtype (kept on the handle) instead of autocast,
    # which re-casts every frozen weight on every use; prefix parameters stay float32.
    work = base.with_dtype(resolve_dtype(config.dtype, base.device))

    def held_out() -> float | None:
        if not eval_set:
            return None
        return evaluate_examples(work, kv_of().detach(), eval_set, config.batch_size).loss

    # A fit that raises (a non-finite step, Ctrl-C, a callback's exception) leaves the
    # prefix as it was before the call: a later save() must not store half a fit.
    start_state = [p.detach().clone() for p in parameters]
    try:
        # shown from the start: the held-out loss at step 0 comes first, seconds with much data
        with StepProgress(progress, f"{description} ({dtype_name(work.dtype)})", max_steps) as shown:
            eval_points = []
            best = held_out()
            if best is not None:
                eval_points.append(EvalPoint(step=0, loss=best))
            best_state = [p.detach().clone() for p in parameters]
            stale, losses, seen, stop_reason = 0, [], 0, "max_steps"
            batches = seeded_batches(train_set, config.batch_size, config.seed)
            started = time.perf_counter()
            for step in range(1, max_steps + 1):
                batch = next(batches)
                losses.append(train_step(work, kv_of, batch, optimizer, parameters, config.max_grad_norm, proximal))
                if not math.isfinite(losses[-1]):  # never continue from, or keep, a non-finite prefix
                    raise DataError(
                        f"training step {step}: the loss is {losses[-1]}; the prefix is left as before this fit"
                    )
                if not all(bool(p.isfinite().all()) for p in parameters):  # the step itself overflowed
                    raise DataError(
                        f"training step {step} left NaN or Inf in the prefix; it is left as before this fit"
                    )
                scheduler.step()
                seen += len(batch)
                eval_loss = None
                if eval_set and (step % config.eval_every == 0 or step == max_steps):
                    eval_loss = held_out()
                    eval_points.append(EvalPoint(step=step, loss=eval_loss))
                    if eval_loss < best - 1e-4:
                        best, stale = eval_loss, 0
                        best_state = [p.detach().clone() for p in parameters]
                    else:
                        stale += 1
                shown.step(step, losses[-1], eval_loss)
                info = StepInfo(step, max_steps, losses[-1], scheduler.get_last_lr()[0], eval_loss)
                if callback is not None and callback(info) is False:
                    stop_reason = "callback"
                    break
                if stale >= config.patience:
                    stop_reason = "early_stopping"
                    break
                if config.max_seconds is not None and time.perf_counter() - started >= config.max_seconds:
                    stop_reason = "max_seconds"
                    break
        if eval_set:  # keep the parameters that did best on held-out data
            _restore(parameters, best_state)
        seconds = time.perf_counter() - started
        return FitReport(
            steps=len(losses),
            seconds=seconds,
            examples_per_second=seen / max(seconds, 1e-9),
            num_train_examples=len(train_set),
            num_eval_examples=len(eval_set),
            train_loss=losses,
            eval_loss=eval_points,
            best_eval_loss=best,
            stop_reason="max_epochs" if stop_reason == "max_steps" and max_steps < config.max_steps else stop_reason,
            dtype=dtype_name(work.dtype),
        )
    except BaseException:
        _restore(parameters, start_state)
        raise
    finally:
        optimizer.zero_grad(set_to_none=True)  # the optimizer ends here: no gradients left on the prefix
