"""Federation overhead: wall time per round against the sum of local training, and memory
per simulated client (peak RSS of each ClientApp process, sampled every 50 ms).

    python -m fedprefix.simulations.bench_federation --base tiny-llama --users 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import psutil
from fedprefix.common.config import FederationConfig
from fedprefix.coordinator.simulate import simulate
from fedprefix.simulations.arguments import positive
from fedprefix.simulations.memory import PeakMemory
from fedprefix.simulations.personas import write_federation_data


def _is_client(proc) -> bool:
    """A ClientApp process (a Ray actor in simulation)."""
    return "clientapp" in " ".join(proc.info["cmdline"] or []).lower()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny-llama")
    parser.add_argument("--users", type=positive, default=4)
    parser.add_argument("--rounds", type=positive, default=3)
    parser.add_argument("--local-steps", type=positive, default=10)
    parser.add_argument("--examples", type=positive, default=40)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedprefix-bench-") as tmp:
        config = FederationConfig(
            base=args.base,
            num_users=args.users,
            num_rounds=args.rounds,
            local_steps=args.local_steps,
            data=str(write_federation_data(Path(tmp) / "data", args.users, args.examples)),
            run_dir=str(Path(tmp) / "run"),
            store_root=str(Path(tmp) / "stores"),
        )
        started = time.perf_counter()
        with PeakMemory(select=_is_client, interval=0.05) as memory:
            rounds = simulate(config)
        total = time.perf_counter() - started
    later = rounds[1:] or rounds  # round 1 also starts the node processes
    result = {
        "base": args.base,
        "users": args.users,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "parallel_clients": psutil.cpu_count(),
        "total_seconds": round(total, 1),
        "round_seconds": [round(r.seconds, 2) for r in rounds],
        "local_training_seconds_sum": [round(r.train_seconds_sum, 2) for r in rounds],
        "wall_over_training_sum_after_round1": round(
            statistics.mean(r.seconds / max(r.train_seconds_sum, 1e-9) for r in later), 3
        ),
        "clientapp_processes_seen": len(memory.peaks),
        "peak_rss_per_client_mib": round(max(memory.peaks.values(), default=0) / 2**20, 1),
        "median_peak_rss_per_client_mib": round(statistics.median(memory.peaks.values()) / 2**20, 1)
        if memory.peaks
        else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
