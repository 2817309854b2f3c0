"""Access + refresh token pairs bound to a login session, and the checks that make revocation real.

Every token carries `sid` (its AuthSession) and `tv` (the user's token version). One query per
authenticated request reads the session and its user's token version; a token is dead when its session is revoked
or expired, or when the user's token version moved on (password change). A refresh token is good only
while its jti is the session's current one: presenting a spent one is treated as theft and revokes
the whole session (RFC 6819 5.2.2.3, as microblog-api does).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import timedelta

from flask import current_app, request
from flask_jwt_extended import create_access_token, create_refresh_token, current_user
from sqlalchemy import bindparam, select, update

from chatapp import clock
from chatapp.clock import new_id
from chatapp.errors import error_response
from chatapp.extensions import db, jwt
from chatapp.models import AuthSession, User


def plan_claims(plan: str) -> dict:
    plan_config = current_app.config["PLANS"].get(plan, {})
    return {"scopes": list(plan_config.get("scopes", [])), "limits": dict(plan_config.get("limits", {}))}


def token_pair(user: User, session: AuthSession) -> dict:
    """Mint both tokens for a session; the refresh token's jti is the session's current one."""
    claims = {"sid": session.id, "tv": user.token_version}
    access_seconds = current_app.config["JWT_ACCESS_SECONDS"]
    refresh_seconds = current_app.config["JWT_REFRESH_SECONDS"]
    return {
        "access_token": create_access_token(user.id, additional_claims={**claims, **plan_claims(user.plan)}),
        "refresh_token": create_refresh_token(user.id, additional_claims={**claims, "jti": session.refresh_jti}),
        "token_type": "Bearer",
        "expires_in": access_seconds,
        "refresh_expires_in": refresh_seconds,
        "user": user,
    }


def open_session(user: User) -> AuthSession:
    """A new login session for this request's client (not committed)."""
    session = AuthSession(
        user=user, refresh_jti=new_id(),
        expires_at=clock.now() + timedelta(seconds=current_app.config["JWT_REFRESH_SECONDS"]),
        user_agent=(request.user_agent.string or "")[:255] or None, ip=request.remote_addr,
    )
    db.session.add(session)
    return session


def rotate(session: AuthSession, spent_jti: str) -> bool:
    """Move the session to a new refresh jti, atomically: only one of two racing refreshes wins.

    The session's expiry slides with it: the new refresh token says `refresh_expires_in` from now, and the
    session must not end before the token it just issued.
    """
    now = clock.now()
    result = db.session.execute(
        update(AuthSession)
        .where(AuthSession.id == session.id, AuthSession.refresh_jti == spent_jti, AuthSession.revoked_at.is_(None))
        .values(refresh_jti=new_id(), refreshed_at=now,
                expires_at=now + timedelta(seconds=current_app.config["JWT_REFRESH_SECONDS"]))
        .returning(AuthSession.refresh_jti, AuthSession.expires_at)
    ).first()
    if result is None:
        return False
    session.refresh_jti, session.expires_at = result
    return True


def revoke(session: AuthSession, reason: str) -> None:
    session.revoked_at = session.revoked_at or clock.now()
    session.revoked_reason = session.revoked_reason or reason


@dataclass(frozen=True, slots=True)
class Caller:
    """`current_user`: whom a verified, unrevoked token speaks for. Most endpoints need only the id, so the
    ORM rows are loaded only by those that need them (current_session, current_user_record)."""

    id: str
    session_id: str


def current_session() -> AuthSession:
    """The session the verified token belongs to, with its user (one statement; logout and refresh)."""
    return db.session.get(AuthSession, current_user.session_id)


def current_user_record() -> User:
    """The verified token's user as a row to read or change."""
    return db.session.get(User, current_user.id)


def _session_check_statement():
    sessions, users = AuthSession.__table__.c, User.__table__.c
    return (select(sessions.user_id, sessions.revoked_at, sessions.expires_at, sessions.refresh_jti,
                   users.token_version)
            .join_from(AuthSession.__table__, User.__table__, users.id == sessions.user_id)
            .where(sessions.id == bindparam("sid")))


_SESSION_CHECK = _session_check_statement()  # built once: this runs on every authenticated request


def _is_revoked(_header: dict, payload: dict) -> bool:
    sid = payload.get("sid")
    # Only our own key signs tokens, but a claim of the wrong shape must still mean "no session", not a 500.
    row = db.session.execute(_SESSION_CHECK, {"sid": sid}).first() if isinstance(sid, str) else None
    if row is None or row.user_id != payload["sub"] or row.revoked_at is not None:
        return True
    if row.expires_at <= clock.now() or row.token_version != payload.get("tv"):
        return True
    if payload["type"] == "refresh" and payload["jti"] != row.refresh_jti:
        # A spent refresh token came back: someone holds a copy. Kill the whole session.
        revoke(db.session.get(AuthSession, sid), "refresh_reuse")
        db.session.commit()
        return True
    return False


def _unauthorized(code: str, message: str):
    def callback(*_args):
        return error_response(401, code, message, headers={"WWW-Authenticate": "Bearer"})
    return callback


def init_app(app) -> None:
    secret = app.config["SECRET_KEY"].encode()
    # A key of its own, derived from the secret, so the raw secret never signs anything directly.
    app.config.update(
        JWT_SECRET_KEY=hmac.new(secret, b"chatapp jwt signing", hashlib.sha256).hexdigest(),
        JWT_ALGORITHM="HS256",
        JWT_DECODE_ALGORITHMS=["HS256"],
        JWT_TOKEN_LOCATION=["headers"],
        JWT_ACCESS_TOKEN_EXPIRES=timedelta(seconds=app.config["JWT_ACCESS_SECONDS"]),
        JWT_REFRESH_TOKEN_EXPIRES=timedelta(seconds=app.config["JWT_REFRESH_SECONDS"]),
        JWT_ENCODE_ISSUER=app.config["JWT_ISSUER"],
        JWT_DECODE_ISSUER=app.config["JWT_ISSUER"],
        JWT_ENCODE_AUDIENCE=app.config["JWT_AUDIENCE"],
        JWT_DECODE_AUDIENCE=app.config["JWT_AUDIENCE"],
        JWT_VERIFY_SUB=True,
        JWT_DECODE_LEEWAY=0,
        JWT_COOKIE_CSRF_PROTECT=False,  # headers only: no csrf claim to carry in every token
    )
    jwt.init_app(app)
    jwt.token_in_blocklist_loader(_is_revoked)
    jwt.user_lookup_loader(lambda _header, payload: Caller(payload["sub"], payload["sid"]))
    jwt.unauthorized_loader(_unauthorized("token_missing", "A bearer token is required."))
    jwt.invalid_token_loader(_unauthorized("token_invalid", "The token is invalid."))
    jwt.expired_token_loader(_unauthorized("token_expired", "The token has expired."))
    jwt.revoked_token_loader(_unauthorized("token_revoked", "The token has been revoked."))
    jwt.needs_fresh_token_loader(_unauthorized("token_not_fresh", "A fresh token is required."))
    jwt.user_lookup_error_loader(_unauthorized("token_revoked", "The token has been revoked."))
    jwt.token_verification_failed_loader(_unauthorized("token_invalid", "The token is invalid."))
