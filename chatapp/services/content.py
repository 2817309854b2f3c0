"""Message content in OpenAI form, with images as storage keys at rest and fresh URLs on the way out.

A request may name an image by the upload URL this API issued, a download URL it issued, or the bare
key. It is reduced to the key and must sit under `{caller}/{conversation}/images/`; anything else
(`data:` URLs, foreign hosts, other users' or conversations' keys) is refused with 422 invalid_image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatapp.errors import Unprocessable
from chatapp.storage import Storage, image_prefix

Content = str | list[dict[str, Any]]


def invalid_image(problem: str) -> Unprocessable:
    return Unprocessable("invalid_image", f"Image refused: {problem}.", details={"content": [problem]})


def text_length(content: Content) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(part["text"]) for part in content if part["type"] == "text")


def has_text(content: Content) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    return any(part["text"].strip() for part in content if part["type"] == "text")


def image_count(content: Content) -> int:
    return 0 if isinstance(content, str) else sum(part["type"] == "image_url" for part in content)


def check_limits(content: Content, *, max_chars: int, max_images: int) -> None:
    if text_length(content) > max_chars:
        raise Unprocessable("message_too_long", f"A message may hold at most {max_chars} characters.",
                            details={"content": [f"at most {max_chars} characters"]})
    if image_count(content) > max_images:
        raise Unprocessable("too_many_images", f"A message may hold at most {max_images} images.",
                            details={"content": [f"at most {max_images} images"]})
    if not has_text(content) and not image_count(content):
        raise Unprocessable.field("content", "The message is empty.")


def to_keys(content: Content, storage: Storage, *, user_id: str, conversation_id: str,
            check_exists: bool, max_bytes: int | None = None) -> Content:
    """The form stored in the database: every image URL reduced to a key this caller may use here."""
    if isinstance(content, str):
        return content
    prefix = image_prefix(user_id, conversation_id)
    stored = []
    for part in content:
        if part["type"] != "image_url":
            stored.append(part)
            continue
        url = part["image_url"]["url"].strip()
        if url[:5].lower() == "data:":
            raise invalid_image("inline data: URLs are not accepted; upload the image first")
        key = storage.key_from_url(url)
        if key is None or not key.startswith(prefix):
            raise invalid_image("the image must be one uploaded to this conversation through this API")
        if check_exists:
            size = storage.size(key)
            if size is None:
                raise invalid_image("the image was never uploaded (or has been deleted)")
            if max_bytes is not None and size > max_bytes:
                # The COS backend cannot cap a presigned PUT, so an oversized object is refused here.
                raise invalid_image(f"the image is larger than {max_bytes} bytes")
        stored.append({"type": "image_url", "image_url": {**part["image_url"], "url": key}})
    return stored


def to_urls(content: Content, presign: Callable[[str], str]) -> Content:
    """The form shown to clients and models: keys become fresh presigned download URLs."""
    if isinstance(content, str):
        return content
    return [{"type": "image_url", "image_url": {**part["image_url"], "url": presign(part["image_url"]["url"])}}
            if part["type"] == "image_url" else part for part in content]
