"""The SDK inside a host application: threads sharing a base, the process-wide torch state a
fit must leave alone, and what a notebook user tries first (an auditor's findings)."""

from __future__ import annotations

import contextlib
import copy
import pickle
import threading
import time

import pytest
import torch
from fedprefix.client import Personalizer
from fedprefix.client import training as training_module
from fedprefix.common import base_model as base_model_module
from fedprefix.common.base_model import load_base
from fedprefix.common.errors import ConfigError, DataError
from fedprefix.simulations.personas import training_rows, user_dataset

KEY = bytes(range(32))
ROWS = training_rows(user_dataset(1, 24)["train"])
FAST = dict(progress=False, max_steps=4, batch_size=4, max_length=128, learning_rate=3e-2)


def personalizer(base, user: str = "alice", **kw) -> Personalizer:
    return Personalizer(base_model=base, user_id=user, num_virtual_tokens=4, **{**FAST, **kw})


@pytest.fixture
def sdpa_switches(monkeypatch):
    """Counts the fits' sdpa_kernel switches, and the most of them active at once."""
    seen = {"calls": 0, "active": 0, "most": 0}
    lock = threading.Lock()
    real = training_module.sdpa_kernel

    @contextlib.contextmanager
    def counting(backends):
        with lock:
            seen["calls"] += 1
            seen["active"] += 1
            seen["most"] = max(seen["most"], seen["active"])
        try:
            with real(backends):
                time.sleep(0.01)  # widens the window two threads could overlap in
                yield
        finally:
            with lock:
                seen["active"] -= 1

    monkeypatch.setattr(training_module, "sdpa_kernel", counting)
    return seen


def all_sdpa_backends_on() -> bool:
    cuda = torch.backends.cuda
    return cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled() and cuda.math_sdp_enabled()


def test_a_lean_fit_never_switches_the_process_wide_attention_kernels(tiny_llama, sdpa_switches):
    """Every CPU step had set the process-wide SDPA flags, which a host's own (GPU) models read."""
    personalizer(tiny_llama).fit(ROWS)
    assert sdpa_switches["calls"] == 0 and all_sdpa_backends_on()


def test_concurrent_fits_on_a_transformers_forward_leave_every_attention_kernel_on(sdpa_switches):
    """Two threads leaving sdpa_kernel out of order left the process on the math kernel alone."""
    gpt2 = load_base("tiny-gpt2")  # no lean forward: transformers' own, under the math kernel
    fits = [threading.Thread(target=personalizer(gpt2, user).fit, args=(ROWS,)) for user in ("ann", "bob")]
    for fit in fits:
        fit.start()
    for fit in fits:
        fit.join()
    assert sdpa_switches["calls"] > 0 and sdpa_switches["most"] == 1
    assert all_sdpa_backends_on()


def test_a_fit_does_not_reseed_torchs_global_generator_while_it_runs(tiny_llama):
    """A fit had seeded the global generator with its own seed: a host's draws in any thread
    during a fit repeated the fit's sequence each time (and on a GPU host every CUDA one too)."""
    torch.manual_seed(123)
    seeds = []
    personalizer(tiny_llama, seed=7).fit(ROWS, callback=lambda step: seeds.append(torch.initial_seed()))
    assert seeds and set(seeds) == {123}


def test_two_first_fits_at_once_make_one_copy_of_the_base(monkeypatch):
    base = load_base("tiny-llama")
    real = copy.deepcopy

    def slow_deepcopy(value, *args):
        time.sleep(0.2)  # both threads reach the copy before either has made it
        return real(value, *args)

    monkeypatch.setattr(base_model_module.copy, "deepcopy", slow_deepcopy)
    got = []
    threads = [threading.Thread(target=lambda: got.append(base.with_dtype(torch.bfloat16))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got[0] is got[1] and len(base._copies) == 1
    base.drop_copies()
    assert base._copies == {} and base.with_dtype(torch.bfloat16) is not got[0]


def test_two_users_fitting_in_two_threads_get_what_each_gets_alone(tiny_llama):
    alone = {}
    for user, seed in (("ann", 1), ("bob", 2)):
        p = personalizer(tiny_llama, user, seed=seed)
        p.fit(ROWS)
        alone[user] = p.key_values()
    together = {user: personalizer(tiny_llama, user, seed=seed) for user, seed in (("ann", 1), ("bob", 2))}
    fits = [threading.Thread(target=p.fit, args=(ROWS,)) for p in together.values()]
    for fit in fits:
        fit.start()
    for fit in fits:
        fit.join()
    for user, p in together.items():
        assert torch.equal(p.key_values(), alone[user])


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy, pickle.dumps])
def test_a_personalizer_is_not_pickled_or_copied_with_its_key(tiny_llama, copier):
    """A pickle held the raw key in the clear (and the whole base); a store's lock failed it."""
    p = Personalizer(tiny_llama, user_id="alice", key=KEY, num_virtual_tokens=4, progress=False)
    with pytest.raises(TypeError, match="holds its user's key"):
        copier(p)
    assert "alice" in repr(p) and KEY.hex() not in repr(p)


def test_a_loaded_transformers_model_is_refused_by_name(tiny_llama):
    """Its str() (the whole module tree) had become a path: 'File name too long'."""
    with pytest.raises(ConfigError, match="not a LlamaForCausalLM: save a loaded model"):
        Personalizer(tiny_llama.model)
    assert "model=" not in repr(tiny_llama)  # a handle's repr names it, not its whole module tree


@pytest.mark.parametrize(
    ("argument", "says"),
    [
        ({"do_sample": True}, "'do_sample': temperature > 0 samples"),
        ({"max_length": 9}, "'max_length': use max_new_tokens"),
        ({"temprature": 0.5}, r"'temprature' \(did you mean temperature\?\)"),
        ({"colour": 1}, "'colour'; settings: max_new_tokens"),
    ],
)
def test_generate_names_transformers_arguments_with_what_does_their_job(tiny_llama, argument, says):
    with pytest.raises(ConfigError, match=f"generate: unknown argument {says}"):
        personalizer(tiny_llama).generate("Hi", **argument)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"prompt": ["a", "b"], "completion": ["c", "d"]}, "a dict of columns"),
        ({"prompt": "a", "completion": "b"}, "a single row"),
        ({"messages": [{"role": "user", "content": "x"}]}, "a single row"),
    ],
)
def test_a_dict_given_as_data_is_told_apart(tiny_llama, data, says):
    """A dict of columns had been called 'a single row' and told to pass [row]."""
    with pytest.raises(DataError, match=says):
        personalizer(tiny_llama).fit(data)


def test_a_split_dict_asks_for_one_split(tiny_llama):
    class Split(list):
        column_names = ["prompt", "completion"]

    with pytest.raises(
        DataError, match=r"a dict of splits \(test, train\), a DatasetDict: pass one, e.g. data\['test'\]"
    ):
        personalizer(tiny_llama).fit({"train": Split(), "test": Split()})
