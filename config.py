"""All configuration, read once from CHATAPP_* environment variables.

Nothing else in the code base reads os.environ: `load_config()` returns a plain dict that becomes
`app.config`, and tests pass overrides to `create_app()` instead of patching the environment.
Defaults run on one machine with nothing else installed (SQLite under instance/, local storage,
in-memory rate limits).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEV_SECRET = "dev-insecure-secret-do-not-use-in-production"  # noqa: S105 - a marker production refuses

DEFAULT_PLANS = {
    "free": {"scopes": ["model_config:create"], "limits": {"model_configs": 5}},
    "pro": {"scopes": ["model_config:create"], "limits": {"model_configs": 50}},
    "readonly": {"scopes": [], "limits": {"model_configs": 0}},
}


class ConfigError(RuntimeError):
    """The configuration cannot be used; the message names the variable to fix."""


def _env(env, name, default=None):
    value = env.get(f"CHATAPP_{name}")
    return default if value is None or value == "" else value


def _int(env, name, default):
    raw = _env(env, name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"CHATAPP_{name} must be an integer, got {raw!r}") from None


def _float(env, name, default):
    raw = _env(env, name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"CHATAPP_{name} must be a number, got {raw!r}") from None


def _bool(env, name, default):
    raw = _env(env, name)
    return default if raw is None else raw.strip().lower() in {"1", "true", "yes", "on"}


def _list(env, name):
    return [item.strip() for item in (_env(env, name) or "").split(",") if item.strip()]


def database_url(url: str) -> str:
    """PostgreSQL always through psycopg 3 (it cooperates with gevent), whatever prefix was written."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def load_config(env=None) -> dict:
    """Build the Flask config dict from the environment."""
    env = os.environ if env is None else env
    instance = Path(_env(env, "INSTANCE_PATH", str(ROOT / "instance"))).resolve()
    plans_raw = _env(env, "PLANS")
    try:
        plans = json.loads(plans_raw) if plans_raw else DEFAULT_PLANS
    except ValueError:
        raise ConfigError("CHATAPP_PLANS must be a JSON object of plans") from None
    return {
        "CHATAPP_ENV": _env(env, "ENV", "development"),
        "INSTANCE_PATH": str(instance),
        "SECRET_KEY": _env(env, "SECRET_KEY", DEV_SECRET),
        "SQLALCHEMY_DATABASE_URI": database_url(_env(env, "DATABASE_URL", f"sqlite:///{instance / 'chatapp.sqlite3'}")),
        "DB_POOL_SIZE": _int(env, "DB_POOL_SIZE", 25),
        "DB_MAX_OVERFLOW": _int(env, "DB_MAX_OVERFLOW", 5),
        "DB_POOL_TIMEOUT": _float(env, "DB_POOL_TIMEOUT", 10.0),
        "MAX_BODY_BYTES": _int(env, "MAX_BODY_BYTES", 2 * 1024 * 1024),
        # Tokens
        "JWT_ACCESS_SECONDS": _int(env, "JWT_ACCESS_SECONDS", 15 * 60),
        "JWT_REFRESH_SECONDS": _int(env, "JWT_REFRESH_SECONDS", 30 * 24 * 3600),
        "JWT_ISSUER": _env(env, "JWT_ISSUER", "chatapp"),
        "JWT_AUDIENCE": _env(env, "JWT_AUDIENCE", "chatapp-api"),
        "PLANS": plans,
        "DEFAULT_PLAN": _env(env, "DEFAULT_PLAN", "free"),
        # Rate limits (flask-limiter notation)
        "RATELIMIT_ENABLED": _bool(env, "RATELIMIT_ENABLED", True),
        "RATELIMIT_STORAGE_URI": _env(env, "RATELIMIT_STORAGE_URI", "memory://"),
        "RATELIMIT_KEY_PREFIX": _env(env, "RATELIMIT_KEY_PREFIX", "chatapp"),  # deployments sharing one Redis
        "RATELIMIT_REGISTER": _env(env, "RATELIMIT_REGISTER", "10 per minute"),
        "RATELIMIT_LOGIN": _env(env, "RATELIMIT_LOGIN", "10 per minute"),
        "RATELIMIT_LOGIN_FAILURES": _env(env, "RATELIMIT_LOGIN_FAILURES", "5 per 15 minutes"),
        "RATELIMIT_PASSWORD_FAILURES": _env(env, "RATELIMIT_PASSWORD_FAILURES", "5 per 15 minutes"),
        # HTTP edge
        "CORS_ORIGINS": _list(env, "CORS_ORIGINS"),
        "TRUSTED_PROXIES": _int(env, "TRUSTED_PROXIES", 0),
        "LOG_LEVEL": _env(env, "LOG_LEVEL", "INFO").upper(),
        "LOG_FILE": _env(env, "LOG_FILE"),
        # Model endpoints
        "ENCRYPTION_KEYS": _list(env, "ENCRYPTION_KEYS"),
        "MODEL_HOST_ALLOWLIST": _list(env, "MODEL_HOST_ALLOWLIST"),
        "LLM_CONNECT_TIMEOUT": _float(env, "LLM_CONNECT_TIMEOUT", 10.0),
        "LLM_READ_TIMEOUT": _float(env, "LLM_READ_TIMEOUT", 120.0),
        "LLM_TITLE_TIMEOUT": _float(env, "LLM_TITLE_TIMEOUT", 30.0),
        "LLM_POOL_MAXSIZE": _int(env, "LLM_POOL_MAXSIZE", 1000),
        # Chat
        "SSE_PING_SECONDS": _float(env, "SSE_PING_SECONDS", 15.0),
        "STREAM_MAX_SECONDS": _int(env, "STREAM_MAX_SECONDS", 1800),
        "STREAMS_PER_USER": _int(env, "STREAMS_PER_USER", 5),
        "CONTEXT_MAX_MESSAGES": _int(env, "CONTEXT_MAX_MESSAGES", 50),
        "CONTEXT_MAX_CHARS": _int(env, "CONTEXT_MAX_CHARS", 200_000),
        "MESSAGE_MAX_CHARS": _int(env, "MESSAGE_MAX_CHARS", 100_000),
        "MESSAGE_MAX_IMAGES": _int(env, "MESSAGE_MAX_IMAGES", 10),
        # Storage
        "STORAGE_BACKEND": _env(env, "STORAGE_BACKEND", "local"),
        "STORAGE_DIR": _env(env, "STORAGE_DIR", str(instance / "storage")),
        "PUBLIC_BASE_URL": _env(env, "PUBLIC_BASE_URL"),
        "UPLOAD_MAX_BYTES": _int(env, "UPLOAD_MAX_BYTES", 10 * 1024 * 1024),
        "UPLOAD_URL_SECONDS": _int(env, "UPLOAD_URL_SECONDS", 15 * 60),
        "DOWNLOAD_URL_SECONDS": _int(env, "DOWNLOAD_URL_SECONDS", 60 * 60),
        "STORAGE_CHECK_EXISTS": _bool(env, "STORAGE_CHECK_EXISTS", True),
        "COS_SECRET_ID": _env(env, "COS_SECRET_ID"),
        "COS_SECRET_KEY": _env(env, "COS_SECRET_KEY"),
        "COS_REGION": _env(env, "COS_REGION"),
        "COS_BUCKET": _env(env, "COS_BUCKET"),
        "COS_TOKEN": _env(env, "COS_TOKEN"),
        "COS_DOMAIN": _env(env, "COS_DOMAIN"),
        "COS_SCHEME": _env(env, "COS_SCHEME", "https"),
    }


