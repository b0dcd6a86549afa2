"""Whether N engine replicas fit in this machine's memory, checked before a local Ray starts them.

Each replica loads its own copy of the base. Too many for the memory, and the kernel kills
one, Ray Serve starts it again, and the machine thrashes without ever answering; so
`fedprefix serve --replicas N` on one machine refuses at once, naming how many would fit.
"""

from __future__ import annotations

from fedprefix.common.errors import FedPrefixError

GIB = 1 << 30
# Measured on the 2-core EPYC (resident memory once up, `fedprefix serve --replicas 2`, built-in
# base of 134.5 M parameters, bfloat16): each replica 1.1 GiB, 0.4 of it Python and torch; the
# router 0.5 GiB; Ray's own processes (GCS, raylet, agents, Serve's controller and proxy, the
# replicas' board) 0.9 GiB. A float32 engine of that base peaked at 8 bytes a parameter beyond
# Python and torch (the base, and the copies its fast path fuses). Rounded up: replicas that
# measure this much fit with room to spare.
REPLICA_BYTES = GIB // 2
REPLICA_BYTES_PER_PARAMETER = 8
SERVE_BYTES = 3 * GIB // 2  # the router and Ray's own processes, beside the CLI that starts them


def replica_memory(parameters: int, cache_mib: int) -> int:
    """Estimated bytes one replica holds: its process and base, and its caches at their bounds
    (the decrypted prefixes' and the prompts' KV), which many users reach."""
    return REPLICA_BYTES + REPLICA_BYTES_PER_PARAMETER * parameters + (cache_mib << 20)


def check_replicas_fit(count: int, parameters: int, cache_mib: int, available: int | None) -> None:
    """FedPrefixError where `count` replicas would not fit in `available` bytes (None: unknown, not checked)."""
    if available is None:
        return
    each = replica_memory(parameters, cache_mib)
    needed = SERVE_BYTES + count * each
    if needed <= available:
        return
    fitting = max(0, (available - SERVE_BYTES) // each)
    raise FedPrefixError(
        f"{count} replicas need about {needed / GIB:.1f} GiB ({each / GIB:.1f} GiB each: the base, and the prefix "
        f"and prompt caches' bounds, --cache-mib and --prompt-cache-mib; Ray's own {SERVE_BYTES / GIB:.1f} GiB) "
        f"and {available / GIB:.1f} GiB is free: at most {fitting} would fit; use fewer --replicas or smaller caches"
    )
