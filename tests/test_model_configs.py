"""/api/v1/model_config: CRUD with write-only API keys, encryption at rest and key rotation, the plan
check from the token, BOLA, params and base_url validation. Runs on SQLite, and on PostgreSQL when
CHATAPP_TEST_DATABASE_URL is set.

Nothing here sends a packet off this machine: the autouse ``dials`` fixture fails a test that connects
a socket anywhere but loopback or asks DNS about anything but a numeric host or "localhost"; host-name
cases use a guard with an injected resolver.
"""

from __future__ import annotations

import json
import secrets
import socket
import uuid

import pytest
from sqlalchemy import select

from chatapp import create_app
from chatapp.crypto import DecryptionError, KeyRing, generate_key
from chatapp.deps import deps
from chatapp.errors import ApiError
from chatapp.extensions import db
from chatapp.models import Conversation, ModelConfig
from chatapp.netguard import OutboundGuard, OutboundURLForbidden
from chatapp.services import model_configs
from tests.conftest import ApiClient, assert_error, remember_secret

CONFIG_FIELDS = {"id", "name", "base_url", "model", "api_key_hint", "params", "created_at", "updated_at"}
UPSTREAM = "http://127.0.0.1:9/v1"  # allowlisted in the test settings; never dialled by these endpoints


# ------------------------------------------------------------------ helpers and fixtures


pytestmark = pytest.mark.usefixtures("dials")  # the loopback-only fence of tests/conftest.py


@pytest.fixture
def make_app(app, settings):
    """Further apps on the test's database (other keys, allowlist...); `app` is kept for its teardown."""
    made = []

    def make(**overrides):
        other = create_app({**settings, **overrides})
        made.append(other)
        return other

    yield make
    for other in made:
        with other.app_context():
            db.session.remove()
            db.engine.dispose()


def new_key(prefix: str = "sk-") -> str:
    """A fresh API key, registered so the suite's log check looks for it too."""
    return remember_secret(prefix + secrets.token_hex(20))


def body_for(**overrides) -> dict:
    body = {"name": "My model", "base_url": UPSTREAM, "model": "gpt-test"}
    body.update(overrides)
    return {key: value for key, value in body.items() if value is not ...}


def create(api, account, **overrides):
    return api.post("model_config/create", body_for(**overrides), token=account.access)


def create_ok(api, account, **overrides) -> dict:
    response = create(api, account, **overrides)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def can_create(api, account, token: str | None = None, **body) -> dict:
    response = api.post("model_config/can_create", body, token=token or account.access)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def listed(api, account) -> list[dict]:
    response = api.get("model_config", token=account.access)
    assert response.status_code == 200, response.get_json()
    assert set(response.get_json()) == {"items"}
    return response.get_json()["items"]


def login(api, account) -> str:
    response = api.post("user/login", {"email": account.email, "password": account.password})
    assert response.status_code == 200, response.get_json()
    remember_secret(response.get_json()["refresh_token"])
    return remember_secret(response.get_json()["access_token"])


def set_plan(runner, account, plan: str) -> None:
    result = runner.invoke(args=["users", "set-plan", account.email, plan])
    assert result.exit_code == 0, result.output
    assert f"plan={plan}" in result.output


def row(app, config_id: str) -> ModelConfig:
    with app.app_context():
        config = db.session.get(ModelConfig, config_id)
        db.session.expunge_all()
        return config


def resolve(app, user_id: str, config_id: str) -> model_configs.ModelSource:
    with app.app_context():
        services = deps()
        try:
            return model_configs.resolve_source(db.session, services.keyring, services.guard, user_id=user_id,
                                                data={"model_config_id": config_id}, conversation=None)
        finally:
            db.session.remove()


def swap_ciphertexts(app, first_id: str, second_id: str) -> None:
    with app.app_context():
        first, second = db.session.get(ModelConfig, first_id), db.session.get(ModelConfig, second_id)
        first.api_key_encrypted, second.api_key_encrypted = second.api_key_encrypted, first.api_key_encrypted
        db.session.commit()
        db.session.remove()


def without_request_id(body: dict) -> dict:
    return {key: value for key, value in body.items() if key != "request_id"}


# ------------------------------------------------------------------ CRUD, write-only keys, encryption at rest


def test_crud_round_trip(api, alice):
    key = new_key()
    created = create_ok(api, alice, name="  Local  ", api_key=key, params={"temperature": 0.5, "vendor_x": [1]})
    assert set(created) == CONFIG_FIELDS
    assert created["name"] == "Local"
    assert created["base_url"] == UPSTREAM and created["model"] == "gpt-test"
    assert created["params"] == {"temperature": 0.5, "vendor_x": [1]}
    assert created["api_key_hint"] == f"sk-…{key[-4:]}"
    assert created["created_at"] == created["updated_at"] and created["created_at"].endswith("Z")

    assert listed(api, alice) == [created]

    response = api.post("model_config/update", {"id": created["id"], "name": "Renamed"}, token=alice.access)
    assert response.status_code == 200, response.get_json()
    updated = response.get_json()
    # Partial: only the name moved (and updated_at); the key and everything else stayed.
    assert updated["name"] == "Renamed"
    assert {k: v for k, v in updated.items() if k not in {"name", "updated_at"}} == \
           {k: v for k, v in created.items() if k not in {"name", "updated_at"}}
    assert updated["updated_at"] >= created["updated_at"]

    response = api.post("model_config/update", {"id": created["id"], "params": {"top_p": 0.9}, "model": "other"},
                        token=alice.access)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["params"] == {"top_p": 0.9}
    assert response.get_json()["model"] == "other"
    assert response.get_json()["name"] == "Renamed"
    assert listed(api, alice) == [response.get_json()]

    response = api.post("model_config/delete", {"ids": [created["id"]]}, token=alice.access)
    assert response.status_code == 200
    assert response.get_json() == {"deleted": [created["id"]]}
    assert listed(api, alice) == []
    # Deleting again: nothing left to delete, still 200.
    response = api.post("model_config/delete", {"ids": [created["id"]]}, token=alice.access)
    assert response.get_json() == {"deleted": []}


