"""Accounts and tokens (/api/v1/user, issue 3): every row and rule of API.md's Users section.

Runs on SQLite and, with CHATAPP_TEST_DATABASE_URL, on PostgreSQL; rate limits use whatever storage
CHATAPP_TEST_RATELIMIT_STORAGE_URI names (each app gets its own key prefix). The two-worker Redis test
lives in test_users_live.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import time
import uuid

import argon2
import jwt as pyjwt
import pytest
from sqlalchemy import func, select

from chatapp import cli, clock, passwords, tokens
from chatapp.extensions import db
from chatapp.models import AuthSession, User
from chatapp.services import users as users_service
from tests.conftest import PASSWORD, Account, assert_error, remember_secret

USER_KEYS = {"id", "email", "username", "plan", "created_at"}
PAIR_KEYS = {"access_token", "refresh_token", "token_type", "expires_in", "refresh_expires_in", "user"}
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
NEW_PASSWORD = remember_secret("a brand new passphrase 42")
WRONG_PASSWORD = remember_secret("not the right passphrase")


# ------------------------------------------------------------------ helpers


def claims(token: str) -> dict:
    """The payload, read without checking the signature (what a client can see)."""
    return pyjwt.decode(token, options={"verify_signature": False})


def resign(app, token: str, *, key: str | None = None, algorithm: str = "HS256", drop=(), **changes) -> str:
    """The token's payload with `changes` (and without `drop`), signed with the app's key unless told."""
    payload = {name: value for name, value in {**claims(token), **changes}.items() if name not in drop}
    return remember_secret(pyjwt.encode(payload, key or app.config["JWT_SECRET_KEY"], algorithm=algorithm))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(token: str) -> str:
    """The same claims under `alg: none` with an empty signature."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return remember_secret(f"{header}.{token.split('.')[1]}.")


def tampered_signature(token: str) -> str:
    head, body, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    return remember_secret(f"{head}.{body}.{flipped}")


def tampered_payload(token: str, **changes) -> str:
    """Claims changed, the original signature kept."""
    head, _body, signature = token.split(".")
    body = _b64(json.dumps({**claims(token), **changes}).encode())
    return remember_secret(f"{head}.{body}.{signature}")


def pair(response, status: int = 200) -> Account:
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:500])
    body = response.get_json()
    assert set(body) == PAIR_KEYS
    return Account(body["user"], remember_secret(body["access_token"]), remember_secret(body["refresh_token"]),
                   "", body["user"]["email"])


def login(api, email: str, password: str):
    return api.post("user/login", {"email": email, "password": remember_secret(password)})


def login_pair(api, account: Account, password: str | None = None) -> Account:
    new = pair(login(api, account.email, password or account.password))
    new.password = password or account.password
    return new


def refresh(api, account: Account) -> Account:
    new = pair(api.post("user/refresh", token=account.refresh))
    new.password = account.password
    return new


def works(api, account: Account) -> bool:
    """Both tokens of a pair still accepted? (checks the access token without spending the refresh one)"""
    return api.get("user/me", token=account.access).status_code == 200


def assert_dead(api, account: Account) -> None:
    """Neither token of this pair is accepted any more."""
    assert_error(api.get("user/me", token=account.access), 401, "token_revoked")
    assert_error(api.post("user/refresh", token=account.refresh), 401, "token_revoked")


def stored_user(app, email: str) -> User:
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == email))
        db.session.expunge_all()
        return user


def session_row(app, sid: str) -> AuthSession | None:
    with app.app_context():
        row = db.session.get(AuthSession, sid)
        db.session.expunge_all()
        return row


def register_body(**changes) -> dict:
    body = {"email": f"v-{uuid.uuid4().hex[:10]}@example.com", "username": "Valid", "password": PASSWORD}
    for name, value in changes.items():
        if value is MISSING:
            body.pop(name)
        else:
            body[name] = value
    if isinstance(body.get("password"), str):
        remember_secret(body["password"])
    return body


MISSING = object()


# ------------------------------------------------------------------ the token pair


def test_register_answers_a_token_pair_that_works(app, api):
    response = api.post("user/register", {"email": "pair@example.com", "username": "Pair", "password": PASSWORD})
    account = pair(response, 201)
    body = response.get_json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 15 * 60 and body["refresh_expires_in"] == 30 * 24 * 3600
    assert response.headers["Cache-Control"] == "no-store"  # tokens never sit in a cache
    user = body["user"]
    assert set(user) == USER_KEYS
    assert (user["email"], user["username"], user["plan"]) == ("pair@example.com", "Pair", "free")
    assert ISO_MS.match(user["created_at"])
    uuid.UUID(user["id"])

    access, refresh_claims = claims(account.access), claims(account.refresh)
    assert pyjwt.get_unverified_header(account.access)["alg"] == "HS256"
    assert (access["type"], refresh_claims["type"]) == ("access", "refresh")
    assert access["sub"] == refresh_claims["sub"] == user["id"]
    assert access["sid"] == refresh_claims["sid"]
    assert access["tv"] == refresh_claims["tv"] == 0
    assert (access["iss"], access["aud"]) == ("chatapp", "chatapp-api")
    assert access["exp"] - access["iat"] == 15 * 60
    assert refresh_claims["exp"] - refresh_claims["iat"] == 30 * 24 * 3600
    assert access["scopes"] == ["model_config:create"] and access["limits"] == {"model_configs": 5}

    me = api.get("user/me", token=account.access)
    assert me.status_code == 200 and me.get_json() == user
    assert refresh(api, account).user == user


