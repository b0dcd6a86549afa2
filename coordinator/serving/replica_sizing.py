"""Whether N engine replicas fit in this machine's memory, checked before a local Ray starts them.

Each replica loads its own copy of the base. Too many for the memory, and the kernel kills
one, Ray Serve starts it again, and the machine thrashes without ever answering; so
`fedprefix serve --replicas N` on one machine refuses at once, naming how many would fit (and
warns where their caches, once full, would not).
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


def replica_memory(parameters: int, cache_mib: int = 0) -> int:
    """Estimated bytes one replica holds: its process and base, and its caches at their bounds
    (the decrypted prefixes' and the prompts' KV, which many users reach)."""
    return REPLICA_BYTES + REPLICA_BYTES_PER_PARAMETER * parameters + (cache_mib << 20)


def check_replicas_fit(count: int, parameters: int, cache_mib: int, available: int | None) -> str | None:
    """FedPrefixError where `count` replicas' bases alone would not fit in `available` bytes (the
    start would fail); a warning to print where their caches, once full, would not (None: they
    would; where `available` is unknown, nothing is checked)."""
    if available is None:
        return None
    for caches in (0, cache_mib):
        each = replica_memory(parameters, caches)
        needed = SERVE_BYTES + count * each
        if needed > available:
            break
    else:
        return None
    fitting = max(0, (available - SERVE_BYTES) // each)
    message = (
        f"{count} replicas need about {needed / GIB:.1f} GiB ({each / GIB:.1f} GiB each"
        f"{' with their prefix and prompt caches full, --cache-mib and --prompt-cache-mib' if caches else ''}; "
        f"Ray's own {SERVE_BYTES / GIB:.1f} GiB) and {available / GIB:.1f} GiB is free: "
        f"{fitting} would fit"
    )
    if not caches:
        raise FedPrefixError(f"{message}; use fewer --replicas")
    return f"{message}, so many users may run this machine out of memory; fewer --replicas or smaller caches would not"
