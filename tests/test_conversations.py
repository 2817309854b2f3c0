"""/api/v1/conversation and the JSON side of /api/v1/chat, in-process: list (newest activity first, keyset
pagination), create, batch delete (messages and images go too), generated titles, model-source order,
the outbound guard on model URLs, history paging, validation of `send`, and another user's ids (404).

The streamed side of `send` runs through a real gunicorn server in tests/test_chat_stream.py. Titles
are asked of the fake upstream on 127.0.0.1; nothing here connects anywhere else.
Runs on SQLite, and on PostgreSQL when CHATAPP_TEST_DATABASE_URL is set.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import func, select

from chatapp import clock
from chatapp.extensions import db
from chatapp.models import Conversation, Message
from tests.conftest import assert_error, remember_secret

CONVERSATION_FIELDS = {"id", "title", "model_config_id", "created_at", "updated_at"}
MESSAGE_FIELDS = {"id", "role", "content", "status", "model", "finish_reason", "usage", "reasoning_content",
                  "created_at"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(200)
NOWHERE = "http://127.0.0.1:9/v1"  # allowlisted, never dialled: these requests fail before the model


# ------------------------------------------------------------------ helpers


def fake_model(**options) -> str:
    """A model string that makes the fake upstream behave so for this request only."""
    parts = [key if value is True else f"{key}={quote(str(value), safe='')}" for key, value in options.items()]
    return "fake:" + ";".join(parts)


def new_key() -> str:
    return remember_secret("sk-test-" + secrets.token_hex(16))


def create_conversation(api, account, model_config_id=None) -> dict:
    body = {"model_config_id": model_config_id} if model_config_id else {}
    response = api.post("conversation/create", body, token=account.access)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def create_config(api, account, base_url=NOWHERE, model="fake-echo", **extra) -> dict:
    response = api.post("model_config/create", {"name": "cfg", "base_url": base_url, "model": model, **extra},
                        token=account.access)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def list_all(api, account, **query) -> list[dict]:
    response = api.get("conversation", token=account.access, query_string=query)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["items"]


def history(api, account, conversation_id, **query) -> dict:
    response = api.get(f"chat/{conversation_id}", token=account.access, query_string=query)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def add_messages(app, conversation_id: str, count: int) -> list[str]:
    """Stored messages one second apart (oldest first), as a finished chat would leave them."""
    ids = []
    with app.app_context():
        start = clock.now() - timedelta(seconds=count)
        for index in range(count):
            role = "user" if index % 2 == 0 else "assistant"
            message = Message(id=clock.new_id(), conversation_id=conversation_id, role=role,
                              content=f"message {index}", status="completed",
                              created_at=start + timedelta(seconds=index),
                              updated_at=start + timedelta(seconds=index))
            db.session.add(message)
            ids.append(message.id)
        db.session.commit()
    return ids


def count_rows(app, model, **where) -> int:
    with app.app_context():
        query = select(func.count()).select_from(model)
        for name, value in where.items():
            query = query.where(getattr(model, name) == value)
        return db.session.scalar(query)


# ------------------------------------------------------------------ create and list


def test_create_and_list(api, alice):
    conversation = create_conversation(api, alice)
    assert set(conversation) == CONVERSATION_FIELDS
    assert conversation["title"] is None and conversation["model_config_id"] is None
    assert TIMESTAMP.match(conversation["created_at"]) and TIMESTAMP.match(conversation["updated_at"])
    response = api.get("conversation", token=alice.access)
    assert response.status_code == 200
    assert response.get_json() == {"items": [conversation], "next_cursor": None}


def test_create_with_own_config(api, alice):
    config = create_config(api, alice)
    conversation = create_conversation(api, alice, config["id"])
    assert conversation["model_config_id"] == config["id"]
    assert list_all(api, alice)[0]["model_config_id"] == config["id"]


def test_create_with_null_config(api, alice):
    response = api.post("conversation/create", {"model_config_id": None}, token=alice.access)
    assert response.status_code == 201
    assert response.get_json()["model_config_id"] is None


def test_create_refuses_another_users_or_unknown_config(api, alice, bob):
    bobs = create_config(api, bob)
    for config_id in (bobs["id"], "00000000-0000-7000-8000-000000000000"):
        response = api.post("conversation/create", {"model_config_id": config_id}, token=alice.access)
        assert_error(response, 404, "model_config_not_found")
    assert list_all(api, alice) == []


@pytest.mark.parametrize("body", [{"title": "x"}, {"model_config_id": 5}, {"model_config_id": ""}])
def test_create_validation(api, alice, body):
    body = assert_error(api.post("conversation/create", body, token=alice.access), 422, "validation_error")
    assert body["details"]


def test_endpoints_need_an_access_token(api, alice):
    conversation = create_conversation(api, alice)
    calls = [
        ("GET", "conversation", None),
        ("POST", "conversation/create", {}),
        ("POST", "conversation/delete", {"ids": [conversation["id"]]}),
        ("POST", "conversation/generate_title", {"conversation_id": conversation["id"],
                                                 "messages": [{"role": "user", "content": "hi"}]}),
        ("GET", f"chat/{conversation['id']}", None),
        ("POST", "chat/send", {"conversation_id": conversation["id"], "message": {"content": "hi"}}),
        ("POST", "chat/get_upload_presigned_url", {"conversation_id": conversation["id"], "suffixes": ["png"]}),
    ]
    for method, path, body in calls:
        for token in (None, alice.refresh):  # no token, and a refresh token where an access token belongs
            response = api._call(method, path, token, json=body) if body is not None else api._call(
                method, path, token)
            assert_error(response, 401)
    assert len(list_all(api, alice)) == 1


def test_list_shows_only_the_callers_conversations(api, alice, bob):
    mine = create_conversation(api, alice)
    create_conversation(api, bob)
    assert [item["id"] for item in list_all(api, alice)] == [mine["id"]]


# ------------------------------------------------------------------ pagination


def test_pagination_newest_activity_first(app, api, alice):
    created = [create_conversation(api, alice)["id"] for _ in range(5)]
    pages, cursor = [], None
    while True:
        response = api.get("conversation", token=alice.access,
                           query_string={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200
        body = response.get_json()
        pages.append([item["id"] for item in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10
    assert [len(page) for page in pages] == [2, 2, 1]
    seen = [conversation_id for page in pages for conversation_id in page]
    assert seen == created[::-1]  # newest first, no repeats, none missing

    # Activity (here a stored message bumping updated_at, as a send or a title does) moves one to the top.
    clock.travel(5)
    with app.app_context():
        db.session.get(Conversation, created[0]).updated_at = clock.now()
        db.session.commit()
    order = [item["id"] for item in list_all(api, alice, limit=200)]
    assert order == [created[0], *created[:0:-1]]


def test_pagination_breaks_ties_by_id(app, api, alice):
    created = [create_conversation(api, alice)["id"] for _ in range(4)]
    with app.app_context():  # the same updated_at for all: the id alone orders them, stably across pages
        moment = clock.now()
        for conversation_id in created:
            db.session.get(Conversation, conversation_id).updated_at = moment
        db.session.commit()
    first = api.get("conversation", token=alice.access, query_string={"limit": 3}).get_json()
    second = api.get("conversation", token=alice.access,
                     query_string={"limit": 3, "cursor": first["next_cursor"]}).get_json()
    assert second["next_cursor"] is None
    ids = [item["id"] for item in first["items"] + second["items"]]
    assert ids == sorted(created, reverse=True)


def test_default_limit_is_50(api, alice):
    for _ in range(51):
        api.post("conversation/create", {}, token=alice.access)
    body = api.get("conversation", token=alice.access).get_json()
    assert len(body["items"]) == 50 and body["next_cursor"]
    rest = api.get("conversation", token=alice.access, query_string={"cursor": body["next_cursor"]}).get_json()
    assert len(rest["items"]) == 1 and rest["next_cursor"] is None


@pytest.mark.parametrize("limit", ["0", "201", "x", "-1", "1.5"])
def test_list_limit_out_of_range(api, alice, limit):
    body = assert_error(api.get("conversation", token=alice.access, query_string={"limit": limit}),
                        422, "validation_error")
    assert "limit" in body["details"]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    "not-a-cursor", "%%%", _b64(b"{}"), _b64(b"null"), _b64(b"[1, 2]"), _b64(b'["yesterday", "x"]'),
    _b64(b'["2026-01-01T00:00:00+00:00"]'), _b64(b"\xff\xfe"), "x" * 600,
])
def test_bad_cursor_is_422(api, alice, cursor):
    create_conversation(api, alice)
    body = assert_error(api.get("conversation", token=alice.access, query_string={"cursor": cursor}),
                        422, "validation_error")
    assert "cursor" in body["details"]


def test_foreign_cursor_reveals_nothing(api, alice, bob):
    """A cursor made from bob's list only positions alice's list; it never shows bob's conversations."""
    for _ in range(3):
        create_conversation(api, bob)
    cursor = api.get("conversation", token=bob.access, query_string={"limit": 1}).get_json()["next_cursor"]
    mine = create_conversation(api, alice)
    items = api.get("conversation", token=alice.access, query_string={"cursor": cursor}).get_json()["items"]
    assert all(item["id"] == mine["id"] for item in items)


