"""Accounts: registration, credentials, profile changes. Tokens are minted by the caller."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from chatapp import clock, passwords
from chatapp.errors import Conflict, Forbidden, Unauthorized, Unprocessable
from chatapp.models import AuthSession, User


def check_new_password(password: str, field: str = "password") -> None:
    """`field` is the request's name for it, so `details` points the client at the right input."""
    if not passwords.MIN_LENGTH <= len(password) <= passwords.MAX_LENGTH:
        # A length rule is plain validation (a 129-character password is not "weak"); weak_password is
        # kept for the common-password list, as API.md words it.
        raise Unprocessable.field(field, f"Length must be between {passwords.MIN_LENGTH} and "
                                         f"{passwords.MAX_LENGTH}.")
    if passwords.is_common(password):
        raise Unprocessable("weak_password", "This password is too common; choose another.",
                            details={field: ["Too common."]})


def _email_taken() -> Conflict:
    return Conflict("email_taken", "This email address is already registered.")


def _flush_unique_email(session: Session) -> None:
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise _email_taken() from None


def email_exists(session: Session, email: str) -> bool:
    return session.scalar(select(func.count()).select_from(User).where(User.email == email)) > 0


def register(session: Session, *, email: str, username: str, password: str, plan: str) -> User:
    check_new_password(password)
    if email_exists(session, email):
        raise _email_taken()
    user = User(email=email, username=username, password_hash=passwords.hash_password(password), plan=plan)
    session.add(user)
    _flush_unique_email(session)  # the unique index settles a race between two registrations
    return user


def authenticate(session: Session, *, email: str, password: str) -> User:
    user = session.scalar(select(User).where(User.email == email.strip().lower()))
    if not passwords.verify_password(user.password_hash if user else None, password):
        raise Unauthorized("invalid_credentials", "The email or password is wrong.")
    if passwords.needs_rehash(user.password_hash):
        user.password_hash = passwords.hash_password(password)
    return user


def change_username(user: User, username: str) -> User:
    user.username = username
    return user


def change_email(session: Session, user: User, email: str) -> User:
    if email != user.email:
        if email_exists(session, email):
            raise _email_taken()
        user.email = email
        _flush_unique_email(session)
    return user


def change_password(session: Session, user: User, *, current_password: str, new_password: str) -> User:
    """New password; every session of the user dies (token version bump + revocation)."""
    if not passwords.verify_password(user.password_hash, current_password):
        raise Forbidden("wrong_password", "The current password is wrong.")
    check_new_password(new_password, "new_password")
    user.password_hash = passwords.hash_password(new_password)
    user.token_version += 1
    session.execute(update(AuthSession)
                    .where(AuthSession.user_id == user.id, AuthSession.revoked_at.is_(None))
                    .values(revoked_at=clock.now(), revoked_reason="password_changed"))
    return user


def purge_sessions(session: Session) -> int:
    """Drop sessions that can no longer be used (expired or revoked over a day ago)."""
    from datetime import timedelta

    cutoff = clock.now()
    result = session.execute(AuthSession.__table__.delete().where(
        (AuthSession.expires_at < cutoff) | (AuthSession.revoked_at < cutoff - timedelta(days=1))))
    return result.rowcount