def test_each_login_opens_its_own_session(app, api, alice):
    first, second = login_pair(api, alice), login_pair(api, alice)
    assert first.user == alice.user
    sids = {claims(token)["sid"] for token in (alice.access, first.access, second.access)}
    assert len(sids) == 3
    assert works(api, alice) and works(api, first) and works(api, second)
    row = session_row(app, claims(first.access)["sid"])
    assert row.user_id == alice.user["id"] and row.ip == "127.0.0.1" and row.revoked_at is None


@pytest.mark.app_settings(JWT_ACCESS_SECONDS=1, JWT_REFRESH_SECONDS=120)
def test_token_lifetimes_follow_configuration_and_an_expired_access_token_is_refused(app, api):
    response = api.post("user/register", register_body())
    account = pair(response, 201)
    assert response.get_json()["expires_in"] == 1 and response.get_json()["refresh_expires_in"] == 120
    access = claims(account.access)
    assert access["exp"] - access["iat"] == 1
    assert claims(account.refresh)["exp"] - claims(account.refresh)["iat"] == 120
    time.sleep(max(0.0, access["exp"] - time.time()) + 0.05)
    assert_error(api.get("user/me", token=account.access), 401, "token_expired")
    assert api.get("user/me", token=refresh(api, account).access).status_code == 200


@pytest.mark.app_settings(JWT_ACCESS_SECONDS=1, JWT_REFRESH_SECONDS=120)
def test_a_token_verified_before_still_expires_and_still_dies_with_its_session(app, api):
    """Verified claims are cached per worker (CachingJWTManager): that must change neither expiry nor revocation."""
    account = pair(api.post("user/register", register_body()), 201)
    assert works(api, account) and works(api, account)  # the second use is served from the cache
    assert account.access in app.extensions["chatapp.verified_tokens"]
    time.sleep(max(0.0, claims(account.access)["exp"] - time.time()) + 0.05)
    assert_error(api.get("user/me", token=account.access), 401, "token_expired")

    fresh = refresh(api, account)
    assert works(api, fresh)
    assert api.post("user/logout", token=fresh.refresh).status_code == 204
    assert_error(api.get("user/me", token=fresh.access), 401, "token_revoked")  # cached, yet dead at once


# ------------------------------------------------------------------ refresh


def test_refresh_rotates_the_refresh_token(app, api, alice):
    second = refresh(api, alice)
    assert claims(second.access)["sid"] == claims(alice.access)["sid"]
    assert claims(second.refresh)["jti"] != claims(alice.refresh)["jti"]
    assert second.user == alice.user
    assert works(api, second)
    third = refresh(api, second)  # the new refresh token is the good one now
    assert works(api, third)
    assert session_row(app, claims(third.access)["sid"]).refresh_jti == claims(third.refresh)["jti"]


def test_a_replayed_refresh_token_kills_its_session(app, api, alice):
    other = login_pair(api, alice)
    rotated = refresh(api, alice)

    assert_error(api.post("user/refresh", token=alice.refresh), 401, "token_revoked")  # replay of a spent one

    assert_dead(api, rotated)  # the thief's or the owner's: the new pair dies with the session
    assert_error(api.get("user/me", token=alice.access), 401, "token_revoked")
    row = session_row(app, claims(alice.access)["sid"])
    assert row.revoked_at is not None and row.revoked_reason == "refresh_reuse"
    assert works(api, other)  # another login of the same user is not affected
    assert works(api, refresh(api, other))


