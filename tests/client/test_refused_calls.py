"""SDK calls that are refused or fail change nothing: the prefix, its mode and the store stay as they were."""

from __future__ import annotations

import pytest
import torch
from fedprefix.client import Personalizer
from fedprefix.client.data import read_rows
from fedprefix.common.errors import ConfigError, DataError
from fedprefix.common.protocol import shared_store_id
from fedprefix.common.store import PrefixStore

KEY = bytes(range(32))
ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(8)]
FAST = dict(progress=False, max_steps=4, batch_size=4, max_length=64, learning_rate=3e-2)


def values(p: Personalizer) -> list[torch.Tensor]:
    return [t.detach().clone() for part in (p.shared, p.personal) if part is not None for t in part.parameters()]


def unchanged(p: Personalizer, before: list[torch.Tensor]) -> bool:
    after = [t for part in (p.shared, p.personal) if part is not None for t in part.parameters()]
    return len(after) == len(before) and all(
        torch.equal(a, b) and a.grad is None for a, b in zip(after, before, strict=True)
    )


def test_a_refused_fit_does_not_turn_the_shared_part_into_the_users_copy(tiny_llama, tmp_path):
    """personal_from_shared: the copy used to be made before the checks, so a refused fit
    switched the user over and the next save() removed the stored shared part."""
    store = PrefixStore(tmp_path / "store", scrypt_n=2**12)
    p = Personalizer(
        base_model=tiny_llama,
        user_id="bob",
        store=store,
        key=KEY,
        shared_virtual_tokens=4,
        num_virtual_tokens=4,
        personal_from_shared=True,
        **FAST,
    )
    p.save()
    for refused, error in (
        (lambda: p.fit([]), DataError),
        (lambda: p.fit(ROWS, max_step=3), ConfigError),
        (lambda: p.fit(ROWS, proximal_mu=float("nan")), ConfigError),  # refused inside training
    ):
        with pytest.raises(error):
            refused()
        assert not p.copy_replaces_shared and p.personal is None
    p.fit(ROWS, parts="shared")  # still allowed: the shared part is still the user's
    p.save()
    assert store.exists(shared_store_id("bob")) and not store.exists("bob")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, ValueError])
def test_a_fit_stopped_by_an_exception_leaves_the_prefix_as_it_was(tiny_llama, interrupt):
    p = Personalizer(base_model=tiny_llama, num_virtual_tokens=4, shared_virtual_tokens=2, **FAST)
    p.fit(ROWS)
    before = values(p)

    def stop_at_step_3(info):
        if info.step == 3:
            raise interrupt("stopped")

    with pytest.raises(interrupt):
        p.fit(ROWS, callback=stop_at_step_3)
    assert unchanged(p, before)
    with pytest.raises(ConfigError, match="callback must be a function"):
        p.fit(ROWS, callback=5)  # refused before any step, not after the first
    assert unchanged(p, before)


@pytest.mark.parametrize("mu", [float("inf"), float("nan"), -1.0, "1", True])
def test_proximal_mu_is_a_finite_number_at_least_zero(tiny_llama, mu):
    p = Personalizer(base_model=tiny_llama, num_virtual_tokens=4, shared_virtual_tokens=2, **FAST)
    before = values(p)
    with pytest.raises(ConfigError, match="proximal_mu must be a finite number >= 0"):
        p.fit(ROWS, proximal_mu=mu)
    assert unchanged(p, before)


def test_a_step_that_leaves_nan_in_the_prefix_stops_the_fit_without_a_held_out_set(tiny_llama):
    """A finite mu too large for float32: the step's update is NaN while its loss (taken before
    the update) is finite. Without a held-out set nothing restored a good state: fit returned,
    and generate and evaluate ran on NaN."""
    p = Personalizer(base_model=tiny_llama, num_virtual_tokens=4, shared_virtual_tokens=2, **FAST)
    before = values(p)
    with pytest.raises(DataError, match="training step 1 left NaN or Inf in the prefix"):
        p.fit(ROWS[:4], proximal_mu=1e39, eval_fraction=0.0)
    assert unchanged(p, before)


@pytest.mark.parametrize("prompt", [{"prompt": "hi"}, None, 5, b"hi"])
def test_generate_refuses_a_prompt_that_is_not_text(tiny_llama, prompt):
    p = Personalizer(base_model=tiny_llama, num_virtual_tokens=4, **FAST)
    with pytest.raises(ConfigError, match="prompt must be a string, a chat or a list of them"):
        p.generate(prompt, max_new_tokens=2)


