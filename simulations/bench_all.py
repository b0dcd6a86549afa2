"""`make bench`: every performance benchmark, each a ratio measured side by side in one run.

    python -m fedprefix.simulations.bench_all [--base NAME] [--quick] [--device cuda] [--out results/bench]

Runs, in this order (each prints its own figures too):
- training step, fedprefix vs PEFT prefix tuning (bench_train), on templated persona rows
  and (not with --quick) on real text, Shakespeare's, whose batches carry padding;
- serving: mixed vs single-prefix batch, engine vs PEFT's per-user loop, open-loop HTTP
  latency continuous vs static, memory per cached prefix (bench_serving);
- encrypted store save / load and the KDF (bench_store);
- federation round overhead and memory per simulated client (bench_federation).
Writes OUT/bench.json and OUT/bench.md (machine, versions, figures).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import psutil
import torch
from fedprefix.common.precision import describe_host, host_info, resolve_device

from . import bench_federation, bench_serving, bench_store, bench_train
from .arguments import require


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="tiny model and short runs (a few minutes)")
    parser.add_argument("--out", default="results/bench")
    # the CPU by default: the README's tables are CPU figures; on a GPU host, --device cuda
    # times training and serving there (store and federation benchmarks stay on the CPU)
    parser.add_argument("--device", default="cpu", help="where training and serving run: cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    require("peft")  # before any benchmark runs: the training and serving ones compare with it
    device = resolve_device(args.device)
    base = "tiny-llama" if args.quick else args.base
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import flwr
    import transformers

    host = host_info(device)
    results = {
        "host": host.model_dump(),
        "machine": f"{describe_host(host)}, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "flwr": flwr.__version__,
        },
        "base": base,
    }
    on = ["--device", str(device)]
    results["train"] = bench_train.main(["--base", base, "--steps", "4" if args.quick else "8", *on])
    if not args.quick:
        results["train_real_text"] = bench_train.main(["--base", base, "--steps", "8", "--data", "shakespeare", *on])
    results["serving"] = bench_serving.main(
        [
            "--base",
            base,
            *on,
            "--users",
            "64",
            "--peft-users",
            "16" if args.quick else "8",
            "--rate",
            "20" if args.quick else "1.5",
            "--seconds",
            "8" if args.quick else "30",
            "--repeats",
            "3",
            # tiny-llama's replies are random tokens: a 128-token one makes the returning chat outgrow its context
            *(["--peft-lengths", "32"] if args.quick else []),
        ]
    )
    results["store"] = bench_store.main(["--repeats", "20" if args.quick else "50"])
    results["federation"] = bench_federation.main(
        ["--base", base, "--users", "4", "--rounds", "2" if args.quick else "3", "--local-steps", "5"]
    )
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "bench.md").write_text(markdown(results))
    print(markdown(results))
    return results


def markdown(r: dict) -> str:
    """The headline figures as a table."""
    t, s, f = r["train"], r["serving"], r["federation"]
    peft, http = s["engine_vs_peft"], s["open_loop_http"]
    rows = [
        (
            f"training step vs PEFT float32, {run['data']} rows, {run['padding_share']:.0%} pads (time ratio, "
            f"lower is better; work: linear-layer FLOPs): fedprefix default ({run['fedprefix_dtype']}) / float32",
            f"{run['time_ratio_fedprefix_over_peft']}x / {run['time_ratio_fedprefix_fp32_over_peft_fp32']}x "
            f"(work {run['work_ratio_fedprefix_over_peft']}x; {run['median_step_s']})",
        )
        for run in (t, r.get("train_real_text"))
        if run
    ]
    rows += [
        (
            "mixed-prefix batch vs one shared prefix (tokens/s ratio)",
            f"{s['mixed_vs_single']['ratio_mixed_over_single']}",
        ),
        *(
            (
                f"engine vs PEFT per-user loop, 64 users, {n} new tokens (tokens/s ratio), each in its faster "
                f"dtype (engine {v['engine_dtype']}, PEFT {v['peft_dtype']}; median of {v['rounds']} alternating "
                f"rounds, range): first request / a second one (prompt KV cached)",
                f"{v['ratio_engine_over_peft']}x ({v['ratio_per_round']}) / "
                f"{v['ratio_returning_engine_over_peft']}x ({v['ratio_returning_per_round']})",
            )
            for n, v in peft.items()
        ),
        *(
            (
                f"HTTP open loop p50 / p99, {mode} (tokens/s; share of the engine's direct tokens/s)",
                f"{http[mode]['p50_latency_s']} s / {http[mode]['p99_latency_s']} s "
                f"({http[mode]['throughput_tokens_per_s']}; {http[mode]['of_direct']})",
            )
            for mode in ("continuous", "static")
        ),
        (
            "memory per cached prefix; users per GiB",
            f"{s['memory']['bytes_per_cached_prefix']:,} B; {s['memory']['users_per_GiB']:,}",
        ),
        (
            "store save + load, raw key, durable / no fsync (ms)",
            f"{r['store']['cases']['raw key']['save_plus_load_ms']:.2f} / "
            f"{r['store']['cases']['raw key, durable=False']['save_plus_load_ms']:.2f}",
        ),
        ("store: scrypt unlock, once per session (ms)", f"{r['store']['kdf']['derive_ms']:.0f}"),
        ("federation round wall / local training sum (after round 1)", f"{f['wall_over_training_sum_after_round1']}"),
        ("peak memory per simulated client", f"{f['peak_rss_per_client_mib']} MiB"),
    ]
    head = [
        f"# fedprefix benchmarks ({r['base']})",
        "",
        f"{r['machine']}; {r['versions']}",
        "",
        "| benchmark | figure |",
        "|---|---|",
    ]
    return "\n".join(head + [f"| {a} | {b} |" for a, b in rows]) + "\n"


if __name__ == "__main__":
    main()