@pytest.mark.parametrize(("path", "body"), [
    ("user/logout", None),
    ("user/me/password", {"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
])
def test_a_spent_refresh_token_is_a_replay_wherever_it_is_shown(app, api, alice, path, body):
    rotated = refresh(api, alice)
    assert_error(api.post(path, body, token=alice.refresh), 401, "token_revoked")
    assert_dead(api, rotated)
    assert login(api, alice.email, PASSWORD).status_code == 200  # the password did not change


def test_rotation_is_atomic_so_only_one_of_two_racing_refreshes_wins(app, alice):
    with app.app_context():
        session = db.session.get(AuthSession, claims(alice.refresh)["sid"])
        spent = session.refresh_jti
        assert tokens.rotate(session, spent) is True
        db.session.commit()
        assert tokens.rotate(session, spent) is False  # the second request with the same jti loses
        db.session.rollback()


def test_each_refresh_extends_the_session_as_far_as_the_new_refresh_token_says(app, api, alice):
    clock.travel(20 * 24 * 3600)
    second = refresh(api, alice)
    clock.travel(20 * 24 * 3600)  # 40 days after login, 20 after the last refresh
    third = refresh(api, second)
    assert works(api, third)
    clock.travel(30 * 24 * 3600 + 1)  # idle longer than a refresh token lives
    assert_error(api.post("user/refresh", token=third.refresh), 401, "token_revoked")


def test_an_expired_session_refuses_both_tokens(app, api, alice):
    clock.travel(30 * 24 * 3600 + 1)  # the session row's expiry (the JWTs themselves use real time)
    assert_error(api.post("user/refresh", token=alice.refresh), 401, "token_revoked")
    assert_error(api.get("user/me", token=alice.access), 401, "token_revoked")


# ------------------------------------------------------------------ logout


def test_logout_ends_this_session_at_once_and_only_this_one(app, api, alice):
    other = login_pair(api, alice)
    response = api.post("user/logout", token=alice.refresh)
    assert response.status_code == 204 and response.get_data() == b""

    assert_dead(api, alice)  # the access token too, not just at its expiry
    assert_error(api.post("user/logout", token=alice.refresh), 401, "token_revoked")
    assert session_row(app, claims(alice.access)["sid"]).revoked_reason == "logout"
    assert works(api, other)
    assert works(api, refresh(api, other))


# ------------------------------------------------------------------ password change


def change_password(api, account: Account, current: str, new: str, token: str | None = None):
    return api.post("user/me/password", {"current_password": remember_secret(current),
                                         "new_password": remember_secret(new)}, token=token or account.refresh)


def test_password_change_kills_every_session_and_the_old_password(app, api, alice, bob):
    other = login_pair(api, alice)
    caller = login_pair(api, alice)
    old_hash = stored_user(app, alice.email).password_hash

    response = change_password(api, caller, alice.password, NEW_PASSWORD)
    fresh = pair(response)
    assert fresh.user == alice.user

    for account in (alice, other, caller):  # every session, the caller's old pair included
        assert_dead(api, account)
    assert works(api, fresh)
    assert works(api, refresh(api, fresh))
    assert claims(fresh.access)["tv"] == 1
    assert_error(login(api, alice.email, alice.password), 401, "invalid_credentials")
    assert works(api, login_pair(api, alice, NEW_PASSWORD))
    assert stored_user(app, alice.email).password_hash != old_hash
    assert works(api, bob)  # other users are untouched


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    ({"current_password": WRONG_PASSWORD, "new_password": NEW_PASSWORD}, 403, "wrong_password", None),
    ({"current_password": PASSWORD, "new_password": "password1"}, 422, "weak_password", "new_password"),
    ({"current_password": PASSWORD, "new_password": "qwertyuiop"}, 422, "weak_password", "new_password"),
    ({"current_password": PASSWORD, "new_password": "seven77"}, 422, "validation_error", "new_password"),
    ({"current_password": PASSWORD, "new_password": "n" * 129}, 422, "validation_error", "new_password"),
    ({"current_password": WRONG_PASSWORD, "new_password": "password1"}, 403, "wrong_password", None),
    ({"new_password": NEW_PASSWORD}, 422, "validation_error", "current_password"),
    ({"current_password": PASSWORD}, 422, "validation_error", "new_password"),
    ({"current_password": PASSWORD, "new_password": 12345678}, 422, "validation_error", "new_password"),
    ({"current_password": PASSWORD, "new_password": NEW_PASSWORD, "logout_all": True}, 422,
     "validation_error", "logout_all"),
], ids=["wrong-current", "common", "common-2", "7-chars", "129-chars", "wrong-current-and-weak",
        "no-current", "no-new", "new-not-a-string", "unknown-field"])
def test_a_refused_password_change_changes_nothing(app, api, alice, body, status, code, field):
    for value in body.values():
        if isinstance(value, str):
            remember_secret(value)
    error = assert_error(api.post("user/me/password", body, token=alice.refresh), status, code)
    if field:
        assert list(error["details"]) == [field]  # the request's own field name, even for weak_password
    assert works(api, alice) and works(api, refresh(api, alice))
    assert login(api, alice.email, alice.password).status_code == 200


# ------------------------------------------------------------------ wrong token type, bad tokens


