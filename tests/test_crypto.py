"""chatapp.crypto: API keys at rest (AES-256-GCM, the row's identity bound in, several keys for rotation)
and the hint that is all a user ever sees of a key. No database, no network."""

from __future__ import annotations

import base64
import re
import uuid

import pytest

from chatapp.crypto import DecryptionError, KeyRing, generate_key, key_hint
from config import ConfigError, check_config, load_config
from tests.conftest import remember_secret

PLAIN = remember_secret("sk-crypto-test-0123456789abcdef0123456789")
USER, RECORD = str(uuid.uuid4()), str(uuid.uuid4())


def ring(*keys: str) -> KeyRing:
    return KeyRing.from_config(list(keys), "unused")


@pytest.fixture
def k1() -> str:
    return remember_secret(generate_key())


@pytest.fixture
def k2() -> str:
    return remember_secret(generate_key())


def test_round_trip_and_stored_form(k1):
    keyring = ring(k1)
    stored = keyring.encrypt(PLAIN, user_id=USER, record_id=RECORD)
    assert re.fullmatch(r"v1:[0-9a-f]{8}:[A-Za-z0-9+/]+=*", stored)
    assert stored.split(":")[1] == keyring.primary_id
    assert PLAIN not in stored and PLAIN[3:] not in stored
    assert keyring.decrypt(stored, user_id=USER, record_id=RECORD) == PLAIN


def test_nonce_is_fresh_every_time(k1):
    keyring = ring(k1)
    stored = {keyring.encrypt(PLAIN, user_id=USER, record_id=RECORD) for _ in range(20)}
    assert len(stored) == 20
    nonces = {base64.b64decode(item.split(":", 2)[2])[:12] for item in stored}
    assert len(nonces) == 20


@pytest.mark.parametrize("plain", ["x", "clé-ünïcødé-🔑", "a" * 1024])
def test_any_text_round_trips(k1, plain):
    keyring = ring(k1)
    assert keyring.decrypt(keyring.encrypt(plain, user_id=USER, record_id=RECORD),
                           user_id=USER, record_id=RECORD) == plain


def test_ciphertext_is_bound_to_its_row(k1):
    keyring = ring(k1)
    other_user, other_record = str(uuid.uuid4()), str(uuid.uuid4())
    stored = keyring.encrypt(PLAIN, user_id=USER, record_id=RECORD)
    for user_id, record_id in [(USER, other_record), (other_user, RECORD), (other_user, other_record),
                               (RECORD, USER)]:
        with pytest.raises(DecryptionError):
            keyring.decrypt(stored, user_id=user_id, record_id=record_id)


def test_ciphertexts_swapped_between_rows_fail(k1):
    keyring = ring(k1)
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    rows = {(alice, "a1"): "key-a1", (alice, "a2"): "key-a2", (bob, "b1"): "key-b1"}
    stored = {ident: keyring.encrypt(plain, user_id=ident[0], record_id=ident[1]) for ident, plain in rows.items()}
    for target in rows:
        for source in rows:
            if source == target:
                assert keyring.decrypt(stored[source], user_id=target[0], record_id=target[1]) == rows[target]
            else:
                with pytest.raises(DecryptionError):
                    keyring.decrypt(stored[source], user_id=target[0], record_id=target[1])


def test_another_key_cannot_decrypt(k1, k2):
    stored = ring(k1).encrypt(PLAIN, user_id=USER, record_id=RECORD)
    with pytest.raises(DecryptionError):
        ring(k2).decrypt(stored, user_id=USER, record_id=RECORD)
    # Not even when the other key's ring is told the stored key id is its own.
    forged = stored.replace(ring(k1).primary_id, ring(k2).primary_id, 1)
    with pytest.raises(DecryptionError):
        ring(k2).decrypt(forged, user_id=USER, record_id=RECORD)


def _flip(stored: str, index: int) -> str:
    version, key_id, payload = stored.split(":", 2)
    blob = bytearray(base64.b64decode(payload))
    blob[index] ^= 0x01
    return f"{version}:{key_id}:{base64.b64encode(bytes(blob)).decode()}"


@pytest.mark.parametrize("index", [0, 11, 12, 20, -16, -1], ids=["nonce-first", "nonce-last", "body-first",
                                                                "body-middle", "tag-first", "tag-last"])
def test_tampering_is_detected(k1, index):
    keyring = ring(k1)
    stored = keyring.encrypt(PLAIN, user_id=USER, record_id=RECORD)
    with pytest.raises(DecryptionError):
        keyring.decrypt(_flip(stored, index), user_id=USER, record_id=RECORD)


@pytest.mark.parametrize("mangle", [
    pytest.param(lambda s, kid: "", id="empty"),
    pytest.param(lambda s, kid: "v1", id="version-only"),
    pytest.param(lambda s, kid: f"v1:{kid}", id="no-payload"),
    pytest.param(lambda s, kid: f"v1:{kid}:", id="empty-payload"),
    pytest.param(lambda s, kid: f"v1:{kid}:AAAA", id="payload-too-short"),
    pytest.param(lambda s, kid: f"v1:{kid}:!!!not-base64!!!", id="not-base64"),
    pytest.param(lambda s, kid: "v2" + s[2:], id="unknown-version"),
    pytest.param(lambda s, kid: s.replace(kid, "00000000", 1), id="unknown-key-id"),
    pytest.param(lambda s, kid: s[:-8], id="truncated"),
    pytest.param(lambda s, kid: s + "AAAA", id="extended"),
    pytest.param(lambda s, kid: PLAIN, id="plaintext-in-the-column"),
])
def test_malformed_stored_values_raise_decryption_error_only(k1, mangle):
    keyring = ring(k1)
    stored = keyring.encrypt(PLAIN, user_id=USER, record_id=RECORD)
    with pytest.raises(DecryptionError) as caught:
        keyring.decrypt(mangle(stored, keyring.primary_id), user_id=USER, record_id=RECORD)
    assert PLAIN not in str(caught.value)


