"""Serving benchmarks, each a ratio measured side by side in one process:

1. one batch of N users with N different prefixes vs the same batch all on one prefix;
2. the engine vs PEFT's way (per user: load the adapter, `generate`), with PEFT 0.21.2's
   generate first made to really use the prefix (checked token for token);
   and a second request of the same users (the chat's history again and a new question), where
   the engine reuses their cached prompt KV;
3. open-loop Poisson arrivals over HTTP: latency p50/p99 and throughput, continuous vs
   static batching;
4. memory per cached user prefix and users per GiB;
5. a burst of long prompts while streams run: the streams' inter-token gaps, chunked prefill
   (2048 and 512 tokens per step) vs the whole burst in one prefill;
6. what one request costs at each step: unlock, prefix cache, prefill, decode;
7. on a GPU, decode steps replayed from CUDA graphs vs run eagerly.

    python -m fedprefix.simulations.bench_serving --base tiny-llama
    python -m fedprefix.simulations.bench_serving --base smollm2-135m-instruct --users 64 --peft-users 8
    python -m fedprefix.simulations.bench_serving --base FOLDER --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import base64
import json
import queue
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from fedprefix.common.base_model import context_length, load_base
from fedprefix.common.generation import SamplingParams
from fedprefix.common.precision import host_info, resolve_dtype
from fedprefix.common.prefix import Prefix
from fedprefix.common.store import PrefixStore
from fedprefix.coordinator.serving import Engine, GenerationRequest
from fedprefix.coordinator.serving.http_thread import start_http
from fedprefix.coordinator.serving.server import KEY_HEADER, create_app
from fedprefix.simulations.arguments import positive, require
from fedprefix.simulations.http_load import poisson_load
from fedprefix.simulations.personas import make_record, record_prompt


def key_of(user: str) -> bytes:
    return user.encode().ljust(32, b"#")[:32]


def make_users(base, store: PrefixStore, count: int, tokens: int) -> list[str]:
    """`count` users, each with a distinct prefix (the base's KV of a different text)."""
    users = []
    for i in range(count):
        user = f"u{i:03d}"
        text = f"User {i} writes {'briefly' if i % 2 else 'at length'} about restaurants, topic {i}. " * 4
        store.save(user, Prefix.from_text(base, text, tokens), key_of(user))
        users.append(user)
    return users


def questions_for(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [record_prompt(make_record(rng)) for _ in range(count)]


def prompts_for(base, count: int, seed: int = 0) -> list[str]:
    """Chat prompts (the template's system head, one question each) as the server renders them."""
    return [
        base.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        for question in questions_for(count, seed)
    ]


def requests_for(users: list[str], prompts: list[str], params: SamplingParams) -> list[GenerationRequest]:
    """One request per (user, prompt), each with that user's key (prompts: chat template text)."""
    return [GenerationRequest(p, u, key_of(u), params, templated=True) for u, p in zip(users, prompts, strict=True)]


def tokens_per_second(engine: Engine, requests: list[GenerationRequest]) -> float:
    started = time.perf_counter()
    results = engine.generate(requests)
    return sum(len(r.tokens) for r in results) / (time.perf_counter() - started)


def mixed_vs_single(engine, users, prompts, params, repeats: int) -> dict:
    """The same batch with every user's prefix vs all on users[0]'s, both with cold prompt caches:
    repeated rounds would otherwise reuse the mixed side's cached prompts (one entry per user) far
    more than the single side's (64 prompts of one user, beyond its per-user bound)."""
    mixed = requests_for(users, prompts, params)
    single = [GenerationRequest(p, users[0], key_of(users[0]), params, templated=True) for p in prompts]

    def cold_rate(requests) -> float:
        for user in users:
            engine.prompts.drop_user(user)
        return tokens_per_second(engine, requests)

    engine.generate(mixed[:2])  # warm-up
    rates = {"mixed": [], "single": []}
    for _ in range(repeats):  # alternate so that machine noise hits both
        rates["mixed"].append(cold_rate(mixed))
        rates["single"].append(cold_rate(single))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "mixed_tokens_per_s": round(med["mixed"], 1),
        "single_prefix_tokens_per_s": round(med["single"], 1),
        "ratio_mixed_over_single": round(med["mixed"] / med["single"], 3),
        "prompt_caches": "dropped before every timed batch",
    }


def graphs_vs_eager(base, store, users, prompts, lengths: list[int], repeats: int) -> dict:
    """On a GPU: the same batches with decode steps replayed from CUDA graphs and run eagerly, alternating
    rounds (each engine warmed up first: its captures, cached prompts), and rows whose tokens agree."""
    engines = {
        "graphs": Engine(base, store=store, max_batch_size=len(users)),
        "eager": Engine(base, store=store, max_batch_size=len(users), cuda_graphs=False),
    }
    figures = {}
    for length in lengths:
        batch = requests_for(users, prompts, SamplingParams(max_new_tokens=length, ignore_eos=True))
        first = {name: engine.generate(batch) for name, engine in engines.items()}
        equal = sum(a.tokens == b.tokens for a, b in zip(first["graphs"], first["eager"], strict=True))
        rates = {name: [] for name in engines}
        for _ in range(repeats):
            for name, engine in engines.items():
                rates[name].append(tokens_per_second(engine, batch))
        med = {name: statistics.median(v) for name, v in rates.items()}
        figures[str(length)] = {
            "graphs_tokens_per_s": round(med["graphs"], 1),
            "eager_tokens_per_s": round(med["eager"], 1),
            "ratio_graphs_over_eager": round(med["graphs"] / med["eager"], 2),
            "rounds": {name: [round(r, 1) for r in v] for name, v in rates.items()},
            "rows_with_equal_tokens": f"{equal}/{len(batch)}",
            "graphs_off_because": getattr(engines["graphs"]._forward, "eager_reason", "no graphed forward"),
        }
    return figures


def prefill_burst(base, store, users, prompts, max_prefill_tokens: int) -> dict:
    """16 streams running, then a burst of 48 long prompts: the gaps between the streams' tokens."""
    streams = SamplingParams(max_new_tokens=96, ignore_eos=True)
    longest = max(len(base.tokenizer(p).input_ids) for p in prompts)
    repeat = max(1, min(4, (context_length(base.model) or 2048) // 2 // longest))  # long, within the context
    with Engine(base, store=store, max_batch_size=64, max_prefill_tokens=max_prefill_tokens) as engine:
        running = engine.submit_many(requests_for(users[:16], prompts[:16], streams))
        while engine.stats.steps < 4:
            time.sleep(0.005)
        engine.stats.token_gaps.clear()
        started = time.perf_counter()
        burst = engine.submit_many(
            requests_for(users[16:64], [p * repeat for p in prompts[16:64]], SamplingParams(max_new_tokens=16))
        )
        for handle in burst + running:
            handle.result(timeout=3600)
        wall = time.perf_counter() - started
        gaps = sorted(engine.stats.token_gaps)
    return {
        "max_prefill_tokens": max_prefill_tokens,
        "burst_prompt_tokens": sum(len(base.tokenizer(p * repeat).input_ids) for p in prompts[16:64]),
        "p50_token_gap_s": round(statistics.median(gaps), 3),
        "p99_token_gap_s": round(gaps[int(0.99 * (len(gaps) - 1))], 3),
        "max_token_gap_s": round(gaps[-1], 3),
        "wall_s": round(wall, 2),
    }


def request_costs(base, store, users, prompts) -> dict:
    """What one request costs at each step, in seconds: unlock, cache, prefill, decode."""
    user, key = users[0], key_of(users[0])

    def timed(action, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    store.save("passphrase-user", store.load(user, key), "a passphrase of the user's own")
    engine = Engine(base, store=store, max_batch_size=64)
    engine.resolve_prefix(user, key)

    def alone(n: int, prompt: str = prompts[0], fresh: bool = True):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        request = GenerationRequest(prompt, user=user, key=key, params=params, templated=True)

        def run():
            if fresh:  # no prompt KV of this user cached: the whole prompt is computed
                engine.prompts.drop_user(user)
            engine.generate([request])

        return run

    def batch(n: int):
        requests = requests_for(users, prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))

        def run():
            for other in users:  # first requests: nothing of their prompts cached
                engine.prompts.drop_user(other)
            engine.generate(requests)

        return run

    one, many = timed(alone(1)), timed(alone(33, fresh=True))
    batch_one, batch_many = timed(batch(1), 2), timed(batch(33), 2)
    return {
        # a fresh store each time: no derived key cached (a server pays this once per user and key)
        "unlock_raw_key_s": round(timed(lambda: PrefixStore(store.root).load(user, key)), 4),
        "unlock_passphrase_s": round(
            timed(lambda: PrefixStore(store.root).load("passphrase-user", "a passphrase of the user's own")), 4
        ),
        "prefix_cache_hit_s": round(timed(lambda: engine.prefixes.lookup(user, key)), 6),
        "prompt_tokens": len(base.tokenizer(prompts[0]).input_ids),
        "prefill_alone_s": round(one, 4),
        "prefill_alone_prompt_cached_s": round(timed(alone(1, fresh=False)), 4),
        "decode_token_alone_s": round((many - one) / 32, 4),
        "batch_of": len(users),
        "prefill_per_request_in_batch_s": round(batch_one / len(users), 4),
        "decode_token_per_request_in_batch_s": round((batch_many - batch_one) / 32 / len(users), 5),
    }


def open_loop(
    base,
    store,
    users,
    prompts,
    params,
    rate: float,
    seconds: float,
    continuous: bool,
    client_process: bool = False,
    cuda_graphs: bool = True,
) -> dict:
    """Poisson arrivals at `rate` requests/s for `seconds` against a live HTTP server.

    The load runs on a thread of the server's process, or with `client_process` in a process of
    its own. Where a step is Python launching GPU kernels the two may contend for the
    interpreter; on a 2-core CPU a process of its own takes cores from the engine instead.
    """
    import multiprocessing

    import uvicorn
    from fedprefix.coordinator.superlink import free_port

    engine = Engine(
        base,
        store=store,
        max_batch_size=64,
        max_queue=4096,
        max_wait_s=600,
        continuous=continuous,
        cuda_graphs=cuda_graphs,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, "bench"), host="127.0.0.1", port=port, log_level="warning")
    )
    outcome = {}

    def load() -> None:  # the load on another thread or process, the engine on this thread (as `fedprefix serve`)
        try:
            while not engine.running:
                time.sleep(0.05)
            headers = {user: {KEY_HEADER: base64.b64encode(key_of(user)).decode()} for user in users}
            args = (port, headers, prompts, params.max_new_tokens, rate, seconds)
            if not client_process:
                results = queue.Queue()
                try:
                    poisson_load(*args, results)
                except Exception as error:  # raised below, on the engine's thread, like a process's failure
                    outcome["error"] = f"the load generator failed: {error!r}"
                    return
                outcome["results"], outcome["wall"] = results.get()
                return
            spawn = multiprocessing.get_context("spawn")
            results = spawn.Queue()
            client = spawn.Process(target=poisson_load, args=(*args, results))
            client.start()
            while "results" not in outcome:
                try:
                    outcome["results"], outcome["wall"] = results.get(timeout=1)
                except queue.Empty:
                    if not client.is_alive():  # it failed: its traceback is on stderr
                        outcome["error"] = f"the load generator exited with code {client.exitcode}"
                        return
            client.join()
        finally:
            server.should_exit = True  # the server ends, and with it the engine

    http = start_http(engine, server)
    loader = threading.Thread(target=load)
    loader.start()
    engine.run()
    loader.join()
    http.join(timeout=10)
    if "error" in outcome:
        raise RuntimeError(outcome["error"])
    results, wall = outcome["results"], outcome["wall"]
    served = [r for r in results if r[2] == 200]
    latencies = sorted(r[0] for r in served) or [float("nan")]
    return {
        "requests": len(results),
        "refused_429": len(results) - len(served),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p99_latency_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3),
        "throughput_tokens_per_s": round(sum(r[1] for r in results) / wall, 1),
        "mean_batch": round(statistics.mean(engine.stats.batch_sizes or [0]), 1),
        "p99_token_gap_s": round(sorted(engine.stats.token_gaps)[int(0.99 * (len(engine.stats.token_gaps) - 1))], 3)
        if engine.stats.token_gaps
        else None,
        "load_generator": "its own process" if client_process else "a thread of the server's process",
    }