# ------------------------------------------------------------------ delete


def test_delete_batch_with_mixed_ids(app, api, alice, bob, settings):
    keep, gone_one, gone_two = (create_conversation(api, alice)["id"] for _ in range(3))
    bobs = create_conversation(api, bob)["id"]
    add_messages(app, gone_one, 3)
    add_messages(app, keep, 2)
    add_messages(app, bobs, 2)
    # An uploaded image goes with its conversation.
    upload = api.post("chat/get_upload_presigned_url", {"conversation_id": gone_one, "suffixes": ["png"]},
                      token=alice.access).get_json()["items"][0]
    put = api.client.put(upload["url"], data=PNG, headers=upload["headers"])
    assert put.status_code in (200, 201, 204), put.get_data(as_text=True)
    stored = Path(settings["STORAGE_DIR"]) / upload["key"]
    assert stored.exists()

    unknown = "00000000-0000-7000-8000-000000000000"
    response = api.post("conversation/delete", {"ids": [gone_two, bobs, unknown, gone_one, gone_two]},
                        token=alice.access)
    assert response.status_code == 200
    assert response.get_json() == {"deleted": [gone_two, gone_one]}

    assert [item["id"] for item in list_all(api, alice)] == [keep]
    assert [item["id"] for item in list_all(api, bob)] == [bobs]
    assert count_rows(app, Message, conversation_id=gone_one) == 0
    assert count_rows(app, Message, conversation_id=keep) == 2
    assert count_rows(app, Message, conversation_id=bobs) == 2
    assert not stored.exists()
    assert_error(api.get(f"chat/{gone_one}", token=alice.access), 404, "conversation_not_found")

    again = api.post("conversation/delete", {"ids": [gone_one]}, token=alice.access)
    assert again.status_code == 200 and again.get_json() == {"deleted": []}


