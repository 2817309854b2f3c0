"""Images through presigned URLs, end to end over HTTP (issue 6), on SQLite and on PostgreSQL when
CHATAPP_TEST_DATABASE_URL is set.

- The spec's flows (new conversation, chatting, history, title) with a real PNG through the local backend,
  on a real gunicorn server: the test plays the model too, fetching the download URL the fake upstream got.
- The embedded store's URL rules through its HTTP route: signature, expiry, method, content type, size
  (Content-Length and chunked), magic bytes, traversal; every refusal in the JSON error shape.
- get_upload_presigned_url: ownership, suffix allow-list, server-made keys.
- Key resolution on send and generate_title: other users' and other conversations' keys, data: URLs,
  foreign and look-alike hosts, keys never uploaded -> 422 invalid_image, and nothing reaches the model.
- Deleting a conversation deletes its images.
- The COS backend, fully offline: its presigned URLs through the API, checked with the signature checker of
  tests/test_storage_cos.py (written from Tencent's documentation), and the SDK's network calls replaced.

Nothing here leaves the machine: the autouse ``dials`` fixture fails a test that connects anywhere but
loopback or asks DNS about anything but a numeric host or "localhost".
"""

from __future__ import annotations

import http.client
import io
import json
import re
import struct
import time
import zlib
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest
import requests
from qcloud_cos.cos_exception import CosServiceError
from sqlalchemy import create_engine, text

from chatapp.deps import deps, storage
from chatapp.extensions import db
from chatapp.models import Conversation, Message
from tests.conftest import (
    Account,
    ApiClient,
    LiveServer,
    assert_error,
    free_port,
    remember_secret,
    start_live_server,
    stop_live_server,
)
from tests.test_storage_cos import cos_signature_ok

ROUTE = "/api/v1/storage/"
KEY_SHAPE = r"{user}/{conversation}/images/[0-9a-f]{{32}}\.{suffix}"


# ------------------------------------------------------------------ image bytes


def make_png(width: int = 3, height: int = 2) -> bytes:
    """A real, decodable RGB PNG of a few pixels (signature, IHDR, zlib IDAT, IEND, CRCs)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes(value for x in range(width) for value in (x * 80 % 256, y * 120 % 256, 200))
                    for y in range(height))  # filter byte 0, then RGB pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


PNG = make_png()
# A JPEG that is only its SOI + JFIF APP0 header + EOI: enough for every magic-byte check.
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"


def padded_png(size: int) -> bytes:
    """PNG magic followed by filler: exactly `size` bytes that the store takes as a PNG."""
    return (PNG + b"\x00" * size)[:size]


def test_the_test_png_is_a_real_png():
    assert PNG.startswith(b"\x89PNG\r\n\x1a\n") and PNG.endswith(b"IEND\xaeB`\x82")
    width, height = struct.unpack(">II", PNG[16:24])
    assert (width, height) == (3, 2)
    length = struct.unpack(">I", PNG[33:37])[0]
    assert PNG[37:41] == b"IDAT"
    assert len(zlib.decompress(PNG[41:41 + length])) == height * (1 + 3 * width)


# ------------------------------------------------------------------ no packet leaves the machine


pytestmark = pytest.mark.usefixtures("dials")  # the loopback-only fence of tests/conftest.py


# ------------------------------------------------------------------ helpers (in-process app)


def create_conversation(api: ApiClient, account: Account) -> str:
    response = api.post("conversation/create", {}, token=account.access)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def presign(api: ApiClient, account: Account, conversation_id: str, suffixes=("png",)):
    return api.post("chat/get_upload_presigned_url", {"conversation_id": conversation_id,
                                                      "suffixes": list(suffixes)}, token=account.access)


def upload_items(api: ApiClient, account: Account, conversation_id: str, suffixes=("png",)) -> list[dict]:
    response = presign(api, account, conversation_id, suffixes)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["items"]


def put(api: ApiClient, item: dict, body: bytes, headers: dict | None = None, url: str | None = None):
    """The upload exactly as the client is told: method, url and headers from the item."""
    assert item["method"] == "PUT"
    return api.client.open(url or item["url"], method=item["method"], data=body,
                           headers=item["headers"] if headers is None else headers)


def put_chunked(api: ApiClient, item: dict, body: bytes):
    """A body without Content-Length, as gunicorn hands over a chunked upload (wsgi.input_terminated)."""
    return api.client.open(item["url"], method="PUT", input_stream=io.BytesIO(body),
                           headers={**item["headers"], "Transfer-Encoding": "chunked"},
                           environ_overrides={"wsgi.input_terminated": True})


def upload_png(api: ApiClient, account: Account, conversation_id: str, body: bytes = PNG) -> dict:
    item = upload_items(api, account, conversation_id)[0]
    response = put(api, item, body)
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"key": item["key"], "size": len(body)}
    return item


def text_part(value: str) -> dict:
    return {"type": "text", "text": value}


def image_part(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def model_source(fake) -> dict:
    return {"base_url": fake.base_url, "model": "fake-echo"}


def sse_events(body: str) -> list[tuple[str, dict]]:
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        name = data = None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
        if name:
            events.append((name, data))
    return events


def send(api: ApiClient, account: Account, conversation_id: str, content, fake, **extra):
    body = {"conversation_id": conversation_id, "message": {"role": "user", "content": content},
            **model_source(fake), **extra}
    return api.post("chat/send", body, token=account.access)


def send_ok(api: ApiClient, account: Account, conversation_id: str, content, fake, **extra) -> dict:
    response = send(api, account, conversation_id, content, fake, **extra)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    events = sse_events(response.get_data(as_text=True))
    assert events[-1][0] == "message.completed", events
    assert events[-1][1]["status"] == "completed", events
    return events[-1][1]


def title(api: ApiClient, account: Account, conversation_id: str, messages: list[dict], fake):
    body = {"conversation_id": conversation_id, "messages": messages, **model_source(fake)}
    return api.post("conversation/generate_title", body, token=account.access)


def image_urls(content) -> list[str]:
    if isinstance(content, str):
        return []
    return [part["image_url"]["url"] for part in content if part["type"] == "image_url"]


def model_image_urls(fake) -> list[str]:
    """Every image URL in every message of the last request the model got."""
    return [url for message in fake.requests[-1].body["messages"] for url in image_urls(message["content"])]


def query_of(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


def with_query(url: str, **changes) -> str:
    parts = urlsplit(url)
    query = query_of(url)
    for name, value in changes.items():
        if value is None:
            query.pop(name, None)
        else:
            query[name] = value
    return urlunsplit(parts._replace(query=urlencode(query)))


def assert_download_url(url: str, key: str, origin: str = "http://localhost") -> None:
    """A GET URL of the embedded store for exactly this key: not the upload URL, not a bare key."""
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == origin, url
    assert parts.path == ROUTE + key, url
    query = query_of(url)
    assert set(query) == {"expires", "signature"}, url  # no ct/max: it is not an upload URL


def assert_serves_png(response, body: bytes = PNG) -> None:
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert response.get_data() == body
    assert response.mimetype == "image/png"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Length"] == str(len(body))


def stored(app, message_id: str):
    with app.app_context():
        return db.session.get(Message, message_id).content


def history(api: ApiClient, account: Account, conversation_id: str) -> list[dict]:
    response = api.get(f"chat/{conversation_id}", token=account.access)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["items"]


def stored_file(settings: dict, key: str) -> Path:
    return Path(settings["STORAGE_DIR"]) / key


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


# ------------------------------------------------------------------ the spec's flows, in-process


def test_spec_flows_in_process(app, api, alice, fake_upstream, settings):
    """新建对话 -> upload -> 聊天 with the upload URL -> 加载消息历史 -> title; the database keeps keys only."""
    conversation_id = create_conversation(api, alice)
    item = upload_png(api, alice, conversation_id)
    key = item["key"]
    assert stored_file(settings, key).read_bytes() == PNG

    done = send_ok(api, alice, conversation_id, [text_part("What is this?"), image_part(item["url"], detail="low")],
                   fake_upstream)
    # The model got a fresh download URL for the key, which serves the same bytes.
    sent = fake_upstream.requests[-1].body["messages"][-1]["content"]
    assert sent[0] == text_part("What is this?")
    assert sent[1]["image_url"]["detail"] == "low"
    (model_url,) = model_image_urls(fake_upstream)
    assert model_url not in (item["url"], key)
    assert_download_url(model_url, key)
    assert_serves_png(api.client.get(model_url))
    assert api.client.head(model_url).status_code == 200

    # The database row holds the key, nothing else.
    assert stored(app, done["user_message_id"]) == [text_part("What is this?"),
                                                     {"type": "image_url", "image_url": {"url": key, "detail": "low"}}]

    # History: the key becomes a working download URL.
    items = history(api, alice, conversation_id)
    assert [message["role"] for message in items] == ["user", "assistant"]
    (history_url,) = image_urls(items[0]["content"])
    assert_download_url(history_url, key)
    assert_serves_png(api.client.get(history_url))

    # The next turn: the stored context goes to the model with fresh URLs too; the image by download URL.
    done = send_ok(api, alice, conversation_id, [text_part("again"), image_part(history_url)], fake_upstream)
    assert stored(app, done["user_message_id"])[1]["image_url"]["url"] == key
    urls = model_image_urls(fake_upstream)
    assert len(urls) == 2
    for url in urls:
        assert_download_url(url, key)
    # ... and by the bare key.
    done = send_ok(api, alice, conversation_id, [image_part(key)], fake_upstream)
    assert stored(app, done["user_message_id"]) == [{"type": "image_url", "image_url": {"url": key}}]

    # Title, with the image in each of the three forms the API accepts.
    fake_upstream.script(reply='Title: "A tiny picture"')
    for form in (item["url"], history_url, key):
        response = title(api, alice, conversation_id, [{"role": "user", "content": [text_part("look"),
                                                                                     image_part(form)]}],
                         fake_upstream)
        assert response.status_code == 200, response.get_json()
        assert response.get_json() == {"conversation_id": conversation_id, "title": "A tiny picture"}
        (url,) = model_image_urls(fake_upstream)
        assert_download_url(url, key)
        assert_serves_png(api.client.get(url))
    with app.app_context():
        assert db.session.get(Conversation, conversation_id).title == "A tiny picture"


def test_messages_form_context_images_are_resolved_too(app, api, alice, fake_upstream):
    """The spec's `messages` form: earlier messages are context as sent; their images obey the same rules."""
    conversation_id = create_conversation(api, alice)
    first, second = upload_png(api, alice, conversation_id), upload_png(api, alice, conversation_id)
    body = {"conversation_id": conversation_id, **model_source(fake_upstream), "messages": [
        {"role": "user", "content": [text_part("one"), image_part(first["url"])]},
        {"role": "assistant", "content": "A pixel."},
        {"role": "user", "content": [text_part("two"), image_part(second["key"])]},
    ]}
    response = api.post("chat/send", body, token=alice.access)
    assert response.status_code == 200
    assert sse_events(response.get_data(as_text=True))[-1][1]["status"] == "completed"
    first_url, second_url = model_image_urls(fake_upstream)
    assert_download_url(first_url, first["key"])
    assert_download_url(second_url, second["key"])


