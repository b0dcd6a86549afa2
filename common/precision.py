"""The one rule for compute dtypes (training and serving), and the host it was applied on.

`resolve_dtype("auto", device)` is bfloat16 only where the hardware computes it natively
*and* it is measurably faster there, else float32:

- CUDA: bfloat16 where the GPU supports it (Ampere and later).
- CPU: oneDNN must have a native bf16 path (AVX512-BF16 or AMX; this check honours
  `ONEDNN_MAX_CPU_ISA`). Without one, torch runs bf16 matmuls through a reference GEMM,
  over 20x slower than float32 (DESIGN.md), so no bf16 by default there. With one, a short
  matmul forward + backward in both dtypes decides (once per process, by CPU time, so a busy
  machine does not flip it): bf16 must be at least `BF16_MIN_SPEEDUP` faster, so that a CPU
  whose bf16 instructions exist but do not pay keeps float32.

Explicit "float32" / "bfloat16" are always obeyed. Every figure the project reports
carries `host_info()`: CPU model, cores, native bf16, the torch version.
"""

from __future__ import annotations

import functools
import platform
import subprocess
import time

import torch
from pydantic import BaseModel

from .config import DEVICE_HELP
from .errors import ConfigError
from .resources import usable_cores

# The project's one map of dtype names (compute dtypes here, storage dtypes in common/store).
DTYPE_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
DTYPES: dict[str, torch.dtype] = {name: DTYPE_BY_NAME[name] for name in ("float32", "bfloat16")}  # compute dtypes
DTYPE_CHOICES = ("auto", *DTYPES)
BF16_MIN_SPEEDUP = 1.5  # bf16 must beat float32 by this factor in the probe to be chosen on a CPU


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32, and so on."""
    return str(dtype).removeprefix("torch.")


def cpu_native_bf16() -> bool:
    """True where oneDNN computes bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True where `device` computes bfloat16 natively."""
    device = torch.device(device)
    if device.type == "cuda":
        # by compute capability (Ampere, sm_80, on), of this GPU: torch.cuda.is_bf16_supported()
        # counts emulated bf16 (T4, V100) and asks about the current GPU, not `device`
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_native_bf16()


def _linear_seconds(dtypes: tuple[torch.dtype, ...], reps: int = 5) -> list[float]:
    """Best CPU time per dtype of a (256 x 576) @ (576 x 1536) linear, forward + input gradient
    (a training layer's shape), on one thread.

    CPU time of this thread, not wall time: on a shared machine other processes take cores
    and stretch wall time unevenly, which flipped the choice between runs (measured ratios
    from 1.2 to 2.9 on one host under load); a thread's CPU time counts only its own work
    (2.0-2.1 there, loaded or not). One thread, since torch's worker threads' time is not
    this thread's; bf16 and float32 scale alike over cores."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    for dtype in dtypes:
        x = torch.randn(256, 576, generator=generator).to(dtype).requires_grad_(True)  # (N, in)
        weight = torch.randn(1536, 576, generator=generator).to(dtype)  # (out, in), frozen like the base's
        cases.append((x, weight))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = [float("inf")] * len(cases)
        for rep in range(reps + 1):  # the first round packs weights and warms caches
            for i, (x, weight) in enumerate(cases):
                started = time.thread_time()
                torch.nn.functional.linear(x, weight).sum().backward()
                if rep:
                    best[i] = min(best[i], time.thread_time() - started)
        return best
    finally:
        torch.set_num_threads(threads)


@functools.cache
def cpu_bf16_speedup() -> float:
    """float32 time / bfloat16 time of a training-shaped matmul on this CPU (measured once per
    process, in about 0.1 s)."""
    if not cpu_native_bf16():
        return 0.0
    float32, bfloat16 = _linear_seconds((torch.float32, torch.bfloat16))
    return float32 / bfloat16


def resolve_dtype(name: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """The compute dtype for `name` ('auto', 'float32', 'bfloat16' or a torch dtype) on `device`."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ConfigError(f"unsupported compute dtype {name}; choose {', '.join(DTYPE_CHOICES)}")
        return name
    if name != "auto":
        if name not in DTYPES:
            raise ConfigError(f"unknown dtype {name!r}; choose {', '.join(DTYPE_CHOICES)}")
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if device.type != "cpu" or not cpu_native_bf16():
        return torch.float32
    return torch.bfloat16 if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else torch.float32


def resolve_device(name: str = "auto") -> torch.device:
    """The device for `name`: 'auto' (the first CUDA GPU where torch sees one, else the CPU),
    'cpu', 'cuda' or 'cuda:N', checked to exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; choose {DEVICE_HELP}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; choose {DEVICE_HELP}")
    seen = torch.cuda.device_count() if device.type == "cuda" and torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= seen:
        raise ConfigError(f"device {name!r}: torch sees {seen} CUDA GPU(s) here")
    return device


class HostInfo(BaseModel):
    """The machine a figure was measured on."""

    cpu: str  # model name as the OS reports it
    cores: int  # logical CPUs this process may use: its affinity, capped by a cgroup CPU quota
    torch_threads: int
    native_bf16: bool  # oneDNN's bf16 path (AVX512-BF16 or AMX) or a bf16 GPU
    isa: str  # torch's vector ISA for its own kernels (AVX2, AVX512, ...)
    torch: str
    gpu: str | None = None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":  # no /proc: platform names only "arm" or "i386" there
        try:
            found = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            if found:
                return found
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def host_info(device: str | torch.device = "cpu") -> HostInfo:
    """CPU model, cores, native bf16 and versions: recorded beside every measured figure."""
    device = torch.device(device)
    return HostInfo(
        cpu=_cpu_model(),
        cores=usable_cores(),
        torch_threads=torch.get_num_threads(),
        native_bf16=native_bf16(device),
        isa=torch.backends.cpu.get_cpu_capability(),
        torch=torch.__version__,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    )


def describe_host(info: HostInfo | None = None) -> str:
    """One line: 'AMD EPYC, 2 cores, AVX512, native bf16: yes, torch 2.13.0+cpu'."""
    info = info or host_info()
    gpu = f", GPU {info.gpu}" if info.gpu else ""
    return (
        f"{info.cpu}, {info.cores} cores, {info.isa}, native bf16: {'yes' if info.native_bf16 else 'no'}{gpu}, "
        f"torch {info.torch}"
    )
