"""POST /api/v1/chat/send through a real gunicorn + gevent server and the fake upstream on 127.0.0.1: the SSE
event sequence of API.md, what history keeps on every way out (done, upstream error, timeout, client gone),
pings, one stream per conversation, the reaper, the model-source order, and a relay that adds no buffering.

Two servers for the module: `server` pings every 0.5 s of silence; `quiet_server` pings only every minute
(so a client leaving during silence must be noticed without a write), gives up on a silent upstream after
3 s and on any reply after 5 s. Runs on SQLite, and on PostgreSQL when CHATAPP_TEST_DATABASE_URL is set.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import pairwise
from urllib.parse import quote

import pytest
import requests

from chatapp import clock, create_app
from chatapp.extensions import db
from chatapp.models import Message
from tests.conftest import (
    PG_URL,
    Account,
    LiveServer,
    _truncate_all,
    base_settings,
    remember_secret,
    start_live_server,
    stop_live_server,
)
from tests.fake_upstream import FakeUpstream

TIMEOUT = (5, 10)  # connect, read: every wait in this module is bounded


# ------------------------------------------------------------------ an SSE client that keeps arrival times


@dataclass
class Event:
    name: str  # "ping" for a `: ping` comment
    data: dict | None
    at: float  # time.monotonic() when the bytes carrying it arrived


class SSEStream:
    """Reads a streamed response with read1(), so each event is seen the moment its bytes arrive."""

    def __init__(self, response: requests.Response):
        self.response = response
        self.raw_bytes = b""
        self._buffer = b""
        self._pending: list[Event] = []

    def __iter__(self):
        return self

    def __next__(self) -> Event:
        while not self._pending:
            chunk = self.response.raw.read1(65536)
            now = time.monotonic()
            if not chunk:
                if self._buffer.strip():
                    raise AssertionError(f"stream ended inside an event: {self._buffer!r}")
                raise StopIteration
            self.raw_bytes += chunk
            self._buffer += chunk.replace(b"\r\n", b"\n")
            *blocks, self._buffer = self._buffer.split(b"\n\n")
            self._pending.extend(parse_block(block, now) for block in blocks if block)
        return self._pending.pop(0)

    def until(self, name: str, count: int = 1) -> list[Event]:
        """Events up to and including the count-th `name`."""
        seen, hits = [], 0
        for item in self:
            seen.append(item)
            hits += item.name == name
            if hits == count:
                return seen
        raise AssertionError(f"stream ended before {count} x {name}: {[item.name for item in seen]}")

    def rest(self) -> list[Event]:
        return list(self)

    def hang_up(self) -> float:
        """Close the connection the way a browser tab does; returns the monotonic time of the close."""
        connection = self.response.raw.connection
        sock = getattr(connection, "sock", None)
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        closed_at = time.monotonic()
        self.response.close()
        return closed_at


def parse_block(block: bytes, at: float) -> Event:
    name, data = "message", []
    for line in block.decode().split("\n"):
        if line.startswith(":"):
            assert line == ": ping", line
            return Event("ping", None, at)
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
        else:
            raise AssertionError(f"unexpected SSE line {line!r}")
    return Event(name, json.loads("\n".join(data)), at)


def names(events: list[Event]) -> list[str]:
    return [item.name for item in events if item.name != "ping"]


def text_of(events: list[Event], name: str = "content.delta") -> str:
    return "".join(item.data["delta"] for item in events if item.name == name)


def assert_well_formed(events: list[Event], status: str) -> dict:
    """API.md's sequence: created first, deltas, error only on failure, completed last and exactly once."""
    sequence = names(events)
    assert sequence[0] == "message.created" and sequence.count("message.created") == 1, sequence
    assert sequence[-1] == "message.completed" and sequence.count("message.completed") == 1, sequence
    middle = sequence[1:-1]
    if status == "failed":
        assert middle[-1:] == ["error"] and middle.count("error") == 1, sequence
        middle = middle[:-1]
    else:
        assert "error" not in middle, sequence
    assert set(middle) <= {"reasoning.delta", "content.delta"}, sequence
    # Reasoning comes before the answer (as the fake, like the real models, sends it).
    assert middle == sorted(middle, key=lambda name: name != "reasoning.delta"), sequence
    created = next(item.data for item in events if item.name == "message.created")
    completed = events[-1].data
    assert set(created) == {"conversation_id", "user_message_id", "assistant_message_id"}
    assert set(completed) == {*created, "status", "finish_reason", "usage"}
    assert {key: completed[key] for key in created} == created
    assert created["user_message_id"] != created["assistant_message_id"]
    assert completed["status"] == status, completed
    for item in events:
        if item.name.endswith(".delta"):
            assert set(item.data) == {"delta"} and isinstance(item.data["delta"], str) and item.data["delta"]
    return completed


