"""The compute-dtype rule: bfloat16 only where the hardware computes it natively and faster."""

import pytest
import torch
from fedprefix.client import Personalizer
from fedprefix.common import precision
from fedprefix.common.errors import ConfigError
from fedprefix.common.precision import describe_host, host_info, resolve_device, resolve_dtype


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with or without native bf16, and with a given bf16/fp32 speedup."""

    def pretend(native: bool, speedup: float = 4.0):
        monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup if native else 0.0)

    return pretend


def test_explicit_names_are_obeyed_and_bad_ones_refused(cpu):
    cpu(native=False)
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16  # asked for: obeyed even where slow
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'.*auto, float32, bfloat16"):
        resolve_dtype("fp8")
    with pytest.raises(ConfigError, match="unsupported compute dtype torch.float16"):
        resolve_dtype(torch.float16)


def test_auto_without_native_bf16_is_float32(cpu):
    cpu(native=False)
    assert resolve_dtype("auto") is torch.float32


def test_auto_with_native_bf16_follows_the_measurement(cpu):
    cpu(native=True, speedup=4.0)
    assert resolve_dtype("auto") is torch.bfloat16
    cpu(native=True, speedup=1.1)  # bf16 instructions that do not pay: stay in float32
    assert resolve_dtype("auto") is torch.float32


def test_probe_is_skipped_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: False)
    precision.cpu_bf16_speedup.cache_clear()
    try:
        assert precision.cpu_bf16_speedup() == 0.0
    finally:
        precision.cpu_bf16_speedup.cache_clear()


@pytest.mark.parametrize(("native", "expected"), [(False, "float32"), (True, "bfloat16")])
def test_training_runs_in_the_resolved_dtype_and_reports_it(cpu, tiny_llama, native, expected):
    cpu(native=native)
    p = Personalizer(base_model=tiny_llama, num_virtual_tokens=4, progress=False, max_steps=2, eval_fraction=0)
    report = p.fit([{"prompt": "Hi", "completion": "Hello there"}] * 4)
    assert report.dtype == expected
    assert all(param.dtype == torch.float32 for param in p.trainable_parameters()), "prefix stays float32"


def test_train_config_refuses_an_unknown_dtype(tiny_llama):
    with pytest.raises(ValueError, match="dtype"):
        Personalizer(base_model=tiny_llama, num_virtual_tokens=4, dtype="float16")


def test_host_info_names_the_machine():
    info = host_info()
    assert info.cores >= 1 and info.torch == torch.__version__ and info.cpu
    assert f"{info.cores} cores" in describe_host(info)


def test_the_probe_runs_on_one_thread_and_gives_the_callers_threads_back(monkeypatch):
    """One thread, timed by its own CPU time: what other processes take does not count."""
    threads, seen, real = torch.get_num_threads(), [], torch.nn.functional.linear

    def linear(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    times = precision._linear_seconds((torch.float32, torch.float32), reps=2)
    assert set(seen) == {1} and len(seen) == 6 and all(t > 0 for t in times)
    assert torch.get_num_threads() == threads


def test_the_device_is_a_gpu_only_where_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="torch sees 0 CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match="'cuda:1': torch sees 1 CUDA GPU"):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 0), torch.float32), ((7, 5), torch.float32), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_on_a_gpu_is_bfloat16_from_ampere_on(monkeypatch, capability, expected):
    # a V100 (7.0) or T4 (7.5) only emulates bf16, which torch.cuda.is_bf16_supported() counts
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert resolve_dtype("auto", "cuda:1") is expected
    assert asked == [torch.device("cuda:1")]  # the GPU asked about, not the current one