# ------------------------------------------------------------------ get_upload_presigned_url


def test_upload_urls_shape_and_keys(app, api, alice):
    conversation_id = create_conversation(api, alice)
    suffixes = ["PNG", "jpeg", ".webp", "Jpg", "gif", "png"]
    items = upload_items(api, alice, conversation_id, suffixes)
    expected = [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp"), ("jpg", "image/jpeg"),
                ("gif", "image/gif"), ("png", "image/png")]
    assert len(items) == len(expected)
    assert len({item["key"] for item in items}) == len(items)  # a fresh uuid each
    for item, (suffix, content_type) in zip(items, expected, strict=True):
        assert set(item) == {"key", "url", "method", "headers", "expires_in"}
        assert re.fullmatch(KEY_SHAPE.format(user=alice.user["id"], conversation=conversation_id, suffix=suffix),
                            item["key"]), item["key"]
        assert item["method"] == "PUT"
        assert item["headers"] == {"Content-Type": content_type}
        assert item["expires_in"] == app.config["UPLOAD_URL_SECONDS"]
        parts = urlsplit(item["url"])
        assert (parts.scheme, parts.netloc, parts.path) == ("http", "localhost", ROUTE + item["key"])
        query = query_of(item["url"])
        assert set(query) == {"expires", "max", "ct", "signature"}
        assert (query["ct"], query["max"]) == (content_type, str(app.config["UPLOAD_MAX_BYTES"]))
    # Ten is the most; and each of them can really be used.
    items = upload_items(api, alice, conversation_id, ["png"] * 10)
    assert len(items) == 10
    for item in items[:2]:
        assert put(api, item, PNG).status_code == 200


@pytest.mark.parametrize("suffixes", [
    [], ["png"] * 11, ["exe"], ["svg"], ["png", "svg"], ["html"], [""], ["png.exe"], ["../png"], ["pn g"],
    ["p" * 11], "png", [7], None,
])
def test_upload_urls_refuse_bad_suffixes(api, alice, suffixes):
    conversation_id = create_conversation(api, alice)
    body = assert_error(api.post("chat/get_upload_presigned_url", {"conversation_id": conversation_id,
                                                                   "suffixes": suffixes}, token=alice.access),
                        422, "validation_error")
    assert "suffixes" in body["details"]


def test_upload_urls_only_for_own_conversations(api, alice, bob):
    bobs = create_conversation(api, bob)
    assert_error(presign(api, alice, bobs), 404, "conversation_not_found")
    assert_error(presign(api, alice, "00000000-0000-7000-8000-000000000000"), 404, "conversation_not_found")
    assert_error(api.post("chat/get_upload_presigned_url", {"conversation_id": bobs, "suffixes": ["png"]}), 401)
    assert_error(api.post("chat/get_upload_presigned_url", {"conversation_id": bobs, "suffixes": ["png"]},
                          token=bob.refresh), 401)
    assert presign(api, bob, bobs).status_code == 200