def test_generate_checks_its_settings_as_they_are_used(tiny_llama):
    p = Personalizer(base_model=tiny_llama, num_virtual_tokens=4, **FAST)
    assert isinstance(p.generate("hi", max_new_tokens=2.0), str)  # 2.0 is read as 2, and checked as 2
    with pytest.raises(ConfigError, match="seed"):
        p.generate("hi", max_new_tokens=2, temperature=1.0, seed=2**64)  # past what torch's generators take
    assert p.generate("hi", max_new_tokens=2, temperature=1.0, seed=2**64 - 1) == p.generate(
        "hi", max_new_tokens=2, temperature=1.0, seed=2**64 - 1
    )


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"num_virtual_tokens": "4"}, "num_virtual_tokens must be a whole number >= 0, got '4'"),
        ({"num_virtual_tokens": 4.5}, "num_virtual_tokens must be a whole number"),
        ({"shared_virtual_tokens": -1}, "shared_virtual_tokens must be a whole number >= 0"),
        ({"prefix_projection": True, "encoder_hidden_size": -1}, "encoder_hidden_size must be a whole number >= 1"),
        ({"init": "bogus"}, "init must be 'text', 'random' or 'zero'"),
        ({"num_virtual_tokens": 0}, "at least one must be > 0"),
        # a flag's truthiness would read "no" as true
        ({"personal_from_shared": "no"}, "personal_from_shared must be True or False, got 'no'"),
        ({"prefix_projection": "false"}, "prefix_projection must be True or False, got 'false'"),
        ({"use_chat_template": 0}, "use_chat_template must be True or False, got 0"),
        ({"progress": "off"}, "progress must be True or False"),
    ],
)
def test_constructor_settings_are_refused_in_one_line(tiny_llama, setting, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Personalizer(base_model=tiny_llama, **{"num_virtual_tokens": 4, **FAST, **setting})


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "a", "completion": "   "},
        {"prompt": "a", "completion": "\n\t"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
    ],
)
def test_a_blank_completion_is_refused_as_blank_text_is(row):
    with pytest.raises(DataError, match=r"row 1: field '(completion|messages(\.\d+)?)': .*blank"):
        read_rows([{"prompt": "a", "completion": "b"}, row])


def test_a_part_the_prefix_lacks_is_refused_not_replaced_by_the_base_alone(tiny_llama, tmp_path):
    p = Personalizer(base_model=tiny_llama, num_virtual_tokens=4, **FAST)
    for call in (
        lambda: p.evaluate(ROWS, parts="shared"),
        lambda: p.generate("hi", max_new_tokens=2, parts="shared"),
        lambda: p.export_peft(tmp_path / "peft", parts="shared"),
    ):
        with pytest.raises(ConfigError, match="this prefix has no shared part"):
            call()
    assert p.evaluate(ROWS, parts="personal").tokens > 0  # the part it has still works


def test_settings_no_fit_could_run_and_a_store_that_is_no_store_are_refused_before_training(tiny_llama, tmp_path):
    p = Personalizer(base_model=tiny_llama, user_id="u1", init="zero", **FAST)
    before = values(p)
    for bad, field in (({"max_epochs": 1e308}, "max_epochs"), ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed")):
        with pytest.raises(ConfigError, match=field):  # not OverflowError from a step count or torch's seed
            p.fit(ROWS, **bad)
    assert unchanged(p, before)
    with pytest.raises(ConfigError, match="store must be a folder path or a PrefixStore, not int"):
        Personalizer(base_model=tiny_llama, user_id="u1", store=5, key=KEY)
    with pytest.raises(ConfigError, match="not NoneType"):
        Personalizer.load("u1", None, KEY, base_model=tiny_llama)


def test_flags_of_fit_and_evaluate_are_true_or_false(tiny_llama):
    personalizer = Personalizer(base_model=tiny_llama, **{"num_virtual_tokens": 4, **FAST})
    rows = [{"prompt": "a", "completion": "b"}] * 2
    with pytest.raises(ConfigError, match="progress must be True or False, got 'no'"):
        personalizer.fit(rows, progress="no")
    with pytest.raises(ConfigError, match="accuracy must be True or False, got 1"):
        personalizer.evaluate(rows, accuracy=1)


@pytest.mark.parametrize(
    ("init_text", "message"),
    [
        ("a\ud800", "init_text: not valid Unicode"),
        (None, "init_text must be a string, got NoneType"),
        (5, "init_text must be a string, got int"),
    ],
)
def test_an_init_text_no_tokenizer_reads_is_refused_by_name(tiny_llama, init_text, message):
    with pytest.raises(ConfigError, match=message):
        Personalizer(base_model=tiny_llama, init_text=init_text, **FAST)


@pytest.mark.parametrize(
    "setting", [{"max_steps": True}, {"learning_rate": True}, {"batch_size": "4"}, {"seed": False}]
)
def test_a_bool_or_text_for_a_number_is_refused_not_read_as_one(tiny_llama, setting):
    """pydantic's lax mode read max_steps=True as 1 step and "4" as 4; numpy's numbers still pass."""
    import numpy as np

    with pytest.raises(ConfigError, match=f"{next(iter(setting))}: .*must be a number"):
        Personalizer(base_model=tiny_llama, **{**FAST, **setting})
    p = Personalizer(base_model=tiny_llama, num_virtual_tokens=4, **{**FAST, "max_steps": np.int64(2)})
    before = values(p)
    with pytest.raises(ConfigError, match="must be a number"):
        p.fit(ROWS, **setting)
    assert unchanged(p, before)
    for params in ({"max_new_tokens": True}, {"max_new_tokens": "3"}, {"temperature": float("nan")}):
        with pytest.raises(ConfigError, match="generate: (max_new_tokens|temperature): "):
            p.generate("hello", **params)
    assert p.fit(ROWS).steps == 2