@pytest.mark.parametrize(("method", "path", "kind", "body"), [
    ("post", "user/refresh", "access", None),
    ("post", "user/logout", "access", None),
    ("post", "user/me/password", "access", {"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
    ("get", "user/me", "refresh", None),
    ("post", "user/me/username", "refresh", {"username": "Mallory"}),
    ("post", "user/me/email", "refresh", {"email": "mallory@example.com"}),
])
def test_a_token_of_the_wrong_type_is_401(app, api, alice, method, path, kind, body):
    token = alice.access if kind == "access" else alice.refresh
    response = api.post(path, body, token=token) if method == "post" else api.get(path, token=token)
    assert_error(response, 401, "token_invalid")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    # Nothing happened, and a refresh token shown at the wrong door is not mistaken for a replay.
    me = api.get("user/me", token=alice.access).get_json()
    assert (me["username"], me["email"]) == ("Alice", alice.email)
    assert works(api, refresh(api, alice))
    assert login(api, alice.email, alice.password).status_code == 200


FORGERIES = {
    "tampered-signature": (lambda app, acc, other: tampered_signature(acc.access), "token_invalid"),
    "tampered-payload": (lambda app, acc, other: tampered_payload(acc.access, sub=other.user["id"]), "token_invalid"),
    "alg-none": (lambda app, acc, other: unsigned(acc.access), "token_invalid"),
    "another-key": (lambda app, acc, other: resign(app, acc.access, key="some-other-key-" + "z" * 32),
                    "token_invalid"),
    "hs512-with-our-key": (lambda app, acc, other: resign(app, acc.access, algorithm="HS512"), "token_invalid"),
    "expired": (lambda app, acc, other: resign(app, acc.access, exp=int(time.time()) - 5), "token_expired"),
    "wrong-issuer": (lambda app, acc, other: resign(app, acc.access, iss="someone-else"), "token_invalid"),
    "wrong-audience": (lambda app, acc, other: resign(app, acc.access, aud="another-api"), "token_invalid"),
    "no-session": (lambda app, acc, other: resign(app, acc.access, drop=("sid",)), "token_revoked"),
    "sid-not-a-string": (lambda app, acc, other: resign(app, acc.access, sid={"id": 1}), "token_revoked"),
    "sid-a-number": (lambda app, acc, other: resign(app, acc.access, sid=7), "token_revoked"),
    "unknown-session": (lambda app, acc, other: resign(app, acc.access, sid=str(uuid.uuid4())), "token_revoked"),
    "session-of-another-user": (lambda app, acc, other: resign(app, acc.access, sub=other.user["id"]),
                                "token_revoked"),
    "stale-token-version": (lambda app, acc, other: resign(app, acc.access, tv=-1), "token_revoked"),
}


@pytest.mark.filterwarnings("error::sqlalchemy.exc.SAWarning")  # e.g. a lookup by a missing sid
@pytest.mark.parametrize("forgery", FORGERIES, ids=list(FORGERIES))
def test_forged_or_expired_tokens_are_401(app, api, alice, bob, forgery):
    make, code = FORGERIES[forgery]
    response = api.get("user/me", token=make(app, alice, bob))
    assert_error(response, 401, code)
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert works(api, alice) and works(api, bob)


def test_forged_refresh_tokens_are_401(app, api, alice):
    for token in (tampered_signature(alice.refresh), unsigned(alice.refresh),
                  resign(app, alice.refresh, key="some-other-key-" + "z" * 32),
                  resign(app, alice.refresh, exp=int(time.time()) - 5)):
        assert_error(api.post("user/refresh", token=token), 401)
    assert works(api, refresh(api, alice))  # none of them counted as a replay of the real one


@pytest.mark.parametrize(("headers", "code"), [
    ({}, "token_missing"),
    ({"Authorization": "Bearer x"}, "token_invalid"),
    ({"Authorization": "Bearer a.b.c"}, "token_invalid"),
    ({"Authorization": "Bearer "}, "token_invalid"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "token_missing"),
    ({"Authorization": "Token abc"}, "token_missing"),
], ids=["missing", "garbage", "three-parts", "empty-bearer", "basic", "other-scheme"])
@pytest.mark.parametrize("path", ["user/me", "user/refresh"])
def test_missing_or_garbage_authorization_is_401(app, api, headers, code, path):
    response = api.get(path, headers=headers) if path == "user/me" else api.post(path, headers=headers)
    assert_error(response, 401, code)


def test_a_token_in_the_query_string_is_not_read(app, api, alice):
    assert_error(api.get(f"user/me?jwt={alice.access}"), 401, "token_missing")


# ------------------------------------------------------------------ the user object


def test_no_response_ever_contains_a_password_or_hash(app, api):
    password = remember_secret("hunter2 but much longer")
    email = "secretive@example.com"
    bodies = [api.post("user/register", {"email": email, "username": "S", "password": password})]
    account = pair(bodies[0], 201)
    bodies.append(api.post("user/login", {"email": email, "password": password}))
    bodies.append(api.get("user/me", token=account.access))
    bodies.append(api.post("user/refresh", token=pair(bodies[1]).refresh))
    bodies.append(api.post("user/me/username", {"username": "S2"}, token=account.access))
    bodies.append(api.post("user/me/email", {"email": "secretive2@example.com"}, token=account.access))
    bodies.append(change_password(api, account, password, NEW_PASSWORD))
    for response in bodies:
        assert response.status_code in (200, 201), response.get_json()
        raw = response.get_data(as_text=True)
        assert "argon2" not in raw and "password" not in raw.lower() and password not in raw
        body = response.get_json()
        assert set(body.get("user", body)) == USER_KEYS


def test_me_username_changes_and_trims(app, api, alice):
    response = api.post("user/me/username", {"username": "  Alice Liddell  "}, token=alice.access)
    assert response.status_code == 200 and response.get_json()["username"] == "Alice Liddell"
    assert api.get("user/me", token=alice.access).get_json()["username"] == "Alice Liddell"


# ------------------------------------------------------------------ email rules


def test_email_is_trimmed_and_lowercased(app, api):
    body = register_body(email="  Mixed.Case@Example.COM \t")
    account = pair(api.post("user/register", body), 201)
    assert account.user["email"] == "mixed.case@example.com"
    assert stored_user(app, "mixed.case@example.com") is not None
    assert login(api, " MIXED.case@EXAMPLE.com ", PASSWORD).status_code == 200


def _email_of_length(length: int) -> str:
    domain_rest = length - 64 - 1 - (63 + 1 + 63 + 1) - len(".com")
    return "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * domain_rest + ".com"


@pytest.mark.parametrize(("length", "status"), [(254, 201), (255, 422)])
def test_an_email_may_be_254_characters_long(app, api, length, status):
    email = _email_of_length(length)
    assert len(email) == length
    response = api.post("user/register", register_body(email=email.upper()))
    assert response.status_code == status, response.get_json()
    if status == 201:
        assert response.get_json()["user"]["email"] == email
    else:
        assert "email" in assert_error(response, 422, "validation_error")["details"]


@pytest.mark.parametrize("variant", ["taken@example.com", "TAKEN@EXAMPLE.COM", "  Taken@Example.com  "])
def test_register_with_a_taken_email_is_409_whatever_the_case(app, api, variant):
    api.register(email="Taken@example.com")
    assert_error(api.post("user/register", register_body(email=variant)), 409, "email_taken")
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(User)) == 1


def test_change_email(app, api, alice, bob):
    response = api.post("user/me/email", {"email": "  Alice.New@Example.COM "}, token=alice.access)
    assert response.status_code == 200 and response.get_json()["email"] == "alice.new@example.com"
    assert login(api, "alice.new@example.com", alice.password).status_code == 200
    assert_error(login(api, alice.email, alice.password), 401, "invalid_credentials")

    assert_error(api.post("user/me/email", {"email": bob.email.upper()}, token=alice.access), 409, "email_taken")
    same = api.post("user/me/email", {"email": "ALICE.NEW@example.com"}, token=alice.access)
    assert same.status_code == 200 and same.get_json()["email"] == "alice.new@example.com"
    assert api.get("user/me", token=bob.access).get_json()["email"] == bob.email


def test_the_unique_index_settles_a_race_between_two_registrations(app, api, alice, bob, monkeypatch):
    # As if the other request committed between our existence check and our insert.
    monkeypatch.setattr(users_service, "email_exists", lambda session, email: False)
    assert_error(api.post("user/register", register_body(email=alice.email)), 409, "email_taken")
    assert_error(api.post("user/me/email", {"email": alice.email}, token=bob.access), 409, "email_taken")
    assert api.get("user/me", token=bob.access).get_json()["email"] == bob.email


# ------------------------------------------------------------------ validation


TOO_LONG_EMAIL = "a" * 64 + "@" + ".".join(["b" * 60] * 3) + ".example.com"  # 262 characters


@pytest.mark.parametrize(("changes", "code", "field"), [
    ({"email": "not-an-email"}, "validation_error", "email"),
    ({"email": ""}, "validation_error", "email"),
    ({"email": "   "}, "validation_error", "email"),
    ({"email": "user@"}, "validation_error", "email"),
    ({"email": "@example.com"}, "validation_error", "email"),
    ({"email": "two words@example.com"}, "validation_error", "email"),
    ({"email": TOO_LONG_EMAIL}, "validation_error", "email"),
    ({"email": 42}, "validation_error", "email"),
    ({"email": None}, "validation_error", "email"),
    ({"email": ["a@example.com"]}, "validation_error", "email"),
    ({"email": MISSING}, "validation_error", "email"),
    ({"username": ""}, "validation_error", "username"),
    ({"username": "   "}, "validation_error", "username"),
    ({"username": "x" * 65}, "validation_error", "username"),
    ({"username": "a\x00b"}, "validation_error", "username"),
    ({"username": "a\nb"}, "validation_error", "username"),
    ({"username": "a\tb"}, "validation_error", "username"),
    ({"username": "a\x1bb"}, "validation_error", "username"),
    ({"username": "a\x7fb"}, "validation_error", "username"),
    ({"username": "evil\u202etxt"}, "validation_error", "username"),  # right-to-left override
    ({"username": 7}, "validation_error", "username"),
    ({"username": {"first": "A"}}, "validation_error", "username"),
    ({"username": MISSING}, "validation_error", "username"),
    ({"password": "seven77"}, "validation_error", "password"),
    ({"password": "p" * 129}, "validation_error", "password"),
    ({"password": "q" * 5000}, "validation_error", "password"),
    ({"password": "password1"}, "weak_password", None),
    ({"password": "qwertyuiop"}, "weak_password", None),
    ({"password": "PassWord1"}, "weak_password", None),  # the list is checked case-insensitively
    ({"password": "1234567890"}, "weak_password", None),
    ({"password": 12345678}, "validation_error", "password"),
    ({"password": None}, "validation_error", "password"),
    ({"password": MISSING}, "validation_error", "password"),
    ({"plan": "pro"}, "validation_error", "plan"),
    ({"is_admin": True}, "validation_error", "is_admin"),
], ids=lambda value: repr(value)[:40] if not isinstance(value, dict) else "-".join(
    f"{k}={v!r}"[:40] for k, v in value.items()))
def test_register_validation(app, api, changes, code, field):
    error = assert_error(api.post("user/register", register_body(**changes)), 422, code)
    if field:
        assert field in error["details"], error
        assert all(isinstance(problem, str) for problem in error["details"][field])
    elif "details" in error:  # weak_password may omit details; when given, they name the field
        assert list(error["details"]) == ["password"]
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(User)) == 0