# ------------------------------------------------------------------ the embedded store's URL rules


def _flip(text_value: str) -> str:
    return ("0" if text_value[0] != "0" else "1") + text_value[1:]


def test_tampered_urls_are_403(api, alice, settings):
    conversation_id = create_conversation(api, alice)
    item = upload_png(api, alice, conversation_id)
    other = upload_items(api, alice, conversation_id)[0]
    download = download_url(api, item["key"])

    tampered_puts = [
        with_query(item["url"], signature=_flip(query_of(item["url"])["signature"])),
        with_query(item["url"], signature=None),
        with_query(item["url"], expires=str(int(query_of(item["url"])["expires"]) + 3600)),  # extending it
        with_query(item["url"], max=str(100 * 1024 * 1024)),
        with_query(item["url"], ct="image/gif"),
        item["url"].replace(item["key"], other["key"]),  # a signature for one key used for another
    ]
    for url in tampered_puts:
        assert_error(put(api, item, PNG, url=url), 403, "signature_invalid")
    assert not stored_file(settings, other["key"]).exists()

    tampered_gets = [
        with_query(download, signature=_flip(query_of(download)["signature"])),
        with_query(download, signature=None),
        with_query(download, expires=str(int(query_of(download)["expires"]) + 3600)),
        download.replace(item["key"], other["key"]),
    ]
    for url in tampered_gets:
        assert_error(api.client.get(url), 403, "signature_invalid")
    assert_serves_png(api.client.get(download))


def download_url(api: ApiClient, key: str, seconds: int = 60) -> str:
    """A download URL as the app mints them for history (same storage, same request host), without a model."""
    with api.client.application.test_request_context("/", base_url="http://localhost"):
        return storage().presign_download(key, seconds)


class MovableClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_expired_urls_are_403(app, api, alice, monkeypatch, settings):
    """The store's clock moves past the expiry of URLs it issued through the API."""
    clock = MovableClock(time.time())
    with app.app_context():
        monkeypatch.setattr(deps().storage, "_clock", clock)
    conversation_id = create_conversation(api, alice)
    item = upload_items(api, alice, conversation_id)[0]
    clock.now += app.config["UPLOAD_URL_SECONDS"] + 1
    assert_error(put(api, item, PNG), 403, "url_expired")
    assert not stored_file(settings, item["key"]).exists()

    item = upload_png(api, alice, conversation_id)
    url = download_url(api, item["key"])
    assert_serves_png(api.client.get(url))
    clock.now += 61
    assert_error(api.client.get(url), 403, "url_expired")
    # Editing `expires` to revive it breaks the signature instead.
    assert_error(api.client.get(with_query(url, expires=str(int(clock.now) + 60))), 403, "signature_invalid")