def test_list_is_the_callers_own_in_creation_order(api, alice, bob):
    first = create_ok(api, alice, name="one")
    second = create_ok(api, alice, name="two")
    create_ok(api, bob, name="bob's")
    assert [item["id"] for item in listed(api, alice)] == [first["id"], second["id"]]
    assert [item["name"] for item in listed(api, bob)] == ["bob's"]


def test_endpoints_need_an_access_token(api, alice):
    for path, body in [("model_config", None), ("model_config/can_create", {}),
                       ("model_config/create", body_for()), ("model_config/update", {"id": "x"}),
                       ("model_config/delete", {"ids": ["x"]})]:
        response = api.get(path) if body is None else api.post(path, body)
        assert_error(response, 401)
        response = (api.get(path, token=alice.refresh) if body is None
                    else api.post(path, body, token=alice.refresh))
        assert_error(response, 401)


def test_api_key_is_write_only_and_never_logged(api, alice, log_file):
    # One key in the common sk- form (which the log redactor also knows) and one it does not recognise.
    sk_key, plain_key, new_plain = new_key("sk-"), new_key("zq"), new_key("zq")
    responses = []

    def call(path, body=None):
        response = api.get(path, token=alice.access) if body is None else api.post(path, body, token=alice.access)
        responses.append(response)
        return response

    first = call("model_config/create", body_for(api_key=sk_key)).get_json()
    second = call("model_config/create", body_for(api_key=plain_key, name="plain")).get_json()
    assert first["api_key_hint"] == f"sk-…{sk_key[-4:]}"
    assert second["api_key_hint"] == f"…{plain_key[-4:]}"
    call("model_config")
    call("model_config/update", {"id": second["id"], "api_key": new_plain})
    call("model_config/update", {"id": first["id"], "name": "still has its key"})
    # Failures that carry a key in the request must not echo it either.
    call("model_config/create", body_for(api_key=plain_key, base_url="http://10.0.0.1/v1"))
    call("model_config/create", body_for(api_key=plain_key, params={"temperature": "hot"}))
    call("model_config/create", body_for(api_key=plain_key, surprise=plain_key[:3]))
    call("model_config/update", {"id": str(uuid.uuid4()), "api_key": plain_key})
    call("model_config")

    assert [r.status_code for r in responses] == [201, 201, 200, 200, 200, 422, 422, 422, 404, 200]
    for response in responses:
        raw = response.get_data(as_text=True)
        for key in (sk_key, plain_key, new_plain):
            assert key not in raw
            assert key[3:] not in raw  # nor the secret part without its family prefix
        assert "api_key_encrypted" not in raw
        assert '"api_key"' not in raw
    final = {item["id"]: item for item in responses[-1].get_json()["items"]}
    assert final[second["id"]]["api_key_hint"] == f"…{new_plain[-4:]}"
    assert final[first["id"]]["api_key_hint"] == f"sk-…{sk_key[-4:]}"

    text = log_file.read_text(encoding="utf-8")
    assert responses[0].headers["X-Request-ID"] in text  # the requests were logged...
    for key in (sk_key, plain_key, new_plain):
        assert key not in text  # ...and no key with them
        assert key[3:] not in text


@pytest.mark.parametrize("api_key", [
    "abcdefg-hijk",  # 12 characters: a prefix and a tail together would be the whole key
    "sk-abcdefghi",
    "sk-" + "a" * 12,
    "shortQ7key",
    "Kz" * 10,
    "Kz" * 12,
])
def test_hint_never_gives_away_a_short_key(api, alice, api_key):
    remember_secret(api_key)
    hint = create_ok(api, alice, api_key=api_key)["api_key_hint"]
    assert hint is not None and "…" in hint
    visible = hint.replace("…", "")
    # At least 16 characters (or all of a shorter key) stay hidden.
    assert len(api_key) - len(visible) >= min(16, len(api_key))


def test_api_key_can_be_replaced_and_removed(app, api, alice):
    key = new_key()
    config = create_ok(api, alice, api_key=key)
    assert resolve(app, alice.user["id"], config["id"]).api_key == key

    other = new_key()
    response = api.post("model_config/update", {"id": config["id"], "api_key": other}, token=alice.access)
    assert response.get_json()["api_key_hint"] == f"sk-…{other[-4:]}"
    assert resolve(app, alice.user["id"], config["id"]).api_key == other

    response = api.post("model_config/update", {"id": config["id"], "api_key": None}, token=alice.access)
    assert response.status_code == 200
    assert response.get_json()["api_key_hint"] is None
    assert row(app, config["id"]).api_key_encrypted is None
    assert resolve(app, alice.user["id"], config["id"]).api_key is None

    no_key = create_ok(api, alice)
    assert no_key["api_key_hint"] is None
    assert row(app, no_key["id"]).api_key_encrypted is None


def test_api_key_is_encrypted_at_rest(app, api, alice):
    key = new_key()
    config = create_ok(api, alice, api_key=key)
    stored = row(app, config["id"]).api_key_encrypted
    assert stored and key not in stored and key[3:] not in stored
    assert stored.startswith("v1:")
    keyring = app.extensions["chatapp"].keyring
    assert keyring.decrypt(stored, user_id=alice.user["id"], record_id=config["id"]) == key
    # Bound to its row: the same ciphertext does not open as another record or another user's.
    with pytest.raises(DecryptionError):
        keyring.decrypt(stored, user_id=alice.user["id"], record_id=str(uuid.uuid4()))
    with pytest.raises(DecryptionError):
        keyring.decrypt(stored, user_id=str(uuid.uuid4()), record_id=config["id"])
    # And a fresh keyring of another key cannot open it at all.
    with pytest.raises(DecryptionError):
        KeyRing.from_config([generate_key()], "").decrypt(stored, user_id=alice.user["id"], record_id=config["id"])


