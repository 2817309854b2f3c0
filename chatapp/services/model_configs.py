"""Per-user model endpoints: CRUD with encrypted keys, the plan check, and model-source resolution."""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from chatapp import clock
from chatapp.clock import new_id
from chatapp.crypto import KeyRing, key_hint
from chatapp.errors import ApiError, Forbidden, NotFound, Unprocessable
from chatapp.models import Conversation, ModelConfig, User
from chatapp.netguard import OutboundGuard, OutboundURLForbidden

CREATE_SCOPE = "model_config:create"
PARAMS_MAX_BYTES = 4096
RESERVED_PARAMS = ("model", "messages", "stream")


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


def check_params(params: dict | None, field_name: str = "params") -> dict:
    params = params or {}
    problems = [f"{key} may not be set here" for key in RESERVED_PARAMS if key in params]
    for key, check in KNOWN_PARAMS.items():
        if key in params and (problem := check(params[key])):
            problems.append(f"{key} {problem}")
    if len(json.dumps(params, separators=(",", ":")).encode()) > PARAMS_MAX_BYTES:
        problems.append(f"must be at most {PARAMS_MAX_BYTES} bytes of JSON")
    if problems:
        raise Unprocessable("validation_error", "Some fields are invalid.", details={field_name: problems})
    return params


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
    owned = list(session.scalars(select(ModelConfig.id).where(ModelConfig.user_id == user_id,
                                                              ModelConfig.id.in_(set(ids)))))
    if owned:
        # Explicit, so SQLite without foreign-key enforcement behaves like PostgreSQL's ON DELETE SET NULL.
        session.execute(Conversation.__table__.update().where(Conversation.model_config_id.in_(owned))
                        .values(model_config_id=None))
        session.execute(delete(ModelConfig).where(ModelConfig.id.in_(owned)))
    return [config_id for config_id in dict.fromkeys(ids) if config_id in set(owned)]


def rotate_keys(session: Session, keyring: KeyRing) -> int:
    changed = 0
    for config in session.scalars(select(ModelConfig).where(ModelConfig.api_key_encrypted.is_not(None))):
        if keyring.needs_rotation(config.api_key_encrypted):
            plain = keyring.decrypt(config.api_key_encrypted, user_id=config.user_id, record_id=config.id)
            config.api_key_encrypted = keyring.encrypt(plain, user_id=config.user_id, record_id=config.id)
            changed += 1
    return changed


@dataclass(frozen=True)
class ModelSource:
    base_url: str
    model: str
    api_key: str | None = field(repr=False)
    params: dict
    config_id: str | None = None


def resolve_source(session: Session, keyring: KeyRing, guard: OutboundGuard, *, user_id: str, data: dict,
                   conversation: Conversation | None) -> ModelSource:
    """API.md's order: inline base_url + model; else model_config_id; else the conversation's config."""
    if data.get("base_url") or data.get("model"):
        if not (data.get("base_url") and data.get("model")):
            missing = "model" if data.get("base_url") else "base_url"
            raise Unprocessable.field(missing, "Inline model source needs both base_url and model.")
        return ModelSource(check_base_url(guard, data["base_url"]), data["model"], data.get("api_key"),
                           check_params(data.get("params")))
    config_id = data.get("model_config_id") or (conversation.model_config_id if conversation else None)
    if not config_id:
        raise Unprocessable("model_not_configured", "Choose a model: send base_url and model, or a "
                            "model_config_id, or give the conversation a model config.")
    config = get_owned(session, user_id, config_id)
    api_key = (keyring.decrypt(config.api_key_encrypted, user_id=config.user_id, record_id=config.id)
               if config.api_key_encrypted else None)
    params = {**config.params, **check_params(data.get("params"))}
    return ModelSource(check_base_url(guard, config.base_url), config.model, api_key, params, config.id)
