"""Per-user model endpoints: CRUD with encrypted keys, the plan check, and model-source resolution."""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
from dataclasses import dataclass, field

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from chatapp import clock
from chatapp.clock import new_id
from chatapp.crypto import DecryptionError, KeyRing, key_hint
from chatapp.errors import ApiError, Forbidden, NotFound, Unprocessable
from chatapp.models import Conversation, ModelConfig, User
from chatapp.netguard import OutboundGuard, OutboundURLForbidden

log = logging.getLogger(__name__)

CREATE_SCOPE = "model_config:create"
PARAMS_MAX_BYTES = 4096
RESERVED_PARAMS = ("model", "messages", "stream")
_SURROGATE = re.compile("[\\ud800-\\udfff]")
_API_KEY = re.compile(r"[\x21-\x7e]+")


def _number(low: float, high: float):
    def check(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return "must be a number"
        return None if low <= value <= high else f"must be between {low} and {high}"
    return check


def _integer(low: int):
    def check(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        return None if value >= low else f"must be at least {low}"
    return check


def _stop(value) -> str | None:
    if isinstance(value, str) or value is None:
        return None
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(item, str) for item in value):
        return None
    return "must be a string or a list of at most 4 strings"


def _string(value) -> str | None:
    return None if isinstance(value, str) and 0 < len(value) <= 64 else "must be a short string"


def _response_format(value) -> str | None:
    return None if isinstance(value, dict) and isinstance(value.get("type"), str) else 'must be {"type": ...}'


# The well-known OpenAI fields are type-checked; anything else is the provider's business and passes through.
KNOWN_PARAMS = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "max_tokens": _integer(1),
    "max_completion_tokens": _integer(1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "seed": _integer(-(2**63)),
    "stop": _stop,
    "reasoning_effort": _string,
    "response_format": _response_format,
}


def _not_plain_json(params: dict) -> str | None:
    """Python's JSON parser lets through what JSON itself (and PostgreSQL's jsonb) refuses: NaN and
    Infinity, lone surrogates, and NUL in text. Stored, they fail the insert; sent, they break the request."""
    pending: list = [params]
    while pending:  # a loop, not recursion: nesting depth is the client's choice
        value = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return "numbers must be finite (no NaN or Infinity)"
        texts = list(value) if isinstance(value, dict) else [value] if isinstance(value, str) else []
        if any("\x00" in text or _SURROGATE.search(text) for text in texts):
            return "text must be valid Unicode without NUL characters"
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return None


def check_params(params: dict | None, field_name: str = "params") -> dict:
    params = params or {}
    problems = [f"{key} may not be set here" for key in RESERVED_PARAMS if key in params]
    for key, check in KNOWN_PARAMS.items():
        if key in params and (problem := check(params[key])):
            problems.append(f"{key} {problem}")
    if problem := _not_plain_json(params):
        problems.append(problem)
    # Measured as the UTF-8 bytes it will take, not with \uXXXX escapes (that would count "é" as 6).
    elif len(json.dumps(params, separators=(",", ":"), ensure_ascii=False).encode()) > PARAMS_MAX_BYTES:
        problems.append(f"must be at most {PARAMS_MAX_BYTES} bytes of JSON")
    if problems:
        raise Unprocessable("validation_error", "Some fields are invalid.", details={field_name: problems})
    return params


def check_api_key(api_key: str | None) -> str | None:
    """A key travels as `Authorization: Bearer <key>`: only visible ASCII can. Refused here, a CR/LF or a
    lone surrogate is a clear 422, not a header-injection attempt at call time or a 500 in encrypt()."""
    if api_key and not _API_KEY.fullmatch(api_key):
        raise Unprocessable.field("api_key", "Must be printable ASCII without spaces.")
    return api_key


def check_base_url(guard: OutboundGuard, base_url: str) -> str:
    try:
        guard.check_url(base_url)
    except OutboundURLForbidden as error:
        raise url_forbidden(error) from None
    return base_url


def url_forbidden(error: Exception) -> ApiError:
    return Unprocessable("model_url_forbidden", f"This model URL is not allowed: {error}.",
                         details={"base_url": [str(error)]})


def list_configs(session: Session, user_id: str) -> list[ModelConfig]:
    return list(session.scalars(select(ModelConfig).where(ModelConfig.user_id == user_id)
                                .order_by(ModelConfig.created_at, ModelConfig.id)))


def count_configs(session: Session, user_id: str) -> int:
    return session.scalar(select(func.count()).select_from(ModelConfig).where(ModelConfig.user_id == user_id))


def creation_verdict(session: Session, user_id: str, claims: dict) -> tuple[bool, int, int | None]:
    """(may create, the server's count, the limit or None): decided from the token's scopes and limits."""
    count = count_configs(session, user_id)
    limit = (claims.get("limits") or {}).get("model_configs")
    allowed = CREATE_SCOPE in (claims.get("scopes") or []) and (limit is None or count < limit)
    return allowed, count, limit


def get_owned(session: Session, user_id: str, config_id: str | None) -> ModelConfig:
    config = session.get(ModelConfig, config_id) if config_id else None
    if config is None or config.user_id != user_id:
        raise NotFound.of("model_config")
    return config


def _set_api_key(keyring: KeyRing, config: ModelConfig, api_key: str | None) -> None:
    check_api_key(api_key)
    config.api_key_encrypted = (keyring.encrypt(api_key, user_id=config.user_id, record_id=config.id)
                                if api_key else None)
    config.api_key_hint = key_hint(api_key)


def create(session: Session, keyring: KeyRing, guard: OutboundGuard, *, user_id: str, claims: dict,
           data: dict) -> ModelConfig:
    if CREATE_SCOPE not in (claims.get("scopes") or []):
        raise Forbidden("forbidden", "Your plan does not allow creating model configs.")
    # Serialise one user's creates (PostgreSQL row lock) so two racing requests cannot both pass the limit.
    session.execute(select(User.id).where(User.id == user_id).with_for_update())
    allowed, _count, limit = creation_verdict(session, user_id, claims)
    if not allowed:
        raise Forbidden("model_config_limit_reached", f"Your plan allows {limit} model configs.",
                        details={"limit": limit})
    config = ModelConfig(id=new_id(), user_id=user_id, name=data["name"], model=data["model"],
                         base_url=check_base_url(guard, data["base_url"]),
                         params=check_params(data.get("params")))
    _set_api_key(keyring, config, data.get("api_key"))
    session.add(config)
    return config


def update(session: Session, keyring: KeyRing, guard: OutboundGuard, *, user_id: str, data: dict) -> ModelConfig:
    config = get_owned(session, user_id, data["id"])
    if "base_url" in data:
        config.base_url = check_base_url(guard, data["base_url"])
    if "params" in data:
        config.params = check_params(data["params"])
    for name in ("name", "model"):
        if name in data:
            setattr(config, name, data[name])
    if "api_key" in data:
        _set_api_key(keyring, config, data["api_key"])
    config.updated_at = clock.now()
    return config


def delete_many(session: Session, user_id: str, ids: list[str]) -> list[str]:
    """Deletes the caller's configs among `ids`; others' and unknown ids are ignored, never revealed."""
    owned = set(session.scalars(select(ModelConfig.id).where(ModelConfig.user_id == user_id,
                                                             ModelConfig.id.in_(set(ids)))))
    if owned:
        # Explicit, so SQLite without foreign-key enforcement behaves like PostgreSQL's ON DELETE SET NULL.
        session.execute(Conversation.__table__.update().where(Conversation.model_config_id.in_(owned))
                        .values(model_config_id=None))
        session.execute(delete(ModelConfig).where(ModelConfig.id.in_(owned)))
    return [config_id for config_id in dict.fromkeys(ids) if config_id in owned]


def rotate_keys(session: Session, keyring: KeyRing) -> tuple[int, list[str]]:
    """Re-encrypts every key not under the keyring's first key: (how many, ids no configured key opens).

    An unreadable row does not stop the others: its id is reported, so the operator can add back the key
    it was written with (or ask its owner to set the key again) instead of finding out from a failed chat.
    """
    changed, unreadable = 0, []
    for config in session.scalars(select(ModelConfig).where(ModelConfig.api_key_encrypted.is_not(None))
                                  .order_by(ModelConfig.id)):
        if keyring.needs_rotation(config.api_key_encrypted):
            try:
                plain = keyring.decrypt(config.api_key_encrypted, user_id=config.user_id, record_id=config.id)
            except DecryptionError:
                unreadable.append(config.id)
                continue
            config.api_key_encrypted = keyring.encrypt(plain, user_id=config.user_id, record_id=config.id)
            changed += 1
    return changed, unreadable


def stored_api_key(keyring: KeyRing, config: ModelConfig | StoredConfig) -> str | None:
    """The config's key in clear, or a clear refusal: a row whose ciphertext no configured key opens (moved
    from another row, or written under a key since dropped) must never reach the model with a wrong key."""
    if not config.api_key_encrypted:
        return None
    try:
        return keyring.decrypt(config.api_key_encrypted, user_id=config.user_id, record_id=config.id)
    except DecryptionError:
        log.warning("stored api key of model config %s cannot be decrypted", config.id)
        raise Unprocessable("model_config_key_unreadable", "The API key stored with this model config cannot be "
                            "read; set it again with /model_config/update.",
                            details={"model_config_id": [config.id]}) from None


@dataclass(frozen=True)
class StoredConfig:
    """The columns of a model config that a send needs, when they were read without the ORM."""

    id: str
    user_id: str
    base_url: str
    model: str
    api_key_encrypted: str | None = field(repr=False)
    params: dict


@dataclass(frozen=True)
class ModelSource:
    base_url: str
    model: str
    api_key: str | None = field(repr=False)
    params: dict
    config_id: str | None = None


def resolve_source(session: Session, keyring: KeyRing, guard: OutboundGuard, *, user_id: str, data: dict,
                   conversation: Conversation | None, loaded: StoredConfig | None = None) -> ModelSource:
    """API.md's order: inline base_url + model; else model_config_id; else the conversation's config.

    `loaded`: the config the caller already read for this choice (send reads it with the conversation)."""
    if data.get("base_url") or data.get("model"):
        if not (data.get("base_url") and data.get("model")):
            missing = "model" if data.get("base_url") else "base_url"
            raise Unprocessable.field(missing, "Inline model source needs both base_url and model.")
        return ModelSource(check_base_url(guard, data["base_url"]), data["model"], check_api_key(data.get("api_key")),
                           check_params(data.get("params")))
    config_id = data.get("model_config_id") or (conversation.model_config_id if conversation else None)
    if not config_id:
        raise Unprocessable("model_not_configured", "Choose a model: send base_url and model, or a "
                            "model_config_id, or give the conversation a model config.")
    config = loaded if loaded is not None and loaded.id == config_id else get_owned(session, user_id, config_id)
    api_key = stored_api_key(keyring, config)
    params = {**config.params, **check_params(data.get("params"))}
    return ModelSource(check_base_url(guard, config.base_url), config.model, api_key, params, config.id)