@pytest.mark.parametrize("body", [{}, {"ids": []}, {"ids": "abc"}, {"ids": [1]}, {"ids": [""]},
                                  {"ids": ["a"] * 101}, {"ids": ["a"], "extra": 1}])
def test_delete_validation(api, alice, body):
    assert_error(api.post("conversation/delete", body, token=alice.access), 422, "validation_error")


def test_deleting_a_config_unlinks_its_conversations(api, alice):
    config = create_config(api, alice)
    conversation = create_conversation(api, alice, config["id"])
    deleted = api.post("model_config/delete", {"ids": [config["id"]]}, token=alice.access)
    assert deleted.get_json() == {"deleted": [config["id"]]}
    assert list_all(api, alice)[0]["model_config_id"] is None
    # Without its config the conversation needs a model from the request.
    response = api.post("chat/send", {"conversation_id": conversation["id"], "message": {"content": "hi"}},
                        token=alice.access)
    assert_error(response, 422, "model_not_configured")
    assert history(api, alice, conversation["id"])["items"] == []


# ------------------------------------------------------------------ another user's ids


def test_another_user_gets_404_everywhere(app, api, alice, bob):
    conversation = create_conversation(api, alice)
    message_ids = add_messages(app, conversation["id"], 2)
    other = conversation["id"]
    inline = {"base_url": NOWHERE, "model": "fake-echo"}
    calls = [
        ("GET", f"chat/{other}", None),
        ("GET", f"chat/{other}?limit=1&before={message_ids[1]}", None),
        ("POST", "chat/send", {"conversation_id": other, "message": {"content": "hi"}, **inline}),
        ("POST", "chat/send", {"conversation_id": other, "message": {"content": "hi"}}),
        ("POST", "chat/send", {"conversation_id": other, "messages": [{"role": "user", "content": "hi"}], **inline}),
        ("POST", "conversation/generate_title",
         {"conversation_id": other, "messages": [{"role": "user", "content": "hi"}], **inline}),
        ("POST", "chat/get_upload_presigned_url", {"conversation_id": other, "suffixes": ["png"]}),
    ]
    unknown = "00000000-0000-7000-8000-000000000000"
    for method, path, body in calls:
        response = api._call(method, path, bob.access, **({"json": body} if body else {}))
        error = assert_error(response, 404, "conversation_not_found")
        # Exactly the answer an id that does not exist gets.
        missing_path = path.replace(other, unknown)
        missing_body = json.loads(json.dumps(body).replace(other, unknown)) if body else None
        missing = api._call(method, missing_path, bob.access, **({"json": missing_body} if body else {}))
        twin = assert_error(missing, 404, "conversation_not_found")
        assert (error["message"], error.get("details")) == (twin["message"], twin.get("details"))

    deleted = api.post("conversation/delete", {"ids": [other]}, token=bob.access)
    assert deleted.status_code == 200 and deleted.get_json() == {"deleted": []}
    # Nothing of alice's changed.
    assert [item["id"] for item in list_all(api, alice)] == [other]
    assert list_all(api, alice)[0] == conversation
    assert len(history(api, alice, other)["items"]) == 2
    assert list_all(api, bob) == []