def test_url_is_good_for_its_method_only(api, alice, settings):
    conversation_id = create_conversation(api, alice)
    item = upload_png(api, alice, conversation_id)
    download = download_url(api, item["key"])

    response = api.client.get(item["url"])  # an upload URL used to read
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "PUT"
    response = put(api, item, padded_png(50), url=download)  # a download URL used to write
    assert_error(response, 405, "method_not_allowed")
    assert set(response.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
    assert stored_file(settings, item["key"]).read_bytes() == PNG  # untouched
    for method in ("POST", "DELETE", "PATCH"):
        assert_error(api.client.open(download, method=method, data=PNG, headers=item["headers"]), 405)
    assert stored_file(settings, item["key"]).read_bytes() == PNG


@pytest.mark.parametrize("headers", [
    {"Content-Type": "image/jpeg"}, {"Content-Type": "text/plain"}, {"Content-Type": "application/json"},
    {"Content-Type": "image/svg+xml"}, {"Content-Type": "image/pngx"}, {},
])
def test_wrong_content_type_is_403(api, alice, settings, headers):
    conversation_id = create_conversation(api, alice)
    item = upload_items(api, alice, conversation_id)[0]
    assert_error(put(api, item, PNG, headers=headers), 403, "signature_invalid")
    assert not stored_file(settings, item["key"]).exists()


def test_content_type_parameters_and_case_are_tolerated(api, alice):
    conversation_id = create_conversation(api, alice)
    item = upload_items(api, alice, conversation_id)[0]
    assert put(api, item, PNG, headers={"Content-Type": "IMAGE/PNG; charset=binary"}).status_code == 200


@pytest.mark.app_settings(UPLOAD_MAX_BYTES=1000)
def test_oversize_upload_is_413(api, alice, settings):
    conversation_id = create_conversation(api, alice)
    item = upload_items(api, alice, conversation_id)[0]
    assert query_of(item["url"])["max"] == "1000"
    assert_error(put(api, item, padded_png(1001)), 413, "payload_too_large")
    assert_error(put(api, item, padded_png(50_000)), 413, "payload_too_large")
    assert_error(put_chunked(api, item, padded_png(1001)), 413, "payload_too_large")
    assert_error(put_chunked(api, item, padded_png(50_000)), 413, "payload_too_large")
    folder = stored_file(settings, item["key"]).parent
    assert files_under(folder) == []  # no object, no temp file left behind

    assert put(api, item, padded_png(1000)).status_code == 200
    assert stored_file(settings, item["key"]).stat().st_size == 1000
    second = upload_items(api, alice, conversation_id)[0]
    response = put_chunked(api, second, padded_png(1000))  # exactly the limit, without Content-Length
    assert response.status_code == 200, response.get_json()
    assert stored_file(settings, second["key"]).stat().st_size == 1000


@pytest.mark.app_settings(MAX_BODY_BYTES=1000, UPLOAD_MAX_BYTES=5000)
def test_upload_limit_is_the_signed_one_not_the_json_body_limit(api, alice, settings):
    conversation_id = create_conversation(api, alice)
    for uploader in (put, put_chunked):
        item = upload_items(api, alice, conversation_id)[0]
        response = uploader(api, item, padded_png(3000))
        assert response.status_code == 200, response.get_json()
        assert stored_file(settings, item["key"]).stat().st_size == 3000


@pytest.mark.parametrize(("suffix", "body"), [
    ("png", b"hello, this is text and not an image"),
    ("png", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'),
    ("png", b"<html><body>hi</body></html>"),
    ("png", JPEG_HEAD),  # an image, but not the signed type
    ("jpg", PNG),
    ("gif", PNG),
    ("webp", b"RIFF\x00\x00\x00\x00WAVEfmt "),
    ("png", b""),
    ("png", PNG[:4]),
])
def test_non_image_body_is_415(api, alice, settings, suffix, body):
    conversation_id = create_conversation(api, alice)
    item = upload_items(api, alice, conversation_id, [suffix])[0]
    assert_error(put(api, item, body), 415, "not_an_image")
    assert files_under(stored_file(settings, item["key"]).parent) == []


@pytest.mark.parametrize("suffix", ["jpg", "jpeg", "JPEG"])
def test_jpeg_header_goes_to_jpeg_urls(api, alice, suffix):
    conversation_id = create_conversation(api, alice)
    item = upload_items(api, alice, conversation_id, [suffix])[0]
    assert put(api, item, JPEG_HEAD).status_code == 200
    response = api.client.get(download_url(api, item["key"]))
    assert response.status_code == 200 and response.get_data() == JPEG_HEAD
    assert response.mimetype == "image/jpeg"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


TRAVERSALS = [
    "../../etc/passwd",
    "../../../../../../etc/passwd",
    "%2e%2e/%2e%2e/etc/passwd",
    "..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fevil.png",
    "{prefix}../../../evil.png",
    "{prefix}..%2f..%2f..%2fevil.png",
    "{prefix}%2e%2e/%2e%2e/%2e%2e/evil.png",
    "{prefix}%252e%252e/evil.png",
    "/etc/passwd",
    "{prefix}evil.png%00.png",
    "{prefix}.upload-x.tmp",
    "{prefix}..\\..\\..\\evil.png",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_keys_never_reach_outside_the_store(api, alice, settings, tmp_path, path):
    conversation_id = create_conversation(api, alice)
    item = upload_items(api, alice, conversation_id)[0]
    prefix = item["key"].rsplit("/", 1)[0] + "/"
    query = urlsplit(item["url"]).query  # a genuine signature, for a different key
    url = f"http://localhost{ROUTE}{path.format(prefix=prefix)}?{query}"
    before = set(tmp_path.rglob("*"))
    response = put(api, item, PNG, url=url)
    assert 400 <= response.status_code < 500
    assert_error(response, response.status_code)
    response = api.client.get(url)
    assert 400 <= response.status_code < 500
    assert_error(response, response.status_code)
    assert b"root:" not in response.get_data()
    assert set(tmp_path.rglob("*")) == before  # nothing written anywhere


# ------------------------------------------------------------------ key resolution refusals (422)


@pytest.fixture
def scene(app, api, alice, bob):
    """Alice's conversations A and B and Bob's conversation, each with an uploaded PNG."""
    conv_a, conv_b, conv_bob = (create_conversation(api, alice), create_conversation(api, alice),
                                create_conversation(api, bob))
    items = {"a": upload_png(api, alice, conv_a), "b": upload_png(api, alice, conv_b),
             "bob": upload_png(api, bob, conv_bob)}
    downloads = {name: download_url(api, item["key"], 600) for name, item in items.items()}
    key_a = items["a"]["key"]
    never = upload_items(api, alice, conv_a)[0]  # issued, but nothing was ever PUT
    return {"conv_a": conv_a, "conv_b": conv_b, "conv_bob": conv_bob, "items": items, "downloads": downloads,
            "key_a": key_a, "never": never,
            "path_a": f"{ROUTE}{key_a}?{urlsplit(items['a']['url']).query}"}


REFUSED = {
    "bob_key": lambda s: s["items"]["bob"]["key"],
    "bob_upload_url": lambda s: s["items"]["bob"]["url"],
    "bob_download_url": lambda s: s["downloads"]["bob"],
    "other_conversation_key": lambda s: s["items"]["b"]["key"],
    "other_conversation_upload_url": lambda s: s["items"]["b"]["url"],
    "other_conversation_download_url": lambda s: s["downloads"]["b"],
    "data_url": lambda s: "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk",
    "data_url_upper": lambda s: "DATA:image/png;base64,iVBORw0KGgo=",
    "data_url_spaced": lambda s: "  data:image/png;base64,iVBORw0KGgo=",
    "foreign_url": lambda s: "https://evil.example/x.png",
    "foreign_url_with_our_path": lambda s: "https://evil.example" + s["path_a"],
    "lookalike_subdomain": lambda s: "http://localhost.evil.example" + s["path_a"],
    "lookalike_userinfo": lambda s: "http://localhost@evil.example" + s["path_a"],
    "lookalike_userinfo_reverse": lambda s: "http://evil.example@localhost" + s["path_a"],
    "lookalike_other_port": lambda s: "http://localhost:8080" + s["path_a"],
    "lookalike_https": lambda s: "https://localhost" + s["path_a"],
    "lookalike_scheme": lambda s: "ftp://localhost" + s["path_a"],
    "lookalike_route": lambda s: "http://localhost/api/v1/storagex/" + s["key_a"],
    "lookalike_backslash": lambda s: "http://localhost\\@evil.example" + s["path_a"],
    "url_with_fragment": lambda s: "http://localhost" + s["path_a"] + "#x",
    "traversal_in_url": lambda s: ("http://localhost" + ROUTE + s["key_a"].rsplit("/", 3)[0]
                                   + "/../" + s["items"]["bob"]["key"]),
    "encoded_traversal_in_url": lambda s: ("http://localhost" + ROUTE + s["key_a"].rsplit("/", 1)[0]
                                           + "/%2e%2e/%2e%2e/" + s["key_a"].split("/", 1)[1]),
    "traversal_key": lambda s: s["key_a"].rsplit("/", 1)[0] + "/../images/" + s["key_a"].rsplit("/", 1)[1],
    "absolute_key": lambda s: "/" + s["key_a"],
    "never_uploaded_key": lambda s: s["never"]["key"],
    "never_uploaded_url": lambda s: s["never"]["url"],
    "made_up_key_in_prefix": lambda s: s["key_a"].rsplit("/", 1)[0] + "/0123456789abcdef0123456789abcdef.png",
    "not_an_image_key": lambda s: s["key_a"].rsplit(".", 1)[0] + ".txt",
    "empty": lambda s: "",
    "javascript": lambda s: "javascript:alert(1)",
    "file_url": lambda s: "file:///etc/passwd",
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_send_refuses_images_it_did_not_issue_here(api, alice, scene, fake_upstream, kind):
    url = REFUSED[kind](scene)
    response = send(api, alice, scene["conv_a"], [text_part("see"), image_part(url)], fake_upstream)
    body = assert_error(response, 422, "invalid_image")
    assert "content" in body["details"]
    assert fake_upstream.requests == []  # the model was never called
    assert history(api, alice, scene["conv_a"]) == []  # and nothing was stored


@pytest.mark.parametrize("kind", list(REFUSED))
def test_generate_title_refuses_images_it_did_not_issue_here(app, api, alice, scene, fake_upstream, kind):
    url = REFUSED[kind](scene)
    response = title(api, alice, scene["conv_a"], [{"role": "user", "content": [text_part("see"),
                                                                                 image_part(url)]}], fake_upstream)
    assert_error(response, 422, "invalid_image")
    assert fake_upstream.requests == []
    with app.app_context():
        assert db.session.get(Conversation, scene["conv_a"]).title is None


def test_refused_image_in_messages_context(api, alice, scene, fake_upstream):
    body = {"conversation_id": scene["conv_a"], **model_source(fake_upstream), "messages": [
        {"role": "user", "content": [image_part(scene["items"]["bob"]["key"])]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [image_part(scene["key_a"])]},
    ]}
    assert_error(api.post("chat/send", body, token=alice.access), 422, "invalid_image")
    assert fake_upstream.requests == []


def test_each_owner_may_use_their_own_image(api, alice, bob, scene, fake_upstream):
    """The refusals above are about who and where, not about the images: their owners can use them."""
    send_ok(api, alice, scene["conv_a"], [image_part(scene["items"]["a"]["url"])], fake_upstream)
    send_ok(api, alice, scene["conv_b"], [image_part(scene["downloads"]["b"])], fake_upstream)
    send_ok(api, bob, scene["conv_bob"], [image_part(scene["items"]["bob"]["key"])], fake_upstream)
    # Bob cannot even address Alice's conversation.
    assert_error(send(api, bob, scene["conv_a"], [image_part(scene["key_a"])], fake_upstream), 404,
                 "conversation_not_found")


@pytest.mark.app_settings(STORAGE_CHECK_EXISTS=False)
def test_without_the_exists_check_a_never_uploaded_key_is_accepted_but_the_prefix_rule_holds(
        api, alice, scene, fake_upstream):
    send_ok(api, alice, scene["conv_a"], [image_part(scene["never"]["key"])], fake_upstream)
    assert_error(send(api, alice, scene["conv_a"], [image_part(scene["items"]["bob"]["key"])], fake_upstream),
                 422, "invalid_image")


# ------------------------------------------------------------------ configured public URL


@pytest.mark.app_settings(PUBLIC_BASE_URL="https://chat.example.test")
def test_configured_public_url_wins_over_the_request_host(api, alice, fake_upstream, settings):
    conversation_id = create_conversation(api, alice)
    item = upload_items(api, alice, conversation_id)[0]
    assert item["url"].startswith(f"https://chat.example.test{ROUTE}{item['key']}?")
    # A request claiming another Host still gets URLs on the configured one.
    spoofed = api.post("chat/get_upload_presigned_url", {"conversation_id": conversation_id, "suffixes": ["png"]},
                       token=alice.access, headers={"Host": "evil.example"})
    assert spoofed.get_json()["items"][0]["url"].startswith("https://chat.example.test/")
    assert put(api, item, PNG).status_code == 200  # the test client speaks to the app whatever the host
    # The request's own host is not ours any more: only the configured origin (or a bare key) resolves.
    local = f"http://localhost{ROUTE}{item['key']}?{urlsplit(item['url']).query}"
    assert_error(send(api, alice, conversation_id, [image_part(local)], fake_upstream), 422, "invalid_image")
    send_ok(api, alice, conversation_id, [image_part(item["url"])], fake_upstream)
    (url,) = model_image_urls(fake_upstream)
    assert_download_url(url, item["key"], origin="https://chat.example.test")
    assert_serves_png(api.client.get(url))


# ------------------------------------------------------------------ deletion


def test_conversation_delete_removes_its_images(app, api, alice, bob, fake_upstream, settings):
    conv_a, conv_b = create_conversation(api, alice), create_conversation(api, alice)
    kept = upload_png(api, alice, conv_b)
    first, second = upload_png(api, alice, conv_a), upload_png(api, alice, conv_a)
    send_ok(api, alice, conv_a, [text_part("two"), image_part(first["url"]), image_part(second["key"])],
            fake_upstream)
    urls = image_urls(history(api, alice, conv_a)[0]["content"])
    kept_url = download_url(api, kept["key"])
    for url in urls:
        assert_serves_png(api.client.get(url))

    # Bob deleting Alice's conversation is ignored, images included.
    response = api.post("conversation/delete", {"ids": [conv_a]}, token=bob.access)
    assert response.status_code == 200 and response.get_json() == {"deleted": []}
    assert stored_file(settings, first["key"]).exists()

    response = api.post("conversation/delete", {"ids": [conv_a]}, token=alice.access)
    assert response.get_json() == {"deleted": [conv_a]}
    for url, item in zip(urls, (first, second), strict=True):
        assert_error(api.client.get(url), 404, "object_not_found")
        assert not stored_file(settings, item["key"]).exists()
    assert not stored_file(settings, first["key"]).parent.parent.exists()  # the conversation's folder too
    # The other conversation keeps its image; an upload URL for the deleted conversation cannot revive it
    # under a conversation that no longer exists as far as sending goes.
    assert_serves_png(api.client.get(kept_url))
    assert_error(presign(api, alice, conv_a), 404, "conversation_not_found")


def test_upload_url_of_a_deleted_conversation_stores_nothing(api, alice, settings):
    """An upload URL outlives its conversation by up to UPLOAD_URL_SECONDS; it must not leave an orphan file
    that no message references and no later delete would ever remove."""
    conversation_id = create_conversation(api, alice)
    item = upload_items(api, alice, conversation_id)[0]
    assert api.post("conversation/delete", {"ids": [conversation_id]}, token=alice.access).status_code == 200
    assert_error(put(api, item, PNG), 404, "conversation_not_found")
    assert not stored_file(settings, item["key"]).exists()
    assert files_under(Path(settings["STORAGE_DIR"])) == []


# ------------------------------------------------------------------ the COS backend, offline

COS_SECRET_ID = "AKIDtestImagesSecretId0123456789"
COS_SECRET_KEY = remember_secret("testImagesSecretKey0123456789abcdef")
COS_REGION = "ap-guangzhou"
COS_BUCKET = "chat-1250000000"
COS_HOST = f"{COS_BUCKET}.cos.{COS_REGION}.myqcloud.com"
COS_SETTINGS = {"STORAGE_BACKEND": "cos", "COS_SECRET_ID": COS_SECRET_ID, "COS_SECRET_KEY": COS_SECRET_KEY,
                "COS_REGION": COS_REGION, "COS_BUCKET": COS_BUCKET, "STORAGE_CHECK_EXISTS": False}


class FakeCosCalls:
    """Stands in for the SDK's network calls; presigning stays the SDK's own (it is pure computation)."""

    def __init__(self, objects: set[str] | None = None) -> None:
        self.objects = objects if objects is not None else set()
        self.sizes: dict[str, int] = {}
        self.calls: list[tuple[str, dict]] = []

    def head_object(self, **kwargs):
        self.calls.append(("head_object", kwargs))
        if kwargs["Key"] not in self.objects:
            raise CosServiceError("HEAD", "<Error><Code>NoSuchKey</Code></Error>", 404)
        return {"Content-Length": str(self.sizes.get(kwargs["Key"], len(PNG)))}

    def list_objects(self, **kwargs):
        self.calls.append(("list_objects", kwargs))
        keys = sorted(key for key in self.objects if key.startswith(kwargs["Prefix"]))
        return {"Contents": [{"Key": key} for key in keys], "IsTruncated": "false"}

    def delete_objects(self, **kwargs):
        self.calls.append(("delete_objects", kwargs))
        for entry in kwargs["Delete"]["Object"]:
            self.objects.discard(entry["Key"])
        return {}


@pytest.fixture
def cos(app, monkeypatch) -> FakeCosCalls:
    fake = FakeCosCalls()
    client = app.extensions["chatapp"].storage._client
    for name in ("head_object", "list_objects", "delete_objects"):
        monkeypatch.setattr(client, name, getattr(fake, name))
    for name in ("put_object", "get_object", "upload_file", "download_file", "send_request"):
        if hasattr(client, name):
            monkeypatch.setattr(client, name, _never(name))
    return fake


def _never(name: str):
    def call(*args, **kwargs):
        raise AssertionError(f"the app called COS {name}")

    return call


def assert_cos_download(url: str, key: str) -> None:
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", COS_HOST, "/" + key), url
    assert cos_signature_ok("GET", url, {}, secret_id=COS_SECRET_ID, secret_key=COS_SECRET_KEY)


@pytest.mark.app_settings(**COS_SETTINGS)
def test_cos_upload_urls_are_signed_for_the_bucket_and_content_type(api, alice, cos):
    conversation_id = create_conversation(api, alice)
    items = upload_items(api, alice, conversation_id, ["PNG", "jpg"])
    for item, content_type in zip(items, ("image/png", "image/jpeg"), strict=True):
        assert re.fullmatch(KEY_SHAPE.format(user=alice.user["id"], conversation=conversation_id,
                                             suffix=content_type.split("/")[1].replace("jpeg", "jpg")),
                            item["key"])
        assert (item["method"], item["headers"]) == ("PUT", {"Content-Type": content_type})
        parts = urlsplit(item["url"])
        assert (parts.scheme, parts.netloc, parts.path) == ("https", COS_HOST, "/" + item["key"])
        query = query_of(item["url"])
        assert query["q-ak"] == COS_SECRET_ID and query["q-signature"]
        assert "content-type" in query["q-header-list"].split(";")
        assert COS_SECRET_KEY not in item["url"]
        assert cos_signature_ok("PUT", item["url"], item["headers"], secret_id=COS_SECRET_ID,
                                secret_key=COS_SECRET_KEY)
        assert not cos_signature_ok("PUT", item["url"], {"Content-Type": "text/html"}, secret_id=COS_SECRET_ID,
                                    secret_key=COS_SECRET_KEY)
        assert not cos_signature_ok("GET", item["url"], {}, secret_id=COS_SECRET_ID, secret_key=COS_SECRET_KEY)
    assert cos.calls == []


@pytest.mark.app_settings(**COS_SETTINGS)
def test_cos_send_history_and_title_use_keys_and_fresh_cos_urls(app, api, alice, cos, fake_upstream):
    conversation_id = create_conversation(api, alice)
    item = upload_items(api, alice, conversation_id)[0]
    done = send_ok(api, alice, conversation_id, [text_part("cos"), image_part(item["url"])], fake_upstream)
    key = item["key"]
    assert stored(app, done["user_message_id"]) == [text_part("cos"), {"type": "image_url", "image_url": {"url": key}}]
    (model_url,) = model_image_urls(fake_upstream)
    assert model_url != item["url"]
    assert_cos_download(model_url, key)

    (history_url,) = image_urls(history(api, alice, conversation_id)[0]["content"])
    assert_cos_download(history_url, key)
    send_ok(api, alice, conversation_id, [image_part(history_url)], fake_upstream)
    send_ok(api, alice, conversation_id, [image_part(key)], fake_upstream)

    response = title(api, alice, conversation_id, [{"role": "user", "content": [image_part(item["url"])]}],
                     fake_upstream)
    assert response.status_code == 200, response.get_json()
    (url,) = model_image_urls(fake_upstream)
    assert_cos_download(url, key)
    assert cos.calls == []  # the exists check is off: not one call to COS


@pytest.mark.app_settings(**COS_SETTINGS)
@pytest.mark.parametrize("kind", ["lookalike_host", "bucket_as_path", "local_store_url", "other_bucket",
                                  "other_region", "bob_key", "http_scheme", "userinfo"])
def test_cos_refuses_foreign_and_lookalike_urls(api, alice, bob, cos, fake_upstream, kind):
    conversation_id = create_conversation(api, alice)
    item = upload_items(api, alice, conversation_id)[0]
    key, query = item["key"], urlsplit(item["url"]).query
    bob_key = upload_items(api, bob, create_conversation(api, bob))[0]["key"]
    url = {
        "lookalike_host": f"https://{COS_HOST}.evil.example/{key}?{query}",
        "bucket_as_path": f"https://cos.{COS_REGION}.myqcloud.com/{COS_BUCKET}/{key}",
        "local_store_url": f"http://localhost{ROUTE}{key}",
        "other_bucket": f"https://evil-1250000000.cos.{COS_REGION}.myqcloud.com/{key}?{query}",
        "other_region": f"https://{COS_BUCKET}.cos.ap-beijing.myqcloud.com/{key}?{query}",
        "bob_key": bob_key,
        "http_scheme": f"http://{COS_HOST}/{key}?{query}",
        "userinfo": f"https://{COS_HOST}@evil.example/{key}",
    }[kind]
    assert_error(send(api, alice, conversation_id, [image_part(url)], fake_upstream), 422, "invalid_image")
    assert fake_upstream.requests == []


@pytest.mark.app_settings(**{**COS_SETTINGS, "STORAGE_CHECK_EXISTS": True})
def test_cos_exists_check_uses_head_object(api, alice, cos, fake_upstream):
    conversation_id = create_conversation(api, alice)
    missing, present = upload_items(api, alice, conversation_id, ["png", "png"])
    cos.objects.add(present["key"])
    assert_error(send(api, alice, conversation_id, [image_part(missing["url"])], fake_upstream), 422,
                 "invalid_image")
    send_ok(api, alice, conversation_id, [image_part(present["url"])], fake_upstream)
    assert [(name, kwargs["Key"]) for name, kwargs in cos.calls] == [("head_object", missing["key"]),
                                                                     ("head_object", present["key"])]
    assert all(kwargs["Bucket"] == COS_BUCKET for _, kwargs in cos.calls)


@pytest.mark.app_settings(**{**COS_SETTINGS, "STORAGE_CHECK_EXISTS": True, "UPLOAD_MAX_BYTES": 1000})
def test_cos_oversized_object_is_refused_when_used(api, alice, cos, fake_upstream):
    """A COS presigned PUT cannot cap the size, so the size is judged when a message uses the image."""
    conversation_id = create_conversation(api, alice)
    small, large = upload_items(api, alice, conversation_id, ["png", "png"])
    cos.objects.update({small["key"], large["key"]})
    cos.sizes.update({small["key"]: 1000, large["key"]: 1001})
    body = assert_error(send(api, alice, conversation_id, [image_part(large["url"])], fake_upstream), 422,
                        "invalid_image")
    assert "1000 bytes" in body["message"]
    send_ok(api, alice, conversation_id, [image_part(small["url"])], fake_upstream)


def test_an_uploaded_image_cannot_be_replaced(api, alice):
    conversation_id = create_conversation(api, alice)
    item = upload_png(api, alice, conversation_id)
    assert_error(put(api, item, make_png(5, 5)), 409, "object_exists")


def test_double_slashes_are_a_json_404_not_a_redirect(api, alice):
    assert_error(api.get("/api/v1//user/me", token=alice.access), 404)


@pytest.mark.app_settings(**COS_SETTINGS)
def test_cos_conversation_delete_batch_deletes_its_prefix(api, alice, cos):
    conv_a, conv_b = create_conversation(api, alice), create_conversation(api, alice)
    keys_a = [item["key"] for item in upload_items(api, alice, conv_a, ["png", "gif"])]
    key_b = upload_items(api, alice, conv_b)[0]["key"]
    cos.objects.update([*keys_a, key_b])
    response = api.post("conversation/delete", {"ids": [conv_a]}, token=alice.access)
    assert response.get_json() == {"deleted": [conv_a]}
    assert cos.objects == {key_b}
    prefix = f"{alice.user['id']}/{conv_a}/images/"
    assert [name for name, _ in cos.calls] == ["list_objects", "delete_objects"]
    assert cos.calls[0][1]["Prefix"] == prefix and cos.calls[0][1]["Bucket"] == COS_BUCKET
    assert sorted(entry["Key"] for entry in cos.calls[1][1]["Delete"]["Object"]) == sorted(keys_a)


@pytest.mark.app_settings(**COS_SETTINGS)
def test_cos_leaves_the_embedded_store_route_dark(api, alice, cos):
    conversation_id = create_conversation(api, alice)
    key = upload_items(api, alice, conversation_id)[0]["key"]
    assert_error(api.client.put(f"{ROUTE}{key}?expires=1&signature=00", data=PNG,
                                headers={"Content-Type": "image/png"}), 404)
    assert_error(api.client.get(f"{ROUTE}{key}?expires=1&signature=00"), 404)


COS_TOKEN = remember_secret("sts-token/with+odd=chars&more")


@pytest.mark.app_settings(**{**COS_SETTINGS, "COS_TOKEN": COS_TOKEN, "COS_DOMAIN": "img.chat.example.test"})
def test_cos_sts_token_and_custom_domain(api, alice, cos, fake_upstream):
    conversation_id = create_conversation(api, alice)
    item = upload_items(api, alice, conversation_id)[0]
    parts = urlsplit(item["url"])
    assert (parts.netloc, parts.path) == ("img.chat.example.test", "/" + item["key"])
    query = query_of(item["url"])
    assert query["x-cos-security-token"] == COS_TOKEN
    assert "x-cos-security-token" in query["q-url-param-list"].split(";")
    assert cos_signature_ok("PUT", item["url"], item["headers"], secret_id=COS_SECRET_ID,
                            secret_key=COS_SECRET_KEY)
    # The custom domain is ours now; the default bucket domain is not.
    default = f"https://{COS_HOST}/{item['key']}"
    assert_error(send(api, alice, conversation_id, [image_part(default)], fake_upstream), 422, "invalid_image")
    send_ok(api, alice, conversation_id, [image_part(item["url"])], fake_upstream)
    (url,) = model_image_urls(fake_upstream)
    assert urlsplit(url).netloc == "img.chat.example.test"
    assert query_of(url)["x-cos-security-token"] == COS_TOKEN
    assert cos_signature_ok("GET", url, {}, secret_id=COS_SECRET_ID, secret_key=COS_SECRET_KEY)


# ------------------------------------------------------------------ a real gunicorn server


LIVE_UPLOAD_MAX = 4096


@pytest.fixture(scope="module")
def image_server(tmp_path_factory, _schema_template):
    server = start_live_server(tmp_path_factory.mktemp("live_images"),
                               extra_env={"CHATAPP_UPLOAD_MAX_BYTES": str(LIVE_UPLOAD_MAX)})
    yield server
    stop_live_server(server)


def live_json_error(response: requests.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["code"], str) and isinstance(body["message"], str)
    assert body["request_id"] == response.headers["X-Request-ID"]
    if code:
        assert body["code"] == code, body
    return body


class Live:
    """The client side of the spec's flows against a LiveServer, with `requests`."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.http = requests.Session()
        # No keep-alive: a pooled connection (kept open by any Response still referenced) would hold up
        # gunicorn's graceful stop until stop_live_server gives up and kills it.
        self.http.headers["Connection"] = "close"
        self.account = server.register(self.http)

    def __enter__(self) -> Live:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.http.close()

    def post(self, path: str, body: dict, **kwargs) -> requests.Response:
        return self.http.post(self.server.api(path), json=body, timeout=30,
                              headers={"Authorization": f"Bearer {self.account.access}"}, **kwargs)

    def get(self, path: str) -> requests.Response:
        return self.http.get(self.server.api(path), timeout=30,
                             headers={"Authorization": f"Bearer {self.account.access}"})

    def conversation(self) -> str:
        response = self.post("conversation/create", {})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def upload_items(self, conversation_id: str, suffixes=("png",)) -> list[dict]:
        response = self.post("chat/get_upload_presigned_url", {"conversation_id": conversation_id,
                                                               "suffixes": list(suffixes)})
        assert response.status_code == 200, response.text
        return response.json()["items"]

    def upload(self, item: dict, body) -> requests.Response:
        # exactly method, url and headers from the answer; a plain client, no app token
        return requests.request(item["method"], item["url"], data=body, headers=item["headers"], timeout=30)

    def send(self, conversation_id: str, content, fake) -> dict:
        response = self.post("chat/send", {"conversation_id": conversation_id, **model_source(fake),
                                           "message": {"role": "user", "content": content}}, stream=True)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(response.text)
        assert events[0][0] == "message.created" and events[-1][0] == "message.completed", events
        assert events[-1][1]["status"] == "completed", events
        return events[-1][1]


@pytest.fixture
def live(image_server):
    with Live(image_server) as client:
        yield client


def fetch_like_a_model(url: str, body: bytes = PNG) -> None:
    """What a vision model does with the URL it was given: a plain GET, no credentials."""
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text[:300]
    assert response.content == body
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def stored_row_content(server: LiveServer, message_id: str):
    engine = create_engine(server.env["CHATAPP_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            value = connection.execute(text("SELECT content FROM messages WHERE id = :id"),
                                       {"id": message_id}).scalar_one()
    finally:
        engine.dispose()
    return json.loads(value) if isinstance(value, str) else value


def test_live_spec_flow_with_a_real_png(image_server, live, fake_upstream):
    origin = image_server.url
    storage_root = Path(image_server.env["CHATAPP_INSTANCE_PATH"]) / "storage"

    # 新建对话: conversation, then upload URLs, then the upload itself.
    conversation_id = live.conversation()
    (item,) = live.upload_items(conversation_id)
    key = item["key"]
    assert item["url"].startswith(f"{origin}{ROUTE}{key}?")
    response = live.upload(item, PNG)
    assert response.status_code == 200, response.text
    assert (storage_root / key).read_bytes() == PNG

    # Title and reply, with the upload URL in the message.
    content = [text_part("What colour is this?"), image_part(item["url"])]
    fake_upstream.script(reply="Pixel colours")
    response = live.post("conversation/generate_title", {"conversation_id": conversation_id,
                                                         **model_source(fake_upstream),
                                                         "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200, response.text
    assert response.json()["title"] == "Pixel colours"
    (title_url,) = model_image_urls(fake_upstream)
    assert_download_url(title_url, key, origin)
    fetch_like_a_model(title_url)

    fake_upstream.reset()
    done = live.send(conversation_id, content, fake_upstream)
    sent = fake_upstream.requests[-1].body["messages"][-1]["content"]
    assert sent[0] == text_part("What colour is this?")
    model_url = sent[1]["image_url"]["url"]
    assert model_url not in (item["url"], key)
    assert_download_url(model_url, key, origin)
    fetch_like_a_model(model_url)
    assert stored_row_content(image_server, done["user_message_id"]) == [
        text_part("What colour is this?"), {"type": "image_url", "image_url": {"url": key}}]

    # 加载消息历史: fresh download URLs that work.
    response = live.get(f"chat/{conversation_id}")
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [message["role"] for message in items] == ["user", "assistant"]
    assert items[1]["content"].startswith("echo: ")
    (history_url,) = image_urls(items[0]["content"])
    assert_download_url(history_url, key, origin)
    fetch_like_a_model(history_url)

    # 聊天: the image again, by download URL and by bare key; the stored context comes along as URLs.
    for form in (history_url, key):
        done = live.send(conversation_id, [text_part("and now?"), image_part(form)], fake_upstream)
        assert stored_row_content(image_server, done["user_message_id"])[1]["image_url"]["url"] == key
        urls = model_image_urls(fake_upstream)
        assert len(urls) >= 2
        for url in urls:
            assert_download_url(url, key, origin)
        fetch_like_a_model(urls[-1])

    # Title with the bare key.
    response = live.post("conversation/generate_title", {"conversation_id": conversation_id,
                                                         **model_source(fake_upstream),
                                                         "messages": [{"role": "user", "content": [image_part(key)]}]})
    assert response.status_code == 200, response.text
    (url,) = model_image_urls(fake_upstream)
    assert_download_url(url, key, origin)
    fetch_like_a_model(url)

    # Deleting the conversation deletes the image.
    response = live.post("conversation/delete", {"ids": [conversation_id]})
    assert response.json() == {"deleted": [conversation_id]}
    live_json_error(requests.get(history_url, timeout=10), 404, "object_not_found")
    assert not (storage_root / key).exists()


def test_live_uploads_chunked_and_by_length(image_server, live):
    conversation_id = live.conversation()
    storage_root = Path(image_server.env["CHATAPP_INSTANCE_PATH"]) / "storage"

    def chunks(body: bytes, size: int = 700):
        for start in range(0, len(body), size):
            yield body[start:start + size]

    fits = padded_png(LIVE_UPLOAD_MAX)
    for body in (fits, chunks(fits)):  # exactly the limit, with Content-Length and chunked
        (item,) = live.upload_items(conversation_id)
        response = live.upload(item, body)
        assert response.status_code == 200, response.text
        assert (storage_root / item["key"]).read_bytes() == fits

    too_big = padded_png(LIVE_UPLOAD_MAX + 1)
    for body in (too_big, chunks(too_big), padded_png(LIVE_UPLOAD_MAX * 20), chunks(padded_png(LIVE_UPLOAD_MAX * 20))):
        (item,) = live.upload_items(conversation_id)
        try:
            response = live.upload(item, body)
        except requests.ConnectionError:
            # The server may close the connection before the client finished sending a large body.
            assert not (storage_root / item["key"]).exists()
            continue
        live_json_error(response, 413, "payload_too_large")
        assert not (storage_root / item["key"]).exists()

    (item,) = live.upload_items(conversation_id)
    live_json_error(live.upload(item, chunks(b"just text, chunked " * 10)), 415, "not_an_image")
    leftovers = [path for path in storage_root.rglob("*") if path.is_file() and path.name.startswith(".")]
    assert leftovers == []


def raw_request(server: LiveServer, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """Send the path exactly as written (requests and urllib3 would normalise dot segments)."""
    netloc = urlsplit(server.url).netloc
    host, port = netloc.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path", TRAVERSALS)
def test_live_traversal_paths(image_server, live, path):
    conversation_id = live.conversation()
    (item,) = live.upload_items(conversation_id)
    prefix = item["key"].rsplit("/", 1)[0] + "/"
    target = f"{ROUTE}{path.format(prefix=prefix)}?{urlsplit(item['url']).query}".replace("\\", "%5C")
    instance = Path(image_server.env["CHATAPP_INSTANCE_PATH"])
    before = {p for p in instance.parent.rglob("*") if p.is_file()}
    for method, body in (("PUT", PNG), ("GET", b"")):
        status, headers, raw = raw_request(image_server, method, target, body, item["headers"])
        assert 400 <= status < 500, (status, raw[:300])
        assert headers["Content-Type"].startswith("application/json"), raw[:300]
        payload = json.loads(raw)
        assert set(payload) >= {"code", "message", "request_id"}
        assert b"root:" not in raw
    after = {p for p in instance.parent.rglob("*") if p.is_file()}
    assert {p for p in after - before if p.name != "live.log" and "sqlite3" not in p.name} == set()


def test_live_configured_public_url(tmp_path, fake_upstream, _schema_template):
    """CHATAPP_PUBLIC_BASE_URL set to the server's own URL under another name: that name wins."""
    port = free_port()
    public = f"http://localhost:{port}"
    server = start_live_server(tmp_path, extra_env={"CHATAPP_PUBLIC_BASE_URL": public}, port=port)
    try:
        with Live(server) as live:
            conversation_id = live.conversation()
            (item,) = live.upload_items(conversation_id)
            assert item["url"].startswith(f"{public}{ROUTE}{item['key']}?")
            assert live.upload(item, PNG).status_code == 200
            # The same object under the name we talk to (127.0.0.1) is not an origin the server issues.
            numeric = item["url"].replace(public, server.url)
            response = live.post("chat/send", {"conversation_id": conversation_id, **model_source(fake_upstream),
                                               "message": {"content": [image_part(numeric)]}})
            live_json_error(response, 422, "invalid_image")
            live.send(conversation_id, [image_part(item["url"])], fake_upstream)
            (url,) = model_image_urls(fake_upstream)
            assert_download_url(url, item["key"], public)
            fetch_like_a_model(url)
    finally:
        stop_live_server(server)
