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
from .cos import COSStorage
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