def test_history_before_must_be_a_message_of_this_conversation(app, api, alice, bob):
    mine = create_conversation(api, alice)["id"]
    bobs = create_conversation(api, bob)["id"]
    bobs_message = add_messages(app, bobs, 1)[0]
    other_of_mine = create_conversation(api, alice)["id"]
    my_other_message = add_messages(app, other_of_mine, 1)[0]
    for before in (bobs_message, my_other_message, "nope"):
        assert_error(api.get(f"chat/{mine}", token=alice.access, query_string={"before": before}),
                     404, "message_not_found")


def test_send_with_another_users_config_is_404(api, alice, bob):
    bobs_config = create_config(api, bob)
    conversation = create_conversation(api, alice)
    response = api.post("chat/send", {"conversation_id": conversation["id"], "message": {"content": "hi"},
                                      "model_config_id": bobs_config["id"]}, token=alice.access)
    assert_error(response, 404, "model_config_not_found")
    response = api.post("conversation/generate_title", {
        "conversation_id": conversation["id"], "messages": [{"role": "user", "content": "hi"}],
        "model_config_id": bobs_config["id"]}, token=alice.access)
    assert_error(response, 404, "model_config_not_found")
    assert history(api, alice, conversation["id"])["items"] == []


# ------------------------------------------------------------------ history


