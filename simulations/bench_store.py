"""Benchmark the encrypted prefix store on a built-in-model-sized prefix.

Measures, for a SmolLM2-sized prefix (30 layers x 3 kv heads x 64 dims, P=16, float32,
737 KB of tensors), the median time of ``PrefixStore.save`` and ``PrefixStore.load`` with
a raw key and with a passphrase whose KEK is already cached (so without the KDF), and the
KDF (scrypt at the store's default cost) separately. Target: save + load under 5 ms.

    python simulations/bench_store.py [--repeats N] [--kdf-repeats K] [--dir DIR] [--json OUT]

``main(argv)`` returns the results as a dict, for other benchmarks to import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from fedprefix.common.precision import host_info
from fedprefix.common.prefix import Prefix, PrefixConfig, PrefixSpec
from fedprefix.common.store import DEFAULT_SCRYPT_N, SCRYPT_P, SCRYPT_R, PrefixStore
from fedprefix.simulations.arguments import positive

SPEC = PrefixSpec(num_layers=30, num_kv_heads=3, head_dim=64, num_virtual_tokens=16)  # built-in SmolLM2
FINGERPRINT = "ab" * 32
TARGET_MS = 5.0
RAW_KEY = bytes(range(32))
PASSPHRASE = "benchmark passphrase, not a secret"


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _filesystem(path: Path) -> str:
    """Filesystem type of `path` from /proc/mounts (fsync cost depends on it)."""
    try:
        best, kind = "", "unknown"
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and resolved.startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
        return kind
    except OSError:
        return "unknown"


def machine_info(folder: Path) -> dict:
    """CPU, OS, library versions and the filesystem the store was on."""
    versions = {}
    for package in ("torch", "cryptography", "safetensors", "pydantic", "filelock"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return {
        "cpu": host_info().cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "filesystem": _filesystem(folder),
        "host": host_info().model_dump(),
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a table, return the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive, default=50, help="timed saves/loads per case (median reported)")
    parser.add_argument("--kdf-repeats", type=positive, default=5, help="timed scrypt derivations")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the store (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    prefix = Prefix(PrefixConfig(spec=SPEC, base_fingerprint=FINGERPRINT), generator=torch.Generator().manual_seed(0))
    tensor_bytes = sum(t.numel() * t.element_size() for t in prefix.state_tensors().values())
    results: dict = {"spec": SPEC.model_dump(), "tensor_bytes": tensor_bytes, "repeats": args.repeats, "cases": {}}

    if args.dir:  # a folder on the disk to measure, made if missing
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        store = PrefixStore(folder / "store")  # default scrypt cost, durable writes
        scratch = PrefixStore(folder / "scratch", durable=False)  # no fsync: the CPU cost alone
        results["machine"] = machine_info(folder)
        cases = (
            ("raw key", RAW_KEY, store),
            ("passphrase (KEK cached)", PASSPHRASE, store),
            ("raw key, durable=False", RAW_KEY, scratch),
            ("passphrase, durable=False", PASSPHRASE, scratch),
        )
        for name, key, target in cases:
            user = "raw" if isinstance(key, bytes) else "pass"
            target.save(user, prefix, key)  # first save: creates the DEK (and pays the KDF once)
            target.load(user, key, FINGERPRINT)  # warm-up
            save_ms = _median_ms(lambda t=target, u=user, k=key: t.save(u, prefix, k), args.repeats)
            load_ms = _median_ms(lambda t=target, u=user, k=key: t.load(u, k, FINGERPRINT), args.repeats)
            results["cases"][name] = {
                "save_ms": save_ms,
                "load_ms": load_ms,
                "save_plus_load_ms": save_ms + load_ms,
                "file_bytes": target.info(user).size_bytes,
                "meets_target": save_ms + load_ms < TARGET_MS,
                "durable": target.durable,
            }

        def unlock_and_load() -> None:
            store.forget_keys()
            store.load("pass", PASSPHRASE, FINGERPRINT)

        salt = os.urandom(16)
        kdf_ms = _median_ms(
            lambda: Scrypt(salt=salt, length=32, n=DEFAULT_SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(
                PASSPHRASE.encode()
            ),
            args.kdf_repeats,
        )
        results["kdf"] = {
            "name": "scrypt",
            "n": DEFAULT_SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "derive_ms": kdf_ms,
            "unlock_and_load_ms": _median_ms(unlock_and_load, args.kdf_repeats),
        }
    results["target_ms"] = TARGET_MS
    _print(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _print(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    machine = results["machine"]
    console = Console()
    spec = results["spec"]
    console.print(
        f"prefix {spec['num_layers']}x{spec['num_kv_heads']}x{spec['head_dim']}, P={spec['num_virtual_tokens']}, "
        f"float32, {results['tensor_bytes'] / 1024:.0f} KiB; median of {results['repeats']} runs"
    )
    console.print(
        f"{machine['cpu']} ({machine['cpu_count']} CPUs), {machine['platform']}, Python {machine['python']}, "
        f"store on {machine['filesystem']}"
    )
    console.print(", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    table = Table(title=f"PrefixStore (target save+load < {results['target_ms']:g} ms)")
    for column in ("case", "save ms", "load ms", "save+load ms", "file KiB", "target"):
        table.add_column(column, justify="right" if column != "case" else "left")
    for name, case in results["cases"].items():
        table.add_row(
            name,
            f"{case['save_ms']:.2f}",
            f"{case['load_ms']:.2f}",
            f"{case['save_plus_load_ms']:.2f}",
            f"{case['file_bytes'] / 1024:.0f}",
            "met" if case["meets_target"] else "MISSED",
        )
    kdf = results["kdf"]
    table.add_row(
        f"scrypt n=2^{kdf['n'].bit_length() - 1} r={kdf['r']} p={kdf['p']} (KDF alone)",
        "",
        "",
        f"{kdf['derive_ms']:.1f}",
        "",
        "",
    )
    table.add_row("unlock + load (KEK not cached)", "", f"{kdf['unlock_and_load_ms']:.1f}", "", "", "")
    console.print(table)


if __name__ == "__main__":
    main()