# ------------------------------------------------------------------ fixtures and helpers


def fake_model(**options) -> str:
    """A model string that makes the fake upstream behave so for this request only."""
    parts = [key if value is True else f"{key}={quote(str(value), safe='')}" for key, value in options.items()]
    return "fake:" + ";".join(parts)


def new_key() -> str:
    return remember_secret("sk-live-" + secrets.token_hex(16))


@pytest.fixture(scope="module")
def fake():
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_fake(fake):
    fake.reset()


def _start(tmp_path_factory, name: str, env: dict) -> LiveServer:
    # A short graceful timeout: a test that failed with a stream open must not hold the teardown for 30 s.
    return start_live_server(tmp_path_factory.mktemp(name), extra_env={"CHATAPP_GRACEFUL_TIMEOUT": "2", **env})


@pytest.fixture(scope="module")
def server(tmp_path_factory, _schema_template, fake):
    live = _start(tmp_path_factory, "chat-live", {"CHATAPP_SSE_PING_SECONDS": "0.5"})
    yield live
    stop_live_server(live)


@pytest.fixture(scope="module")
def quiet_server(tmp_path_factory, _schema_template, fake):
    live = _start(tmp_path_factory, "chat-quiet", {"CHATAPP_SSE_PING_SECONDS": "60", "CHATAPP_LLM_READ_TIMEOUT": "3",
                                                   "CHATAPP_STREAM_MAX_SECONDS": "5"})
    yield live
    stop_live_server(live)


@pytest.fixture(scope="module")
def server_app(server, tmp_path_factory, log_file):
    """An app on the live server's database: for the CLI and for planting rows a crashed worker would leave."""
    application = create_app(base_settings(tmp_path_factory.mktemp("chat-cli"), log_file,
                                           server.env["CHATAPP_DATABASE_URL"]))
    yield application
    with application.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture(scope="module", autouse=True)
def _empty_postgres_afterwards(tmp_path_factory, log_file, _schema_template):
    """The in-process tests expect empty tables; the live servers wrote into the shared PostgreSQL database."""
    yield
    if PG_URL:
        application = create_app(base_settings(tmp_path_factory.mktemp("chat-cleanup"), log_file, PG_URL))
        with application.app_context():
            _truncate_all()
            db.session.remove()
            db.engine.dispose()


@dataclass
class Chat:
    """One user of a live server."""

    server: LiveServer
    account: Account
    http: requests.Session = field(default_factory=requests.Session)

    def post(self, path: str, body: dict, **kwargs) -> requests.Response:
        return self.http.post(self.server.api(path), json=body, headers=self.account.headers, timeout=TIMEOUT,
                              **kwargs)

    def get(self, path: str, **params) -> requests.Response:
        return self.http.get(self.server.api(path), params=params, headers=self.account.headers, timeout=TIMEOUT)

    def conversation(self, model_config_id: str | None = None) -> str:
        response = self.post("conversation/create", {"model_config_id": model_config_id} if model_config_id else {})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def config(self, base_url: str, model: str, **extra) -> dict:
        response = self.post("model_config/create", {"name": "live", "base_url": base_url, "model": model, **extra})
        assert response.status_code == 201, response.text
        return response.json()

    def send(self, conversation_id: str, content="hello", **body) -> requests.Response:
        """Start a send; the response is streamed (read it with SSEStream) or a JSON error."""
        payload = {"conversation_id": conversation_id, **body}
        if "messages" not in payload:
            payload["message"] = {"content": content}  # `role` may be omitted
        # A fresh connection per stream, so hanging one up never touches the pooled session.
        return requests.post(self.server.api("chat/send"), json=payload, headers=self.account.headers,
                             timeout=TIMEOUT, stream=True)

    def stream(self, conversation_id: str, content="hello", **body) -> SSEStream:
        response = self.send(conversation_id, content, **body)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return SSEStream(response)

    def history(self, conversation_id: str) -> list[dict]:
        response = self.get(f"chat/{conversation_id}")
        assert response.status_code == 200, response.text
        return response.json()["items"]

    def reply_when_settled(self, conversation_id: str, timeout: float = 5) -> dict:
        """The last assistant message once it is no longer `streaming` (the server saves it as it ends)."""
        deadline = time.monotonic() + timeout
        while True:
            reply = [item for item in self.history(conversation_id) if item["role"] == "assistant"][-1]
            if reply["status"] != "streaming" or time.monotonic() > deadline:
                return reply
            time.sleep(0.05)

    def conversations(self) -> list[dict]:
        return self.get("conversation", limit=200).json()["items"]


