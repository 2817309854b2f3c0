"""Operator commands: `flask --app wsgi users|tokens|keys|chat ...` (migrations: `flask --app wsgi db upgrade`)."""

from __future__ import annotations

import sys

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy import select

from chatapp.extensions import db
from chatapp.models import User

users_cli = AppGroup("users", help="Manage user accounts.")
tokens_cli = AppGroup("tokens", help="Manage login sessions.")
keys_cli = AppGroup("keys", help="Manage API-key encryption keys.")
chat_cli = AppGroup("chat", help="Chat maintenance.")


def _fail(message: str) -> None:
    raise click.ClickException(message)


@users_cli.command("create")
@click.argument("email")
@click.argument("username")
@click.option("--plan", default=None, help="Plan name (default: the configured default plan).")
def create_user(email: str, username: str, plan: str | None) -> None:
    """Create a user; the password is prompted, or read from stdin when piped."""
    from chatapp.errors import ApiError
    from chatapp.schemas import RegisterIn
    from chatapp.services import users

    # Piped stdin is not newline-translated: a line from a CRLF file ends in "\r\n", none of it the password.
    password = sys.stdin.readline().rstrip("\r\n") if not sys.stdin.isatty() else click.prompt(
        "Password", hide_input=True, confirmation_prompt=True)
    plan = plan or current_app.config["DEFAULT_PLAN"]
    if plan not in current_app.config["PLANS"]:
        _fail(f"unknown plan {plan!r}; known: {', '.join(current_app.config['PLANS'])}")
    errors = RegisterIn().validate({"email": email, "username": username, "password": password})
    if errors:
        _fail(f"invalid input: {errors}")
    data = RegisterIn().load({"email": email, "username": username, "password": password})
    try:
        user = users.register(db.session, plan=plan, **data)
    except ApiError as error:
        _fail(f"{error.message} {error.details}" if error.details else error.message)
    db.session.commit()
    click.echo(f"created {user.id} {user.email} plan={user.plan}")


@users_cli.command("set-plan")
@click.argument("email")
@click.argument("plan")
def set_plan(email: str, plan: str) -> None:
    """Move a user to another plan (takes effect with their next access token)."""
    if plan not in current_app.config["PLANS"]:
        _fail(f"unknown plan {plan!r}; known: {', '.join(current_app.config['PLANS'])}")
    user = db.session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None:
        _fail(f"no user with email {email}")
    user.plan = plan
    db.session.commit()
    click.echo(f"{user.email} plan={plan}")


@users_cli.command("list")
def list_users() -> None:
    """List users: id, email, username, plan, created."""
    for user in db.session.scalars(select(User).order_by(User.created_at, User.id)):
        click.echo(f"{user.id}\t{user.email}\t{user.username}\t{user.plan}\t{user.created_at.isoformat()}")


@tokens_cli.command("purge")
def purge_tokens() -> None:
    """Drop expired sessions and ones revoked over a day ago."""
    from chatapp.services.users import purge_sessions

    count = purge_sessions(db.session)
    db.session.commit()
    click.echo(f"purged {count} sessions")


@keys_cli.command("generate")
def generate_key() -> None:
    """Print a new random key for CHATAPP_ENCRYPTION_KEYS."""
    from chatapp.crypto import generate_key as new_key

    click.echo(new_key())


@keys_cli.command("rotate")
def rotate_keys() -> None:
    """Re-encrypt every stored API key under the first key of CHATAPP_ENCRYPTION_KEYS."""
    from chatapp.deps import deps
    from chatapp.services.model_configs import rotate_keys as rotate

    changed, unreadable = rotate(db.session, deps().keyring)
    db.session.commit()
    click.echo(f"re-encrypted {changed} api keys")
    if unreadable:
        # Non-zero exit so a rotation script stops here: these rows need the key they were written with
        # added back to CHATAPP_ENCRYPTION_KEYS, or their owners must set the key again.
        _fail(f"{len(unreadable)} api keys could not be decrypted with any configured key "
              f"(model configs {', '.join(unreadable)}); they were left as they are")


@chat_cli.command("reap")
@click.option("--older-than", type=int, default=None,
              help="Also mark streams older than this many seconds (default: the stream time limit).")
def reap(older_than: int | None) -> None:
    """Mark streams whose worker died as incomplete, so their conversations are usable again."""
    from chatapp.services.chat import reap_stale_streams

    limit = current_app.config["STREAM_MAX_SECONDS"] if older_than is None else older_than
    count = reap_stale_streams(db.session, max_age_seconds=limit)
    db.session.commit()
    click.echo(f"reaped {count} streams")


def init_app(app) -> None:
    for group in (users_cli, tokens_cli, keys_cli, chat_cli):
        app.cli.add_command(group)