# ------------------------------------------------------------------ ciphertexts moved between rows


def test_swapped_ciphertext_fails_to_decrypt_in_the_service(app, api, alice, bob):
    keys = [new_key(), new_key(), new_key()]
    mine = create_ok(api, alice, api_key=keys[0])
    mine_too = create_ok(api, alice, api_key=keys[1])
    theirs = create_ok(api, bob, api_key=keys[2])
    keyring = app.extensions["chatapp"].keyring
    stored = {cfg["id"]: row(app, cfg["id"]).api_key_encrypted for cfg in (mine, mine_too, theirs)}

    # Same user, other row; other user's row; both directions.
    for target, source, owner in [(mine, mine_too, alice), (mine_too, mine, alice),
                                  (mine, theirs, alice), (theirs, mine, bob)]:
        with pytest.raises(DecryptionError):
            keyring.decrypt(stored[source["id"]], user_id=owner.user["id"], record_id=target["id"])


def unreadable(app, user_id: str, config_id: str) -> dict:
    """resolve_source refuses a config whose key does not decrypt with a 422 naming the config."""
    with pytest.raises(ApiError) as caught:
        resolve(app, user_id, config_id)
    error = caught.value
    assert (error.status, error.code) == (422, "model_config_key_unreadable")
    assert error.details == {"model_config_id": [config_id]}
    return {"code": error.code, "message": error.message}


def test_swapped_ciphertext_is_refused_by_the_app(app, api, alice, bob):
    keys = [new_key(), new_key(), new_key()]
    mine = create_ok(api, alice, api_key=keys[0])
    mine_too = create_ok(api, alice, api_key=keys[1])
    theirs = create_ok(api, bob, api_key=keys[2])
    assert resolve(app, alice.user["id"], mine["id"]).api_key == keys[0]

    swap_ciphertexts(app, mine["id"], mine_too["id"])  # same user, two rows
    for config in (mine, mine_too):
        refusal = unreadable(app, alice.user["id"], config["id"])
        assert not any(key in json.dumps(refusal) for key in keys)
    swap_ciphertexts(app, mine["id"], mine_too["id"])  # back: both work again
    assert resolve(app, alice.user["id"], mine_too["id"]).api_key == keys[1]

    swap_ciphertexts(app, mine["id"], theirs["id"])  # bob's ciphertext planted in alice's row and vice versa
    unreadable(app, alice.user["id"], mine["id"])
    unreadable(app, bob.user["id"], theirs["id"])
    raw = api.get("model_config", token=alice.access).get_data(as_text=True)
    assert not any(key in raw for key in keys)

    # The owner repairs the row by setting the key again.
    fresh = new_key()
    api.post("model_config/update", {"id": mine["id"], "api_key": fresh}, token=alice.access)
    assert resolve(app, alice.user["id"], mine["id"]).api_key == fresh


def test_swapped_ciphertext_is_refused_before_the_model_is_called(app, api, alice, fake_upstream, log_file):
    keys = [new_key(), new_key()]
    first = create_ok(api, alice, base_url=fake_upstream.base_url, api_key=keys[0])
    second = create_ok(api, alice, base_url=fake_upstream.base_url, api_key=keys[1])
    response = api.post("conversation/create", {"model_config_id": first["id"]}, token=alice.access)
    if response.status_code in (404, 405):
        pytest.skip("POST /api/v1/conversation/create is not built yet")
    conversation = response.get_json()["id"]
    swap_ciphertexts(app, first["id"], second["id"])

    request = {"conversation_id": conversation, "messages": [{"role": "user", "content": "Name this chat"}]}
    for extra in ({}, {"model_config_id": second["id"]}):
        response = api.post("conversation/generate_title", {**request, **extra}, token=alice.access)
        body = assert_error(response, 422, "model_config_key_unreadable")
        assert not any(key in response.get_data(as_text=True) for key in keys)
        assert body["details"] == {"model_config_id": [extra.get("model_config_id", first["id"])]}
    response = api.post("chat/send", {"conversation_id": conversation, "message": {"content": "hi"}},
                        token=alice.access)
    if response.status_code not in (404, 405):
        assert_error(response, 422, "model_config_key_unreadable")
    assert fake_upstream.requests == []  # no model was ever called with a wrong key
    text = log_file.read_text(encoding="utf-8")
    assert "model_config_key_unreadable" in text or first["id"] in text
    assert not any(key in text for key in keys)


def test_resolve_source_never_serves_another_users_config(app, api, alice, bob):
    theirs = create_ok(api, bob, api_key=new_key())
    with app.app_context():
        services = deps()
        with pytest.raises(ApiError) as caught:
            model_configs.resolve_source(db.session, services.keyring, services.guard, user_id=alice.user["id"],
                                         data={"model_config_id": theirs["id"]}, conversation=None)
    assert caught.value.status == 404 and caught.value.code == "model_config_not_found"


# ------------------------------------------------------------------ key rotation


