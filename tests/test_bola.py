"""BOLA matrix: every endpoint that takes an id, given every kind of id that belongs to another user, answers
404 (or 422 for image references) exactly like an unknown id — and never returns or changes the other's data."""

from __future__ import annotations

import struct
import zlib
from urllib.parse import urlsplit

import pytest

from tests.conftest import assert_error


def tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"\x00\xff\x00\x00"  # one red pixel, filter byte first
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture
def world(api, alice, bob, fake_upstream):
    """Bob owns a config, a conversation with a message and an uploaded image; Alice owns one of each too."""
    def setup(account):
        config = api.post("model_config/create", {"name": "c", "base_url": fake_upstream.base_url, "model": "m",
                                                  "api_key": "sk-bola-test-key-0001"}, token=account.access).get_json()
        conversation = api.post("conversation/create", {"model_config_id": config["id"]},
                                token=account.access).get_json()
        upload = api.post("chat/get_upload_presigned_url", {"conversation_id": conversation["id"], "suffixes": ["png"]},
                          token=account.access).get_json()["items"][0]
        put = api.client.put(urlsplit(upload["url"]).path + "?" + urlsplit(upload["url"]).query,
                             data=tiny_png(), headers=upload["headers"])
        assert put.status_code == 200, put.get_json()
        with api.client.post("/api/v1/chat/send", headers={"Authorization": f"Bearer {account.access}"},
                             json={"conversation_id": conversation["id"], "message": {"content": "hi"}}) as reply:
            assert reply.status_code == 200
            reply.get_data()
        history = api.get(f"chat/{conversation['id']}", token=account.access).get_json()["items"]
        return {"config": config, "conversation": conversation, "upload": upload, "message_id": history[0]["id"]}
    return {"alice": setup(alice), "bob": setup(bob)}


def _same_as_unknown(foreign, unknown, status, code):
    foreign_body = assert_error(foreign, status, code)
    unknown_body = assert_error(unknown, status, code)
    foreign_body.pop("request_id"), unknown_body.pop("request_id")
    assert foreign_body == unknown_body


def test_conversation_ids_of_another_user_look_unknown(api, alice, world):
    _alice_tries_bobs_conversation(api, alice, world)


def _alice_tries_bobs_conversation(api, alice, world):
    bob_conversation = world["bob"]["conversation"]["id"]
    for path, body in [
        (f"chat/{bob_conversation}", None),
        ("chat/send", {"conversation_id": bob_conversation, "message": {"content": "x"}}),
        ("conversation/generate_title", {"conversation_id": bob_conversation, "messages": [{"content": "x"}]}),
        ("chat/get_upload_presigned_url", {"conversation_id": bob_conversation, "suffixes": ["png"]}),
    ]:
        call = (lambda b, p=path: api.get(p, token=alice.access)) if body is None else (
            lambda b, p=path: api.post(p, b, token=alice.access))
        unknown_body = body and {**body, "conversation_id": "00000000-0000-7000-8000-000000000000"}
        unknown = api.get(path.replace(bob_conversation, "00000000-0000-7000-8000-000000000000"),
                          token=alice.access) if body is None else call(unknown_body)
        _same_as_unknown(call(body), unknown, 404, "conversation_not_found")
    deleted = api.post("conversation/delete", {"ids": [bob_conversation, world["alice"]["conversation"]["id"]]},
                       token=alice.access).get_json()["deleted"]
    assert deleted == [world["alice"]["conversation"]["id"]]
    assert all(item["id"] != bob_conversation for item in api.get("conversation", token=alice.access).get_json()["items"])


def test_bobs_conversation_survives_everything_alice_tried(api, alice, bob, world):
    _alice_tries_bobs_conversation(api, alice, world)
    history = api.get(f"chat/{world['bob']['conversation']['id']}", token=bob.access).get_json()["items"]
    assert [message["status"] for message in history] == ["completed", "completed"]