@pytest.mark.parametrize("username", [
    "张三", "山田太郎", "김민준", "Zoë", "Zoe\u0308", "مرحبا", "😀", "👨\u200d👩\u200d👧\u200d👦", "🇨🇳",
    "👍🏽", "❤️", "x" * 64, "😀" * 64, "a b  c",
    "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", "می\u200cخواهم",
], ids=lambda value: value.encode("unicode_escape").decode()[:30])
def test_cjk_and_emoji_usernames_are_kept_intact(app, api, username):
    account = pair(api.post("user/register", register_body(username=f"  {username} ")), 201)
    assert account.user["username"] == username
    assert api.get("user/me", token=account.access).get_json()["username"] == username
    assert api.post("user/me/username", {"username": "Someone"}, token=account.access).status_code == 200
    changed = api.post("user/me/username", {"username": f"\t{username} "}, token=account.access)
    assert changed.status_code == 200 and changed.get_json()["username"] == username


@pytest.mark.parametrize("password", ["exactly8", "p" * 128, "        spaces  ", "密码是一句很长的话", "🔑" * 8])
def test_password_length_bounds_and_any_characters_are_accepted(app, api, password):
    remember_secret(password)
    account = pair(api.post("user/register", register_body(password=password)), 201)
    assert login(api, account.email, password).status_code == 200
    assert login(api, account.email, password.strip() + "x").status_code == 401  # taken as given, no trimming


