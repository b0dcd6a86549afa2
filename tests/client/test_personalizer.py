"""Personalizer: fit / evaluate / generate / save / load / export on tiny models."""

from __future__ import annotations

import os
import re

import pytest
import torch
from fedprefix.client import Personalizer
from fedprefix.common.base_model import load_base
from fedprefix.common.errors import ConfigError, DataError, FingerprintMismatchError
from fedprefix.common.peft_format import import_peft
from fedprefix.common.protocol import shared_store_id
from fedprefix.common.store import PrefixStore, StoreError
from fedprefix.simulations.personas import training_rows, user_dataset

KEY = bytes(range(32))
ROWS = training_rows(user_dataset(1, 24)["train"])
FAST = dict(progress=False, max_steps=6, batch_size=4, max_length=128, learning_rate=3e-2)


def personalizer(base, **kw) -> Personalizer:
    return Personalizer(base_model=base, user_id="alice", num_virtual_tokens=4, **{**FAST, **kw})


@pytest.fixture
def store(tmp_path):
    return PrefixStore(tmp_path / "store", scrypt_n=2**12)


def test_fit_lowers_loss_and_reports(tiny_llama):
    p = personalizer(tiny_llama, max_steps=20, eval_fraction=0.2)
    before = p.evaluate(ROWS).loss
    report = p.fit(ROWS)
    assert report.steps == 20 and report.stop_reason == "max_steps"
    assert len(report.train_loss) == 20 and report.eval_loss[0].step == 0
    assert report.num_train_examples + report.num_eval_examples == len(ROWS)
    assert report.examples_per_second > 0
    after = p.evaluate(ROWS)
    assert after.loss < before and after.perplexity == pytest.approx(torch.tensor(after.loss).exp().item())


def test_a_fit_leaves_the_callers_torch_generator_as_it_was(tiny_base):
    """train() seeded torch's global generator: after a fit, the caller's torch.rand sequence
    had restarted from the fit's seed (an auditor's finding)."""
    fitted = personalizer(tiny_base, seed=3)  # made first: building torch modules draws from it, as anywhere
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    fitted.fit(ROWS)
    assert torch.equal(torch.rand(3), expected)


def test_same_seed_same_prefix(tiny_base):
    a, b = personalizer(tiny_base, seed=3), personalizer(tiny_base, seed=3)
    a.fit(ROWS)
    b.fit(ROWS)
    assert torch.equal(a.key_values(), b.key_values())


def test_base_weights_unchanged_by_fit(tiny_llama):
    twin = tiny_llama.with_dtype(torch.bfloat16)  # what bf16 training runs against
    before = [{k: v.clone() for k, v in m.model.state_dict().items()} for m in (tiny_llama, twin)]
    personalizer(tiny_llama, shared_virtual_tokens=2).fit(ROWS)
    for handle, state in zip((tiny_llama, twin), before, strict=True):
        assert all(torch.equal(state[k], v) for k, v in handle.model.state_dict().items())
    assert twin is tiny_llama.with_dtype(torch.bfloat16), "the bf16 copy is made once"


def test_budget_callback_and_early_stopping(tiny_llama):
    seen = []
    report = personalizer(tiny_llama, max_steps=50).fit(ROWS, callback=lambda info: seen.append(info.step) or None)
    assert seen == list(range(1, 51))
    report = personalizer(tiny_llama, max_steps=50).fit(ROWS, callback=lambda info: info.step < 3)
    assert report.steps == 3 and report.stop_reason == "callback"
    report = personalizer(tiny_llama, max_steps=500).fit(ROWS, max_seconds=0.2)
    assert report.stop_reason == "max_seconds" and report.steps < 500
    # lr 0 never improves the held-out loss: patience 1 stops at the first evaluation
    report = personalizer(tiny_llama, max_steps=50).fit(
        ROWS, learning_rate=1e-12, eval_every=2, patience=1, eval_fraction=0.25
    )
    assert report.stop_reason == "early_stopping" and report.steps == 2


def test_shared_part_can_be_frozen(tiny_llama):
    p = personalizer(tiny_llama, shared_virtual_tokens=3, train_shared=False)
    shared_before = p.shared.key_values().detach().clone()
    p.fit(ROWS)
    assert torch.equal(p.shared.key_values(), shared_before)
    assert p.key_values().shape[3] == 7


