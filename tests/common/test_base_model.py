"""Base model loading: registry, tiny builds, local folders, fingerprints, errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from fedprefix.common import base_checks, base_model, base_registry
from fedprefix.common.base_model import load_base
from fedprefix.common.base_registry import REGISTRY
from fedprefix.common.errors import ConfigError, UnsupportedModelError


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-qwen2"])
def test_tiny_models_are_fast_deterministic_and_frozen(name):
    started = time.perf_counter()
    a = load_base(name)
    assert time.perf_counter() - started < 5  # well under a second on a quiet machine
    b = load_base(name)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert all(not p.requires_grad for p in a.model.parameters())
    assert not a.model.training
    assert load_base(name, seed=1).fingerprint != a.fingerprint


def test_tiny_llama_has_grouped_query_attention(tiny_llama):
    spec = tiny_llama.prefix_spec(4)
    assert spec.num_kv_heads < tiny_llama.model.config.num_attention_heads


def test_tokenizer_is_offline_and_round_trips(tiny_llama):
    tok = tiny_llama.tokenizer
    text = "Grüße, café! 123"
    assert tok.decode(tok(text).input_ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_local_folder_loads_with_stable_fingerprint(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    loaded = load_base(tmp_path)
    assert loaded.fingerprint == load_base(str(tmp_path)).fingerprint
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, tiny_llama.model(ids).logits)


def test_changed_weights_change_folder_fingerprint(tmp_path, tiny_llama):
    first, second = tmp_path / "a", tmp_path / "b"
    tiny_llama.model.save_pretrained(first)
    tiny_llama.tokenizer.save_pretrained(first)
    other = load_base("tiny-llama", seed=5)
    other.model.save_pretrained(second)
    other.tokenizer.save_pretrained(second)
    assert load_base(first).fingerprint != load_base(second).fingerprint


def test_parameter_count_reads_headers_not_weights(tmp_path, tiny_llama):
    """What a simulation sizes its nodes by: exact from the weight files load_base reads, an
    estimate from the bytes of a damaged one, never an error for a folder that loads."""
    count = tiny_llama.num_parameters()
    assert base_checks.parameter_count("tiny-llama") == count
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "optimizer.pt").write_bytes(b"\0" * 10_000_000)  # a trainer's file, not weights
    assert base_checks.parameter_count(tmp_path) == count  # tied embeddings are stored once
    weights = tmp_path / "model.safetensors"
    weights.rename(tmp_path / "saved.safetensors.old")
    torch.save(tiny_llama.model.state_dict(), tmp_path / "pytorch_model.bin")  # float32, as most .bin files
    assert base_checks.parameter_count(tmp_path) == sum(t.numel() for t in tiny_llama.model.state_dict().values())
    size = (tmp_path / "pytorch_model.bin").stat().st_size
    (tmp_path / "pytorch_model.bin").write_bytes(b"\xff" * size)  # damaged
    assert base_checks.parameter_count(tmp_path) == size // 2
    with pytest.raises(ConfigError, match="does not exist"):
        base_checks.parameter_count(tmp_path / "missing")


def test_unknown_name_lists_the_registry():
    with pytest.raises(ConfigError, match="registry names: smollm2-135m-instruct, tiny-gpt2"):
        load_base("no-such-model")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_base(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="has no config.json"):
        load_base(tmp_path)
    (tmp_path / "weights.txt").write_text("a file")
    with pytest.raises(ConfigError, match="is a file; give a model folder"):
        load_base(str(tmp_path / "weights.txt"))


def test_a_folder_check_reads_its_config_and_tokenizer_as_each_node_would(tmp_path, tiny_llama):
    """check_base (before a run starts Flower and Ray) passed a folder whose config.json was {}:
    the run then failed on every node, its reason only in a log."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"^base model folder {tmp_path} cannot be loaded: Unrecognized model"):
        base_checks.check_base(tmp_path)
    good = tmp_path / "good"
    tiny_llama.model.save_pretrained(good)
    tiny_llama.tokenizer.save_pretrained(good)
    base_checks.check_base(good)
    (good / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        base_checks.check_base(good)


def test_unsupported_architecture_in_folder(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gptj", n_layer=1, n_head=2, n_embd=16, vocab_size=300, rotary_dim=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    base_model.byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'gptj' is not supported"):
        load_base(tmp_path)


def test_registry_lists_builtin_default():
    assert base_model.DEFAULT_BASE in REGISTRY and not REGISTRY[base_model.DEFAULT_BASE].builtin
    with pytest.raises(ConfigError, match="needs no fetch"):
        base_registry.fetch("tiny-gpt2")


@pytest.mark.slow
def test_builtin_smollm2_answers_paris():
    from fedprefix.common.generation import SamplingParams, generate

    base = load_base("smollm2-135m-instruct")
    spec = base.prefix_spec(16)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (30, 3, 64)
    from fedprefix.common.chat import format_prompt

    text = format_prompt(base.tokenizer, "What is the capital of France?")
    prompt = base.tokenizer(text, add_special_tokens=False).input_ids
    (answer,) = generate(base.model, base.tokenizer, [prompt], [None], SamplingParams(max_new_tokens=12))
    assert "Paris" in answer


def test_load_base_takes_dtype_names_as_everywhere_else():
    import torch
    from fedprefix.common.base_model import load_base
    from fedprefix.common.errors import ConfigError

    assert load_base("tiny-llama", dtype="bfloat16").dtype == torch.bfloat16
    assert load_base("tiny-llama", dtype="float32").dtype == torch.float32
    with pytest.raises(ConfigError, match="unknown dtype 'float16'; choose auto, float32, bfloat16"):
        load_base("tiny-llama", dtype="float16")


def test_the_cache_is_the_checkouts_own_unless_chosen_or_installed(tmp_path, monkeypatch):
    """Run from this checkout, the SDK finds the base `make demo` fetched into .cache/fedprefix."""
    from pathlib import Path

    checkout = Path(__file__).resolve().parents[2]
    if Path(base_registry.__file__).resolve().parents[1] != checkout:
        pytest.skip("fedprefix is installed from a wheel here, not run from this checkout")
    monkeypatch.delenv("FEDPREFIX_CACHE", raising=False)
    assert base_registry.cache_dir() == checkout / ".cache" / "fedprefix"
    monkeypatch.setenv("FEDPREFIX_CACHE", str(tmp_path / "mine"))
    assert base_registry.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("FEDPREFIX_CACHE")
    installed = tmp_path / "site-packages" / "fedprefix" / "common" / "base_registry.py"  # a wheel's layout
    installed.parent.mkdir(parents=True)
    installed.touch()
    monkeypatch.setattr(base_registry, "__file__", str(installed))
    assert base_registry.cache_dir() == Path.home() / ".cache" / "fedprefix"


def test_a_damaged_or_unwritable_fingerprint_cache_never_becomes_a_fingerprint(tmp_path, tiny_llama, monkeypatch):
    """A corrupt cached fingerprint was taken as the base's (and recorded by every prefix); a
    cache folder that cannot be written failed the load of a base already there."""
    folder = tmp_path / "model"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    monkeypatch.setenv("FEDPREFIX_CACHE", str(tmp_path / "cache"))
    true = load_base(folder).fingerprint
    (cached,) = (tmp_path / "cache" / "fingerprints").iterdir()
    for damage in (b"garbage", b"", b"\xff\x00", b"A" * 64):
        cached.write_bytes(damage)
        assert load_base(folder).fingerprint == true
    assert cached.read_text() == true  # written again
    monkeypatch.setenv("FEDPREFIX_CACHE", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("not a folder")
    assert load_base(folder).fingerprint == true  # not cached, not refused


def test_a_folder_transformers_cannot_read_is_one_config_error_naming_it(tmp_path, tiny_llama):
    folder = tmp_path / "model"
    tiny_llama.model.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00")  # truncated
    tiny_llama.tokenizer.save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"base model folder .*model cannot be loaded \("):
        load_base(folder)
    for name, message in (("", "the base model's name is empty"), ("  ", "empty"), ("~no-such-user-x/m", "~no-such")):
        with pytest.raises(ConfigError, match=message):
            load_base(name)


def test_a_converted_base_is_readable_as_the_umask_allows(tmp_path):
    """mkdtemp made the converted folder 0700 (files 0600): only whoever fetched could load it."""
    import os
    import stat
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / "sub").mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    os.chmod(folder / "model.safetensors", 0o600)
    previous = os.umask(0o022)
    try:
        base_registry._readable_as_umask_allows(folder)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755 and stat.S_IMODE((folder / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "model.safetensors").stat().st_mode) == 0o644
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "sub"]


