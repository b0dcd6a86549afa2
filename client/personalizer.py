"""Personalizer: the on-device SDK. Fit a private prefix on local data, generate, save encrypted.

Example:
    >>> from fedprefix.client import Personalizer
    >>> p = Personalizer(base_model="tiny-llama", user_id="alice", num_virtual_tokens=8, progress=False)
    >>> report = p.fit([{"prompt": "Hi", "completion": "Hello there!"}] * 8, max_steps=2)
    >>> isinstance(p.generate("Hi", max_new_tokens=4), str)
    True

A row's prefix is [shared part ; personal part]: the shared part (optional,
``shared_virtual_tokens``) is what a federation aggregates, the personal part never
leaves the device. Both are trained by ``fit`` unless ``train_shared=False``.
With ``personal_from_shared=True`` the personal part instead starts as a copy of the
shared part, the first time ``fit`` trains it, and from then on replaces it: the row
prefix is the personal part alone (local fine-tuning of a federation's shared prefix).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from fedprefix.common.base_model import DEFAULT_BASE, BaseModelHandle, context_length, load_base
from fedprefix.common.chat import generation_ids, generation_prompts, unicode_text
from fedprefix.common.config import EvalReport, FitReport
from fedprefix.common.errors import ConfigError, first_error
from fedprefix.common.generation import SamplingParams, generate
from fedprefix.common.peft_format import export_peft
from fedprefix.common.prefix import Prefix, PrefixConfig
from fedprefix.common.protocol import DEFAULT_INIT_TEXT, row_prefix, shared_store_id
from fedprefix.common.protocol import init_text as repeated_init_text
from fedprefix.common.store import (
    PrefixStore,
    UnknownUserError,
    WrongBaseError,
    validate_user_id,
)
from fedprefix.common.store.keys import check_key
from pydantic import ValidationError

from .arguments import as_store, check_flags, refuse_a_key_that_cannot_save, refuse_generate_arguments, train_config
from .data import read_rows, tokenize_rows
from .training import Callback, evaluate_examples, split_examples, train

log = logging.getLogger(__name__)


class Personalizer:
    """A user's personal prefix on a frozen base model, trained and kept on the device.

    base_model: a registry name (`fedprefix base list`), a folder, or a BaseModelHandle from
    load_base, which Personalizers of several users may share, also from several threads (a fit
    changes nothing in the base); one Personalizer is for one thread at a time.
    store, key: an encrypted prefix store (folder) and the user's key (32 raw bytes or a
    passphrase), for save() and load().
    num_virtual_tokens / shared_virtual_tokens: the personal and shared prefix lengths.
    Other keywords are training settings (TrainConfig: max_steps, learning_rate, batch_size,
    dtype, seed, ...), used by every fit() unless a fit() call overrides them.
    """

    def __init__(
        self,
        base_model: str | os.PathLike | BaseModelHandle = DEFAULT_BASE,
        user_id: str = "local",
        store: str | os.PathLike | PrefixStore | None = None,
        key: bytes | str | None = None,
        num_virtual_tokens: int = 16,
        shared_virtual_tokens: int = 0,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
        shared_projection: bool = False,
        init: str = "text",
        init_text: str = DEFAULT_INIT_TEXT,
        use_chat_template: bool | None = None,
        train_shared: bool = True,
        personal_from_shared: bool = False,
        progress: bool = True,
        **train_settings,
    ) -> None:
        # the store's rule, also without a store: an id checked only at save() fails after training
        self.user_id = validate_user_id(user_id)
        for name, value, minimum in (
            ("num_virtual_tokens", num_virtual_tokens, 0),
            ("shared_virtual_tokens", shared_virtual_tokens, 0),
            ("encoder_hidden_size", 1 if encoder_hidden_size is None else encoder_hidden_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")
        check_flags(
            prefix_projection=prefix_projection,
            shared_projection=shared_projection,
            train_shared=train_shared,
            personal_from_shared=personal_from_shared,
            progress=progress,
            **({} if use_chat_template is None else {"use_chat_template": use_chat_template}),
        )
        if init not in ("text", "random", "zero"):
            raise ConfigError(f"init must be 'text', 'random' or 'zero', got {init!r}")
        if not isinstance(init_text, str):  # the tokenizer's own errors name neither the setting nor the problem
            raise ConfigError(f"init_text must be a string, got {type(init_text).__name__}")
        try:
            unicode_text(init_text)
        except ValueError as exc:
            raise ConfigError(f"init_text: {exc}") from None
        self.base = base_model if isinstance(base_model, BaseModelHandle) else load_base(base_model)
        self.store = as_store(store)  # a wrong type refused now, not at save() after training
        self.key = None if key is None else check_key(self.user_id, key)  # refused now, not at save() after training
        refuse_a_key_that_cannot_save(self.store, self.user_id, self.key)
        self.train_config = train_config(train_settings)
        self.train_shared = train_shared
        self.personal_from_shared = personal_from_shared
        if personal_from_shared and (
            shared_virtual_tokens == 0 or num_virtual_tokens not in (0, shared_virtual_tokens)
        ):
            raise ConfigError(
                f"personal_from_shared=True copies the shared part: it needs shared_virtual_tokens > 0 and "
                f"num_virtual_tokens 0 or equal to it, got {shared_virtual_tokens} and {num_virtual_tokens}"
            )
        self.progress = progress
        has_template = bool(getattr(self.base.tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        if self.use_chat_template and not has_template:
            raise ConfigError(f"use_chat_template=True but base {self.base.name} has no chat template")
        generator = torch.Generator().manual_seed(self.train_config.seed)
        if init_text is DEFAULT_INIT_TEXT:  # long enough for any prefix length
            init_text = repeated_init_text(self.base.tokenizer, shared_virtual_tokens + num_virtual_tokens)

        def make(tokens: int, skip: int, projection: bool) -> Prefix:
            return self._new_prefix(tokens, init, init_text, projection, encoder_hidden_size, generator, skip)

        # [shared ; personal] starts as the init text's KV as a whole; the shared part is
        # then the same on every device without any communication. The personal part is
        # MLP-reparameterized by default (the benchmark report: at the same step budget it
        # learned style and content where a direct prefix learned neither fully); the shared
        # part stays direct, since its arrays travel every round.
        # num_virtual_tokens=0 with a shared part: a shared-only prefix (federated "shared" mode).
        if num_virtual_tokens + shared_virtual_tokens == 0:
            raise ConfigError("num_virtual_tokens and shared_virtual_tokens are both 0: at least one must be > 0")
        self._check_context(shared_virtual_tokens + num_virtual_tokens, self.train_config.max_length, "max_length")
        self.shared = make(shared_virtual_tokens, 0, shared_projection) if shared_virtual_tokens > 0 else None
        self.personal = (
            make(num_virtual_tokens, shared_virtual_tokens, prefix_projection)
            if num_virtual_tokens > 0 and not personal_from_shared
            else None  # personal_from_shared: made by the first fit that trains it
        )

    def __repr__(self) -> str:
        return (
            f"Personalizer(user_id={self.user_id!r}, base={self.base.name!r}, "
            f"prefix_tokens={self.prefix_tokens}, store={self.store!r})"
        )

    def __reduce_ex__(self, protocol):  # pickle, copy and deepcopy all ask here
        raise TypeError(
            "a Personalizer is not pickled or copied: it holds its user's key (which a pickle would "
            "write out in the clear) and the whole base; save() it and make another on the same base, then load()"
        )

    @property
    def prefix_tokens(self) -> int:
        """Virtual tokens of [shared ; personal] (as a row is served)."""
        parts = (None if self.copy_replaces_shared else self.shared, self.personal)
        return sum(part.config.spec.num_virtual_tokens for part in parts if part is not None)

    def _check_context(self, used: int, more: int, name: str, where: str = "") -> None:
        """ConfigError where `used` positions (prefix, prompt) + `more` pass the base's context
        (an absolute-position base such as GPT-2 fails on them, and serving refuses them)."""
        context = context_length(self.base.model)
        if context is not None and used + more > context:
            raise ConfigError(
                f"{where}{used} prefix and prompt tokens + {name} {more} exceed the base's context of {context} "
                f"tokens: lower {name} or the prefix length"
            )

    @property
    def copy_replaces_shared(self) -> bool:
        """True once the personal part is this user's copy of the shared one, used in its place."""
        return self.personal_from_shared and self.personal is not None

    def _new_prefix(self, tokens, init, text, projection, hidden, generator, skip) -> Prefix:
        if init == "text":
            return Prefix.from_text(self.base, text, tokens, projection, hidden, generator=generator, skip=skip)
        config = PrefixConfig(
            spec=self.base.prefix_spec(tokens),
            prefix_projection=projection,
            encoder_hidden_size=hidden,
            base_fingerprint=self.base.fingerprint,
        )
        return Prefix(config, init=init, generator=generator)

    # ------------------------------------------------------------------ prefix

    def key_values(self, parts: str = "all") -> torch.Tensor | None:
        """The row prefix (L, 2, H, P, D): 'all' = shared + personal, 'shared', or 'none' (None)."""
        if parts == "none":
            return None
        chosen = {"all": (self.shared, self.personal), "shared": (self.shared, None), "personal": (None, self.personal)}
        if parts not in chosen:
            raise ConfigError(f"parts must be 'all', 'shared', 'personal' or 'none', got {parts!r}")
        shared, personal = chosen[parts]
        if parts != "all" and shared is None and personal is None:  # not the base alone, silently
            raise ConfigError(f"user {self.user_id}: this prefix has no {parts} part")
        if parts == "all" and self.copy_replaces_shared:
            shared = None  # the personal part is the user's copy of the shared one: it replaces it
        return row_prefix(
            shared.key_values() if shared is not None else None, personal.key_values() if personal is not None else None
        )

    def trainable_parameters(self, parts: str = "all") -> list[torch.nn.Parameter]:
        """Parameters `fit` optimizes: the personal part, and the shared part if train_shared;
        `parts` = 'personal' or 'shared' narrows that to one part."""
        if parts not in ("all", "shared", "personal"):
            raise ConfigError(f"parts to train must be 'all', 'shared' or 'personal', got {parts!r}")
        if self.copy_replaces_shared:
            if parts == "shared":
                raise ConfigError(
                    f"user {self.user_id}: the personal part has replaced the shared one in this user's prefix; "
                    "training the shared part would not change it"
                )
            parts = "personal"
        params = list(self.personal.parameters()) if self.personal is not None and parts != "shared" else []
        if self.shared is not None and self.train_shared and parts != "personal":
            params += list(self.shared.parameters())
        if not params:
            part = "" if parts == "all" else f"{parts} "
            raise ConfigError(f"user {self.user_id}: there is no {part}prefix part to train")
        return params

    # ------------------------------------------------------------------ training

    def prepare(self, local_data, max_length: int | None = None) -> list:
        """Validate and tokenize `local_data` (rows, or a .jsonl, .json, .csv or .parquet path) into examples."""
        rows = read_rows(local_data)
        return tokenize_rows(
            rows, self.base.tokenizer, max_length or self.train_config.max_length, self.use_chat_template
        )

    def fit(
        self,
        local_data,
        *,
        progress: bool | None = None,
        callback: Callback | None = None,
        proximal_mu: float = 0.0,
        parts: str = "all",
        **train_settings,
    ) -> FitReport:
        """Train the prefix on `local_data`; settings override the constructor's for this call.

        Calling fit again continues from the current prefix (after `load`, the stored one).
        `proximal_mu` > 0 keeps the shared part near where this call started (FedProx).
        `parts`: 'all' (default), or only the 'personal' or the 'shared' part, the other frozen.
        """
        check_flags(**({} if progress is None else {"progress": progress}))
        config = train_config({**self.train_config.model_dump(), **train_settings})
        self._check_context(self.prefix_tokens, config.max_length, "max_length")
        examples = self.prepare(local_data, config.max_length)
        train_set, eval_set = split_examples(examples, config.eval_fraction, config.seed, config.max_eval_rows)
        copied = self.personal_from_shared and self.personal is None and parts != "shared"
        if copied:
            self.personal = copy.deepcopy(self.shared)  # from here on the user's own copy, in place of the shared one
        try:
            return self._train(parts, train_set, eval_set, config, progress, callback, proximal_mu)
        except BaseException:  # a fit that raises changes nothing, the copy included
            if copied:
                self.personal = None
            raise

    def _train(self, parts, train_set, eval_set, config, progress, callback, proximal_mu) -> FitReport:
        """fit()'s training of `parts` on prepared examples."""
        parameters = self.trainable_parameters(parts)
        # A part not trained this call is frozen: no gradient is computed for it.
        trained = {id(p) for p in parameters}
        frozen = [p for part in (self.shared, self.personal) if part is not None for p in part.parameters()]
        frozen = [p for p in frozen if id(p) not in trained and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            return train(
                self.base,
                lambda: self.key_values("all"),
                parameters,
                train_set,
                eval_set,
                config,
                progress=self.progress if progress is None else progress,
                callback=callback,
                description=f"personalizing {self.user_id}",
                proximal_parameters=[p for p in self.shared.parameters() if id(p) in trained] if self.shared else [],
                proximal_mu=proximal_mu,
            )
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def evaluate(self, data, parts: str = "all", batch_size: int = 16, accuracy: bool = True) -> EvalReport:
        """Loss and perplexity per completion token on `data`, and next-token accuracy (fp32, no autocast)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        check_flags(accuracy=accuracy)
        examples = self.prepare(data)
        kv = self.key_values(parts)
        return evaluate_examples(self.base, None if kv is None else kv.detach(), examples, batch_size, accuracy)

    # ------------------------------------------------------------------ inference

    def generate(
        self,
        prompt: str | list[dict] | Sequence[str | list[dict]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        parts: str = "all",
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        **unknown,
    ) -> str | list[str]:
        """Continue `prompt` (or each of a list, batched) behind this user's prefix: a string, or a
        chat (a list of {"role", "content"} dicts, OpenAI's messages) answered as the next assistant turn.

        `presence_penalty` / `frequency_penalty` (-2 to 2, OpenAI's) lower the logit of a token
        already in the output, once / per occurrence: a small base's greedy text can loop."""
        refuse_generate_arguments(unknown, self.generate)  # transformers' do_sample, top_k, ...: what does their job
        prompts, single = generation_prompts(prompt)
        tok = self.base.tokenizer
        ids = [generation_ids(tok, p, self.use_chat_template) for p in prompts]  # as training framed its rows
        try:
            params = SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop=stop,
                presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty,
            )
        except ValidationError as exc:
            field, message = first_error(exc, "setting")
            raise ConfigError(f"generate: {field}: {message}") from None
        for i, row in enumerate(ids):
            self._check_context(self.prefix_tokens + len(row), params.max_new_tokens, "max_new_tokens", f"prompt {i}: ")
        with torch.no_grad():
            kv = self.key_values(parts)
        outputs = generate(self.base.model, tok, ids, [kv] * len(ids), params)
        return outputs[0] if single else outputs

    # ------------------------------------------------------------------ storage

    def _require_store(self) -> PrefixStore:
        if self.store is None or self.key is None:
            raise ConfigError("this Personalizer has no store and key; pass store=... and key=... to save or load")
        return self.store

    def save(self, drop_other_parts: bool = False):
        """Encrypt and store the personal prefix and the shared one beside it, together: both or neither.

        With personal_from_shared, once the copy exists only it is stored (any stored shared part
        of this user is removed in the same step), so every reader sees the row prefix this user has.
        A stored part this Personalizer does not have (say a shared part, saved by one built with
        shared_virtual_tokens > 0) would be put beside a prefix trained without it: the save is
        refused, unless `drop_other_parts` removes that part in the same step."""
        store = self._require_store()
        both = (("personal", self.personal), ("shared", self.shared))
        parts = {name: part for name, part in both if part is not None}
        drop = ("shared",) if self.copy_replaces_shared else ()
        if drop:  # a stored shared part would be joined in front of the copy that replaced it
            del parts["shared"]
        others = [part for part in store.stored_parts(self.user_id) if part not in parts and part not in drop]
        if others and not drop_other_parts:
            raise ConfigError(
                f"user {self.user_id}: the store holds a {' and a '.join(others)} part this Personalizer does not "
                f"have, which readers would put beside a prefix trained without it; nothing was saved: "
                f"save(drop_other_parts=True) removes it, or build the Personalizer with that part"
            )
        for name, part in parts.items():
            if not all(torch.isfinite(t).all() for t in part.state_tensors().values()):
                raise ConfigError(f"user {self.user_id}: the {name} prefix holds NaN or Inf; nothing was saved")
        infos = store.save_parts(self.user_id, parts, self.key, drop=(*drop, *others))
        return infos.get("personal") or infos.get("shared")

    def restore(self) -> bool:
        """Replace this user's prefixes with the stored ones, where stored; True if any was.

        A stored prefix must fit this base (fingerprint) and be unlocked by this key; both
        parts are read together, so a concurrent save is seen whole or not at all.
        """
        store = self._require_store()
        try:
            parts = store.load_parts(self.user_id, self.key, self.base.fingerprint)
        except UnknownUserError:
            return False
        except WrongBaseError as exc:
            hint = f"; pass base_model= the base it was trained on (this Personalizer's is {self.base.name!r})"
            raise WrongBaseError(str(exc) + hint, self.user_id) from None
        for attr, prefix in parts.items():
            setattr(self, attr, prefix)
        kept = [attr for attr in ("shared", "personal") if attr not in parts and getattr(self, attr) is not None]
        if kept == ["shared"] and self.copy_replaces_shared:
            kept = []  # the stored personal copy replaced the shared part: it was dropped on purpose
        if kept:  # dropped with a personal copy, or deleted: the store cannot tell which
            log.warning(
                "user %r: the store holds no %s part; this Personalizer keeps its new one beside the stored "
                "part, where serving uses the stored part alone",
                self.user_id,
                kept[0],
            )
        return True

    @classmethod
    def load(
        cls,
        user_id: str,
        store: str | os.PathLike | PrefixStore,
        key: bytes | str,
        base_model: str | os.PathLike | BaseModelHandle = DEFAULT_BASE,
        **settings,
    ) -> Personalizer:
        """A Personalizer holding `user_id`'s stored prefix, decrypted with `key`, on `base_model`."""
        store = as_store(store, existing=True)  # loading never creates a store
        if not store.exists(user_id) and not store.exists(shared_store_id(user_id)):  # validates the id
            store.load(user_id, key)  # raises the store's "unknown user" error
        key = check_key(user_id, key)
        # the key is set after: restore() below opens every part with it, which the constructor's
        # check (a key that opens the stored prefix) would do first, a second time
        self = cls(base_model=base_model, user_id=user_id, store=store, init="zero", **settings)
        self.key = key
        self.personal = None
        self.restore()
        return self

    def export_peft(self, folder: str | os.PathLike, parts: str = "all") -> Path:
        """Write the prefix (shared + personal by default) as a PEFT adapter folder, unencrypted
        (files 0600): protect or delete it once used."""
        with torch.no_grad():
            kv = self.key_values(parts)
        if kv is None:
            raise ConfigError("there is no prefix to export for parts='none'")
        prefix = Prefix.from_key_values(kv.detach(), self.base.fingerprint)
        return export_peft(prefix, folder, base_model_name_or_path=self.base.name)