def test_fit_can_train_one_part_only(tiny_llama):
    """parts='personal' keeps the shared part as it is (a federated personal-only round) and
    parts='shared' the personal one; either way the part left alone gets no gradient."""
    p = personalizer(tiny_llama, shared_virtual_tokens=3)
    for trained, kept in (("personal", "shared"), ("shared", "personal")):
        before = {n: getattr(p, n).key_values().detach().clone() for n in ("shared", "personal")}
        p.fit(ROWS, parts=trained)
        assert torch.equal(getattr(p, kept).key_values(), before[kept]), trained
        assert not torch.equal(getattr(p, trained).key_values(), before[trained]), trained
        assert all(q.grad is None for q in getattr(p, kept).parameters()), trained
        assert all(q.requires_grad for q in getattr(p, kept).parameters()), "frozen only during the call"
    with pytest.raises(ConfigError, match="parts to train must be"):
        p.fit(ROWS, parts="both")
    shared_only = Personalizer(base_model=tiny_llama, num_virtual_tokens=0, shared_virtual_tokens=3, **FAST)
    with pytest.raises(ConfigError, match="no personal prefix part to train"):
        shared_only.fit(ROWS, parts="personal")


def test_a_personal_copy_of_the_shared_part_replaces_it(tiny_llama, store):
    """personal_from_shared: the row is the shared part until a fit trains the personal part; that
    fit starts from an exact copy of the shared part, leaves the shared part alone, and from then
    on the copy alone is the user's prefix, in memory and in the store (no shared part to join)."""
    p = personalizer(tiny_llama, store=store, key=KEY, shared_virtual_tokens=4, personal_from_shared=True)
    assert p.personal is None and torch.equal(p.key_values(), p.shared.key_values())
    p.save()  # before the copy: the shared part is what is stored
    assert store.exists(shared_store_id("alice")) and not store.exists("alice")
    shared_before = p.shared.key_values().detach().clone()
    started = []
    p.fit(ROWS, callback=lambda info: started.append(p.personal.key_values().detach().clone()))
    assert torch.allclose(started[0], shared_before, atol=0.05)  # one step from the copy (a text start is 0.6 away)
    assert torch.equal(p.shared.key_values(), shared_before)
    assert torch.equal(p.key_values(), p.personal.key_values()) and p.key_values().shape[3] == 4
    with pytest.raises(ConfigError, match="replaced the shared one"):
        p.fit(ROWS, parts="shared")
    p.save()
    assert store.exists("alice") and not store.exists(shared_store_id("alice"))
    loaded = Personalizer.load(user_id="alice", store=store, key=KEY, base_model=tiny_llama, **FAST)
    assert torch.equal(loaded.key_values(), p.key_values())
    with pytest.raises(ConfigError, match="personal_from_shared=True copies the shared part"):
        personalizer(tiny_llama, personal_from_shared=True)  # no shared part to copy


def test_next_token_accuracy_counts_the_tokens_ranked_first(tiny_llama):
    """evaluate's accuracy is the share of completion tokens whose argmax is the true token
    (checked against the plain transformers forward, base alone), and asking for it leaves
    the loss as it was."""
    p = personalizer(tiny_llama)
    rows = ROWS[:5]
    report = p.evaluate(rows, parts="none")
    assert report.loss == pytest.approx(p.evaluate(rows, parts="none", accuracy=False).loss, rel=1e-4)
    hits = tokens = 0
    with torch.no_grad():
        for ex in p.prepare(rows):  # one row at a time, no padding
            ids = torch.tensor([ex.prompt + ex.completion])
            predicted = tiny_llama.model(ids).logits[0, len(ex.prompt) - 1 : -1].argmax(-1)
            hits += int((predicted == torch.tensor(ex.completion)).sum())
            tokens += len(ex.completion)
    assert report.tokens == tokens and report.accuracy == pytest.approx(hits / tokens)
    assert p.evaluate(rows, accuracy=False).accuracy is None  # not computed unless asked for


