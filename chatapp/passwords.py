"""Password hashing (argon2id at OWASP ASVS 5.0 parameters) and the common-password check."""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# ASVS 5.0 / OWASP minimum for argon2id: m=19 MiB, t=2, p=1.
HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
MIN_LENGTH, MAX_LENGTH = 8, 128
_COMMON = Path(__file__).parent / "data" / "common-passwords.txt.gz"


@cache
def _dummy_hash() -> str:
    return HASHER.hash("not-a-real-password-just-for-timing")


def hash_password(password: str) -> str:
    return HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when it matches. With no hash (unknown user) a dummy hash is checked so timing reveals nothing."""
    try:
        return HASHER.verify(password_hash or _dummy_hash(), password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return HASHER.check_needs_rehash(password_hash)


@cache
def _common_passwords() -> frozenset[str]:
    with gzip.open(_COMMON, "rt", encoding="utf-8") as handle:
        return frozenset(line.strip().lower() for line in handle if line.strip())


def is_common(password: str) -> bool:
    """The 10,000 most common passwords (Royce Williams' list, as shipped by Django), case-insensitively."""
    return password.lower() in _common_passwords()
