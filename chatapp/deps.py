"""The long-lived collaborators services need, built once per app and handed to them explicitly."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from flask import current_app, request

from chatapp.crypto import KeyRing
from chatapp.llm import LLMClient
from chatapp.netguard import OutboundGuard
from chatapp.storage import LocalStorage, Storage


@dataclass
class Deps:
    keyring: KeyRing
    guard: OutboundGuard
    llm: LLMClient
    storage: Storage


def build(config: dict) -> Deps:
    guard = OutboundGuard(allowlist=config["MODEL_HOST_ALLOWLIST"])
    return Deps(
        keyring=KeyRing.from_config(config["ENCRYPTION_KEYS"], config["SECRET_KEY"]),
        guard=guard,
        llm=LLMClient(session_factory=lambda: guard.session(pool_maxsize=config["LLM_POOL_MAXSIZE"]),
                      connect_timeout=config["LLM_CONNECT_TIMEOUT"], read_timeout=config["LLM_READ_TIMEOUT"]),
        storage=build_storage(config),
    )


def build_storage(config: dict) -> Storage:
    if config["STORAGE_BACKEND"] == "cos":
        from chatapp.storage.cos import COSStorage

        return COSStorage(config["COS_SECRET_ID"], config["COS_SECRET_KEY"], config["COS_REGION"],
                          config["COS_BUCKET"], token=config["COS_TOKEN"], domain=config["COS_DOMAIN"],
                          scheme=config["COS_SCHEME"])
    # URL signing gets its own key derived from the secret, never the secret itself.
    signing_key = hmac.new(config["SECRET_KEY"].encode(), b"chatapp storage urls", hashlib.sha256).digest()
    return LocalStorage(config["STORAGE_DIR"], signing_key, base_url=config["PUBLIC_BASE_URL"])


def deps() -> Deps:
    return current_app.extensions["chatapp"]


def storage() -> Storage:
    """The storage backend, its URLs based on the configured public URL or else this request's host."""
    backend = deps().storage
    if current_app.config["PUBLIC_BASE_URL"]:
        return backend
    return backend.with_base_url(request.host_url.rstrip("/"))
