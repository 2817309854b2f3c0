"""Files under a local folder, reached through HMAC-signed, expiring URLs that this app serves."""

from __future__ import annotations

import copy
import errno
import hashlib
import hmac
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlencode

from .base import (
    InvalidKey,
    InvalidSignature,
    NotAnImage,
    ObjectNotFound,
    Origin,
    PresignedUpload,
    Storage,
    StorageError,
    StorageFull,
    TooLarge,
)
from .keys import (
    IMAGE_CONTENT_TYPES,
    SNIFF_BYTES,
    content_type_for,
    is_valid_key,
    is_valid_prefix,
    sniff_image_type,
)

CHUNK_SIZE = 64 * 1024
TEMP_PREFIX = ".upload-"  # starts with a dot, so no valid key can ever name a temp file
_DIGITS = re.compile(r"[0-9]{1,15}")
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_FULL_DISK = {errno.ENOSPC, errno.EDQUOT}


@dataclass(frozen=True)
class SignedGrant:
    """What a verified URL allows: content_type and max_bytes are set for PUT only."""

    method: str
    key: str
    expires: int
    content_type: str | None = None
    max_bytes: int | None = None


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


class LocalStorage(Storage):
    def __init__(
        self,
        root: str | Path,
        secret: bytes,
        base_url: str | None = None,
        route_prefix: str = "/api/v1/storage",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ValueError("LocalStorage needs a non-empty secret")
        self.root = Path(root).resolve()
        # a key of its own, so URL signatures can never be replayed as signatures of anything else
        self._signing_key = hmac.new(secret, b"chatapp.storage.url.v1", hashlib.sha256).digest()
        self.route_prefix = "/" + route_prefix.strip("/")
        self._clock = clock
        self.base_url: str | None = None
        self._origin: Origin | None = None
        if base_url:
            self._bind(base_url)

    def _bind(self, base_url: str) -> None:
        self._origin = Origin.parse(base_url, self.route_prefix)
        self.base_url = base_url.rstrip("/")

    def with_base_url(self, base_url: str) -> LocalStorage:
        if self.base_url is not None:
            return self  # a configured public URL wins over whatever Host a request claims
        bound = copy.copy(self)
        bound._bind(base_url)
        return bound

    # -- signed URLs --------------------------------------------------------------------------

    def _signature(
        self, method: str, key: str, expires: str, content_type: str = "", max_bytes: str = ""
    ) -> str:
        # JSON keeps the fields apart whatever characters a tampered query puts in them
        canonical = json.dumps([method, key, expires, content_type, max_bytes], separators=(",", ":"))
        return hmac.new(self._signing_key, canonical.encode(), hashlib.sha256).hexdigest()

    def _url(self, key: str, query: dict[str, str]) -> str:
        if self.base_url is None:
            raise StorageError("LocalStorage has no base URL; use with_base_url(<public URL of this app>)")
        return f"{self.base_url}{self.route_prefix}/{quote(key, safe='/')}?{urlencode(query)}"

    def _expires(self, key: str, expires_in: int) -> str:
        if not is_valid_key(key):
            raise InvalidKey(f"invalid key: {key!r}")
        if expires_in <= 0:
            raise ValueError("expires_in must be positive")
        return str(int(self._clock()) + expires_in)

    def presign_upload(self, key: str, content_type: str, max_bytes: int, expires_in: int) -> PresignedUpload:
        expires = self._expires(key, expires_in)
        if content_type != content_type_for(key):
            raise ValueError(f"content type {content_type!r} does not match key {key!r}")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        signature = self._signature("PUT", key, expires, content_type, str(max_bytes))
        query = {"expires": expires, "max": str(max_bytes), "ct": content_type, "signature": signature}
        return PresignedUpload(
            key=key,
            url=self._url(key, query),
            method="PUT",
            headers={"Content-Type": content_type},
            expires_in=expires_in,
        )

    def presign_download(self, key: str, expires_in: int) -> str:
        expires = self._expires(key, expires_in)
        return self._url(key, {"expires": expires, "signature": self._signature("GET", key, expires)})

    def verify(
        self, method: str, key: str, query: Mapping[str, str], *, content_type: str | None = None
    ) -> SignedGrant:
        """Check a request against its signed URL; content_type, if given, is the request's header."""
        method = "GET" if method.upper() == "HEAD" else method.upper()
        if method not in ("GET", "PUT"):
            raise InvalidSignature("method_not_allowed")
        expires, signature = query.get("expires", ""), query.get("signature", "")
        if not is_valid_key(key) or not _DIGITS.fullmatch(expires) or not _HEX_SHA256.fullmatch(signature):
            raise InvalidSignature("signature_invalid")
        signed_type, signed_max = query.get("ct"), query.get("max")
        is_put_url = signed_type is not None and signed_max is not None and _DIGITS.fullmatch(signed_max)
        expected = {
            "GET": self._signature("GET", key, expires),
            "PUT": self._signature("PUT", key, expires, signed_type, signed_max) if is_put_url else "",
        }
        # compare against both methods so a genuine URL used with the wrong verb says so
        matches = {m for m, digest in expected.items() if digest and hmac.compare_digest(digest, signature)}
        if method not in matches:
            raise InvalidSignature("method_not_allowed" if matches else "signature_invalid")
        if int(expires) < self._clock():
            raise InvalidSignature("url_expired")
        if method == "GET":
            return SignedGrant("GET", key, int(expires))
        assert signed_type is not None and signed_max is not None
        if content_type is not None and _media_type(content_type) != signed_type:
            raise InvalidSignature("signature_invalid", "Content-Type differs from the signed one")
        return SignedGrant("PUT", key, int(expires), signed_type, int(signed_max))

    def key_from_url(self, url_or_key: str) -> str | None:
        if self._origin is None:
            return url_or_key if is_valid_key(url_or_key) else None
        return self._origin.key_from_url(url_or_key)

    # -- files --------------------------------------------------------------------------------

    def _resolve(self, relative: str) -> Path:
        """root/relative, refused unless it stays strictly inside root (the last line against traversal)."""
        try:
            path = (self.root / relative).resolve()
        except (OSError, ValueError) as exc:
            raise InvalidKey(f"invalid key: {relative!r}") from exc
        if path == self.root or not path.is_relative_to(self.root):
            raise InvalidKey(f"key escapes the storage root: {relative!r}")
        return path

    def _path_for(self, key: str) -> Path:
        if not is_valid_key(key):
            raise InvalidKey(f"invalid key: {key!r}")
        return self._resolve(key)

    def save(self, key: str, stream: BinaryIO, content_type: str, max_bytes: int) -> int:
        """Store the stream's bytes under key, all or nothing; returns the size."""
        path = self._path_for(key)
        expected = _media_type(content_type)
        if expected not in IMAGE_CONTENT_TYPES:
            raise NotAnImage(f"not an image type: {content_type!r}")
        temp_path: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_path = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as out:
                size = _copy_image(stream, out, expected, max_bytes)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp_path, path)
            temp_path = None
            return size
        except OSError as exc:
            if exc.errno in _FULL_DISK:
                raise StorageFull("storage is full") from exc
            raise StorageError("could not store the object") from exc
        finally:
            if temp_path is not None:
                with suppress(OSError):
                    os.unlink(temp_path)

    def open(self, key: str) -> tuple[BinaryIO, int, str]:
        path = self._path_for(key)
        try:
            file = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(key) from exc
        return file, os.fstat(file.fileno()).st_size, content_type_for(key)

    def size(self, key: str) -> int | None:
        try:
            path = self._path_for(key)
            return path.stat().st_size if path.is_file() else None
        except (InvalidKey, OSError):
            return None

    def delete_prefix(self, prefix: str) -> int:
        if not is_valid_prefix(prefix):
            raise InvalidKey(f"invalid prefix: {prefix!r}")
        directory = self._resolve(prefix)
        if not directory.is_dir():
            return 0
        deleted = 0
        try:
            for dirpath, dirnames, filenames in os.walk(directory, topdown=False):
                for name in filenames:
                    os.unlink(os.path.join(dirpath, name))
                    if not name.startswith(TEMP_PREFIX):
                        deleted += 1
                for name in dirnames:
                    with suppress(OSError):  # an upload may have just recreated it; leave it be
                        os.rmdir(os.path.join(dirpath, name))
        except OSError as exc:
            raise StorageError("could not delete objects") from exc
        # drop the now-empty parents (images/, conversation/, user/) but never root itself
        for parent in (directory, *directory.parents):
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break
        return deleted


def _copy_image(stream: BinaryIO, out: BinaryIO, content_type: str, max_bytes: int) -> int:
    """Copy in chunks, refusing the body as soon as it passes max_bytes or its head is not content_type."""
    head: bytes | None = b""
    size = 0
    while chunk := stream.read(CHUNK_SIZE):
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"body exceeds {max_bytes} bytes")
        if head is None:
            out.write(chunk)
            continue
        head += chunk
        if len(head) >= SNIFF_BYTES:
            _check_image(head, content_type)
            out.write(head)
            head = None
    if head is not None:
        _check_image(head, content_type)
        out.write(head)
    return size


def _check_image(head: bytes, content_type: str) -> None:
    if sniff_image_type(head) != content_type:
        raise NotAnImage(f"content is not {content_type}")
