"""Object keys for stored images: how they are made, checked and typed."""

from __future__ import annotations

import re
import uuid

IMAGE_SUFFIXES: dict[str, str] = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
}
IMAGE_CONTENT_TYPES: frozenset[str] = frozenset(IMAGE_SUFFIXES.values())

MAX_KEY_LENGTH = 512
SNIFF_BYTES = 12  # enough bytes for every signature sniff_image_type knows
MAX_SEGMENT_LENGTH = 128
# A leading dot is refused so ".", "..", hidden files and the local backend's temp files are never keys.
_SEGMENT = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_SEGMENT_LENGTH - 1}}}")


def _check_segment(segment: str) -> str:
    if not _SEGMENT.fullmatch(segment):
        raise ValueError(f"invalid key segment: {segment!r}")
    return segment


def image_prefix(user_id: str, conversation_id: str) -> str:
    return f"{_check_segment(user_id)}/{_check_segment(conversation_id)}/images/"


def make_image_key(user_id: str, conversation_id: str, suffix: str) -> str:
    suffix = suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"unsupported image suffix: {suffix!r}")
    return f"{image_prefix(user_id, conversation_id)}{uuid.uuid4().hex}.{suffix}"


def _suffix(key: str) -> str:
    return key.rpartition(".")[2].lower()


def is_valid_key(key: object) -> bool:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        return False
    # fullmatch on every segment also rules out "/", "\\", "%", NUL, controls, non-ASCII and empty segments
    segments = key.split("/")
    if len(segments) < 2 or not all(_SEGMENT.fullmatch(s) for s in segments):
        return False
    return "." in segments[-1] and _suffix(key) in IMAGE_SUFFIXES


def is_valid_prefix(prefix: object) -> bool:
    """A directory-like prefix ("a/b/") of at least one segment; never empty, so never the whole store."""
    if not isinstance(prefix, str) or not prefix.endswith("/") or len(prefix) > MAX_KEY_LENGTH:
        return False
    return all(_SEGMENT.fullmatch(s) for s in prefix[:-1].split("/"))


def content_type_for(key: str) -> str:
    content_type = IMAGE_SUFFIXES.get(_suffix(key))
    if content_type is None:
        raise ValueError(f"not an image key: {key!r}")
    return content_type


def sniff_image_type(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if len(head) >= 12 and head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    return None