def test_key_rotation_with_two_keys(make_app, api):
    k1, k2 = remember_secret(generate_key()), remember_secret(generate_key())
    old = make_app(ENCRYPTION_KEYS=[k1])
    old_api = ApiClient(old.test_client())
    users = [old_api.register(), old_api.register()]
    keys, configs = {}, []
    for account in users:
        for _ in range(2):
            key = new_key()
            config = create_ok(old_api, account, api_key=key)
            keys[config["id"]] = key
            configs.append((account, config))
    keyless = create_ok(old_api, users[0])

    k1_id, k2_id = KeyRing.from_config([k1], "").primary_id, KeyRing.from_config([k2], "").primary_id
    assert all(row(old, cfg["id"]).api_key_encrypted.startswith(f"v1:{k1_id}:") for _, cfg in configs)

    both = make_app(ENCRYPTION_KEYS=[k2, k1])
    for account, config in configs:
        assert resolve(both, account.user["id"], config["id"]).api_key == keys[config["id"]]
    # A key written while both are configured goes under the first one.
    fresh = new_key()
    fresh_config = create_ok(ApiClient(both.test_client()), users[1], api_key=fresh)
    keys[fresh_config["id"]] = fresh
    configs.append((users[1], fresh_config))
    assert row(both, fresh_config["id"]).api_key_encrypted.startswith(f"v1:{k2_id}:")

    result = both.test_cli_runner().invoke(args=["keys", "rotate"])
    assert result.exit_code == 0, result.output
    assert "re-encrypted 4 api keys" in result.output
    assert all(row(both, cfg["id"]).api_key_encrypted.startswith(f"v1:{k2_id}:") for _, cfg in configs)
    assert row(both, keyless["id"]).api_key_encrypted is None
    again = both.test_cli_runner().invoke(args=["keys", "rotate"])
    assert again.exit_code == 0 and "re-encrypted 0 api keys" in again.output

    new = make_app(ENCRYPTION_KEYS=[k2])
    for account, config in configs:
        assert resolve(new, account.user["id"], config["id"]).api_key == keys[config["id"]]
    # Rotation really moved them: the old key alone no longer opens anything.
    for account, config in configs:
        unreadable(old, account.user["id"], config["id"])


def test_rotation_reports_rows_no_key_opens_and_rotates_the_rest(make_app, api, alice):
    k1, k2 = remember_secret(generate_key()), remember_secret(generate_key())
    old = make_app(ENCRYPTION_KEYS=[k1])
    old_api = ApiClient(old.test_client())
    good_key = new_key()
    good = create_ok(old_api, alice, api_key=good_key)
    broken = create_ok(old_api, alice, api_key=new_key())
    create_ok(old_api, alice, api_key=new_key())
    with old.app_context():
        db.session.get(ModelConfig, broken["id"]).api_key_encrypted = KeyRing.from_config(
            [generate_key()], "").encrypt("lost", user_id=alice.user["id"], record_id=broken["id"])
        db.session.commit()
        db.session.remove()
    before = row(old, broken["id"]).api_key_encrypted

    both = make_app(ENCRYPTION_KEYS=[k2, k1])
    result = both.test_cli_runner().invoke(args=["keys", "rotate"])
    assert result.exit_code != 0
    assert "re-encrypted 2 api keys" in result.output
    assert broken["id"] in result.output and good["id"] not in result.output
    assert row(both, broken["id"]).api_key_encrypted == before  # left alone
    assert resolve(make_app(ENCRYPTION_KEYS=[k2]), alice.user["id"], good["id"]).api_key == good_key


def test_keys_generate_prints_a_usable_key(runner):
    printed = []
    for _ in range(2):
        result = runner.invoke(args=["keys", "generate"])
        assert result.exit_code == 0, result.output
        printed.append(remember_secret(result.output.strip()))
    assert printed[0] != printed[1]
    keyring = KeyRing.from_config([printed[0]], "")
    sealed = keyring.encrypt("secret", user_id="u", record_id="r")
    assert keyring.decrypt(sealed, user_id="u", record_id="r") == "secret"


# ------------------------------------------------------------------ plan limits, decided from the token


def test_can_create_flips_exactly_when_create_starts_answering_403(api, alice):
    for count in range(7):
        verdict = can_create(api, alice)
        response = create(api, alice, name=f"config {count}")
        assert verdict == {"can_create": count < 5, "count": min(count, 5), "limit": 5}
        if verdict["can_create"]:
            assert response.status_code == 201, response.get_json()
        else:
            body = assert_error(response, 403, "model_config_limit_reached")
            assert "5" in body["message"]
    assert len(listed(api, alice)) == 5

    # Freeing a slot opens it again, for exactly one more.
    first = listed(api, alice)[0]["id"]
    api.post("model_config/delete", {"ids": [first]}, token=alice.access)
    assert can_create(api, alice) == {"can_create": True, "count": 4, "limit": 5}
    create_ok(api, alice)
    assert can_create(api, alice)["can_create"] is False
    assert_error(create(api, alice), 403, "model_config_limit_reached")


def test_client_count_is_informational(api, alice):
    assert can_create(api, alice, count=99) == {"can_create": True, "count": 0, "limit": 5}
    for _ in range(5):
        create_ok(api, alice)
    assert can_create(api, alice, count=0) == {"can_create": False, "count": 5, "limit": 5}
    assert can_create(api, alice) == {"can_create": False, "count": 5, "limit": 5}
    for bad in (-1, "five", None, [1]):
        body = assert_error(api.post("model_config/can_create", {"count": bad}, token=alice.access), 422)
        assert "count" in body["details"]
    assert_error(api.post("model_config/can_create", {"other": 1}, token=alice.access), 422)


def test_limit_counts_only_the_callers_configs(api, alice, bob):
    for _ in range(5):
        create_ok(api, alice)
    assert can_create(api, bob) == {"can_create": True, "count": 0, "limit": 5}
    create_ok(api, bob)


def test_set_plan_and_a_new_token_raise_the_limit(api, runner, alice):
    for _ in range(5):
        create_ok(api, alice)
    old_token = alice.access
    set_plan(runner, alice, "pro")

    # The old access token still carries the free plan: the decision comes from the token.
    assert can_create(api, alice, token=old_token) == {"can_create": False, "count": 5, "limit": 5}
    assert_error(api.post("model_config/create", body_for(), token=old_token), 403, "model_config_limit_reached")

    new_token = login(api, alice)
    assert can_create(api, alice, token=new_token) == {"can_create": True, "count": 5, "limit": 50}
    response = api.post("model_config/create", body_for(), token=new_token)
    assert response.status_code == 201, response.get_json()
    assert can_create(api, alice, token=new_token)["count"] == 6