def check_config(config: dict) -> None:
    """Refuse settings that are unsafe or unusable, naming the variable to set."""
    if config["CHATAPP_ENV"] not in {"development", "production"}:
        raise ConfigError("CHATAPP_ENV must be 'development' or 'production'")
    if config["DEFAULT_PLAN"] not in config["PLANS"]:
        raise ConfigError("CHATAPP_DEFAULT_PLAN names a plan that CHATAPP_PLANS does not define")
    if config["STORAGE_BACKEND"] not in {"local", "cos"}:
        raise ConfigError("CHATAPP_STORAGE_BACKEND must be 'local' or 'cos'")
    if config["STORAGE_BACKEND"] == "cos":
        missing = [f"CHATAPP_COS_{name}" for name in ("SECRET_ID", "SECRET_KEY", "REGION", "BUCKET")
                   if not config[f"COS_{name}"]]
        if missing:
            raise ConfigError(f"the cos storage backend needs {', '.join(missing)}")
    if config["CHATAPP_ENV"] == "production":
        secret = config["SECRET_KEY"]
        if secret == DEV_SECRET or len(secret) < 32:
            raise ConfigError("production needs CHATAPP_SECRET_KEY set to a random value of 32+ characters")
        if not config["ENCRYPTION_KEYS"]:
            raise ConfigError("production needs CHATAPP_ENCRYPTION_KEYS (see README: generate with `flask keys generate`)")


def gunicorn_settings(env=None) -> dict:
    """What gunicorn.conf.py needs: the bind address and the worker sizing."""
    env = os.environ if env is None else env
    return {
        "bind": f"{env.get('HOST', '127.0.0.1')}:{env.get('PORT', '8000')}",
        "workers": _int(env, "WORKERS", 2),
        "worker_connections": _int(env, "WORKER_CONNECTIONS", 5000),
        "graceful_timeout": _int(env, "GRACEFUL_TIMEOUT", 30),
    }