@pytest.mark.parametrize(("path", "body", "field"), [
    ("user/me/username", {"username": ""}, "username"),
    ("user/me/username", {"username": "x" * 65}, "username"),
    ("user/me/username", {"username": "a\u0000b"}, "username"),
    ("user/me/username", {"username": 1}, "username"),
    ("user/me/username", {}, "username"),
    ("user/me/username", {"username": "ok", "email": "x@example.com"}, "email"),
    ("user/me/email", {"email": "nope"}, "email"),
    ("user/me/email", {"email": ""}, "email"),
    ("user/me/email", {"email": TOO_LONG_EMAIL}, "email"),
    ("user/me/email", {"email": False}, "email"),
    ("user/me/email", {}, "email"),
    ("user/me/email", {"email": "x@example.com", "username": "x"}, "username"),
])
def test_profile_change_validation(app, api, alice, path, body, field):
    error = assert_error(api.post(path, body, token=alice.access), 422, "validation_error")
    assert field in error["details"]
    me = api.get("user/me", token=alice.access).get_json()
    assert (me["username"], me["email"]) == ("Alice", alice.email)


@pytest.mark.parametrize(("body", "field"), [
    ({"email": "a@example.com"}, "password"),
    ({"password": PASSWORD}, "email"),
    ({"email": 1, "password": PASSWORD}, "email"),
    ({"email": "a@example.com", "password": ["x"]}, "password"),
    ({"email": "", "password": PASSWORD}, "email"),
    ({"email": "a@example.com", "password": PASSWORD, "remember_me": True}, "remember_me"),
])
def test_login_validation(app, api, body, field):
    error = assert_error(api.post("user/login", body), 422, "validation_error")
    assert field in error["details"]


@pytest.mark.parametrize(("kwargs", "status"), [
    ({"data": "email=a@example.com", "content_type": "application/x-www-form-urlencoded"}, 415),
    ({"data": "{not json", "content_type": "application/json"}, 400),
    ({"data": "[]", "content_type": "application/json"}, 400),
    ({"data": '"a string"', "content_type": "application/json"}, 400),
])
@pytest.mark.parametrize("path", ["user/register", "user/login"])
def test_non_object_bodies_are_refused_in_the_error_shape(app, api, kwargs, status, path):
    assert_error(api.post(path, **kwargs), status)


# ------------------------------------------------------------------ login answers


class CountingHasher(argon2.PasswordHasher):
    """The production parameters, counting verifications (to show both failures do the same work)."""

    def __init__(self):
        params = passwords.HASHER._parameters
        super().__init__(time_cost=params.time_cost, memory_cost=params.memory_cost,
                         parallelism=params.parallelism)
        self.verified = 0

    def verify(self, hash, password):
        self.verified += 1
        return super().verify(hash, password)


def test_unknown_email_and_wrong_password_get_the_same_answer(app, api, alice, monkeypatch):
    hasher = CountingHasher()
    monkeypatch.setattr(passwords, "HASHER", hasher)
    unknown = login(api, "nobody-" + alice.email, alice.password)
    assert hasher.verified == 1  # a dummy hash is checked so timing does not tell the two apart
    wrong = login(api, alice.email, WRONG_PASSWORD)
    assert hasher.verified == 2
    bodies = []
    for response in (unknown, wrong):
        body = assert_error(response, 401, "invalid_credentials")
        assert body.pop("request_id")
        bodies.append(body)
        assert "WWW-Authenticate" not in response.headers or response.headers["WWW-Authenticate"] == "Bearer"
    assert bodies[0] == bodies[1]
    assert unknown.headers.get("WWW-Authenticate") == wrong.headers.get("WWW-Authenticate")