def test_generate_single_and_batched(tiny_base):
    p = personalizer(tiny_base)
    single = p.generate("Describe", max_new_tokens=5)
    batch = p.generate(["Describe", "another prompt"], max_new_tokens=5)
    assert isinstance(single, str) and batch[0] == single and len(batch) == 2
    sampled = p.generate("Describe", max_new_tokens=5, temperature=1.0, top_p=0.9, seed=1)
    assert sampled == p.generate("Describe", max_new_tokens=5, temperature=1.0, top_p=0.9, seed=1)
    with pytest.raises(ConfigError, match="at least one prompt"):
        p.generate([])
    with pytest.raises(ConfigError, match="prompt 1: not valid Unicode"):
        p.generate(["fine", "lone \ud800 surrogate"])
    with pytest.raises(ConfigError, match="prompt 0: expected a string or a chat"):
        p.generate([7])


def test_generate_answers_chats(tiny_llama):
    """A chat (OpenAI's messages) is answered as the next assistant turn, alone or in a batch
    beside plain prompts; a one-turn chat is what a plain prompt becomes on a chat base."""
    p = personalizer(tiny_llama, use_chat_template=False)  # chats still go through the template
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe"}]
    answer = p.generate(chat, max_new_tokens=5)
    assert isinstance(answer, str)
    assert p.generate([chat, "Describe", chat[1:]], max_new_tokens=5)[::2] == [
        answer,
        p.generate(chat[1:], max_new_tokens=5),
    ]
    templated = personalizer(tiny_llama)
    assert templated.generate(chat[1:], max_new_tokens=5) == templated.generate("Describe", max_new_tokens=5)
    with pytest.raises(ConfigError, match="prompt 1: message 0.role: Input should be 'system', 'user' or 'assistant'"):
        p.generate(["fine", [{"role": "bot", "content": "hi"}]])
    with pytest.raises(ConfigError, match="prompt 0: message 1.content: not valid Unicode"):
        p.generate([{"role": "user", "content": "ok"}, {"role": "user", "content": "\ud800"}])


def test_save_load_resume(tiny_llama, store):
    p = personalizer(tiny_llama, store=store, key=KEY, shared_virtual_tokens=2)
    p.fit(ROWS)
    p.save()
    assert store.exists("alice") and store.exists(shared_store_id("alice"))
    loaded = Personalizer.load(user_id="alice", store=store, key=KEY, base_model=tiny_llama, **FAST)
    assert torch.equal(loaded.key_values(), p.key_values())
    assert loaded.generate("Describe", max_new_tokens=6) == p.generate("Describe", max_new_tokens=6)
    before = loaded.evaluate(ROWS).loss
    loaded.fit(ROWS, max_steps=10)  # resumes from the stored prefix
    assert loaded.evaluate(ROWS).loss < before


def test_a_save_without_a_stored_part_is_refused_unless_it_drops_that_part(tiny_llama, store):
    """A stored shared part was re-sealed beside the personal part of a Personalizer built without
    one: every later load put it in front of a prefix trained without it."""
    two_part = personalizer(tiny_llama, store=store, key=KEY, shared_virtual_tokens=2)
    two_part.save()
    before = {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()}
    alone = personalizer(tiny_llama, store=store, key=KEY)
    alone.fit(ROWS)
    with pytest.raises(ConfigError, match="the store holds a shared part this Personalizer does not have"):
        alone.save()
    assert {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()} == before  # nothing changed
    alone.save(drop_other_parts=True)
    assert store.stored_parts("alice") == ["personal"]
    loaded = Personalizer.load(user_id="alice", store=store, key=KEY, base_model=tiny_llama, **FAST)
    assert torch.equal(loaded.key_values(), alone.key_values())


def test_wrong_key_and_other_base_are_refused(tiny_llama, store):
    p = personalizer(tiny_llama, store=store, key=KEY)
    p.save()
    stored = store.path_for("alice").read_bytes()
    with pytest.raises(StoreError, match="wrong key"):
        Personalizer.load(user_id="alice", store=store, key=bytes(32), base_model=tiny_llama)
    with pytest.raises(FingerprintMismatchError):
        Personalizer.load(user_id="alice", store=store, key=KEY, base_model=load_base("tiny-llama", seed=9))
    assert store.path_for("alice").read_bytes() == stored, "a refused load must not touch the file"


