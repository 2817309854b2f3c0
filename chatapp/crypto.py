"""API keys at rest: AES-256-GCM, several keys for rotation, the row's identity bound in.

Stored form: "v1:<key id>:<base64 nonce+ciphertext>". The associated data is "<user id>:<config id>",
so a ciphertext copied into another row (or another user's row) fails to decrypt instead of
silently serving someone else's key. The first configured key encrypts; all of them decrypt.
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class DecryptionError(Exception):
    """The ciphertext does not belong to this row or no configured key opens it."""


def _decode_key(text: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError("each CHATAPP_ENCRYPTION_KEYS entry must be 32 bytes, url-safe base64 (flask keys generate)")
    return raw


def generate_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


class KeyRing:
    def __init__(self, keys: list[bytes]):
        if not keys:
            raise ValueError("at least one encryption key is needed")
        # A key's id is a short digest of it, so reordering keys never breaks old rows.
        self._keys = {hashlib.sha256(key).hexdigest()[:8]: AESGCM(key) for key in keys}
        self.primary_id = next(iter(self._keys))

    @classmethod
    def from_config(cls, configured: list[str], secret_key: str) -> KeyRing:
        if configured:
            return cls([_decode_key(item) for item in configured])
        # Development only (production refuses to start without CHATAPP_ENCRYPTION_KEYS).
        return cls([hashlib.sha256(b"chatapp api-key encryption:" + secret_key.encode()).digest()])

    def encrypt(self, plaintext: str, *, user_id: str, record_id: str) -> str:
        nonce = os.urandom(12)
        sealed = self._keys[self.primary_id].encrypt(nonce, plaintext.encode(), f"{user_id}:{record_id}".encode())
        return f"v1:{self.primary_id}:{base64.b64encode(nonce + sealed).decode()}"

    def decrypt(self, stored: str, *, user_id: str, record_id: str) -> str:
        try:
            version, key_id, payload = stored.split(":", 2)
            aead = self._keys[key_id]
            blob = base64.b64decode(payload)
            if version != "v1":
                raise ValueError(version)
            return aead.decrypt(blob[:12], blob[12:], f"{user_id}:{record_id}".encode()).decode()
        except (ValueError, KeyError, InvalidTag) as error:
            raise DecryptionError("the stored API key cannot be decrypted") from error

    def needs_rotation(self, stored: str) -> bool:
        return not stored.startswith(f"v1:{self.primary_id}:")


# However long the key, at least this many of its characters stay out of the hint.
HINT_HIDDEN_MIN = 16


def key_hint(api_key: str | None) -> str | None:
    """What the user may see of a key: its prefix family and last four characters.

    Only while HINT_HIDDEN_MIN characters stay hidden: a prefix and a tail of a short key would give
    most (or all: "abcdefg-hijk") of it away, so the tail goes first, then the prefix, down to "…".
    """
    if not api_key:
        return None
    prefix = api_key.split("-", 1)[0] + "-" if "-" in api_key[:8] else ""
    tail = api_key[-4:]
    if len(api_key) - len(prefix) - len(tail) < HINT_HIDDEN_MIN:
        tail = ""
    if len(api_key) - len(prefix) < HINT_HIDDEN_MIN:
        prefix = ""
    return f"{prefix}…{tail}"