def test_plan_without_the_create_scope_is_forbidden(api, runner, alice):
    create_ok(api, alice)
    set_plan(runner, alice, "readonly")
    token = login(api, alice)
    assert can_create(api, alice, token=token) == {"can_create": False, "count": 1, "limit": 0}
    body = assert_error(api.post("model_config/create", body_for(), token=token), 403, "forbidden")
    assert body["code"] != "model_config_limit_reached"
    # Read, update and delete of what already exists stay open.
    existing = listed(api, alice)[0]["id"]
    response = api.post("model_config/update", {"id": existing, "name": "kept"}, token=token)
    assert response.status_code == 200
    assert api.post("model_config/delete", {"ids": [existing]}, token=token).get_json() == {"deleted": [existing]}
    assert_error(api.post("model_config/create", body_for(), token=token), 403, "forbidden")


def test_set_plan_cli_refuses_unknown_plans_and_users(runner, alice):
    result = runner.invoke(args=["users", "set-plan", alice.email, "platinum"])
    assert result.exit_code != 0 and "unknown plan" in result.output
    result = runner.invoke(args=["users", "set-plan", "nobody@example.com", "pro"])
    assert result.exit_code != 0 and "no user" in result.output


def test_plan_without_a_limit_is_unlimited(make_app, settings):
    plans = {"free": {"scopes": ["model_config:create"], "limits": {}}}
    open_app = make_app(PLANS=plans)
    client = ApiClient(open_app.test_client())
    account = client.register()
    for _ in range(6):
        create_ok(client, account)
    assert can_create(client, account) == {"can_create": True, "count": 6, "limit": None}


# ------------------------------------------------------------------ BOLA: another user's ids


def test_another_users_config_is_not_found_on_update(app, api, alice, bob):
    key = new_key()
    theirs = create_ok(api, alice, api_key=key)
    foreign = assert_error(api.post("model_config/update", {"id": theirs["id"], "name": "mine now"},
                                    token=bob.access), 404, "model_config_not_found")
    unknown = assert_error(api.post("model_config/update", {"id": str(uuid.uuid4()), "name": "mine now"},
                                    token=bob.access), 404, "model_config_not_found")
    assert without_request_id(foreign) == without_request_id(unknown)
    # Every updatable field, including a bad one, still answers the same 404 (nothing is revealed).
    for change in ({"api_key": new_key()}, {"base_url": "http://10.0.0.1/"}, {"params": {"temperature": 9}}):
        response = api.post("model_config/update", {"id": theirs["id"], **change}, token=bob.access)
        assert without_request_id(assert_error(response, 404)) == without_request_id(unknown)
    assert listed(api, alice) == [theirs]
    assert resolve(app, alice.user["id"], theirs["id"]).api_key == key


def test_another_users_config_is_not_deleted(api, alice, bob):
    theirs = create_ok(api, alice)
    mine = create_ok(api, bob)
    response = api.post("model_config/delete", {"ids": [theirs["id"]]}, token=bob.access)
    assert response.status_code == 200 and response.get_json() == {"deleted": []}
    unknown = str(uuid.uuid4())
    response = api.post("model_config/delete", {"ids": [theirs["id"], mine["id"], unknown, mine["id"]]},
                        token=bob.access)
    assert response.get_json() == {"deleted": [mine["id"]]}
    assert listed(api, alice) == [theirs]
    assert listed(api, bob) == []


def test_another_users_configs_are_absent_from_the_list(api, alice, bob):
    create_ok(api, alice)
    create_ok(api, alice)
    assert listed(api, bob) == []
    assert len(listed(api, alice)) == 2


# ------------------------------------------------------------------ deleting leaves conversations in place


def test_deleting_a_config_unlinks_its_conversations(app, api, alice, bob):
    config = create_ok(api, alice)
    keep = create_ok(api, alice)
    with app.app_context():
        linked = Conversation(user_id=alice.user["id"], title="linked", model_config_id=config["id"])
        other = Conversation(user_id=alice.user["id"], title="other", model_config_id=keep["id"])
        db.session.add_all([linked, other])
        db.session.commit()
        linked_id, other_id = linked.id, other.id
        db.session.remove()

    # Bob's attempt changes nothing.
    api.post("model_config/delete", {"ids": [config["id"]]}, token=bob.access)
    with app.app_context():
        assert db.session.get(Conversation, linked_id).model_config_id == config["id"]
        db.session.remove()

    response = api.post("model_config/delete", {"ids": [config["id"]]}, token=alice.access)
    assert response.get_json() == {"deleted": [config["id"]]}
    with app.app_context():
        assert db.session.get(Conversation, linked_id).model_config_id is None  # kept, unlinked
        assert db.session.get(Conversation, other_id).model_config_id == keep["id"]
        assert db.session.scalar(select(ModelConfig).where(ModelConfig.id == config["id"])) is None
        db.session.remove()


def test_deleting_a_config_unlinks_conversations_through_the_api(api, alice):
    config = create_ok(api, alice)
    response = api.post("conversation/create", {"model_config_id": config["id"]}, token=alice.access)
    if response.status_code in (404, 405) and (response.get_json() or {}).get("code") in {
            "not_found", "method_not_allowed"}:
        pytest.skip("POST /api/v1/conversation/create is not built yet")
    assert response.status_code == 201, response.get_json()
    conversation = response.get_json()
    assert conversation["model_config_id"] == config["id"]
    api.post("model_config/delete", {"ids": [config["id"]]}, token=alice.access)
    listing = api.get("conversation", token=alice.access).get_json()["items"]
    assert [(item["id"], item["model_config_id"]) for item in listing] == [(conversation["id"], None)]


# ------------------------------------------------------------------ validation


def _big_params() -> dict:
    return {"note": "x" * 4100}


