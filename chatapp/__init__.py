"""chatapp: a chat backend for bring-your-own OpenAI-compatible model endpoints.

Imports stay inside the functions, so importing the package stays light: gunicorn's log configuration
imports chatapp.logs for its format, and the `flask` CLI's commands need only some of the app.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask


def create_app(overrides: dict | None = None) -> Flask:
    from flask import Flask

    from config import check_config, load_config

    settings = load_config()
    settings.update(overrides or {})
    check_config(settings)
    app = Flask(__name__, instance_path=settings["INSTANCE_PATH"])
    configure(app, settings)
    register_logging(app)
    register_extensions(app)
    register_errors(app)
    register_tokens(app)
    register_request_rules(app)
    register_dependencies(app)
    register_blueprints(app)
    register_cli(app)
    return app


def configure(app: Flask, settings: dict) -> None:
    from werkzeug.middleware.proxy_fix import ProxyFix

    from chatapp.api_doc import api_settings

    Path(app.instance_path).mkdir(parents=True, exist_ok=True)
    app.config.update(settings)
    app.config.update(api_settings())
    url = settings["SQLALCHEMY_DATABASE_URI"]
    sqlite = url.startswith("sqlite")
    app.config.update(
        MAX_CONTENT_LENGTH=settings["MAX_BODY_BYTES"],
        JSON_SORT_KEYS=False,
        RATELIMIT_HEADERS_ENABLED=True,
        RATELIMIT_SWALLOW_ERRORS=settings["CHATAPP_ENV"] == "production",
        # The same pool bounds for both databases, so tests on SQLite exercise the pool-exhausted path too.
        SQLALCHEMY_ENGINE_OPTIONS={
            "pool_size": settings["DB_POOL_SIZE"],  # no pool_pre_ping: see _ping_when_idle
            "max_overflow": settings["DB_MAX_OVERFLOW"], "pool_timeout": settings["DB_POOL_TIMEOUT"],
            **({"connect_args": {"timeout": 30}} if sqlite else {}),
        },
    )
    app.json.sort_keys = False
    app.url_map.merge_slashes = False  # '//' in a path is a JSON 404, not werkzeug's HTML redirect
    if settings["TRUSTED_PROXIES"] > 0:
        hops = settings["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)


def register_logging(app: Flask) -> None:
    from chatapp import logs

    logs.init_app(app)  # first: every later hook and error already has its request ids


def register_extensions(app: Flask) -> None:
    import click
    from flask_cors import CORS
    from sqlalchemy import event

    from chatapp.extensions import api, db, limiter

    db.init_app(app)
    app.teardown_appcontext(_release_session)  # registered after Flask-SQLAlchemy's, so it runs before it
    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            event.listen(db.engine, "connect", _sqlite_pragmas)
        _ping_when_idle(db.engine)
    if click.get_current_context(silent=True) is not None:
        # Only the `flask` CLI needs Flask-Migrate (Alembic and Mako: ~11 MB in every gunicorn worker otherwise).
        from chatapp.extensions import migrate

        migrate.init_app(app, db, render_as_batch=True, directory=str(Path(__file__).parent.parent / "migrations"))
    limiter.init_app(app)
    api.init_app(app)
    if app.config["CORS_ORIGINS"]:
        CORS(app, resources={r"/api/*": {"origins": app.config["CORS_ORIGINS"]}},
             expose_headers=["X-Request-ID", "Retry-After"], max_age=600,
             allow_headers=["Authorization", "Content-Type", "X-Request-ID", "traceparent", "X-Trace-ID"])


def _release_session(_error) -> None:
    """End the request's session; a connection the database dropped must not turn the response into a 500.

    Teardown errors escape Flask's error handlers (gunicorn would answer its own HTML page), and rolling
    back on a connection a database restart killed does raise. The pool has invalidated it by then.
    """
    import logging

    from sqlalchemy.exc import DBAPIError

    from chatapp.extensions import db

    try:
        db.session.remove()
    except DBAPIError:
        logging.getLogger(__name__).warning("database connection lost while ending a request")
        db.session.registry.clear()


POOL_PING_IDLE_SECONDS = 1.0


def _ping_when_idle(engine) -> None:
    """Check a pooled connection before use only when it has sat idle in the pool.

    A database restart, or a server or proxy that closes idle connections, kills the connections waiting in
    the pool; those get checked, and a dead one is replaced before the request sees it. pool_pre_ping would
    check every checkout: one more round trip per request (7-10 % of a GET /conversation's CPU against a
    local PostgreSQL, a network round trip of latency against a remote one). A connection that dies while
    busy fails its request either way: SQLAlchemy invalidates the pool on the disconnect error and the
    request answers 503 database_unavailable.
    """
    import time

    from sqlalchemy import event, exc

    def checkin(_dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    def checkout(dbapi_connection, record, _proxy) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < POOL_PING_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            # The pool drops this connection and checks out a new one (up to three tries).
            raise exc.DisconnectionError("a pooled connection failed its ping") from error

    event.listen(engine, "checkin", checkin)
    event.listen(engine, "checkout", checkout)


def _sqlite_pragmas(connection, _record) -> None:
    # WAL lets readers run beside the one writer; foreign keys make ON DELETE CASCADE / SET NULL real.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def register_errors(app: Flask) -> None:
    from chatapp import errors

    errors.init_app(app)


def register_tokens(app: Flask) -> None:
    from chatapp import tokens

    tokens.init_app(app)


def register_request_rules(app: Flask) -> None:
    from chatapp.http import (
        NoCookieSessions,
        check_json_body,
        check_text_params,
        security_headers,
        without_a_transaction,
    )

    app.session_interface = NoCookieSessions()
    app.before_request(check_json_body)
    app.before_request(check_text_params)
    if not app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        # (SQLite's driver begins no transaction for reads, and switching its isolation level back runs a PRAGMA
        # that expires every statement prepared on the connection: see chat._single_write.)
        app.before_request(without_a_transaction)
    app.after_request(security_headers)


def register_dependencies(app: Flask) -> None:
    from chatapp.deps import build

    app.extensions["chatapp"] = build(app.config)


def register_blueprints(app: Flask) -> None:
    from chatapp.api import chat, conversation, health, model_config, storage, user
    from chatapp.extensions import api

    api.register_blueprint(health.blp)
    api.register_blueprint(user.blp, url_prefix="/api/v1/user")
    api.register_blueprint(model_config.blp, url_prefix="/api/v1/model_config")
    api.register_blueprint(conversation.blp, url_prefix="/api/v1/conversation")
    api.register_blueprint(chat.blp, url_prefix="/api/v1/chat")
    api.register_blueprint(storage.blp, url_prefix="/api/v1/storage")


def register_cli(app: Flask) -> None:
    from chatapp import cli

    cli.init_app(app)


__all__ = ["create_app"]