def test_a_key_that_does_not_open_the_users_stored_prefix_is_refused_before_training(tiny_llama, store):
    """A second run of the README's example, its key file moved away but not its store: the new
    key was taken, and save() refused it only after the whole fit (4 minutes)."""
    personalizer(tiny_llama, store=store, key=KEY).save()
    stored = store.path_for("alice").read_bytes()
    with pytest.raises(
        StoreError, match=r"holds a prefix of 'alice' that this key does not open \(wrong key.*: load it with its key"
    ):
        personalizer(tiny_llama, store=store, key=bytes(32))
    assert store.path_for("alice").read_bytes() == stored
    personalizer(tiny_llama, store=store, key=KEY).save()  # its own key: a new prefix replaces it, as before
    Personalizer(base_model=tiny_llama, user_id="bob", store=store, key=bytes(32), **FAST).save()  # another user


def test_bad_keys_and_missing_store(tiny_llama, store):
    with pytest.raises(StoreError, match="32"):
        personalizer(tiny_llama, store=store, key=b"short").save()
    with pytest.raises(ConfigError, match="no store and key"):
        personalizer(tiny_llama).save()


@pytest.mark.parametrize("user_id", ["a b", "a[b]", "", ".hidden", "bob@shared", 7])
def test_a_user_id_no_store_accepts_is_refused_before_training(tiny_llama, user_id):
    with pytest.raises(StoreError, match="invalid user id"):  # with or without a store: not after fit
        Personalizer(base_model=tiny_llama, user_id=user_id, num_virtual_tokens=4, progress=False)


def test_bad_data_leaves_the_prefix_alone(tiny_llama):
    p = personalizer(tiny_llama)
    before = p.key_values().detach().clone()
    for bad in ([], [{"prompt": "only a prompt"}]):
        with pytest.raises(DataError):
            p.fit(bad)
    assert torch.equal(p.key_values(), before)


def test_export_peft_round_trip(tiny_llama, tmp_path):
    p = personalizer(tiny_llama, shared_virtual_tokens=2)
    folder = p.export_peft(tmp_path / "adapter")
    assert torch.equal(import_peft(folder, tiny_llama).key_values(), p.key_values())


def test_jsonl_path_and_chat_rows(tiny_llama, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(os.linesep.join(['{"prompt": "a", "completion": "b"}'] * 4))
    assert personalizer(tiny_llama).fit(path).steps == 6
    chat = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 4
    assert personalizer(tiny_llama).fit(chat).steps == 6


@pytest.mark.parametrize("setting", [{"weight_decay": float("inf")}, {"learning_rate": float("nan")}])
def test_non_finite_settings_are_refused_and_nothing_trains(tiny_llama, setting):
    p = Personalizer(base_model=tiny_llama, num_virtual_tokens=4, progress=False)
    before = p.personal.flat().detach().clone()
    with pytest.raises(ValueError, match="finite number"):
        p.fit([{"prompt": "a", "completion": "b"}] * 4, eval_fraction=0.0, **setting)
    assert torch.equal(p.personal.flat(), before)


def test_a_non_finite_prefix_is_never_saved(tiny_llama, tmp_path):
    store = PrefixStore(tmp_path / "store")
    p = Personalizer(base_model=tiny_llama, user_id="eve", store=store, key=b"\x07" * 32, num_virtual_tokens=4)
    with torch.no_grad():
        next(iter(p.personal.parameters())).fill_(float("nan"))
    with pytest.raises(ConfigError, match="NaN or Inf; nothing was saved"):
        p.save()
    assert not store.exists("eve")


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_prefix(tiny_llama, monkeypatch):
    from fedprefix.client import training

    p = Personalizer(base_model=tiny_llama, num_virtual_tokens=4, progress=False)
    before = p.personal.flat().detach().clone()
    real_step, calls = training.train_step, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(training, "train_step", poisoned)
    with pytest.raises(DataError, match="training step 2: the loss is nan"):
        p.fit([{"prompt": "a", "completion": "b"}] * 4, eval_fraction=0.0, max_steps=5)
    assert torch.equal(p.personal.flat(), before)


def test_every_fit_warms_up_over_several_steps():
    """A fresh AdamW's first steps move every value by about the learning rate: never at full rate."""
    from fedprefix.client.training import warmup_cosine
    from fedprefix.common.config import TrainConfig

    for steps in (4, 10, 20, 60):
        factor = warmup_cosine(TrainConfig(max_steps=steps))
        ramp = [factor(step) for step in range(steps)]
        assert ramp[0] <= 0.5 and max(ramp) == 1.0, (steps, ramp[:6])
    assert warmup_cosine(TrainConfig(max_steps=10))(0) == 0.2  # 5 warm-up steps of 10


def test_settings_are_checked_alike_in_the_constructor_and_in_fit_one_line_each(tiny_llama):
    rows = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(10)]
    for settings, message in (
        ({"learning_rate": float("nan")}, "setting learning_rate: "),
        ({"max_steps": 0}, "setting max_steps: "),
        ({"max_step": 1}, "unknown setting 'max_step' (did you mean max_steps?)"),
        ({"learning_rat": 5.0}, "unknown setting 'learning_rat' (did you mean learning_rate?)"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)) as caught:
            personalizer(tiny_llama, **settings)
        assert "\n" not in str(caught.value)
        p = personalizer(tiny_llama, max_steps=2)
        with pytest.raises(ConfigError, match=re.escape(message)):
            p.fit(rows, **settings)  # a typo in fit is refused too, never silently ignored
    p = personalizer(tiny_llama, max_steps=3)
    with pytest.raises(ConfigError, match="setting max_steps: must be a number, got str '1'"):
        p.fit(rows, max_steps="1")  # as num_virtual_tokens="4" is: lax validation read it as 1
    assert p.fit(rows, max_steps=1.0).steps == 1  # what validation accepts is what trains
    assert p.fit(rows, eval_fraction=0.95, max_steps=1).steps == 1  # at least one row is left to train on


