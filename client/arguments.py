"""Checks of what a user passes to Personalizer: one-line ConfigErrors that name the argument."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

from fedprefix.common.config import TrainConfig
from fedprefix.common.errors import ConfigError, did_you_mean, first_error
from fedprefix.common.store import PrefixStore, StoreError, WrongKeyError, existing_store_folder
from pydantic import ValidationError

# transformers' generate() arguments people pass out of habit, and what does their job here
GENERATE_HINTS = {
    "do_sample": "temperature > 0 samples, temperature=0 (the default) is greedy",
    "max_length": "use max_new_tokens",
    "max_tokens": "use max_new_tokens",
    "num_beams": "beam search is not offered; greedy (temperature=0) is the default",
    "top_k": "not offered; top_p limits sampling to the likeliest tokens",
    "repetition_penalty": "use frequency_penalty or presence_penalty (OpenAI's, -2 to 2)",
    "stop_strings": "use stop",
}


def check_flags(**flags) -> None:
    """Refuses a flag that is not True or False: "no" would be taken as true, by its truthiness."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}")


def as_store(store, existing: bool = False) -> PrefixStore | None:
    """`store` as a PrefixStore: a folder path opened (`existing`: it must be there already), a
    PrefixStore as it is, None kept where a store is optional; ConfigError for anything else."""
    if isinstance(store, (str, os.PathLike)):
        return PrefixStore(existing_store_folder(store) if existing else store)
    if isinstance(store, PrefixStore) or (store is None and not existing):
        return store
    raise ConfigError(f"store must be a folder path or a PrefixStore, not {type(store).__name__}")


def refuse_a_key_that_cannot_save(store: PrefixStore | None, user_id: str, key) -> None:
    """WrongKeyError now where `store` holds a prefix of `user_id` that `key` does not open: the
    save after a whole fit failed on it (a second run of the README's example, its key file
    moved away but not its store). Other problems of the stored files are left to save and load."""
    if store is None or key is None or not store.stored_parts(user_id):
        return
    try:
        store.verify_user(user_id, key)  # a passphrase's key, derived here, is kept for the save
    except WrongKeyError:
        raise WrongKeyError(
            f"{store.root} holds a prefix of {user_id!r} that this key does not open (wrong key, or the file "
            "was tampered with): load it with its key (Personalizer.load), or give another store or user id",
            user_id,
        ) from None
    except StoreError:
        return


def train_config(settings: dict) -> TrainConfig:
    """`settings` as a TrainConfig, or a one-line ConfigError naming the first bad or unknown one."""
    try:
        return TrainConfig.model_validate(settings)
    except ValidationError as exc:
        field, message = first_error(exc, "setting")
        if message == "Extra inputs are not permitted":
            raise ConfigError(f"unknown setting {field!r}{_hint(field, TrainConfig.model_fields)}") from None
        raise ConfigError(f"setting {field}: {message}") from None


def refuse_generate_arguments(unknown: dict, generate: Callable) -> None:
    """A ConfigError for the first argument `generate` (a bound method) does not take (none:
    returns); the settings it names are those of its signature after the prompt."""
    for name in unknown:
        parameters = list(inspect.signature(generate).parameters.values())[1:]
        settings = [p.name for p in parameters if p.kind is not p.VAR_KEYWORD]
        hint = f": {GENERATE_HINTS[name]}" if name in GENERATE_HINTS else _hint(name, settings)
        raise ConfigError(f"generate: unknown argument {name!r}{hint}")


def _hint(name: str, known) -> str:
    return did_you_mean(name, known) or f"; settings: {', '.join(known)}"