def test_history_pages_oldest_first(app, api, alice):
    conversation_id = create_conversation(api, alice)["id"]
    ids = add_messages(app, conversation_id, 5)
    body = history(api, alice, conversation_id, limit=2)
    assert [item["id"] for item in body["items"]] == ids[3:]
    assert body["has_more"] is True
    item = body["items"][0]
    assert set(item) == MESSAGE_FIELDS
    assert item["content"] == "message 3" and item["status"] == "completed" and TIMESTAMP.match(item["created_at"])
    body = history(api, alice, conversation_id, limit=2, before=ids[3])
    assert [item["id"] for item in body["items"]] == ids[1:3] and body["has_more"] is True
    body = history(api, alice, conversation_id, limit=2, before=ids[1])
    assert [item["id"] for item in body["items"]] == ids[:1] and body["has_more"] is False
    body = history(api, alice, conversation_id)
    assert [item["id"] for item in body["items"]] == ids and body["has_more"] is False
    assert history(api, alice, conversation_id, limit=5)["has_more"] is False


def test_history_pages_through_messages_of_one_moment(app, api, alice):
    # A turn's two rows share one created_at: the id orders them, on every page boundary.
    conversation_id = create_conversation(api, alice)["id"]
    with app.app_context():
        moment, ids = clock.now(), [clock.new_id() for _ in range(4)]
        db.session.add_all(Message(id=message_id, conversation_id=conversation_id, role="user", content="same moment",
                                   status="completed", created_at=moment, updated_at=moment) for message_id in ids)
        db.session.commit()
    seen, query = [], {"limit": 1}
    for _ in ids:
        body = history(api, alice, conversation_id, **query)
        seen[:0] = [item["id"] for item in body["items"]]
        query["before"] = seen[0]
        assert body["has_more"] is (len(seen) < len(ids))
    assert seen == ids
    assert history(api, alice, conversation_id, **query) == {"items": [], "has_more": False}  # before the oldest


def test_history_with_nul_in_its_path_or_query_is_a_clear_error(api, alice):
    # PostgreSQL refuses NUL in text: these were 500s there (found by schemathesis).
    conversation_id = create_conversation(api, alice)["id"]
    assert_error(api.get("chat/a%00b", token=alice.access), 404, "conversation_not_found")
    body = assert_error(api.get(f"chat/{conversation_id}?before=a%00b", token=alice.access), 422, "validation_error")
    assert set(body["details"]) == {"before"}
    body = assert_error(api.get("conversation?cursor=%00", token=alice.access), 422, "validation_error")
    assert set(body["details"]) == {"cursor"}


@pytest.mark.parametrize("limit", ["0", "501", "x"])
def test_history_limit_out_of_range(api, alice, limit):
    conversation_id = create_conversation(api, alice)["id"]
    body = assert_error(api.get(f"chat/{conversation_id}", token=alice.access, query_string={"limit": limit}),
                        422, "validation_error")
    assert "limit" in body["details"]


# ------------------------------------------------------------------ send: everything checked before the stream


def _send_body(conversation: str, **overrides) -> dict:
    body = {"conversation_id": conversation, "message": {"role": "user", "content": "hello"},
            "base_url": NOWHERE, "model": "fake-echo"}
    body.update(overrides)
    return {key: value for key, value in body.items() if value is not ...}