def test_generate_and_evaluate_refuse_bad_settings_and_take_one_stop_string(tiny_llama):
    p = personalizer(tiny_llama)
    full = p.generate("Describe", max_new_tokens=12)
    assert p.generate("Describe", max_new_tokens=12, stop=full[-3:]) == p.generate(
        "Describe", max_new_tokens=12, stop=[full[-3:]]
    )
    for settings in ({"max_new_tokens": 0}, {"temperature": float("nan")}, {"top_p": 0}):
        with pytest.raises(ConfigError, match="generate: "):
            p.generate("Describe", **settings)
    for batch_size in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="batch_size must be a whole number >= 1"):
            p.evaluate([{"prompt": "Q", "completion": "A"}], batch_size=batch_size)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_prefix_prompt_and_new_tokens_past_the_context_are_refused_not_an_index_error(name):
    base = load_base(name)  # both have 512 positions
    with pytest.raises(ConfigError, match="exceed the base's context of 512 tokens"):
        Personalizer(base_model=base, num_virtual_tokens=400, max_length=256, progress=False)
    p = Personalizer(base_model=base, num_virtual_tokens=8, max_length=128, progress=False, max_steps=1)
    with pytest.raises(ConfigError, match="max_length 510 exceed"):
        p.fit([{"prompt": "Q", "completion": "A"}], max_length=510)
    with pytest.raises(ConfigError, match="prompt 1: .* max_new_tokens 400 exceed"):
        p.generate(["short", "word " * 30], max_new_tokens=400)
    assert isinstance(p.generate("short", max_new_tokens=4), str)


def test_a_bad_key_or_a_store_path_that_is_a_file_is_refused_before_training(tiny_llama, tmp_path):
    from fedprefix.common.store import BadKeyError

    for key in (b"short", "", 42):
        with pytest.raises(BadKeyError):
            personalizer(tiny_llama, store=tmp_path / "store", key=key)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StoreError, match="is not a folder"):
        personalizer(tiny_llama, store=afile, key=KEY)
    (tmp_path / "rows.jsonl").mkdir()
    with pytest.raises(DataError, match="rows.jsonl is not a regular file"):
        personalizer(tiny_llama).fit(tmp_path / "rows.jsonl")  # a folder where a data file was meant
    typo = tmp_path / "stroe"
    with pytest.raises(StoreError, match="no store folder at"):
        Personalizer.load(user_id="alice", store=typo, key=KEY, base_model=tiny_llama)
    assert not typo.exists(), "loading must not create a store"