@pytest.fixture
def chat(server) -> Chat:
    return Chat(server, server.register())


@pytest.fixture
def quiet_chat(quiet_server) -> Chat:
    return Chat(quiet_server, quiet_server.register())


def inline(fake: FakeUpstream, api_key: str | None = None, **options) -> dict:
    source = {"base_url": fake.base_url, "model": fake_model(**options)}
    if api_key:
        source["api_key"] = api_key
    return source


# ------------------------------------------------------------------ the happy path


def test_stream_sequence_history_and_upstream_request(chat, fake):
    conversation_id = chat.conversation()
    key = new_key()
    reply = "The quick brown fox jumps over the lazy dog."
    source = inline(fake, key, reply=reply)
    stream = chat.stream(conversation_id, "Tell me about foxes", **source, params={"temperature": 0.25, "top_p": 0.5})
    headers = stream.response.headers
    assert headers["Cache-Control"] == "no-cache" and headers["X-Accel-Buffering"] == "no"
    assert headers.get("X-Request-ID")
    events = stream.rest()
    completed = assert_well_formed(events, "completed")
    assert text_of(events) == reply
    assert len([item for item in events if item.name == "content.delta"]) == len(fake.requests[-1].sent("content"))
    assert completed["conversation_id"] == conversation_id
    assert completed["finish_reason"] == "stop"
    usage = completed["usage"]
    assert usage["completion_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage[
        "completion_tokens"]

    upstream = fake.requests[-1]
    assert upstream.path == "/v1/chat/completions"
    assert upstream.headers["authorization"] == f"Bearer {key}"
    assert upstream.body["model"] == source["model"]
    assert upstream.body["temperature"] == 0.25 and upstream.body["top_p"] == 0.5
    assert upstream.body["stream"] is True and upstream.body["stream_options"] == {"include_usage": True}
    assert upstream.body["messages"] == [{"role": "user", "content": "Tell me about foxes"}]

    user, assistant = chat.history(conversation_id)
    assert (user["id"], assistant["id"]) == (completed["user_message_id"], completed["assistant_message_id"])
    assert user["role"] == "user" and user["content"] == "Tell me about foxes" and user["status"] == "completed"
    assert assistant["role"] == "assistant" and assistant["content"] == reply
    assert assistant["status"] == "completed" and assistant["finish_reason"] == "stop"
    assert assistant["usage"] == usage and assistant["model"] == source["model"]
    assert assistant["reasoning_content"] is None
    assert key not in stream.raw_bytes.decode()


def test_message_form_sends_the_stored_history_as_context(chat, fake):
    conversation_id = chat.conversation()
    source = inline(fake)
    first = chat.stream(conversation_id, "first question", **source).rest()
    assert text_of(first) == "echo: first question"
    failed = chat.stream(conversation_id, "doomed", **inline(fake, status=500)).rest()
    assert_well_formed(failed, "failed")
    third = chat.stream(conversation_id, [{"type": "text", "text": "second question"}], **source).rest()
    assert_well_formed(third, "completed")
    assert text_of(third) == "echo: second question"
    # The failed reply (empty) is left out of the context; the user message that got it stays.
    assert fake.requests[-1].body["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "echo: first question"},
        {"role": "user", "content": "doomed"},
        {"role": "user", "content": [{"type": "text", "text": "second question"}]},
    ]
    assert [item["status"] for item in chat.history(conversation_id)] == [
        "completed", "completed", "completed", "failed", "completed", "completed"]


def test_messages_form_uses_what_the_client_sent(chat, fake):
    conversation_id = chat.conversation()
    chat.stream(conversation_id, "stored but not used", **inline(fake)).rest()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    events = chat.stream(conversation_id, messages=messages, **inline(fake, reply="4")).rest()
    assert_well_formed(events, "completed")
    assert text_of(events) == "4"
    assert fake.requests[-1].body["messages"] == messages
    stored = chat.history(conversation_id)
    assert [(item["role"], item["content"]) for item in stored[2:]] == [("user", "What is 2+2?"), ("assistant", "4")]