CREATE_INVALID = [
    pytest.param({"name": ...}, "name", id="name-missing"),
    pytest.param({"model": ...}, "model", id="model-missing"),
    pytest.param({"base_url": ...}, "base_url", id="base_url-missing"),
    pytest.param({"name": 5}, "name", id="name-number"),
    pytest.param({"name": "   "}, "name", id="name-blank"),
    pytest.param({"name": "x" * 101}, "name", id="name-too-long"),
    pytest.param({"name": "a\x00b"}, "name", id="name-control-char"),
    pytest.param({"model": ["gpt"]}, "model", id="model-list"),
    pytest.param({"model": None}, "model", id="model-null"),
    pytest.param({"base_url": 7}, "base_url", id="base_url-number"),
    pytest.param({"api_key": 12345}, "api_key", id="api_key-number"),
    pytest.param({"api_key": remember_secret("Kq" * 513)}, "api_key", id="api_key-too-long"),
    pytest.param({"api_key": remember_secret("sk-crlf1234\r\nX-Injected: 1")}, "api_key", id="api_key-CRLF"),
    pytest.param({"api_key": remember_secret("sk-with space-123")}, "api_key", id="api_key-space"),
    pytest.param({"api_key": remember_secret("sk-nul1234\x00")}, "api_key", id="api_key-NUL"),
    pytest.param({"api_key": remember_secret("sk-sur\ud800rogate")}, "api_key", id="api_key-lone-surrogate"),
    pytest.param({"api_key": remember_secret("sk-clé-secrète-99")}, "api_key", id="api_key-non-ascii"),
    pytest.param({"params": [1, 2]}, "params", id="params-list"),
    pytest.param({"params": "temperature=1"}, "params", id="params-string"),
    pytest.param({"params": None}, "params", id="params-null"),
    pytest.param({"params": _big_params()}, "params", id="params-over-4KiB"),
    pytest.param({"params": {"model": "other"}}, "params", id="params-model"),
    pytest.param({"params": {"messages": []}}, "params", id="params-messages"),
    pytest.param({"params": {"stream": True}}, "params", id="params-stream"),
    pytest.param({"params": {"temperature": 3}}, "params", id="temperature-3"),
    pytest.param({"params": {"temperature": -0.1}}, "params", id="temperature-negative"),
    pytest.param({"params": {"temperature": "hot"}}, "params", id="temperature-string"),
    pytest.param({"params": {"temperature": True}}, "params", id="temperature-bool"),
    pytest.param({"params": {"temperature": None}}, "params", id="temperature-null"),
    pytest.param({"params": {"top_p": 2}}, "params", id="top_p-2"),
    pytest.param({"params": {"max_tokens": 0}}, "params", id="max_tokens-0"),
    pytest.param({"params": {"max_tokens": 1.5}}, "params", id="max_tokens-float"),
    pytest.param({"params": {"max_tokens": "100"}}, "params", id="max_tokens-string"),
    pytest.param({"params": {"presence_penalty": 2.5}}, "params", id="presence_penalty-2.5"),
    pytest.param({"params": {"frequency_penalty": -3}}, "params", id="frequency_penalty--3"),
    pytest.param({"params": {"seed": 1.5}}, "params", id="seed-float"),
    pytest.param({"params": {"stop": ["a", "b", "c", "d", "e"]}}, "params", id="stop-5-items"),
    pytest.param({"params": {"stop": [1]}}, "params", id="stop-number-item"),
    pytest.param({"params": {"stop": 5}}, "params", id="stop-number"),
    pytest.param({"params": {"response_format": {}}}, "params", id="response_format-without-type"),
    pytest.param({"params": {"response_format": "json"}}, "params", id="response_format-string"),
    pytest.param({"params": {"reasoning_effort": 3}}, "params", id="reasoning_effort-number"),
    pytest.param({"surprise": 1}, "surprise", id="unknown-top-level-field"),
    pytest.param({"api_key_hint": "sk-…abcd"}, "api_key_hint", id="read-only-field"),
    pytest.param({"id": "chosen"}, "id", id="client-chosen-id"),
]


@pytest.mark.parametrize(("change", "field"), CREATE_INVALID)
def test_create_validation(api, alice, change, field):
    body = assert_error(create(api, alice, **change), 422, "validation_error")
    assert field in body["details"], body
    assert listed(api, alice) == []


@pytest.mark.parametrize("raw", [
    pytest.param('{"temperature": NaN}', id="NaN-temperature"),
    pytest.param('{"vendor": Infinity}', id="Infinity"),
    pytest.param('{"vendor": {"x": [-Infinity]}}', id="nested-minus-Infinity"),
    pytest.param('{"vendor": "a\\ud800b"}', id="lone-surrogate"),
    pytest.param('{"\\udfff": 1}', id="lone-surrogate-key"),
    pytest.param('{"vendor": ["a\\u0000b"]}', id="NUL"),
])
def test_params_refuse_what_json_cannot_carry(api, alice, raw):
    # Python's JSON parser accepts these; JSON itself, PostgreSQL's jsonb and model servers do not.
    body = f'{{"name": "n", "base_url": "{UPSTREAM}", "model": "m", "params": {raw}}}'.encode()
    response = api.post("model_config/create", data=body, token=alice.access,
                        headers={"Content-Type": "application/json"})
    assert "params" in assert_error(response, 422, "validation_error")["details"]
    config = create_ok(api, alice)
    response = api.post("model_config/update", data=body.replace(b'"name": "n"', b'"id": "%s"' % config["id"].encode()),
                        token=alice.access, headers={"Content-Type": "application/json"})
    assert "params" in assert_error(response, 422, "validation_error")["details"]
    assert listed(api, alice) == [config]


def test_params_size_counts_utf8_bytes(api, alice):
    fits = {"system_hint": "é" * 2000}  # 4000 bytes of UTF-8 (12000 as \\u escapes)
    assert create_ok(api, alice, params=fits)["params"] == fits
    too_big = {"system_hint": "é" * 2100}
    assert "params" in assert_error(create(api, alice, params=too_big), 422)["details"]