def test_first_key_encrypts_all_keys_decrypt(k1, k2):
    old_stored = ring(k1).encrypt(PLAIN, user_id=USER, record_id=RECORD)
    both = ring(k2, k1)
    assert both.primary_id == ring(k2).primary_id
    assert both.decrypt(old_stored, user_id=USER, record_id=RECORD) == PLAIN
    new_stored = both.encrypt(PLAIN, user_id=USER, record_id=RECORD)
    assert new_stored.startswith(f"v1:{ring(k2).primary_id}:")
    assert ring(k2).decrypt(new_stored, user_id=USER, record_id=RECORD) == PLAIN
    with pytest.raises(DecryptionError):
        ring(k1).decrypt(new_stored, user_id=USER, record_id=RECORD)
    # Reordering the configured keys never breaks a stored value: ids come from the keys themselves.
    assert ring(k1, k2).decrypt(new_stored, user_id=USER, record_id=RECORD) == PLAIN


def test_needs_rotation(k1, k2):
    old_stored = ring(k1).encrypt(PLAIN, user_id=USER, record_id=RECORD)
    new_stored = ring(k2).encrypt(PLAIN, user_id=USER, record_id=RECORD)
    both = ring(k2, k1)
    assert both.needs_rotation(old_stored) is True
    assert both.needs_rotation(new_stored) is False
    assert ring(k1, k2).needs_rotation(old_stored) is False


def test_generate_key_makes_distinct_32_byte_url_safe_keys():
    keys = {remember_secret(generate_key()) for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", key)
        assert len(base64.urlsafe_b64decode(key + "=")) == 32
        ring(key)  # usable as CHATAPP_ENCRYPTION_KEYS


def test_padded_key_is_accepted(k1):
    padded = k1 + "="
    assert ring(padded).primary_id == ring(k1).primary_id


@pytest.mark.parametrize("bad", [
    "short",
    base64.urlsafe_b64encode(b"x" * 31).decode(),
    base64.urlsafe_b64encode(b"x" * 33).decode(),
    base64.urlsafe_b64encode(b"x" * 16).decode(),
    "!" * 43,
])
def test_bad_configured_keys_are_refused_with_the_variable_named(bad):
    with pytest.raises(ValueError, match="CHATAPP_ENCRYPTION_KEYS"):
        KeyRing.from_config([bad], "unused")


def test_no_keys_at_all_is_refused():
    with pytest.raises(ValueError):
        KeyRing([])


def test_development_key_is_derived_from_the_secret():
    first = KeyRing.from_config([], "secret-one-" + "a" * 32)
    again = KeyRing.from_config([], "secret-one-" + "a" * 32)
    other = KeyRing.from_config([], "secret-two-" + "b" * 32)
    stored = first.encrypt(PLAIN, user_id=USER, record_id=RECORD)
    assert again.decrypt(stored, user_id=USER, record_id=RECORD) == PLAIN
    with pytest.raises(DecryptionError):
        other.decrypt(stored, user_id=USER, record_id=RECORD)


def test_production_requires_encryption_keys(k1):
    env = {"CHATAPP_ENV": "production", "CHATAPP_SECRET_KEY": "p" * 40}
    with pytest.raises(ConfigError, match="CHATAPP_ENCRYPTION_KEYS"):
        check_config(load_config(env))
    check_config(load_config({**env, "CHATAPP_ENCRYPTION_KEYS": k1}))


def test_encryption_keys_are_read_as_a_list(k1, k2):
    config = load_config({"CHATAPP_ENCRYPTION_KEYS": f" {k2} , {k1} ,"})
    assert config["ENCRYPTION_KEYS"] == [k2, k1]
    assert KeyRing.from_config(config["ENCRYPTION_KEYS"], "").primary_id == ring(k2).primary_id


# ------------------------------------------------------------------ hints


@pytest.mark.parametrize(("api_key", "hint"), [
    (None, None),
    ("", None),
    ("sk-" + "0123456789abcdef" * 3, "sk-…cdef"),
    ("sk-proj-" + "Z" * 40 + "3f9a", "sk-…3f9a"),
    ("gsk-" + "q" * 30 + "wxyz", "gsk-…wxyz"),
    ("a" * 36 + "tail", "…tail"),
    ("EMPTY", "…"),
    ("abcdefg-hijk", "…"),
])
def test_key_hint_examples(api_key, hint):
    assert key_hint(api_key) == hint


@pytest.mark.parametrize("shape", [
    lambda n: "k" * n,
    lambda n: ("sk-" + "x" * n)[:n],
    lambda n: ("abcdefg-" + "y" * n)[:n],
    lambda n: ("a-" + "z" * n)[:n],
], ids=["plain", "sk-prefix", "long-prefix", "short-prefix"])
def test_key_hint_keeps_at_least_16_characters_hidden(shape):
    for length in range(1, 80):
        api_key = shape(length)
        hint = key_hint(api_key)
        assert hint is not None and hint.count("…") == 1
        visible = hint.replace("…", "")
        assert len(api_key) - len(visible) >= min(16, len(api_key)), (api_key, hint)
        prefix, _, tail = hint.partition("…")
        assert api_key.startswith(prefix) and api_key.endswith(tail)