def test_the_timing_dummy_password_does_not_log_in_an_unknown_email(app, api):
    # verify_password checks unknown emails against a dummy hash; that hash's own password must not pass.
    assert_error(login(api, "ghost@example.com", "not-a-real-password-just-for-timing"), 401, "invalid_credentials")


# ------------------------------------------------------------------ rate limits


def assert_rate_limited(response, *, at_most: int) -> None:
    body = assert_error(response, 429, "rate_limited")
    assert body["message"]
    retry_after = int(response.headers["Retry-After"])
    assert 0 < retry_after <= at_most


@pytest.mark.app_settings(RATELIMIT_LOGIN="3 per minute")
def test_login_is_rate_limited_per_ip(app, api, alice):
    statuses = [login(api, alice.email, alice.password).status_code,
                login(api, alice.email, WRONG_PASSWORD).status_code,
                login(api, "someone@example.com", WRONG_PASSWORD).status_code]
    assert statuses == [200, 401, 401]
    assert_rate_limited(login(api, alice.email, alice.password), at_most=60)
    assert_rate_limited(login(api, "other@example.com", alice.password), at_most=60)
    assert works(api, alice)  # the limit is on logins, not on the API


@pytest.mark.app_settings(RATELIMIT_LOGIN_FAILURES="2 per 15 minutes")
def test_failed_logins_are_limited_per_email_and_successes_do_not_count(app, api, alice, bob):
    for _ in range(4):
        assert login(api, alice.email, alice.password).status_code == 200
    assert login(api, alice.email, WRONG_PASSWORD).status_code == 401
    assert login(api, f"  {alice.email.upper()} ", WRONG_PASSWORD).status_code == 401  # same email, other spelling
    assert_rate_limited(login(api, alice.email, WRONG_PASSWORD), at_most=15 * 60)
    assert_rate_limited(login(api, alice.email, alice.password), at_most=15 * 60)  # locked, even when right

    assert login(api, bob.email, bob.password).status_code == 200  # another email is not affected
    assert login(api, bob.email, WRONG_PASSWORD).status_code == 401
    for _ in range(2):
        assert login(api, "nobody@example.com", WRONG_PASSWORD).status_code == 401
    assert_rate_limited(login(api, "nobody@example.com", WRONG_PASSWORD), at_most=15 * 60)
    assert works(api, alice)


@pytest.mark.app_settings(RATELIMIT_REGISTER="2 per minute")
def test_register_is_rate_limited(app, api):
    assert api.post("user/register", register_body()).status_code == 201
    assert api.post("user/register", register_body(email="bad")).status_code == 422  # every attempt counts
    assert_rate_limited(api.post("user/register", register_body()), at_most=60)
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(User)) == 1


# ------------------------------------------------------------------ password hashing


def test_passwords_are_hashed_with_argon2id_at_least_at_asvs_parameters(app, alice):
    stored = stored_user(app, alice.email).password_hash
    params = argon2.extract_parameters(stored)
    assert params.type is argon2.Type.ID
    assert params.time_cost >= 2 and params.memory_cost >= 19 * 1024 and params.parallelism >= 1
    assert alice.password not in stored


def test_a_hash_with_old_parameters_is_upgraded_at_login(app, api, monkeypatch):
    strong = passwords.HASHER
    monkeypatch.setattr(passwords, "HASHER", argon2.PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1))
    account = api.register(email="legacy@example.com")
    weak = stored_user(app, account.email).password_hash
    assert argon2.extract_parameters(weak).memory_cost == 8 * 1024

    monkeypatch.setattr(passwords, "HASHER", strong)  # the parameters were raised since
    assert login(api, account.email, account.password).status_code == 200
    upgraded = stored_user(app, account.email).password_hash
    assert not strong.check_needs_rehash(upgraded) and upgraded != weak
    assert login(api, account.email, account.password).status_code == 200
    assert stored_user(app, account.email).password_hash == upgraded  # once upgraded, left alone
    assert_error(login(api, account.email, WRONG_PASSWORD), 401, "invalid_credentials")


def test_a_failed_login_does_not_rehash(app, api, monkeypatch):
    strong = passwords.HASHER
    monkeypatch.setattr(passwords, "HASHER", argon2.PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1))
    account = api.register(email="legacy2@example.com")
    weak = stored_user(app, account.email).password_hash
    monkeypatch.setattr(passwords, "HASHER", strong)
    assert login(api, account.email, WRONG_PASSWORD).status_code == 401
    assert stored_user(app, account.email).password_hash == weak


# ------------------------------------------------------------------ plans in the token


def test_the_access_token_carries_the_plan(app, api, alice):
    access = claims(alice.access)
    assert access["scopes"] == app.config["PLANS"]["free"]["scopes"]
    assert access["limits"] == app.config["PLANS"]["free"]["limits"]
    assert "scopes" not in claims(alice.refresh)  # the refresh token only buys a new pair