@pytest.mark.parametrize("reasoning_field", ["reasoning_content", "reasoning"])
def test_reasoning_is_relayed_and_stored(chat, fake, reasoning_field):
    conversation_id = chat.conversation()
    thinking = "The user greets me. I should greet back."
    events = chat.stream(conversation_id, **inline(fake, reply="Hello to you!", reasoning=thinking,
                                                   reasoning_field=reasoning_field)).rest()
    assert_well_formed(events, "completed")
    assert text_of(events, "reasoning.delta") == thinking
    assert text_of(events) == "Hello to you!"
    assistant = chat.history(conversation_id)[-1]
    assert assistant["reasoning_content"] == thinking and assistant["content"] == "Hello to you!"


def test_upstream_quirks_do_not_change_the_answer(chat, fake):
    """CRLF, comments, multi-line data, no usage, no [DONE]: the same events come out."""
    conversation_id = chat.conversation()
    reply = "Same answer, however it is framed."
    for options in ({"crlf": True, "comments": True}, {"multiline": True, "no_done": True},
                    {"no_usage": True, "close_delimited": True}):
        events = chat.stream(conversation_id, **inline(fake, reply=reply, **options)).rest()
        completed = assert_well_formed(events, "completed")
        assert text_of(events) == reply, options
        assert (completed["usage"] is None) == ("no_usage" in options)


# ------------------------------------------------------------------ model sources


def test_model_source_order(chat, fake):
    bound_key, chosen_key = new_key(), new_key()
    bound = chat.config(fake.base_url, fake_model(reply="from the conversation"), api_key=bound_key,
                        params={"temperature": 0.2, "max_tokens": 64})
    chosen = chat.config(fake.base_url, fake_model(reply="from model_config_id"), api_key=chosen_key)
    conversation_id = chat.conversation(bound["id"])

    events = chat.stream(conversation_id, params={"temperature": 0.9}).rest()
    assert text_of(events) == "from the conversation"
    upstream = fake.requests[-1]
    assert upstream.headers["authorization"] == f"Bearer {bound_key}"
    assert upstream.body["model"] == bound["model"]
    assert upstream.body["temperature"] == 0.9 and upstream.body["max_tokens"] == 64  # request params win

    assert text_of(chat.stream(conversation_id, model_config_id=chosen["id"]).rest()) == "from model_config_id"
    assert fake.requests[-1].headers["authorization"] == f"Bearer {chosen_key}"

    inline_key = new_key()
    events = chat.stream(conversation_id, model_config_id=chosen["id"],
                         **inline(fake, inline_key, reply="inline wins")).rest()
    assert text_of(events) == "inline wins"
    assert fake.requests[-1].headers["authorization"] == f"Bearer {inline_key}"
    assert chat.history(conversation_id)[-1]["model"] == fake_model(reply="inline wins")


def test_deleted_config_leaves_a_working_conversation(chat, fake):
    config = chat.config(fake.base_url, fake_model(reply="configured"))
    conversation_id = chat.conversation(config["id"])
    assert text_of(chat.stream(conversation_id).rest()) == "configured"
    assert chat.post("model_config/delete", {"ids": [config["id"]]}).json() == {"deleted": [config["id"]]}
    listed = next(item for item in chat.conversations() if item["id"] == conversation_id)
    assert listed["model_config_id"] is None
    refused = chat.send(conversation_id)
    assert refused.status_code == 422 and refused.json()["code"] == "model_not_configured"
    events = chat.stream(conversation_id, **inline(fake, reply="inline after delete")).rest()
    assert_well_formed(events, "completed")
    assert text_of(events) == "inline after delete"


def test_forbidden_model_url_is_json_and_never_dialled(chat, fake):
    conversation_id = chat.conversation()
    response = chat.send(conversation_id, base_url="http://10.0.0.1/v1", model="gpt", api_key=new_key())
    assert response.status_code == 422
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["code"] == "model_url_forbidden"
    assert chat.history(conversation_id) == []
    assert fake.requests == []


def test_another_users_conversation_is_404(chat, server, fake):
    conversation_id = chat.conversation()
    other = Chat(server, server.register())
    response = other.send(conversation_id, **inline(fake))
    assert response.status_code == 404 and response.json()["code"] == "conversation_not_found"
    assert other.get(f"chat/{conversation_id}").status_code == 404
    assert chat.history(conversation_id) == [] and fake.requests == []


# ------------------------------------------------------------------ failures keep what arrived