@pytest.mark.parametrize("layers", [3, 1])
def test_a_config_unlike_its_weights_is_refused_not_run_with_random_layers(tmp_path, tiny_llama, layers):
    """transformers builds what config.json says and only prints a report: with a layer more than
    the weights hold that layer ran at random; with one fewer, the last layer's weights were unread."""
    import json

    folder = tmp_path / "model"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (folder / "config.json").write_text(json.dumps(config))
    what = "missing from its files, such as model.layers.2."
    if layers == 1:
        what = "of layers it does not have, such as model.layers.1."
    with pytest.raises(ConfigError, match=rf"weights do not match its config.json \(\d+ weights? {what}"):
        load_base(folder)
    config["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    assert load_base(folder).fingerprint  # as saved: loads


def test_tied_embeddings_are_not_missing_weights(tmp_path):
    """A base whose output layer is its input embedding (SmolLM2, Qwen2.5) has no lm_head weight."""
    from transformers import AutoModelForCausalLM

    config = base_model.tiny_config("llama")
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    base_model.byte_tokenizer().save_pretrained(tmp_path)
    base = load_base(tmp_path)
    assert base.model.lm_head.weight.data_ptr() == base.model.model.embed_tokens.weight.data_ptr()


def test_leftover_buffers_in_old_checkpoints_are_read_past_with_a_warning(tmp_path, caplog):
    """GPT-2 folders that transformers 2.x-4.x fine-tunes saved hold attn.masked_bias buffers,
    which today's model does not read: harmless, unlike weights of layers the config lacks."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(base_model.tiny_config("gpt2")).save_pretrained(tmp_path)
    base_model.byte_tokenizer().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        assert load_base(tmp_path).prefix_spec(2).num_layers == 2
    assert "1 entries its model does not read, such as transformer.h.0.attn.masked_bias" in caplog.text
    weights["transformer.h.2.mlp.c_fc.bias"] = torch.zeros(256)  # a layer past the config's two
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="1 weights? of layers it does not have, such as transformer.h.2.mlp"):
        load_base(tmp_path)