@pytest.mark.parametrize("params", [
    {},
    {"temperature": 0, "top_p": 1, "max_tokens": 1, "stop": "END", "seed": -5},
    {"temperature": 2.0, "stop": ["a", "b", "c", "d"], "presence_penalty": -2, "frequency_penalty": 2},
    {"response_format": {"type": "json_object"}, "reasoning_effort": "high", "max_completion_tokens": 10},
    {"stop": None, "vendor_extension": {"nested": [1, "two", None]}, "logit_bias": {"50256": -100}},
    {"note": "x" * 3900},
])
def test_create_accepts_valid_params(api, alice, params):
    assert create_ok(api, alice, params=params)["params"] == params


UPDATE_INVALID = [
    pytest.param({"id": ...}, "id", id="id-missing"),
    pytest.param({"id": 5}, "id", id="id-number"),
    pytest.param({"id": ""}, "id", id="id-empty"),
    pytest.param({"name": None}, "name", id="name-null"),
    pytest.param({"name": 5}, "name", id="name-number"),
    pytest.param({"model": ""}, "model", id="model-empty"),
    pytest.param({"api_key": remember_secret("sk-upd1234\r\nX-Injected: 1")}, "api_key", id="api_key-CRLF"),
    pytest.param({"api_key": 5}, "api_key", id="api_key-number"),
    pytest.param({"params": [1]}, "params", id="params-list"),
    pytest.param({"params": {"stream": False}}, "params", id="params-stream"),
    pytest.param({"params": {"temperature": 3}}, "params", id="temperature-3"),
    pytest.param({"params": _big_params()}, "params", id="params-over-4KiB"),
    pytest.param({"surprise": True}, "surprise", id="unknown-top-level-field"),
]


@pytest.mark.parametrize(("change", "field"), UPDATE_INVALID)
def test_update_validation(api, alice, change, field):
    config = create_ok(api, alice, params={"temperature": 1})
    request = {"id": config["id"], **change}
    request = {key: value for key, value in request.items() if value is not ...}
    body = assert_error(api.post("model_config/update", request, token=alice.access), 422, "validation_error")
    assert field in body["details"], body
    assert listed(api, alice) == [config]  # nothing half-applied


@pytest.mark.parametrize("ids", [
    pytest.param([], id="empty"),
    pytest.param([str(uuid.uuid4()) for _ in range(101)], id="101-ids"),
    pytest.param("not-a-list", id="string"),
    pytest.param({"id": "x"}, id="object"),
    pytest.param([5], id="number-item"),
    pytest.param([""], id="empty-item"),
    pytest.param(None, id="null"),
    pytest.param(..., id="missing"),
])
def test_delete_validation(api, alice, ids):
    create_ok(api, alice)
    request = {} if ids is ... else {"ids": ids}
    body = assert_error(api.post("model_config/delete", request, token=alice.access), 422, "validation_error")
    assert "ids" in body["details"]
    assert len(listed(api, alice)) == 1


def test_delete_accepts_100_ids(api, alice):
    config = create_ok(api, alice)
    ids = [str(uuid.uuid4()) for _ in range(99)] + [config["id"]]
    assert api.post("model_config/delete", {"ids": ids}, token=alice.access).get_json() == {"deleted": [config["id"]]}


@pytest.mark.parametrize(("body", "status"), [("[]", 400), ('"x"', 400), ("{", 400)])
def test_non_object_bodies_are_400(api, alice, body, status):
    response = api.post("model_config/create", data=body, token=alice.access,
                        headers={"Content-Type": "application/json"})
    assert_error(response, status)


# ------------------------------------------------------------------ base_url and the outbound guard


FORBIDDEN_URLS = [
    "file:///etc/passwd",
    "ftp://127.0.0.1/v1",
    "gopher://127.0.0.1:70/",
    "127.0.0.1:9/v1",  # no scheme
    "http://user:pass@127.0.0.1:9/v1",  # user-info, even on an allowlisted host
    "http://sk-secret@127.0.0.1:9/v1",
    "http://10.0.0.1/v1",
    "http://192.168.1.10:8000/v1",
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.0.23/",
    "http://100.64.0.1/",
    "http://[::1]:9/v1",  # loopback, but only 127.0.0.1 is allowlisted
    "http://[fd00::1]/v1",
    "http://0.0.0.0:9/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://10.0.0.1\\@127.0.0.1/",
    "http://127.0.0.1:0/",
]


@pytest.mark.parametrize("base_url", FORBIDDEN_URLS)
def test_create_refuses_forbidden_base_urls(api, alice, dials, base_url):
    body = assert_error(create(api, alice, base_url=base_url), 422, "model_url_forbidden")
    assert "base_url" in body["details"]
    assert "sk-secret" not in json.dumps(body) and "pass" not in json.dumps(body)
    assert listed(api, alice) == []
    assert dials == []


@pytest.mark.parametrize("base_url", FORBIDDEN_URLS[:8])
def test_update_refuses_forbidden_base_urls(api, alice, dials, base_url):
    config = create_ok(api, alice)
    response = api.post("model_config/update", {"id": config["id"], "base_url": base_url}, token=alice.access)
    assert_error(response, 422, "model_url_forbidden")
    assert listed(api, alice) == [config]
    assert dials == []


LOOPBACK_FORMS = ["http://127.0.0.1:9/v1", "http://127.1:9/", "http://2130706433/", "http://0x7f000001/",
                  "http://0177.0.0.1/", "http://[::ffff:127.0.0.1]/", "http://[::1]/", "http://localhost:9/"]


@pytest.fixture
def strict(make_app):
    """An app with an empty allowlist; the resolver is injected so `localhost` never reaches DNS."""
    strict_app = make_app(MODEL_HOST_ALLOWLIST=[])
    strict_app.extensions["chatapp"].guard = OutboundGuard(allowlist=[], resolver=lambda host, port: ["127.0.0.1"])
    return ApiClient(strict_app.test_client())