# ------------------------------------------------------------------ CLI


def test_cli_users_create_reads_the_password_from_stdin(app, api, runner):
    password = remember_secret("a password piped in from stdin")
    result = runner.invoke(args=["users", "create", " Cli.User@Example.com ", "  命令行 "], input=password + "\n")
    assert result.exit_code == 0, result.output
    assert "cli.user@example.com" in result.output and "plan=free" in result.output
    assert password not in result.output
    account = login_pair(api, Account({}, "", "", password, "cli.user@example.com"), password)
    assert (account.user["username"], account.user["plan"]) == ("命令行", "free")


def test_cli_users_create_with_a_plan(app, api, runner):
    password = remember_secret("the pro plan's password")
    result = runner.invoke(args=["users", "create", "pro@example.com", "Pro", "--plan", "pro"], input=password)
    assert result.exit_code == 0, result.output
    account = pair(login(api, "pro@example.com", password))
    assert account.user["plan"] == "pro" and claims(account.access)["limits"] == {"model_configs": 50}


def test_cli_users_create_takes_a_crlf_line_from_a_pipe(app, api, monkeypatch):
    # CliRunner's stdin translates newlines; a real pipe does not, so feed the command a raw one.
    password = remember_secret("windows line endings here")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(password.encode() + b"\r\n"), newline=""))
    with app.app_context():
        cli.create_user.callback.__wrapped__("crlf@example.com", "Crlf", None)  # past with_appcontext
    assert login(api, "crlf@example.com", password).status_code == 200


@pytest.mark.parametrize(("args", "password", "message"), [
    (["users", "create", "weak@example.com", "Weak"], "password1", "common"),
    (["users", "create", "short@example.com", "Short"], "seven77", "8"),
    (["users", "create", "not-an-email", "Bad"], PASSWORD, "email"),
    (["users", "create", "ctl@example.com", "a\x01b"], PASSWORD, "username"),
    (["users", "create", "plan@example.com", "Plan", "--plan", "platinum"], PASSWORD, "platinum"),
    (["users", "create", "ALICE@example.com", "Again"], PASSWORD, "already registered"),
], ids=["common-password", "short-password", "bad-email", "control-char", "unknown-plan", "taken-email"])
def test_cli_users_create_refuses_bad_input(app, api, runner, args, password, message):
    api.register(email="alice@example.com")
    remember_secret(password)
    result = runner.invoke(args=args, input=password + "\n")
    assert result.exit_code != 0 and message in result.output, result.output
    assert password not in result.output
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(User)) == 1


def test_cli_set_plan_shows_in_the_next_token(app, api, runner, alice):
    result = runner.invoke(args=["users", "set-plan", alice.email.upper(), "pro"])
    assert result.exit_code == 0, result.output
    assert claims(alice.access)["limits"] == {"model_configs": 5}  # a token already issued keeps its claims
    refreshed = refresh(api, alice)
    assert claims(refreshed.access)["limits"] == {"model_configs": 50}
    assert refreshed.user["plan"] == "pro"
    assert api.get("user/me", token=refreshed.access).get_json()["plan"] == "pro"

    assert runner.invoke(args=["users", "set-plan", alice.email, "readonly"]).exit_code == 0
    readonly = claims(login_pair(api, alice).access)
    assert readonly["scopes"] == [] and readonly["limits"] == {"model_configs": 0}


@pytest.mark.parametrize(("args", "message"), [
    (["users", "set-plan", "nobody@example.com", "pro"], "no user"),
    (["users", "set-plan", "alice@example.com", "platinum"], "platinum"),
])
def test_cli_set_plan_refuses_unknown_users_and_plans(app, api, runner, args, message):
    api.register(email="alice@example.com")
    result = runner.invoke(args=args)
    assert result.exit_code != 0 and message in result.output
    assert stored_user(app, "alice@example.com").plan == "free"


def test_cli_users_list(app, api, runner, alice, bob):
    result = runner.invoke(args=["users", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split("\t")[:4] for line in lines] == [
        [alice.user["id"], alice.email, "Alice", "free"], [bob.user["id"], bob.email, "Bob", "free"]]
    assert "argon2" not in result.output


def test_cli_tokens_purge_drops_expired_and_long_revoked_sessions(app, api, runner, alice):
    logged_out = login_pair(api, alice)
    assert api.post("user/logout", token=logged_out.refresh).status_code == 204

    def rows() -> int:
        with app.app_context():
            return db.session.scalar(select(func.count()).select_from(AuthSession))

    result = runner.invoke(args=["tokens", "purge"])
    assert result.exit_code == 0 and "purged 0 sessions" in result.output
    assert rows() == 2  # a fresh revocation is kept for a day

    clock.travel(2 * 24 * 3600)
    assert "purged 1 sessions" in runner.invoke(args=["tokens", "purge"]).output
    assert rows() == 1
    assert works(api, refresh(api, alice))  # the live session survived the purge

    clock.travel(31 * 24 * 3600)
    assert "purged 1 sessions" in runner.invoke(args=["tokens", "purge"]).output
    assert rows() == 0
    assert_error(api.post("user/refresh", token=alice.refresh), 401)