SEND_CASES = {
    "both forms": ({"messages": [{"role": "user", "content": "hi"}]}, "message"),
    "neither form": ({"message": ...}, "message"),
    "message role assistant": ({"message": {"role": "assistant", "content": "hi"}}, "message"),
    "message role system": ({"message": {"role": "system", "content": "hi"}}, "message"),
    "messages last assistant": ({"message": ..., "messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]},
                                "message"),
    "messages empty": ({"message": ..., "messages": []}, "messages"),
    "messages not a list": ({"message": ..., "messages": {"role": "user", "content": "hi"}}, "messages"),
    "role unknown": ({"message": {"role": "tool", "content": "hi"}}, "message"),
    "content a number": ({"message": {"content": 123}}, "message"),
    "content an object": ({"message": {"content": {"text": "hi"}}}, "message"),
    "content null": ({"message": {"content": None}}, "message"),
    "content missing": ({"message": {"role": "user"}}, "message"),
    "content empty list": ({"message": {"content": []}}, "message"),
    "content bad part": ({"message": {"content": [{"type": "text"}]}}, "message"),
    "content unknown part": ({"message": {"content": [{"type": "audio", "audio": "x"}]}}, "message"),
    "content text not str": ({"message": {"content": [{"type": "text", "text": 5}]}}, "message"),
    "content empty string": ({"message": {"content": ""}}, "content"),
    "content empty text part": ({"message": {"content": [{"type": "text", "text": ""}]}}, "content"),
    "content lone surrogate": ({"message": {"content": "half an emoji \ud83d"}}, "message"),
    "content NUL": ({"message": {"content": [{"type": "text", "text": "a\x00b"}]}}, "message"),
    "context lone surrogate": ({"message": ..., "messages": [{"role": "assistant", "content": "\ude00"},
                                                             {"role": "user", "content": "hi"}]}, "messages"),
    "message a string": ({"message": "hello"}, "message"),
    "message unknown field": ({"message": {"content": "hi", "name": "x"}}, "message"),
    "unknown top-level field": ({"stream": True}, "stream"),
    "conversation_id missing": ({"conversation_id": ...}, "conversation_id"),
    "conversation_id not a string": ({"conversation_id": 5}, "conversation_id"),
    "params not an object": ({"params": [1]}, "params"),
    "params sets model": ({"params": {"model": "x"}}, "params"),
    "params bad temperature": ({"params": {"temperature": 9}}, "params"),
    "inline base_url only": ({"model": ...}, "model"),
    "inline model only": ({"base_url": ...}, "base_url"),
}


@pytest.mark.parametrize("case", list(SEND_CASES))
def test_send_validation(api, alice, case):
    conversation_id = create_conversation(api, alice)["id"]
    overrides, field = SEND_CASES[case]
    response = api.post("chat/send", _send_body(conversation_id, **overrides), token=alice.access)
    body = assert_error(response, 422, "validation_error")
    assert field in body["details"], body
    assert history(api, alice, conversation_id)["items"] == []  # nothing stored


def test_send_refuses_a_non_object_body(api, alice):
    conversation_id = create_conversation(api, alice)["id"]
    assert_error(api.post("chat/send", [_send_body(conversation_id)], token=alice.access), 400)
    response = api.post("chat/send", data="{nope", token=alice.access, headers={"Content-Type": "application/json"})
    assert_error(response, 400)


@pytest.mark.app_settings(MESSAGE_MAX_CHARS=10)
@pytest.mark.parametrize("form", ["message", "messages", "context", "parts"])
def test_send_message_too_long(api, alice, form):
    conversation_id = create_conversation(api, alice)["id"]
    long_text = "x" * 11
    overrides = {
        "message": {"message": {"content": long_text}},
        "messages": {"message": ..., "messages": [{"role": "user", "content": long_text}]},
        "context": {"message": ..., "messages": [{"role": "user", "content": long_text},
                                                 {"role": "user", "content": "short"}]},
        "parts": {"message": {"content": [{"type": "text", "text": "x" * 6}, {"type": "text", "text": "y" * 5}]}},
    }[form]
    body = assert_error(api.post("chat/send", _send_body(conversation_id, **overrides), token=alice.access),
                        422, "message_too_long")
    assert "10" in body["message"]
    assert history(api, alice, conversation_id)["items"] == []
    # Exactly the limit is fine as far as validation goes (it then fails on the model, which is not here).


def test_send_without_any_model_source(api, alice):
    conversation_id = create_conversation(api, alice)["id"]
    response = api.post("chat/send", {"conversation_id": conversation_id, "message": {"content": "hi"}},
                        token=alice.access)
    body = assert_error(response, 422, "model_not_configured")
    assert "model" in body["message"].lower()
    assert history(api, alice, conversation_id)["items"] == []


@pytest.mark.parametrize("base_url", [
    "http://10.0.0.1/v1", "http://169.254.169.254/v1", "http://192.168.1.1:8080/v1", "http://[::ffff:10.0.0.1]/v1",
    "http://0.0.0.0/v1", "ftp://127.0.0.1/v1", "http://user:secret@127.0.0.1:9/v1", "file:///etc/passwd",
])
@pytest.mark.parametrize("endpoint", ["chat/send", "conversation/generate_title"])
def test_forbidden_model_url_is_422_and_never_dialled(api, alice, dials, base_url, endpoint):
    conversation_id = create_conversation(api, alice)["id"]
    body = {"conversation_id": conversation_id, "base_url": base_url, "model": "fake-echo", "api_key": new_key()}
    if endpoint == "chat/send":
        body["message"] = {"content": "hi"}
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    dials.clear()
    error = assert_error(api.post(endpoint, body, token=alice.access), 422, "model_url_forbidden")
    assert body["api_key"] not in json.dumps(error)
    assert "base_url" in error["details"]
    # Only the database (on loopback) may have been dialled; no model server, not even the allowlisted one.
    assert [address for address in dials if address[0] != "127.0.0.1" or address[1] == 9] == []
    assert history(api, alice, conversation_id)["items"] == []


# ------------------------------------------------------------------ titles


def _title(api, account, conversation_id, messages=None, **source):
    body = {"conversation_id": conversation_id,
            "messages": messages or [{"role": "user", "content": "Hi there!"},
                                     {"role": "assistant", "content": "Hello! How can I help?"}], **source}
    return api.post("conversation/generate_title", body, token=account.access)


@pytest.mark.parametrize(("raw", "expected"), [
    ('**Title:** "Greeting Chat".', "Greeting Chat"),
    ("Greeting Chat", "Greeting Chat"),
    ("Title: Greeting Chat", "Greeting Chat"),
    ("'Greeting Chat'", "Greeting Chat"),
    ("“Greeting Chat”", "Greeting Chat"),
    ("Greeting Chat\nA friendly hello exchanged between two parties.", "Greeting Chat"),
    ("\n\n  Greeting   Chat  \n", "Greeting Chat"),
    ("标题：问候", "问候"),
    ("「问候」。", "问候"),
    ('"Greeting" Chat', '"Greeting" Chat'),  # quotes come off in pairs only
])
def test_title_is_cleaned_and_stored(api, alice, fake_upstream, raw, expected):
    conversation = create_conversation(api, alice)
    clock.travel(3)
    key = new_key()
    response = _title(api, alice, conversation["id"], base_url=fake_upstream.base_url,
                      model=fake_model(reply=raw), api_key=key, params={"temperature": 0.1})
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"conversation_id": conversation["id"], "title": expected}
    listed = list_all(api, alice)[0]
    assert listed["title"] == expected
    assert listed["updated_at"] > conversation["updated_at"]
    sent = fake_upstream.requests[-1]
    assert sent.headers["authorization"] == f"Bearer {key}"
    assert sent.body["model"] == fake_model(reply=raw) and sent.body["temperature"] == 0.1
    assert not sent.body.get("stream")
    assert sent.body["messages"][0]["role"] == "system"
    assert "Hi there!" in json.dumps(sent.body["messages"])