def median_round(runs: list[dict]) -> dict:
    """The median of each figure over alternating rounds, and every round's p50 / p99 / throughput."""
    numbers = [key for key, value in runs[0].items() if isinstance(value, int | float)]
    summary = {key: round(statistics.median(run[key] for run in runs if run[key] is not None), 4) for key in numbers}
    summary["rounds"] = [
        [run["p50_latency_s"], run["p99_latency_s"], run["throughput_tokens_per_s"]] for run in runs
    ]  # p50 s, p99 s, tokens/s
    return {**runs[0], **summary}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny-llama")
    parser.add_argument("--device", default="cpu", help="where the base runs: cpu, cuda, cuda:1, ...")
    parser.add_argument("--users", type=positive, default=64)
    parser.add_argument("--tokens", type=positive, default=16, help="prefix length P of every user")
    parser.add_argument("--max-tokens", type=positive, default=32)
    repeats = "alternating rounds of each side-by-side comparison (ratios, HTTP open loop)"
    parser.add_argument("--repeats", type=positive, default=3, help=repeats)
    parser.add_argument("--peft-users", type=positive, default=16, help="users timed for the PEFT loop (it is slow)")
    parser.add_argument(
        "--peft-lengths", type=positive, nargs="+", default=[32, 128], help="new tokens per request, engine vs PEFT"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="open-loop arrivals per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="open-loop duration")
    parser.add_argument("--client-process", action="store_true", help="open loop: the load in a process of its own")
    parser.add_argument(
        "--no-cuda-graphs", action="store_true", help="on a GPU: eager decode steps (but in the graphs section)"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["mixed", "peft", "http", "memory", "burst", "costs", "graphs"]
    )
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args(argv)
    if "peft" not in args.skip:  # the per-user loop it is compared with
        require("peft")
    torch.manual_seed(0)
    base = load_base(args.base, device=args.device)
    served = base.with_dtype(resolve_dtype("auto", base.device))  # what `fedprefix serve` runs
    params = SamplingParams(max_new_tokens=args.max_tokens, ignore_eos=True)
    result = {
        "host": host_info(base.device).model_dump(),
        "torch": torch.__version__,
        "base": args.base,
        "users": args.users,
        "prefix_tokens": args.tokens,
        "max_tokens": args.max_tokens,
        "serving_dtype": str(served.dtype).removeprefix("torch."),
    }
    with tempfile.TemporaryDirectory(prefix="fedprefix-bench-") as tmp:
        store = PrefixStore(Path(tmp) / "store")
        users = make_users(base, store, args.users, args.tokens)
        prompts = prompts_for(base, args.users)
        if "peft" not in args.skip:  # per generation length: prefill weighs less in longer ones
            from .bench_vs_peft import engine_vs_peft  # it imports this file's helpers

            result["engine_vs_peft"] = {}
            for length in args.peft_lengths:
                result["engine_vs_peft"][str(length)] = engine_vs_peft(
                    args.base,
                    base,
                    store,
                    users,
                    prompts,
                    SamplingParams(max_new_tokens=length, ignore_eos=True),
                    min(args.peft_users, args.users),
                    args.repeats,
                )
                print(json.dumps({length: result["engine_vs_peft"][str(length)]}), flush=True)
        if "graphs" not in args.skip and served.device.type == "cuda":
            result["cuda_graphs_vs_eager"] = graphs_vs_eager(
                served, store, users, prompts, args.peft_lengths, args.repeats
            )
            print(json.dumps(result["cuda_graphs_vs_eager"]), flush=True)
        # not started: runs on this thread
        engine = Engine(served, store=store, max_batch_size=args.users, cuda_graphs=not args.no_cuda_graphs)
        if "mixed" not in args.skip:
            result["mixed_vs_single"] = mixed_vs_single(engine, users, prompts, params, args.repeats)
            print(json.dumps(result["mixed_vs_single"]), flush=True)
        if "memory" not in args.skip:
            for user in users:
                engine.resolve_prefix(user, key_of(user))
            per_user = engine.prefixes.stats.bytes / len(users)
            result["memory"] = {"bytes_per_cached_prefix": int(per_user), "users_per_GiB": int(2**30 // per_user)}
        if "burst" not in args.skip and args.users >= 64:  # chunked prefill vs one prefill of the whole burst
            result["prefill_burst"] = [
                prefill_burst(served, store, users, prompts, budget) for budget in (2048, 512, 1 << 20)
            ]
            print(json.dumps(result["prefill_burst"]), flush=True)
        if "costs" not in args.skip:
            result["request_costs"] = request_costs(served, store, users, prompts)
            print(json.dumps(result["request_costs"]), flush=True)
        if "http" not in args.skip:
            rounds = {"continuous": [], "static": []}
            for _ in range(args.repeats):  # alternating: the host's drift hits both modes alike
                for mode, runs in rounds.items():
                    runs.append(
                        open_loop(
                            served,
                            store,
                            users,
                            prompts,
                            params,
                            args.rate,
                            args.seconds,
                            continuous=mode == "continuous",
                            client_process=args.client_process,
                            cuda_graphs=not args.no_cuda_graphs,
                        )
                    )
            result["open_loop_http"] = {mode: median_round(runs) for mode, runs in rounds.items()}
            # What the engine does on the same batch without HTTP (prompts cached, as the rounds'
            # repeated users find them): at a rate past what the server sustains, the rounds'
            # throughput over this is the HTTP path's share of the engine.
            batch = requests_for(users, prompts, params)
            tokens_per_second(engine, batch)
            direct = tokens_per_second(engine, batch)
            result["open_loop_http"]["direct_tokens_per_s"] = round(direct, 1)
            for mode in rounds:
                served_rate = result["open_loop_http"][mode]["throughput_tokens_per_s"]
                result["open_loop_http"][mode]["of_direct"] = round(served_rate / direct, 3)
            print(json.dumps(result["open_loop_http"]), flush=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