@pytest.mark.parametrize("base_url", LOOPBACK_FORMS)
def test_loopback_in_any_spelling_is_refused_without_the_allowlist(strict, alice, dials, base_url):
    assert_error(create(strict, alice, base_url=base_url), 422, "model_url_forbidden")
    assert dials == []


def test_allowlisted_loopback_is_accepted(api, alice, dials):
    for base_url in ("http://127.0.0.1:9/v1", "http://127.1:9/v1", "http://[::ffff:127.0.0.1]:9/v1"):
        assert create_ok(api, alice, base_url=base_url)["base_url"] == base_url
    assert dials == []


def use_resolver(app, addresses: list[str], allowlist=("127.0.0.1",)) -> list[tuple[str, int]]:
    asked: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return list(addresses)

    app.extensions["chatapp"].guard = OutboundGuard(allowlist=list(allowlist), resolver=resolver)
    return asked


@pytest.mark.parametrize("addresses", [
    pytest.param(["10.0.0.1"], id="private"),
    pytest.param(["127.0.0.2"], id="loopback-not-allowlisted"),
    pytest.param(["::1"], id="ipv6-loopback"),
    pytest.param(["169.254.169.254"], id="metadata"),
    pytest.param(["93.184.216.34", "10.0.0.1"], id="one-of-several-private"),
    pytest.param(["::ffff:10.0.0.1"], id="v4-mapped-private"),
])
def test_hostnames_resolving_to_private_addresses_are_refused(app, api, alice, dials, addresses):
    asked = use_resolver(app, addresses)
    assert_error(create(api, alice, base_url="https://models.example.test/v1"), 422, "model_url_forbidden")
    assert asked == [("models.example.test", 443)]
    config = create_ok(api, alice)
    response = api.post("model_config/update", {"id": config["id"], "base_url": "http://evil.example.test:8080/"},
                        token=alice.access)
    assert_error(response, 422, "model_url_forbidden")
    assert asked[-1] == ("evil.example.test", 8080)
    assert dials == []


def test_hostname_that_does_not_resolve_is_refused(app, api, alice, dials):
    def resolver(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "no such host")

    app.extensions["chatapp"].guard = OutboundGuard(allowlist=["127.0.0.1"], resolver=resolver)
    assert_error(create(api, alice, base_url="https://nowhere.example.test/v1"), 422, "model_url_forbidden")
    assert dials == []


def test_public_hostname_is_accepted_without_dialling(app, api, alice, dials):
    asked = use_resolver(app, ["93.184.216.34"])
    config = create_ok(api, alice, base_url="https://api.example.test/v1")
    assert config["base_url"] == "https://api.example.test/v1"
    assert asked == [("api.example.test", 443)]
    assert dials == []  # create checks the URL; it never connects to it


def test_allowlisted_hostname_is_accepted(app, api, alice):
    use_resolver(app, ["10.1.2.3"], allowlist=["127.0.0.1", "models.internal"])
    assert create_ok(api, alice, base_url="http://models.internal:8000/v1")["base_url"] == \
        "http://models.internal:8000/v1"
    assert_error(create(api, alice, base_url="http://other.internal:8000/v1"), 422, "model_url_forbidden")


def test_base_url_is_checked_again_when_the_config_is_used(app, api, alice):
    use_resolver(app, ["93.184.216.34"])
    config = create_ok(api, alice, base_url="https://api.example.test/v1")
    assert resolve(app, alice.user["id"], config["id"]).base_url == "https://api.example.test/v1"
    use_resolver(app, ["10.0.0.1"])  # DNS changed since the config was saved
    with pytest.raises(ApiError) as caught:
        resolve(app, alice.user["id"], config["id"])
    assert caught.value.status == 422 and caught.value.code == "model_url_forbidden"


def test_fake_upstream_is_reachable_only_when_allowlisted(app, make_app, fake_upstream, dials):
    request = {"model": "fake-echo", "messages": [{"role": "user", "content": "hi"}]}
    with app.app_context():
        response = deps().guard.session().post(f"{fake_upstream.base_url}/chat/completions", json=request, timeout=10)
    assert response.status_code == 200
    assert fake_upstream.wait_for_requests(1)
    assert dials and all(address[0] == "127.0.0.1" for address in dials)

    dials.clear()
    strict_app = make_app(MODEL_HOST_ALLOWLIST=[])
    with strict_app.app_context(), pytest.raises(OutboundURLForbidden):
        deps().guard.session().post(f"{fake_upstream.base_url}/chat/completions", json=request, timeout=10)
    assert dials == []  # refused before any connection was attempted
    assert len(fake_upstream.requests) == 1


def test_inline_source_api_key_is_checked_too(app, alice):
    bad = remember_secret("sk-inline1234\r\nX-Injected: 1")
    with app.app_context():
        services = deps()
        with pytest.raises(ApiError) as caught:
            model_configs.resolve_source(db.session, services.keyring, services.guard, user_id=alice.user["id"],
                                         data={"base_url": UPSTREAM, "model": "m", "api_key": bad},
                                         conversation=None)
    assert caught.value.status == 422 and "api_key" in caught.value.details
    assert bad not in caught.value.message


def test_upstream_redirect_to_a_private_address_is_not_followed(app, api, alice, fake_upstream, dials):
    config = create_ok(api, alice, base_url=fake_upstream.base_url)
    fake_upstream.script(redirect="http://169.254.169.254/latest/meta-data/")
    source = resolve(app, alice.user["id"], config["id"])
    with app.app_context():
        response = deps().guard.session().post(f"{source.base_url}/chat/completions", timeout=10,
                                               json={"model": source.model, "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
    assert response.status_code == 302  # handed back as it is, never followed
    assert {address[0] for address in dials} == {"127.0.0.1"}