def test_long_title_is_cut_to_60(api, alice, fake_upstream):
    conversation = create_conversation(api, alice)
    raw = "A very long title about " + "many interesting things " * 5
    response = _title(api, alice, conversation["id"], base_url=fake_upstream.base_url, model=fake_model(reply=raw))
    title = response.get_json()["title"]
    assert 0 < len(title) <= 60 and "\n" not in title
    assert title.startswith("A very long title about many")
    assert list_all(api, alice)[0]["title"] == title


def test_empty_title_falls_back_to_the_first_message(api, alice, fake_upstream):
    conversation = create_conversation(api, alice)
    response = _title(api, alice, conversation["id"], [{"role": "user", "content": "Plan a trip to Kyoto"}],
                      base_url=fake_upstream.base_url, model=fake_model(reply=""))
    assert response.status_code == 200
    assert response.get_json()["title"] == "Plan a trip to Kyoto"


@pytest.mark.parametrize(("options", "status", "code"), [
    ({"status": 500}, 502, "upstream_error"),
    ({"status": 401}, 502, "upstream_unauthorized"),
    ({"status": 429}, 502, "upstream_rate_limited"),
    ({"first_delay": 3}, 504, "upstream_timeout"),
])
@pytest.mark.app_settings(LLM_TITLE_TIMEOUT=0.5)
def test_title_upstream_failure_leaves_the_title(api, alice, fake_upstream, options, status, code):
    conversation = create_conversation(api, alice)
    ok = _title(api, alice, conversation["id"], base_url=fake_upstream.base_url, model=fake_model(reply="Old title"))
    assert ok.status_code == 200
    before = list_all(api, alice)[0]
    clock.travel(3)
    key = new_key()
    response = _title(api, alice, conversation["id"], base_url=fake_upstream.base_url,
                      model=fake_model(**options), api_key=key)
    body = assert_error(response, status, code)
    assert key not in response.get_data(as_text=True)
    assert key[-8:] not in body["message"]
    assert list_all(api, alice)[0] == before  # title and updated_at unchanged


