"""Resource limits not covered beside their feature: concurrent streams per user, images per message, empty text."""

from __future__ import annotations

import pytest

from tests.conftest import assert_error


@pytest.fixture
def conversations(api, alice, fake_upstream):
    config = api.post("model_config/create", {"name": "f", "base_url": fake_upstream.base_url, "model": "m"},
                      token=alice.access).get_json()
    return [api.post("conversation/create", {"model_config_id": config["id"]}, token=alice.access).get_json()["id"]
            for _ in range(3)]


def _open_send(api, account, conversation_id, content="hi"):
    """Start a send without reading it: its reply stays `streaming` until the response is consumed."""
    return api.client.post("/api/v1/chat/send", headers={"Authorization": f"Bearer {account.access}"},
                           json={"conversation_id": conversation_id, "message": {"content": content}})


@pytest.mark.app_settings(STREAMS_PER_USER=2)
def test_concurrent_streams_per_user_are_capped(api, alice, bob, conversations, fake_upstream):
    first, second = (_open_send(api, alice, conversation_id) for conversation_id in conversations[:2])
    assert first.status_code == second.status_code == 200
    third = _open_send(api, alice, conversations[2])
    body = assert_error(third, 429, "too_many_streams")
    assert third.headers["Retry-After"] == "1" and "2" in body["message"]
    # Another user is not affected by Alice's streams.
    bob_config = api.post("model_config/create", {"name": "f", "base_url": fake_upstream.base_url, "model": "m"},
                          token=bob.access).get_json()
    bob_conversation = api.post("conversation/create", {"model_config_id": bob_config["id"]},
                                token=bob.access).get_json()["id"]
    bobs = _open_send(api, bob, bob_conversation)
    assert bobs.status_code == 200
    for response in (first, second, bobs):
        response.get_data()  # the streams finish and store their replies
        response.close()
    again = _open_send(api, alice, conversations[2])
    assert again.status_code == 200
    again.get_data()


@pytest.mark.app_settings(MESSAGE_MAX_IMAGES=2, STORAGE_CHECK_EXISTS=False)
def test_images_per_message_are_capped(api, alice, conversations):
    image = {"type": "image_url", "image_url": {"url": f"{alice.user['id']}/{conversations[0]}/images/a.png"}}
    response = _open_send(api, alice, conversations[0], [{"type": "text", "text": "three"}, image, image, image])
    assert assert_error(response, 422, "too_many_images")["details"] == {"content": ["at most 2 images"]}


@pytest.mark.parametrize("content", ["", "   \n\t", [{"type": "text", "text": "  "}]])
def test_a_message_without_text_or_images_is_refused(api, alice, conversations, content):
    assert_error(_open_send(api, alice, conversations[0], content), 422, "validation_error")
