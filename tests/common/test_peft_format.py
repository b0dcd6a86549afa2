"""PEFT adapter folders: export loads in PEFT with equal logits; PEFT-saved adapters import."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fedprefix.common.attention import forward_with_prefixes, stack_prefixes
from fedprefix.common.base_model import load_base
from fedprefix.common.errors import ConfigError, FingerprintMismatchError, ShapeError
from fedprefix.common.peft_format import export_peft, import_peft

from tests.conftest import random_prefix

peft = pytest.importorskip("peft")

IDS = torch.tensor([[5, 17, 99, 120, 33, 7]])


def _our_logits(base, prefix):
    batch = stack_prefixes([prefix.key_values().detach()], base.dtype, "cpu")
    with torch.no_grad():
        return forward_with_prefixes(base.model, IDS, torch.ones_like(IDS), batch).logits


@pytest.mark.parametrize("projection", [False, True])
def test_export_loads_in_peft_with_equal_logits(tiny_base, tmp_path, projection):
    prefix = random_prefix(tiny_base, 5, seed=11, projection=projection)
    export_peft(prefix, tmp_path, base_model_name_or_path=tiny_base.name)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_attention_heads"] == prefix.spec.num_kv_heads
    model = peft.PeftModel.from_pretrained(load_base(tiny_base.name).model, tmp_path)
    with torch.no_grad():
        theirs = model(input_ids=IDS).logits
    assert (theirs - _our_logits(tiny_base, prefix)).abs().max() < 1e-5


def test_import_of_peft_saved_adapter(tiny_base, tmp_path):
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True)
    model = peft.get_peft_model(load_base(tiny_base.name).model, config)
    torch.nn.init.normal_(model.prompt_encoder["default"].transform[2].bias, std=1.0)
    model.eval()
    with torch.no_grad():
        theirs = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    prefix = import_peft(tmp_path, tiny_base)
    assert (theirs - _our_logits(tiny_base, prefix)).abs().max() < 1e-5


def test_round_trip_is_exact(tiny_llama, tmp_path):
    prefix = random_prefix(tiny_llama, 4, seed=12)
    again = import_peft(export_peft(prefix, tmp_path), tiny_llama)
    assert torch.equal(again.flat(), prefix.flat())


def test_import_refuses_other_base(tiny_llama, tmp_path):
    export_peft(random_prefix(tiny_llama, 4), tmp_path)
    other = load_base("tiny-llama", seed=3)
    with pytest.raises(FingerprintMismatchError):
        import_peft(tmp_path, other)
    with pytest.raises(ShapeError, match="num_layers is 7"):
        spec_mismatch = load_base("tiny-gpt2")
        (tmp_path / "fedprefix.json").unlink()
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, num_layers=7, token_dim=999)))
        import_peft(tmp_path, spec_mismatch)


def test_import_errors_name_the_problem(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="adapter_config.json is missing"):
        import_peft(tmp_path, tiny_llama)
    export_peft(random_prefix(tiny_llama, 4), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        import_peft(tmp_path, tiny_llama)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ConfigError, match="expected 'PREFIX_TUNING'"):
        import_peft(tmp_path, tiny_llama)


def test_an_export_killed_midway_leaves_no_plaintext_copy_after_the_next_one(tiny_base, tmp_path):
    """A killed export left its staging folder and the previous export set aside, each a prefix in
    plain text, beside the adapter for good (an auditor's finding)."""
    out = tmp_path / "adapter"
    export_peft(random_prefix(tiny_base, 5, seed=1), out)
    left = (
        ".adapter.fedprefix-export-k1llxd0n",
        ".adapter.fedprefix-export-k1llxd0n.previous",
    )  # as mkdtemp names them
    for name in left:
        shutil.copytree(out, tmp_path / name)
    for mine in (".adapter.mine", ".adapter.20240101"):  # no name an export gives (a backup, say): left alone
        (tmp_path / mine).mkdir()
    export_peft(random_prefix(tiny_base, 3, seed=2), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.20240101", ".adapter.mine", "adapter"]


def test_an_export_killed_between_its_renames_puts_the_earlier_export_back(tiny_base, tmp_path, monkeypatch):
    """Killed after setting the earlier export aside and before renaming the new one in: no
    adapter folder at all, and the next export, failing on a full disk, left none either."""
    from fedprefix.common import peft_format

    out = tmp_path / "adapter"
    export_peft(random_prefix(tiny_base, 5, seed=1), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    out.rename(tmp_path / ".adapter.fedprefix-export-k1llxd0n.previous")  # as the kill left it
    staging = tmp_path / ".adapter.fedprefix-export-k1llxd0n"
    shutil.copytree(tmp_path / ".adapter.fedprefix-export-k1llxd0n.previous", staging)

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft_format, "atomic_write_bytes", disk_full)
    with pytest.raises(OSError, match="No space"):
        export_peft(random_prefix(tiny_base, 3, seed=2), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_an_export_whose_last_rename_fails_keeps_the_earlier_export(tiny_base, tmp_path, monkeypatch):
    from fedprefix.common import peft_format

    out = tmp_path / "adapter"
    export_peft(random_prefix(tiny_base, 5, seed=1), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, failed = os.replace, []

    def into_place_fails(src, dst):
        if Path(dst) == out and not failed:  # the new export's rename into place (not the way back)
            failed.append(src)
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(peft_format.os, "replace", into_place_fails)
    with pytest.raises(OSError, match="Input/output error"):
        export_peft(random_prefix(tiny_base, 3, seed=2), out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_an_export_is_all_or_nothing_and_writes_only_an_adapter_folder(tiny_base, tmp_path, monkeypatch):
    from fedprefix.common import peft_format

    out = tmp_path / "adapter"
    first = random_prefix(tiny_base, 5, seed=1)
    export_peft(first, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def disk_full_at_the_second_file(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, data)

    real = peft_format.atomic_write_bytes
    monkeypatch.setattr(peft_format, "atomic_write_bytes", disk_full_at_the_second_file)
    with pytest.raises(OSError, match=r"export folder .*adapter cannot be written: No space"):
        export_peft(random_prefix(tiny_base, 3, seed=2), out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left
    export_peft(random_prefix(tiny_base, 3, seed=2), out)  # a previous export is replaced
    assert import_peft(out, tiny_base).spec.num_virtual_tokens == 3

    nan = random_prefix(tiny_base, 3, seed=3)
    with torch.no_grad():
        nan.embedding.weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN or Inf; nothing was exported"):
        export_peft(nan, tmp_path / "nan")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not an adapter")
    with pytest.raises(ConfigError, match="holds notes.txt, not only an adapter"):
        export_peft(first, tmp_path / "mine")
    with pytest.raises(ConfigError, match="not an empty string"):
        export_peft(first, "")
    (tmp_path / "afile").write_text("a file")
    with pytest.raises(ConfigError, match=r"export folder .*afile/sub: .*afile is a file, not a folder"):
        export_peft(first, tmp_path / "afile" / "sub")  # mkdir said only "File exists"

    def denied(**kwargs):
        raise PermissionError(13, "Permission denied", "/x/.adapter.tmp")

    monkeypatch.setattr(peft_format.tempfile, "mkdtemp", denied)
    with pytest.raises(OSError, match=r"export folder .*elsewhere cannot be written: Permission denied") as refused:
        export_peft(first, tmp_path / "elsewhere")  # named by the folder asked for, not the temp folder beside it
    assert ".adapter.tmp" not in str(refused.value)
    monkeypatch.undo()
    assert not (tmp_path / "nan").exists() and sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