def test_title_model_source_order(api, alice, fake_upstream):
    base = fake_upstream.base_url
    bound = create_config(api, alice, base, fake_model(reply="From the conversation"), api_key=new_key())
    chosen_key = new_key()
    chosen = create_config(api, alice, base, fake_model(reply="From model_config_id"), api_key=chosen_key,
                           params={"max_tokens": 7})
    conversation = create_conversation(api, alice, bound["id"])

    def title(**source) -> str:
        response = _title(api, alice, conversation["id"], **source)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["title"]

    assert title() == "From the conversation"
    assert title(model_config_id=chosen["id"]) == "From model_config_id"
    sent = fake_upstream.requests[-1]
    assert sent.headers["authorization"] == f"Bearer {chosen_key}" and sent.body["max_tokens"] == 7
    assert title(model_config_id=chosen["id"], base_url=base, model=fake_model(reply="Inline")) == "Inline"
    assert "authorization" not in fake_upstream.requests[-1].headers  # the inline source had no key
    assert "max_tokens" not in fake_upstream.requests[-1].body  # nor the config's params

    plain = create_conversation(api, alice)
    assert_error(_title(api, alice, plain["id"]), 422, "model_not_configured")


@pytest.mark.parametrize(("body", "field"), [
    ({"messages": []}, "messages"),
    ({"messages": ...}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"conversation_id": ...}, "conversation_id"),
    ({"title": "mine"}, "title"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]}, "messages"),
])
def test_title_validation(api, alice, body, field):
    conversation_id = create_conversation(api, alice)["id"]
    request = {"conversation_id": conversation_id, "messages": [{"role": "user", "content": "hi"}],
               "base_url": NOWHERE, "model": "fake-echo", **body}
    request = {key: value for key, value in request.items() if value is not ...}
    error = assert_error(api.post("conversation/generate_title", request, token=alice.access), 422,
                         "validation_error")
    assert field in error["details"]


def test_a_new_message_moves_its_conversation_to_the_top(app, api, alice):
    """conversations.updated_at follows its messages by a database trigger (migration 0002)."""
    first, second = create_conversation(api, alice), create_conversation(api, alice)
    assert [item["id"] for item in list_all(api, alice)] == [second["id"], first["id"]]
    with app.app_context():
        db.session.add(Message(id=clock.new_id(), conversation_id=first["id"], role="user", content="hi",
                               status="completed"))
        db.session.commit()
    listed = list_all(api, alice)
    assert [item["id"] for item in listed] == [first["id"], second["id"]]
    assert listed[0]["updated_at"] > first["updated_at"]
