"""Image storage: one interface (Storage), a local backend with signed URLs, and Tencent COS."""

from .base import (
    InvalidKey,
    InvalidSignature,
    NotAnImage,
    ObjectNotFound,
    PresignedUpload,
    Storage,
    StorageError,
    StorageFull,
    TooLarge,
)
from .keys import (
    IMAGE_SUFFIXES,
    content_type_for,
    image_prefix,
    is_valid_key,
    is_valid_prefix,
    make_image_key,
    sniff_image_type,
)
from .local import LocalStorage, SignedGrant


def __getattr__(name: str):
    # The COS SDK costs ~8 MB per worker: import it only where the cos backend is used.
    if name == "COSStorage":
        from .cos import COSStorage

        return COSStorage
    raise AttributeError(name)


__all__ = [
    "IMAGE_SUFFIXES",
    "COSStorage",
    "InvalidKey",
    "InvalidSignature",
    "LocalStorage",
    "NotAnImage",
    "ObjectNotFound",
    "PresignedUpload",
    "SignedGrant",
    "Storage",
    "StorageError",
    "StorageFull",
    "TooLarge",
    "content_type_for",
    "image_prefix",
    "is_valid_key",
    "is_valid_prefix",
    "make_image_key",
    "sniff_image_type",
]