def test_model_config_ids_of_another_user_look_unknown(api, alice, world):
    bob_config = world["bob"]["config"]["id"]
    unknown_id = "00000000-0000-7000-8000-000000000000"
    _same_as_unknown(api.post("model_config/update", {"id": bob_config, "name": "mine"}, token=alice.access),
                     api.post("model_config/update", {"id": unknown_id, "name": "mine"}, token=alice.access),
                     404, "model_config_not_found")
    _same_as_unknown(api.post("conversation/create", {"model_config_id": bob_config}, token=alice.access),
                     api.post("conversation/create", {"model_config_id": unknown_id}, token=alice.access),
                     404, "model_config_not_found")
    alice_conversation = world["alice"]["conversation"]["id"]
    _same_as_unknown(
        api.post("chat/send", {"conversation_id": alice_conversation, "model_config_id": bob_config,
                               "message": {"content": "use bob's key"}}, token=alice.access),
        api.post("chat/send", {"conversation_id": alice_conversation, "model_config_id": unknown_id,
                               "message": {"content": "use bob's key"}}, token=alice.access),
        404, "model_config_not_found")
    _same_as_unknown(
        api.post("conversation/generate_title", {"conversation_id": alice_conversation, "model_config_id": bob_config,
                                                 "messages": [{"content": "x"}]}, token=alice.access),
        api.post("conversation/generate_title", {"conversation_id": alice_conversation, "model_config_id": unknown_id,
                                                 "messages": [{"content": "x"}]}, token=alice.access),
        404, "model_config_not_found")
    assert api.post("model_config/delete", {"ids": [bob_config]}, token=alice.access).get_json() == {"deleted": []}
    assert all(item["id"] != bob_config for item in api.get("model_config", token=alice.access).get_json()["items"])


def test_message_ids_of_another_conversation_look_unknown(api, alice, world):
    alice_conversation = world["alice"]["conversation"]["id"]
    _same_as_unknown(
        api.get(f"chat/{alice_conversation}?before={world['bob']['message_id']}", token=alice.access),
        api.get(f"chat/{alice_conversation}?before=00000000-0000-7000-8000-000000000000", token=alice.access),
        404, "message_not_found")


@pytest.mark.parametrize("form", ["key", "upload_url", "download_url"])
def test_image_references_of_another_user_are_refused(api, alice, bob, world, fake_upstream, form):
    bob_upload = world["bob"]["upload"]
    bob_history = api.get(f"chat/{world['bob']['conversation']['id']}", token=bob.access).get_json()
    reference = {"key": bob_upload["key"], "upload_url": bob_upload["url"]}.get(form)
    if form == "download_url":
        reference = api.client.application.extensions["chatapp"].storage.with_base_url("http://localhost") \
            .presign_download(bob_upload["key"], expires_in=60)
    assert bob_history["items"]
    sent_before = len(fake_upstream.requests)
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": reference}}]
    response = api.post("chat/send", {"conversation_id": world["alice"]["conversation"]["id"],
                                      "message": {"content": content}}, token=alice.access)
    assert_error(response, 422, "invalid_image")
    title = api.post("conversation/generate_title", {"conversation_id": world["alice"]["conversation"]["id"],
                                                     "messages": [{"content": content}]}, token=alice.access)
    assert_error(title, 422, "invalid_image")
    assert len(fake_upstream.requests) == sent_before  # refused before any model call


def test_a_storage_url_cannot_be_bent_to_another_key(api, world):
    """The signature covers the key: Alice's valid download URL with Bob's key swapped in is refused."""
    storage = api.client.application.extensions["chatapp"].storage.with_base_url("http://localhost")
    alice_url = urlsplit(storage.presign_download(world["alice"]["upload"]["key"], expires_in=60))
    bent = alice_url.path.replace(world["alice"]["upload"]["key"], world["bob"]["upload"]["key"])
    response = api.client.get(f"{bent}?{alice_url.query}")
    assert_error(response, 403, "signature_invalid")
    assert response.get_data()[:8] != b"\x89PNG\r\n\x1a\n"
