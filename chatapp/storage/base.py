"""The storage interface shared by the local and COS backends, and its errors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

from .keys import is_valid_key

SignatureErrorCode = Literal["signature_invalid", "url_expired", "method_not_allowed"]


class StorageError(Exception):
    """Any storage failure; the message never carries credentials."""


class StorageFull(StorageError):
    pass


class ObjectNotFound(StorageError):
    pass


class InvalidKey(StorageError, ValueError):
    """A key or prefix that is not ours to touch (also a ValueError: it is bad input)."""


class TooLarge(StorageError):
    pass


class NotAnImage(StorageError):
    pass


class InvalidSignature(StorageError):
    def __init__(self, code: SignatureErrorCode, message: str | None = None) -> None:
        super().__init__(message or code.replace("_", " "))
        self.code: SignatureErrorCode = code


@dataclass(frozen=True)
class PresignedUpload:
    key: str
    url: str
    method: str
    headers: dict[str, str] = field(default_factory=dict)
    expires_in: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "url": self.url,
            "method": self.method,
            "headers": dict(self.headers),
            "expires_in": self.expires_in,
        }


class Storage(ABC):
    @abstractmethod
    def presign_upload(self, key: str, content_type: str, max_bytes: int, expires_in: int) -> PresignedUpload:
        """A PUT the client can make with exactly the returned url and headers."""

    @abstractmethod
    def presign_download(self, key: str, expires_in: int) -> str: ...

    @abstractmethod
    def key_from_url(self, url_or_key: str) -> str | None:
        """The key behind a URL this backend issued (valid signature not required) or a bare key, else None."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The stored object's size in bytes, or None when there is none."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under a directory-like prefix ("user/conv/images/"); returns how many."""

    def with_base_url(self, base_url: str) -> Storage:
        """A backend whose URLs use base_url; only backends served by this app need one."""
        return self


_DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_LENGTH = 4096


@dataclass(frozen=True)
class Origin:
    """Where a backend's URLs live: exact host and port, and the path every key URL starts with."""

    host: str
    port: int
    path_prefix: str  # no trailing slash; "" for the root

    @classmethod
    def parse(cls, base_url: str, path_prefix: str = "") -> Origin:
        parts = urlsplit(base_url)
        if (
            parts.scheme not in _DEFAULT_PORTS
            or not parts.hostname
            or "@" in parts.netloc
            or parts.query
            or parts.fragment
        ):
            raise ValueError(f"not a usable base URL: {base_url!r}")
        return cls(
            host=parts.hostname,
            port=parts.port or _DEFAULT_PORTS[parts.scheme],
            path_prefix=(parts.path.rstrip("/") + path_prefix).rstrip("/"),
        )

    def key_from_url(self, url_or_key: str) -> str | None:
        if not isinstance(url_or_key, str) or len(url_or_key) > MAX_URL_LENGTH:
            return None
        if is_valid_key(url_or_key):
            return url_or_key
        # urlsplit silently drops tabs/newlines and trims spaces, and browsers read "\" as "/": refuse them all
        if any(not 0x20 < ord(ch) < 0x7F or ch == "\\" for ch in url_or_key):
            return None
        try:
            parts = urlsplit(url_or_key)
            port = parts.port
        except ValueError:
            return None
        if (
            parts.scheme not in _DEFAULT_PORTS
            or "@" in parts.netloc
            or parts.hostname != self.host
            or (port or _DEFAULT_PORTS[parts.scheme]) != self.port
            or parts.fragment
            or not parts.path.startswith(self.path_prefix + "/")
        ):
            return None
        # exactly one unquote: a double-encoded "%252e%252e" stays "%2e%2e", which is_valid_key refuses
        key = unquote(parts.path[len(self.path_prefix) + 1 :])
        return key if is_valid_key(key) else None