def test_restore_warns_when_a_configured_part_is_not_stored(tiny_llama, store, caplog):
    """The store cannot tell a deleted shared part from one never saved: a two-part Personalizer
    restoring a personal-only user keeps its new shared part beside it (serving would use the
    stored part alone), and says so; a personal copy that replaced the shared part does not."""
    personalizer(tiny_llama, store=store, key=KEY).save()  # personal only
    two_part = personalizer(tiny_llama, store=store, key=KEY, shared_virtual_tokens=2)
    with caplog.at_level("WARNING"):
        assert two_part.restore()
    assert "holds no shared part" in caplog.text
    caplog.clear()
    copy = personalizer(tiny_llama, store=store, key=KEY, shared_virtual_tokens=4, personal_from_shared=True)
    copy.fit(ROWS)
    copy.save()
    with caplog.at_level("WARNING"):
        assert personalizer(
            tiny_llama, store=store, key=KEY, shared_virtual_tokens=4, personal_from_shared=True
        ).restore()
    assert "holds no" not in caplog.text


def test_loading_on_another_base_says_which_base_to_pass(tiny_llama, store):
    from fedprefix.common.base_model import load_base
    from fedprefix.common.store import WrongBaseError

    personalizer(tiny_llama, store=store, key=KEY).save()
    with pytest.raises(WrongBaseError, match="pass base_model= the base it was trained on .*'tiny-qwen2'"):
        Personalizer.load(user_id="alice", store=store, key=KEY, base_model=load_base("tiny-qwen2"), **FAST)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_base_on_a_gpu_trains_saves_and_generates(store):
    # the prefix modules stay on the CPU (small); a text-initialized MLP prefix's anchor must too
    base = load_base("tiny-llama", device="cuda")
    p = personalizer(base, store=store, key=KEY, shared_virtual_tokens=2, prefix_projection=True)
    before = p.evaluate(ROWS).loss
    p.fit(ROWS, max_steps=10)
    assert p.evaluate(ROWS).loss < before
    p.save()
    on_cpu = Personalizer.load(user_id="alice", store=store, key=KEY, base_model=load_base("tiny-llama"), **FAST)
    torch.testing.assert_close(on_cpu.key_values(), p.key_values().cpu())
    assert isinstance(p.generate("Describe", max_new_tokens=4), str)


def test_progress_off_a_terminal_is_plain_lines_as_it_trains(tiny_llama, capsys):
    """Under nohup or CI a rich bar printed only its last line, after the whole fit."""
    p = personalizer(tiny_llama, progress=True, max_steps=20, eval_fraction=0.2, eval_every=5)
    p.fit(ROWS)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("personalizing alice") and lines[0].endswith("up to 20 steps")
    steps = [line for line in lines if ": step " in line]
    assert [int(line.split("step ")[1].split("/")[0]) for line in steps] == [2, 4, 5, 6, 8, 10, 12, 14, 15, 16, 18, 20]
    assert "held-out" in steps[2] and "\x1b" not in "".join(lines)  # no ANSI codes in a file
    p.fit(ROWS, callback=lambda info: info.step < 7)  # stopped early: its last line says where
    assert capsys.readouterr().out.splitlines()[-1].split(", loss")[0].endswith("step 7/20")


def test_progress_shows_before_the_first_held_out_loss_which_a_few_rows_give(tiny_llama, capsys, monkeypatch):
    """10% of 50,000 rows were scored for the held-out loss at step 0 (over three minutes on 2
    cores), before anything was shown; now it is shown first, and at most max_eval_rows are held out."""
    from fedprefix.client import training

    real = training.evaluate_examples

    def scored(base, kv, examples, *args, **kwargs):
        print(f"scoring {len(examples)}")
        return real(base, kv, examples, *args, **kwargs)

    monkeypatch.setattr(training, "evaluate_examples", scored)
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(60)]
    report = personalizer(tiny_llama, progress=True, max_steps=2, eval_fraction=0.5, max_eval_rows=7).fit(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("up to 2 steps") and lines[1] == "scoring 7", lines
    assert report.num_eval_examples == 7 and report.num_train_examples == 53
