"""Fetching a registry base: converted once, again where the cache was damaged, once for two fetches at once."""

from __future__ import annotations

import threading
import time

import pytest
from fedprefix.common import base_registry
from fedprefix.common.config import DEFAULT_BASE


@pytest.fixture
def converter(tmp_path, monkeypatch, tiny_llama):
    """The built-in base's converter replaced by one that saves the tiny Llama (slowly), counting calls."""
    monkeypatch.setenv("FEDPREFIX_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(folder):
        calls.append(folder)
        time.sleep(0.3)  # long enough for a second fetch to arrive meanwhile
        tiny_llama.model.save_pretrained(folder)
        tiny_llama.tokenizer.save_pretrained(folder)

    monkeypatch.setitem(base_registry._CONVERTERS, DEFAULT_BASE, convert)
    return calls


def test_a_fetched_base_is_converted_once(converter):
    folder = base_registry.fetch(DEFAULT_BASE)
    assert base_registry.fetch_problem(folder) is None and len(converter) == 1
    assert base_registry.fetch(DEFAULT_BASE) == folder and len(converter) == 1


@pytest.mark.parametrize("damage", ["cut weights", "no tokenizer", "no weights", "weights overwritten"])
def test_a_damaged_cached_base_is_converted_again(converter, damage, caplog):
    """Only config.json was checked: a folder with cut weights or no tokenizer failed every load,
    and the way out was to delete it by hand."""
    folder = base_registry.fetch(DEFAULT_BASE)
    weights = folder / "model.safetensors"
    if damage == "cut weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "no tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "no weights":
        weights.unlink()
    else:
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert base_registry.fetch_problem(folder) is not None
    with caplog.at_level("WARNING"):
        assert base_registry.fetch(DEFAULT_BASE) == folder
    assert len(converter) == 2 and base_registry.fetch_problem(folder) is None
    assert "is damaged" in caplog.text


def test_two_fetches_at_once_convert_once(converter):
    """Both converted, and the second replaced the folder while the first read it."""
    folders, errors = [], []

    def fetch():
        try:
            folders.append(base_registry.fetch(DEFAULT_BASE))
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(folders)) == 1 and len(folders) == 3
    assert len(converter) == 1


def test_a_finished_base_in_a_read_only_cache_needs_no_lock(converter, monkeypatch):
    folder = base_registry.fetch(DEFAULT_BASE)

    def no_lock(*args, **kwargs):
        raise AssertionError("a lock file was asked for")

    monkeypatch.setattr(base_registry, "FileLock", no_lock)
    assert base_registry.fetch(DEFAULT_BASE) == folder


@pytest.mark.parametrize("in_the_way", ["damaged folder", "file", "dangling link"])
def test_a_conversion_replaces_whatever_is_in_the_way(tmp_path, in_the_way):
    made, folder = tmp_path / "made", tmp_path / "models" / "base"
    made.mkdir()
    (made / "config.json").write_text("{}")
    folder.parent.mkdir()
    if in_the_way == "damaged folder":
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"cut")
    elif in_the_way == "file":
        folder.write_text("not a folder")
    else:
        folder.symlink_to(tmp_path / "nowhere")
    base_registry._put_in_place(made, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"] and not made.exists()


def test_a_cache_that_cannot_be_written_is_named_with_the_way_out(converter, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(base_registry, "FileLock", refused)
    with pytest.raises(base_registry.ConfigError, match=r"the model cache .*models cannot be written \(Permission"):
        base_registry.fetch(DEFAULT_BASE)


def test_a_killed_conversions_temp_folder_is_removed_by_the_next_fetch(converter):
    """A fetch killed while converting left its temp folder (up to 540 MB) in the cache for good."""
    folder = base_registry.registry_folder(DEFAULT_BASE)
    folder.parent.mkdir(parents=True)
    left = folder.parent / f".{folder.name}.converting-t4k7uatu"  # as mkdtemp names it
    (left / "part").mkdir(parents=True)
    mine = [folder.parent / f".{folder.name}-{name}" for name in ("backup", "20240101")]  # no conversion's: kept
    for path in mine:
        path.mkdir()
    base_registry.fetch(DEFAULT_BASE)
    assert not left.exists() and all(path.is_dir() for path in mine) and len(converter) == 1
