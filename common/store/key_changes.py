"""Key changes of a stored user, all parts in one step: a new passphrase, a new data key, and
a reset of the rollback records. A mixin of PrefixStore (api.py), whose reads, locks and
commit these use."""

from __future__ import annotations

from .errors import WrongKeyError, naming_io_errors
from .format import UserWrite, validate_user_id
from .info import StoredPrefixInfo
from .keys import Key, check_key
from .reseal import rewrapped, under_new_data_key
from .rollback import check_parts

__all__ = ["KeyChanges"]


class KeyChanges:
    """PrefixStore's key changes (see api.py for the methods these call)."""

    @naming_io_errors
    def change_passphrase(self, user_id: str, old_key: Key, new_key: Key) -> StoredPrefixInfo:
        """Re-wrap the data key of every stored part of `user_id` under `new_key` (passphrase or
        raw), all parts in one step; the payload ciphertexts are kept.

        A part already under `new_key` is taken as it is: run again, this completes a change
        that an earlier version left killed between its renames (the parts then under both keys,
        from two writes; now the user's next lock completes it from the journal), or puts parts
        stored under two keys (before format 2) under one."""
        old_key = check_key(user_id, old_key)
        new_key = check_key(user_id, new_key)
        with self._stored_user_lock(user_id):
            opened, moved = {}, []
            for name in self._stored_names(user_id):  # the record checks pass: no counter is higher
                try:
                    opened[name] = self._decrypt(name, old_key, None, locked=True, one_write=False)
                except WrongKeyError:  # only the key's owner could have put it under new_key
                    opened[name] = self._decrypt(name, new_key, None, locked=True, one_write=False)
                    moved.append(name)
            if not 0 < len(moved) < len(opened):  # no change stopped halfway: from one write, as a load checks
                for name, o in opened.items():
                    check_parts(name, o.header, self._write_ids(name, o.header))
            write, sealed = UserWrite.new(self.stored_parts(user_id)), {}
            for name, o in opened.items():
                sealed[name] = rewrapped(name, o, *self._kek_cache.new_kek(name, new_key, self.scrypt_n), write)
            self._commit(sealed)
        return self._first_info(sealed)

    @naming_io_errors
    def rotate_data_key(self, user_id: str, key: Key) -> StoredPrefixInfo:
        """Make a new data key (new key id) for every stored part of `user_id` and re-encrypt
        each under it, all parts in one step; the same `key` unlocks them."""
        key = check_key(user_id, key)
        with self._stored_user_lock(user_id):
            opened = {name: self._decrypt(name, key, None, locked=True) for name in self._stored_names(user_id)}
            write = UserWrite.new(self.stored_parts(user_id))
            sealed = {name: under_new_data_key(name, o, write) for name, o in opened.items()}
            self._commit(sealed)
        return self._first_info(sealed)

    @naming_io_errors
    def reset_rollback(self, user_id: str, key: Key) -> list[StoredPrefixInfo]:
        """Re-anchor the rollback records of every stored part of `user_id` at the current files,
        re-encrypted under a new data key: no copy from before the reset is accepted after it,
        whatever its counter (re-anchoring at an older copy put back would accept a newer
        copy someone kept, and a save would have continued from it).

        Needs the key (each file is fully authenticated first). Use it when a load reports a
        missing or damaged rollback record and the current files are the ones to keep.
        """
        validate_user_id(user_id)
        key = check_key(user_id, key)
        with self._stored_user_lock(user_id):
            opened = {name: self._open(name, key) for name in self._stored_names(user_id)}
            write = UserWrite.new(self.stored_parts(user_id))  # the parts as they are, one write again
            sealed = {name: under_new_data_key(name, o, write) for name, o in opened.items()}
            self._commit(sealed)
        return [self._info_of(name, header) for name, (header, _, _) in sealed.items()]
