"""Accounts and tokens: /api/v1/user."""

from __future__ import annotations

from flask import current_app, request
from flask_jwt_extended import decode_token, get_jwt, jwt_required
from flask_smorest import Blueprint

from chatapp import tokens
from chatapp.errors import Unauthorized
from chatapp.extensions import db, limiter
from chatapp.schemas import EmailIn, LoginIn, PasswordChangeIn, RegisterIn, TokenPairOut, UsernameIn, UserOut
from chatapp.services import users

blp = Blueprint("user", __name__, description="Accounts and tokens")
ACCESS = [{"access": []}]
REFRESH = [{"refresh": []}]


def _login_email() -> str:
    body = request.get_json(silent=True)
    email = body.get("email") if isinstance(body, dict) else None
    return "login-email:" + (email.strip().lower() if isinstance(email, str) else "")


def _new_session_pair(user):
    session = tokens.open_session(user)
    db.session.commit()
    return tokens.token_pair(user, session)


@blp.post("/register")
@limiter.limit(lambda: current_app.config["RATELIMIT_REGISTER"])
@blp.arguments(RegisterIn())
@blp.response(201, TokenPairOut)
@blp.alt_response(409, description="email_taken")
@blp.alt_response(429, description="rate_limited")
def register(data):
    """Create an account and log it in."""
    user = users.register(db.session, plan=current_app.config["DEFAULT_PLAN"], **data)
    return _new_session_pair(user)


@blp.post("/login")
@limiter.limit(lambda: current_app.config["RATELIMIT_LOGIN"])
@limiter.limit(lambda: current_app.config["RATELIMIT_LOGIN_FAILURES"], key_func=_login_email,
               deduct_when=lambda response: response.status_code == 401)
@blp.arguments(LoginIn())
@blp.response(200, TokenPairOut)
@blp.alt_response(401, description="invalid_credentials")
@blp.alt_response(429, description="rate_limited")
def login(data):
    """Log in with email and password."""
    user = users.authenticate(db.session, **data)
    return _new_session_pair(user)


@blp.post("/refresh")
@jwt_required(refresh=True)
@blp.response(200, TokenPairOut)
@blp.doc(security=REFRESH)
def refresh():
    """Trade the refresh token for a new pair; the old refresh token is spent."""
    session = tokens.current_session()
    if not tokens.rotate(session, get_jwt()["jti"]):
        # Lost a race with another refresh of the same token: that is reuse too.
        tokens.revoke(session, "refresh_reuse")
        db.session.commit()
        raise Unauthorized("token_revoked", "The token has been revoked.")
    db.session.commit()
    return tokens.token_pair(session.user, session)


@blp.get("/me")
@jwt_required()
@blp.response(200, UserOut)
@blp.doc(security=ACCESS)
def me():
    """The current user."""
    return tokens.current_user_record()


@blp.post("/me/username")
@jwt_required()
@blp.arguments(UsernameIn())
@blp.response(200, UserOut)
@blp.doc(security=ACCESS)
def change_username(data):
    """Change the username."""
    user = users.change_username(tokens.current_user_record(), data["username"])
    db.session.commit()
    return user


@blp.post("/me/email")
@jwt_required()
@blp.arguments(EmailIn())
@blp.response(200, UserOut)
@blp.alt_response(409, description="email_taken")
@blp.doc(security=ACCESS)
def change_email(data):
    """Change the email address."""
    user = users.change_email(db.session, tokens.current_user_record(), data["email"])
    db.session.commit()
    return user


def _token_subject() -> str:
    """Key for password guesses: the token's user (signature checked, so nobody can spend another's quota)."""
    token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    try:
        return "password-user:" + decode_token(token)["sub"]
    except Exception:  # noqa: BLE001 - any bad token: the view answers 401 anyway
        return "password-user:invalid"


@blp.post("/me/password")
@limiter.limit(lambda: current_app.config["RATELIMIT_PASSWORD_FAILURES"], key_func=_token_subject,
               deduct_when=lambda response: response.status_code == 403)
@jwt_required(refresh=True)
@blp.arguments(PasswordChangeIn())
@blp.response(200, TokenPairOut)
@blp.alt_response(403, description="wrong_password")
@blp.alt_response(429, description="rate_limited (wrong current passwords)")
@blp.doc(security=REFRESH)
def change_password(data):
    """Change the password (refresh token): every session ends and a new pair is returned."""
    user = users.change_password(db.session, tokens.current_user_record(), **data)
    return _new_session_pair(user)


@blp.post("/logout")
@jwt_required(refresh=True)
@blp.response(204)
@blp.doc(security=REFRESH)
def logout():
    """End this session: its refresh and access tokens stop working at once."""
    tokens.revoke(tokens.current_session(), "logout")
    db.session.commit()