ERROR_CASES = {
    "401": ({"status": 401}, "upstream_unauthorized", 0),
    "500": ({"status": 500}, "upstream_error", 0),
    "garbage": ({"garbage": 3}, "upstream_error", 3),
    "drop": ({"drop_after": 3}, "upstream_error", 3),
    "refused": (None, "upstream_error", 0),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_upstream_failure_is_an_error_event_then_failed(chat, fake, case):
    options, code, kept = ERROR_CASES[case]
    conversation_id = chat.conversation()
    key = new_key()
    reply = "one two three four five six"
    if options is None:  # nothing listens on the port: connection refused
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        source = {"base_url": f"http://127.0.0.1:{port}/v1", "model": "gpt", "api_key": key}
    else:
        source = inline(fake, key, reply=reply, **options)
    stream = chat.stream(conversation_id, **source)
    events = stream.rest()
    completed = assert_well_formed(events, "failed")
    error = next(item.data for item in events if item.name == "error")
    assert set(error) == {"code", "message"} and error["code"] == code and error["message"]
    assert key not in stream.raw_bytes.decode() and key[-8:] not in error["message"]
    partial = "".join(reply.split(" ")[i] + " " for i in range(kept))
    assert text_of(events) == partial
    assistant = chat.history(conversation_id)[-1]
    assert assistant["id"] == completed["assistant_message_id"]
    assert assistant["status"] == "failed" and assistant["content"] == partial
    assert assistant["finish_reason"] == completed["finish_reason"]
    # The conversation is free again.
    assert text_of(chat.stream(conversation_id, **inline(fake, reply="recovered")).rest()) == "recovered"


def test_silent_upstream_times_out(quiet_chat, fake):
    conversation_id = quiet_chat.conversation()
    started = time.monotonic()
    events = quiet_chat.stream(conversation_id, **inline(fake, reply="one two three four", hang_after=2)).rest()
    assert 2.5 < time.monotonic() - started < 8  # CHATAPP_LLM_READ_TIMEOUT=3
    assert_well_formed(events, "failed")
    assert next(item.data for item in events if item.name == "error")["code"] == "upstream_timeout"
    assert text_of(events) == "one two "
    assistant = quiet_chat.history(conversation_id)[-1]
    assert assistant["status"] == "failed" and assistant["content"] == "one two "
    assert fake.wait_for_disconnect(2) is not None  # and the upstream connection was closed


@pytest.fixture
def surrogate_upstream():
    """A model server whose stream splits an emoji's UTF-16 surrogate pair across two chunks and sends NULs
    (JSON allows both; UTF-8 output and PostgreSQL do not)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def answer():
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            while len(body) < length:
                body += connection.recv(65536)
            chunks = ['{"choices":[{"delta":{"reasoning_content":"a\\u0000b"}}]}',
                      '{"choices":[{"delta":{"content":"smile "}}]}', '{"choices":[{"delta":{"content":"\\ud83d"}}]}',
                      '{"choices":[{"delta":{"content":"\\ude00!"}}]}',
                      '{"choices":[{"delta":{"content":" nul\\u0000"},"finish_reason":"stop"}]}', "[DONE]"]
            connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                               + b"".join(f"data: {chunk}\n\n".encode() for chunk in chunks))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    listener.close()
    thread.join(timeout=5)


def test_unstorable_text_from_upstream_breaks_neither_stream_nor_history(chat, surrogate_upstream):
    conversation_id = chat.conversation()
    events = chat.stream(conversation_id, base_url=surrogate_upstream, model="split-emoji").rest()
    assert_well_formed(events, "completed")
    assert text_of(events) == "smile \ufffd\ufffd! nul\ufffd"
    assert text_of(events, "reasoning.delta") == "a\ufffdb"
    assistant = chat.history(conversation_id)[-1]
    assert assistant["status"] == "completed"
    assert assistant["content"] == "smile \ufffd\ufffd! nul\ufffd" and assistant["reasoning_content"] == "a\ufffdb"


def test_reply_longer_than_the_stream_limit_is_cut(quiet_chat, fake):
    conversation_id = quiet_chat.conversation()
    started = time.monotonic()
    events = quiet_chat.stream(conversation_id, **inline(fake, reply="abcdefghijklmnopqrst", chunk_size=1,
                                                          gap=0.4)).rest()
    assert 4.5 < time.monotonic() - started < 7  # CHATAPP_STREAM_MAX_SECONDS=5, the upstream never idle for 3 s
    assert_well_formed(events, "failed")
    assert next(item.data for item in events if item.name == "error")["code"] == "stream_timeout"
    assert fake.wait_for_disconnect(2) is not None
    assistant = quiet_chat.history(conversation_id)[-1]
    assert assistant["status"] == "failed" and assistant["content"] == text_of(events)
    assert 5 < len(assistant["content"]) < 20


# ------------------------------------------------------------------ the client going away


def test_client_leaving_mid_stream_saves_incomplete_and_stops_upstream(chat, fake):
    conversation_id = chat.conversation()
    reply = "abcdefghijklmnopqrstuvwxyz0123456789"
    stream = chat.stream(conversation_id, **inline(fake, reply=reply, chunk_size=2, gap=0.3))
    received = text_of(stream.until("content.delta", 2))
    closed_at = stream.hang_up()
    disconnected_at = fake.wait_for_disconnect(5)
    assert disconnected_at is not None, "the upstream request was never ended"
    assert disconnected_at - closed_at < 2
    assistant = chat.reply_when_settled(conversation_id)
    assert assistant["status"] == "incomplete" and assistant["finish_reason"] == "cancelled"
    assert assistant["content"].startswith(received) and reply.startswith(assistant["content"])
    assert len(assistant["content"]) < len(reply)
    # The conversation takes the next message.
    assert text_of(chat.stream(conversation_id, **inline(fake, reply="again")).rest()) == "again"


@pytest.mark.parametrize("silence", ["before the first token", "after two tokens"])
def test_client_leaving_during_upstream_silence_is_noticed_without_a_write(quiet_chat, fake, silence):
    conversation_id = quiet_chat.conversation()
    options = {"first_delay": 30} if silence == "before the first token" else {"hang_after": 2}
    stream = quiet_chat.stream(conversation_id, **inline(fake, reply="one two three", **options))
    received = text_of(stream.until("content.delta", 2) if "after" in silence else stream.until("message.created"))
    time.sleep(0.3)  # the upstream is silent now, and pings are a minute away: nothing will be written
    closed_at = stream.hang_up()
    disconnected_at = fake.wait_for_disconnect(5)
    assert disconnected_at is not None, "the upstream request was never ended"
    assert disconnected_at - closed_at < 2
    assistant = quiet_chat.reply_when_settled(conversation_id)
    assert assistant["status"] == "incomplete" and assistant["finish_reason"] == "cancelled"
    assert assistant["content"] == received
    assert_well_formed(quiet_chat.stream(conversation_id, **inline(fake)).rest(), "completed")


def test_pings_arrive_during_upstream_silence(chat, fake):
    conversation_id = chat.conversation()
    events = chat.stream(conversation_id, **inline(fake, reply="finally", first_delay=2)).rest()
    assert_well_formed(events, "completed")
    before_answer = [item.name for item in events[: next(i for i, e in enumerate(events) if e.name == "content.delta")]]
    assert before_answer[0] == "message.created"
    assert before_answer.count("ping") >= 2, before_answer  # every 0.5 s of a 2 s silence
    pings = [item.at for item in events if item.name == "ping"]
    assert all(0.3 < later - earlier < 0.8 for earlier, later in pairwise(pings)), pings


# ------------------------------------------------------------------ one stream per conversation


def test_second_send_while_streaming_is_409(chat, fake, server_app):
    conversation_id = chat.conversation()
    other_conversation = chat.conversation()
    slow = chat.stream(conversation_id, **inline(fake, reply="a b c d e f g h", gap=0.2))
    head = slow.until("message.created")
    created = head[-1].data
    streaming = chat.history(conversation_id)[-1]
    assert streaming["id"] == created["assistant_message_id"]
    assert streaming["status"] == "streaming" and streaming["content"] == ""

    busy = chat.send(conversation_id, "me too", **inline(fake))
    assert busy.status_code == 409
    assert busy.headers["Content-Type"].startswith("application/json")
    assert busy.json()["code"] == "conversation_busy"
    # Another conversation is not blocked, and the reaper leaves a live worker's stream alone.
    assert text_of(chat.stream(other_conversation, **inline(fake, reply="elsewhere")).rest()) == "elsewhere"
    result = server_app.test_cli_runner().invoke(args=["chat", "reap"])
    assert result.exit_code == 0 and "reaped 0" in result.output

    assert_well_formed(head + slow.rest(), "completed")
    assert len(chat.history(conversation_id)) == 2  # the refused message was not stored
    events = chat.stream(conversation_id, "now", **inline(fake)).rest()
    assert text_of(events) == "echo: now"
    assert [item["status"] for item in chat.history(conversation_id)] == ["completed"] * 4


def test_simultaneous_sends_only_one_streams(chat, fake):
    conversation_id = chat.conversation()
    start = threading.Barrier(4)
    responses: list[requests.Response] = []

    def send():
        start.wait(timeout=5)
        responses.append(chat.send(conversation_id, **inline(fake, reply="only one", first_delay=1)))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(response.status_code for response in responses) == [200, 409, 409, 409]
    winner = next(response for response in responses if response.status_code == 200)
    assert text_of(SSEStream(winner).rest()) == "only one"
    assert all(response.json()["code"] == "conversation_busy" for response in responses if response is not winner)
    assert len(chat.history(conversation_id)) == 2
    # Each send asked the model before its INSERT lost the race; the losers' requests were cancelled at once,
    # long before the model's first token (1 s), so nothing is spent on replies that cannot be stored.
    time.sleep(0.3)  # a request sent just before its greenlet was killed is parsed by now
    asked = len(fake.requests)
    assert 1 <= asked <= 4
    if asked > 1:
        assert fake.wait_for_disconnect(5, count=asked - 1) is not None
    cancelled = [rec for rec in fake.requests if rec.disconnected_at is not None]
    assert len(cancelled) == asked - 1
    assert all(not rec.sent("content") for rec in cancelled)


def test_each_send_asks_the_model_exactly_once(chat, fake):
    """The model is asked while the turn is stored; however that race ends (on PostgreSQL the store yields, so
    the model's headers often arrive first), it is asked once per send."""
    conversation_id = chat.conversation()
    for number in range(5):
        assert text_of(chat.stream(conversation_id, f"turn {number}", **inline(fake)).rest()) == f"echo: turn {number}"
    time.sleep(0.2)
    assert len(fake.requests) == 5


def test_a_busy_conversation_never_reaches_the_model(chat, fake):
    conversation_id = chat.conversation()
    slow = chat.stream(conversation_id, **inline(fake, reply="a b c d", gap=0.2))
    head = slow.until("message.created")
    fake.wait_for_requests(1)
    asked = len(fake.requests)
    assert chat.send(conversation_id, "me too", **inline(fake)).status_code == 409
    assert len(fake.requests) == asked  # known busy before anything was sent upstream
    assert_well_formed(head + slow.rest(), "completed")


def test_streams_reuse_a_keep_alive_connection(chat, fake):
    """Browsers send the next message on the same connection; the client watcher must not get in the way."""
    conversation_id = chat.conversation()
    ports = set()
    with requests.Session() as session:
        for number in range(3):
            response = session.post(chat.server.api("chat/send"), headers=chat.account.headers, timeout=TIMEOUT,
                                    stream=True, json={"conversation_id": conversation_id,
                                                       "message": {"content": f"turn {number}"}, **inline(fake)})
            ports.add(response.raw.connection.sock.getsockname()[1])
            events = SSEStream(response).rest()
            assert_well_formed(events, "completed")
            assert text_of(events) == f"echo: turn {number}"
    assert len(ports) == 1
    assert [item["status"] for item in chat.history(conversation_id)] == ["completed"] * 6


def _plant_stale_stream(server_app, conversation_id: str, worker: str | None = None, age: float = 0) -> str:
    """What a worker that died mid-stream leaves behind: a `streaming` row naming a process that is gone."""
    with server_app.app_context():
        message = Message(id=clock.new_id(), conversation_id=conversation_id, role="assistant",
                          content="half an ans", status="streaming", model="gpt",
                          worker=worker or f"{os.uname().nodename}:999999:1",
                          created_at=clock.now() - timedelta(seconds=age))
        db.session.add(message)
        db.session.commit()
        return message.id


def test_reap_command_frees_a_conversation_left_by_a_dead_worker(chat, fake, server_app):
    conversation_id = chat.conversation()
    stale_id = _plant_stale_stream(server_app, conversation_id)
    result = server_app.test_cli_runner().invoke(args=["chat", "reap"])
    assert result.exit_code == 0, result.output
    assert "reaped 1" in result.output
    stale = chat.history(conversation_id)[0]
    assert stale["id"] == stale_id
    assert (stale["status"], stale["finish_reason"], stale["content"]) == ("incomplete", "cancelled", "half an ans")
    assert_well_formed(chat.stream(conversation_id, **inline(fake)).rest(), "completed")


def test_next_send_reaps_a_stale_stream_by_itself(chat, fake, server_app):
    conversation_id = chat.conversation()
    stale_id = _plant_stale_stream(server_app, conversation_id)
    events = chat.stream(conversation_id, "are you there?", **inline(fake)).rest()
    assert_well_formed(events, "completed")
    stored = chat.history(conversation_id)
    assert [(item["id"] == stale_id, item["status"]) for item in stored] == [
        (True, "incomplete"), (False, "completed"), (False, "completed")]
    assert stored[0]["content"] == "half an ans" and stored[0]["finish_reason"] == "cancelled"


def test_next_send_reaps_a_stream_older_than_the_time_limit(chat, fake, server_app):
    """A worker that is alive but could not save its reply (a database hiccup) leaves a `streaming` row that
    nothing will ever finish; past the stream time limit (30 min) the next send frees the conversation."""
    conversation_id = chat.conversation()
    stale_id = _plant_stale_stream(server_app, conversation_id, worker=clock.process_tag(), age=3 * 3600)
    response = chat.send(conversation_id, **inline(fake))
    assert response.status_code == 200, response.text
    assert_well_formed(SSEStream(response).rest(), "completed")
    stale = chat.history(conversation_id)[0]
    assert stale["id"] == stale_id and stale["status"] == "incomplete"


def test_next_send_leaves_a_young_stream_of_a_live_worker(chat, fake, server_app):
    conversation_id = chat.conversation()
    _plant_stale_stream(server_app, conversation_id, worker=clock.process_tag(), age=60)
    busy = chat.send(conversation_id, **inline(fake))
    assert busy.status_code == 409 and busy.json()["code"] == "conversation_busy"
    assert fake.requests == []


# ------------------------------------------------------------------ the conversation list follows activity


def test_send_moves_the_conversation_to_the_top(chat, fake):
    ids = [chat.conversation() for _ in range(3)]
    assert [item["id"] for item in chat.conversations()] == ids[::-1]
    before = next(item for item in chat.conversations() if item["id"] == ids[0])
    time.sleep(0.01)
    chat.stream(ids[0], **inline(fake)).rest()
    listed = chat.conversations()
    assert [item["id"] for item in listed] == [ids[0], ids[2], ids[1]]
    assert listed[0]["updated_at"] > before["updated_at"]


# ------------------------------------------------------------------ no buffering anywhere


@pytest.mark.parametrize("framing", ["chunked", "close_delimited"])
def test_each_chunk_reaches_the_client_within_50ms(chat, fake, framing, record_property):
    conversation_id = chat.conversation()
    options = {"reply": "alpha beta gamma delta epsilon zeta", "gap": 0.2}
    if framing == "close_delimited":
        options["close_delimited"] = True
    events = chat.stream(conversation_id, **inline(fake, **options)).rest()
    assert_well_formed(events, "completed")
    received = [item for item in events if item.name == "content.delta"]
    sent = fake.requests[-1].sent("content")
    assert [text for _, text in sent] == [item.data["delta"] for item in received]
    assert len(sent) == 6
    lags = [item.at - sent_at for (sent_at, _), item in zip(sent, received, strict=True)]
    record_property("lags_ms", [round(lag * 1000, 1) for lag in lags])
    print(f"{framing}: per-chunk lag ms {[round(lag * 1000, 1) for lag in lags]}")
    assert all(0 <= lag < 0.05 for lag in lags), lags
    # And the chunks really were spread out (the client saw them one by one, not in a burst at the end).
    arrivals = [item.at for item in received]
    assert all(later - earlier > 0.15 for earlier, later in pairwise(arrivals)), arrivals


# ------------------------------------------------------------------ the worker going away (keep this last: it restarts one)


def test_worker_stopping_mid_stream_saves_and_ends_the_stream(quiet_chat, fake):
    """A reload (HUP) or max_requests stops a worker: past its graceful timeout (2 s here) gunicorn kills the
    handlers; the reply so far is saved as incomplete and the client still gets message.completed."""
    conversation_id = quiet_chat.conversation()
    (worker,) = quiet_chat.server.workers()
    stream = quiet_chat.stream(conversation_id, **inline(fake, reply="abcdefghijklmnopqrstuvwxyz", chunk_size=1,
                                                          gap=0.25))
    head = stream.until("content.delta", 2)
    os.kill(worker, signal.SIGTERM)
    events = head + stream.rest()
    completed = assert_well_formed(events, "incomplete")
    assert completed["finish_reason"] == "cancelled"
    assert fake.wait_for_disconnect(2) is not None
    assistant = quiet_chat.history(conversation_id)[-1]
    assert assistant["status"] == "incomplete" and assistant["content"] == text_of(events)
    assert 2 <= len(assistant["content"]) < 26


@pytest.mark.parametrize("text", ["hi", 'say "x"\n\tand \\ back', "你好 🌍", "\u2028\u2029", ""])
def test_delta_events_are_the_json_of_their_payload(text):
    from chatapp import sse

    for name in ("content.delta", "reasoning.delta"):
        expected = f"event: {name}\ndata: {json.dumps({'delta': text}, ensure_ascii=False)}\n\n".encode()
        assert sse.delta(name, text) == sse.event(name, {"delta": text}) == expected
