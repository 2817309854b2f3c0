"""chatapp.llm against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/fake_upstream.py)."""

from __future__ import annotations

import random
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import requests
from requests.adapters import HTTPAdapter

from chatapp.llm import (
    Completion,
    ContentDelta,
    Finish,
    LLMClient,
    LLMError,
    ReasoningDelta,
    SSEDecoder,
    _Chunked,
    _parse_chunk,
)
from tests.conftest import self_signed_cert
from tests.fake_upstream import FakeUpstream, parse_options

KEY = "sk-test-0123456789abcdefSECRET"
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there world"},
]
ECHO = "echo: hello there world"


@pytest.fixture
def fake():
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def llm():
    client = LLMClient(read_timeout=5)
    yield client
    client.close()


def run(llm: LLMClient, fake: FakeUpstream, model: str = "fake-echo", **kw) -> list:
    return list(llm.stream_chat(fake.base_url, kw.pop("api_key", KEY), model, kw.pop("messages", MESSAGES), **kw))


def text_of(events: list, kind: type = ContentDelta) -> str:
    return "".join(e.text for e in events if isinstance(e, kind))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- happy path ---------------------------------------------------------------------------------


def test_stream_happy_path_and_request_shape(fake, llm):
    params = {"temperature": 0.3, "max_tokens": 50, "model": "evil", "messages": [], "stream": False,
              "stream_options": {"include_usage": False}}
    events = run(llm, fake, params=params)

    assert text_of(events) == ECHO
    assert len([e for e in events if isinstance(e, ContentDelta)]) == 4  # relayed piece by piece
    assert events[-1] == Finish("stop", {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    assert sum(isinstance(e, Finish) for e in events) == 1

    rec = fake.last_request
    assert (rec.method, rec.path) == ("POST", "/v1/chat/completions")
    assert rec.headers["authorization"] == f"Bearer {KEY}"
    assert rec.headers["content-type"] == "application/json"
    assert rec.headers["accept-encoding"] == "identity"
    assert rec.headers["user-agent"] == "chatapp" and "cookie" not in rec.headers
    assert rec.body == {
        "temperature": 0.3, "max_tokens": 50, "model": "fake-echo", "messages": MESSAGES, "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_no_authorization_header_without_key(fake, llm):
    assert text_of(run(llm, fake, api_key=None)) == ECHO
    assert "authorization" not in fake.last_request.headers


def test_base_url_trailing_slash(fake, llm):
    events = list(llm.stream_chat(fake.base_url + "/", KEY, "fake-echo", MESSAGES))
    assert text_of(events) == ECHO
    assert fake.last_request.path == "/v1/chat/completions"


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_comes_first(fake, llm, field):
    fake.script(reasoning="Let me think about it.", reasoning_field=field, reply="Answer.")
    events = run(llm, fake)
    assert text_of(events, ReasoningDelta) == "Let me think about it."
    assert text_of(events) == "Answer."
    kinds = [type(e) for e in events]
    assert kinds.index(ContentDelta) > max(i for i, k in enumerate(kinds) if k is ReasoningDelta)


@pytest.mark.parametrize(
    "options",
    [
        {"crlf": True, "comments": True, "multiline": True},
        {"cr": True, "comments": True, "multiline": True},
        {"comments": True},
        {"multiline": True, "chunk_size": 1},
    ],
    ids=["crlf", "cr", "comments", "multiline-per-char"],
)
def test_sse_framing_variants(fake, llm, options):
    fake.script(**options)
    events = run(llm, fake)
    assert text_of(events) == ECHO
    assert events[-1].reason == "stop" and events[-1].usage is not None


@pytest.mark.parametrize("close_delimited", [False, True], ids=["chunked", "close-delimited"])
def test_transfer_modes(fake, llm, close_delimited):
    fake.script(close_delimited=close_delimited, reply="one two three")
    events = run(llm, fake)
    assert text_of(events) == "one two three"
    assert isinstance(events[-1], Finish) and events[-1].reason == "stop"


@pytest.mark.parametrize("close_delimited", [False, True], ids=["chunked", "close-delimited"])
def test_eof_after_finish_reason_without_done_is_a_normal_end(fake, llm, close_delimited):
    fake.script(no_done=True, close_delimited=close_delimited)
    events = run(llm, fake)
    assert text_of(events) == ECHO
    assert events[-1].reason == "stop"


def test_done_without_finish_reason_or_usage(fake, llm):
    fake.script(finish_reason="", no_usage=True)
    events = run(llm, fake)
    assert text_of(events) == ECHO
    assert events[-1] == Finish(None, None)


def test_finish_reason_passed_through(fake, llm):
    fake.script(finish_reason="length")
    assert run(llm, fake)[-1].reason == "length"


def test_model_string_options(fake, llm):
    events = run(llm, fake, model="fake:reply=a%3Bb c;chunks=2;crlf")
    assert [e.text for e in events if isinstance(e, ContentDelta)] == ["a;b", " c"]
    assert parse_options("gap=0.5;close_delimited;drop_after=0") == {"gap": 0.5, "close_delimited": True, "drop_after": 0}
    with pytest.raises(ValueError):
        parse_options("nonsense=1")


# --- no buffering -------------------------------------------------------------------------------


@pytest.mark.parametrize("close_delimited", [False, True], ids=["chunked", "close-delimited"])
def test_each_delta_arrives_as_soon_as_it_is_sent(fake, llm, close_delimited):
    fake.script(reply="alpha beta gamma delta epsilon", gap=0.2, close_delimited=close_delimited)
    received = []
    for event in llm.stream_chat(fake.base_url, KEY, "fake-echo", MESSAGES):
        if isinstance(event, ContentDelta):
            received.append((time.monotonic(), event.text))

    sent = fake.last_request.sent("content")
    assert [text for _, text in received] == [text for _, text in sent] == ["alpha ", "beta ", "gamma ", "delta ", "epsilon"]
    for (t_recv, text), (t_sent, _) in zip(received, sent, strict=True):
        assert t_recv - t_sent < 0.05, f"{text!r} arrived {t_recv - t_sent:.3f}s after it was sent"
    assert received[-1][0] - received[0][0] >= 0.7  # the gaps were real, so the test means something


# --- SSE decoder --------------------------------------------------------------------------------

RAW_STREAM = (
    b": hello\r\n"
    b"event: message\r\n"
    b"id: 1\r\n"
    b"retry: 1000\r\n"
    b'data:{"a":1}\r\n'
    b"\r\n"
    b"\n"
    b'data: {"b":\n'
    b"data: 2}\n"
    b"\n"
    b'data: {"c":3}\r'
    b"\r"
    b": keep-alive\n\n"
    b"data: [DONE]\r\n\r\n"
)


def test_sse_decoder_handles_any_split():
    expected = [b'{"a":1}', b'{"b":\n2}', b'{"c":3}', b"[DONE]"]
    rng = random.Random(7)
    splits = [[1] * len(RAW_STREAM)] + [[rng.randint(1, 9) for _ in range(len(RAW_STREAM))] for _ in range(50)]
    for sizes in splits:
        decoder, events, pos = SSEDecoder(), [], 0
        for size in sizes:
            if pos >= len(RAW_STREAM):
                break
            events += decoder.feed(RAW_STREAM[pos : pos + size])
            pos += size
        events += decoder.close()
        assert events == expected, sizes


def test_sse_decoder_flushes_last_event_at_end_of_body():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: [DONE]") == []
    assert decoder.close() == [b"[DONE]"]
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.close() == [b"x"]


def test_parse_chunk_tolerates_sparse_providers():
    assert _parse_chunk(b'{"choices":[{"delta":null}]}', None) == (None, None, None, None)
    assert _parse_chunk(b'{"choices":[]}', None) == (None, None, None, None)
    assert _parse_chunk(b'{"id":"x","usage":null}', None) == (None, None, None, None)
    assert _parse_chunk(b'{"choices":[{"delta":{"reasoning":"r","content":"c"},"finish_reason":"stop"}],'
                        b'"usage":{"total_tokens":3}}', None) == ("r", "c", "stop", {"total_tokens": 3})
    for bad in (b"[1]", b'{"choices":[1]}', b'{"choices":[{"delta":"x"}]}', b"nope"):
        with pytest.raises(LLMError) as info:
            _parse_chunk(bad, None)
        assert info.value.code == "upstream_error"


def test_error_object_inside_a_200_stream_is_scrubbed():
    with pytest.raises(LLMError) as info:
        _parse_chunk(b'{"error":{"message":"bad key ' + KEY.encode() + b'","code":401}}', KEY)
    assert info.value.code == "upstream_error"
    assert KEY not in info.value.message and "bad key [redacted]" in info.value.message


# --- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, "upstream_unauthorized"), (403, "upstream_unauthorized"), (429, "upstream_rate_limited"),
     (500, "upstream_error"), (503, "upstream_error"), (400, "upstream_error")],
)
def test_http_error_status(fake, llm, status, code):
    fake.script(status=status)  # the fake's error body echoes the Authorization header
    with pytest.raises(LLMError) as info:
        run(llm, fake)
    err = info.value
    assert (err.code, err.status) == (code, 502)
    assert str(status) in err.message and "Fake upstream error" in err.message
    assert KEY not in err.message and KEY not in str(err) and KEY not in repr(err)


def test_error_excerpt_is_short_and_never_holds_part_of_the_key(fake, llm):
    # The key straddles the excerpt's cut: scrubbing must happen before truncation.
    fake.script(status=500, error_message="x" * 190 + KEY + "\x00\n" + "y" * 5000)
    with pytest.raises(LLMError) as info:
        run(llm, fake)
    message = info.value.message
    assert len(message) < 300
    assert all(KEY[i : i + 6] not in message for i in range(len(KEY) - 5))
    assert "\x00" not in message and "\n" not in message


def test_garbage_chunk_is_an_upstream_error(fake, llm):
    fake.script(garbage=2)
    got = []
    with pytest.raises(LLMError) as info:
        for event in llm.stream_chat(fake.base_url, KEY, "fake-echo", MESSAGES):
            got.append(event)
    assert info.value.code == "upstream_error" and "malformed" in info.value.message
    assert text_of(got) == "echo: hello "  # what came before the garbage was relayed


@pytest.mark.parametrize("close_delimited", [False, True], ids=["chunked", "close-delimited"])
def test_dropped_connection(fake, llm, close_delimited):
    fake.script(drop_after=2, close_delimited=close_delimited)
    got = []
    with pytest.raises(LLMError) as info:
        for event in llm.stream_chat(fake.base_url, KEY, "fake-echo", MESSAGES):
            got.append(event)
    assert info.value.code == "upstream_error" and "dropped" in info.value.message
    assert text_of(got) == "echo: hello "


@pytest.mark.parametrize("hang_after", [0, 2])
def test_silent_upstream_times_out(fake, hang_after):
    client = LLMClient(read_timeout=0.5)
    fake.script(hang_after=hang_after)
    start = time.monotonic()
    with pytest.raises(LLMError) as info:
        list(client.stream_chat(fake.base_url, KEY, "fake-echo", MESSAGES))
    assert (info.value.code, info.value.status) == ("upstream_timeout", 504)
    assert 0.4 < time.monotonic() - start < 3
    assert fake.wait_for_disconnect(2) is not None  # the timed-out connection was closed, not leaked
    client.close()


@pytest.mark.parametrize("close_delimited", [False, True], ids=["chunked", "close-delimited"])
@pytest.mark.parametrize("mode", ["hang", "gap"])
def test_closing_the_generator_closes_the_upstream_connection(fake, llm, mode, close_delimited):
    if mode == "hang":
        fake.script(hang_after=2, close_delimited=close_delimited)
    else:
        fake.script(gap=10, close_delimited=close_delimited)
    stream = llm.stream_chat(fake.base_url, KEY, "fake-echo", MESSAGES)
    assert isinstance(next(stream), ContentDelta)
    closed_at = time.monotonic()
    stream.close()
    seen_at = fake.wait_for_disconnect(2)
    assert seen_at is not None and seen_at - closed_at < 2
    # The pool still works after a connection was torn down mid-stream.
    fake.script()
    assert text_of(run(llm, fake)) == ECHO


def test_connection_is_reused_after_a_complete_stream(fake, llm):
    run(llm, fake)
    run(llm, fake)
    llm.complete(fake.base_url, KEY, "fake-echo", MESSAGES)
    first, second, third = fake.requests
    assert first.peer == second.peer == third.peer


def test_redirect_is_not_followed(fake, llm):
    fake.script(redirect=fake.base_url + "/chat/completions")
    with pytest.raises(LLMError) as info:
        run(llm, fake)
    assert info.value.code == "upstream_error" and "302" in info.value.message
    assert len(fake.requests) == 1


def test_connection_refused(llm):
    with pytest.raises(LLMError) as info:
        list(llm.stream_chat(f"http://127.0.0.1:{closed_port()}/v1", KEY, "m", MESSAGES))
    assert (info.value.code, info.value.status) == ("upstream_error", 502)
    assert KEY not in info.value.message


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/v1", "file:///etc/passwd", "127.0.0.1:8000/v1", ""])
def test_non_http_urls_are_forbidden(llm, url):
    with pytest.raises(LLMError) as info:
        list(llm.stream_chat(url, KEY, "m", MESSAGES))
    assert (info.value.code, info.value.status) == ("model_url_forbidden", 422)


class OutboundURLForbidden(Exception):
    """Stands in for chatapp.netguard's exception: llm.py recognises it by name."""


class _RefusingAdapter(HTTPAdapter):
    def __init__(self, wrap: bool) -> None:
        super().__init__()
        self.wrap = wrap

    def send(self, request, *args, **kwargs):
        refusal = OutboundURLForbidden("host resolves to a non-public address")
        if self.wrap:
            raise requests.ConnectionError(refusal)
        raise refusal


@pytest.mark.parametrize("wrap", [False, True], ids=["raw", "wrapped"])
def test_guard_refusal_maps_to_model_url_forbidden(fake, wrap):
    def factory() -> requests.Session:
        session = requests.Session()
        session.mount("http://", _RefusingAdapter(wrap))
        return session

    client = LLMClient(session_factory=factory)
    for call in (lambda: list(client.stream_chat(fake.base_url, KEY, "m", MESSAGES)),
                 lambda: client.complete(fake.base_url, KEY, "m", MESSAGES)):
        with pytest.raises(LLMError) as info:
            call()
        assert (info.value.code, info.value.status) == ("model_url_forbidden", 422)
        assert "non-public" in info.value.message
    assert fake.requests == []


def test_with_the_real_outbound_guard(fake):
    netguard = pytest.importorskip("chatapp.netguard")
    refused = LLMClient(session_factory=netguard.OutboundGuard().session)
    with pytest.raises(LLMError) as info:
        list(refused.stream_chat(fake.base_url, KEY, "fake-echo", MESSAGES))
    assert info.value.code == "model_url_forbidden"
    assert fake.requests == []

    allowed = LLMClient(session_factory=netguard.OutboundGuard(allowlist=["127.0.0.1"]).session)
    fake.script(close_delimited=True, gap=0.01)
    assert text_of(list(allowed.stream_chat(fake.base_url, KEY, "fake-echo", MESSAGES))) == ECHO


def test_cookies_set_by_an_upstream_are_never_kept(fake, llm):
    # One session serves every user, so a cookie would leak from one user's requests into another's.
    fake.script(set_cookie=True)
    run(llm, fake)
    run(llm, fake)
    assert "cookie" not in fake.last_request.headers
    assert len(llm._session.cookies) == 0


# --- complete() ---------------------------------------------------------------------------------


def test_complete_happy(fake, llm):
    fake.script(reasoning="hmm", reply="A short title")
    result = llm.complete(fake.base_url, KEY, "fake-echo", MESSAGES, params={"max_tokens": 20, "stream": True})
    assert result == Completion(
        text="A short title", finish_reason="stop",
        usage={"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}, reasoning="hmm",
    )
    body = fake.last_request.body
    assert body == {"max_tokens": 20, "model": "fake-echo", "messages": MESSAGES, "stream": False}
    assert fake.last_request.headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(("status", "code"), [(500, "upstream_error"), (401, "upstream_unauthorized"),
                                              (429, "upstream_rate_limited")])
def test_complete_errors(fake, llm, status, code):
    fake.script(status=status)
    with pytest.raises(LLMError) as info:
        llm.complete(fake.base_url, KEY, "fake-echo", MESSAGES)
    assert (info.value.code, info.value.status) == (code, 502)
    assert KEY not in info.value.message


def test_complete_timeout_overrides_read_timeout(fake, llm):
    fake.script(hang_after=0)
    start = time.monotonic()
    with pytest.raises(LLMError) as info:
        llm.complete(fake.base_url, KEY, "fake-echo", MESSAGES, timeout=0.3)
    assert (info.value.code, info.value.status) == ("upstream_timeout", 504)
    assert time.monotonic() - start < 2  # llm's own read_timeout is 5 s


def test_complete_malformed_and_refused(fake, llm):
    with pytest.raises(LLMError) as info:
        llm.complete(f"http://127.0.0.1:{closed_port()}/v1", KEY, "m", MESSAGES)
    assert info.value.code == "upstream_error"
    fake.script(redirect="http://127.0.0.1:1/")
    with pytest.raises(LLMError) as info:
        llm.complete(fake.base_url, KEY, "m", MESSAGES)
    assert info.value.code == "upstream_error"


# --- the fake itself ----------------------------------------------------------------------------


def test_fake_stop_is_prompt_while_a_request_hangs(llm):
    server = FakeUpstream(hang_after=0).start()
    stopper = threading.Timer(0.3, server.stop)
    start = time.monotonic()
    stopper.start()
    with pytest.raises(LLMError) as info:  # stop() ends the hanging response: the client sees a drop
        list(llm.stream_chat(server.base_url, KEY, "fake-echo", MESSAGES))
    stopper.join()
    assert info.value.code == "upstream_error"
    assert time.monotonic() - start < 2


def test_fake_models_endpoint_and_bad_model_options(fake):
    assert requests.get(fake.base_url + "/models", timeout=5).json()["data"][0]["id"] == "fake-echo"
    answer = requests.post(fake.base_url + "/chat/completions", json={"model": "fake:bogus=1", "messages": []},
                           timeout=5)
    assert answer.status_code == 400 and "bogus" in answer.json()["error"]["message"]


def test_fake_runs_as_a_process():
    script = Path(__file__).with_name("fake_upstream.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", "0", "--options", "reply=hi"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[0] == "READY" and line[1].startswith("http://127.0.0.1:")
        client = LLMClient()
        assert text_of(list(client.stream_chat(line[1], None, "fake-echo", MESSAGES))) == "hi"
        assert text_of(list(client.stream_chat(line[1], None, "fake:reply=yo", MESSAGES))) == "yo"
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) is not None


# --- ChatStream: the body read off the socket --------------------------------------------------


def sse_body(*texts: str, done: bool = True) -> bytes:
    lines = [f'data: {{"choices":[{{"delta":{{"content":"{text}"}}}}]}}\n\n' for text in texts]
    lines.append('data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n')
    return "".join(lines).encode() + (b"data: [DONE]\n\n" if done else b"")


def chunked(body: bytes, size: int = 40) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\nX-Trailer: 1\r\n\r\n"


class RawUpstream:
    """A one-response HTTP server on 127.0.0.1 that writes exactly the bytes a test gives it, piece by piece."""

    def __init__(self, *pieces: bytes, pause: float = 0.0, hold: float = 0.0, tls: ssl.SSLContext | None = None) -> None:
        self.pieces, self.pause, self.hold, self.tls = pieces, pause, hold, tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        scheme = "https" if tls else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True)
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(rest) < length:
                rest += conn.recv(65536)
            for piece in self.pieces:
                conn.sendall(piece)
                time.sleep(self.pause)
            time.sleep(self.hold)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def response_head(*headers: str) -> bytes:
    return ("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + "".join(h + "\r\n" for h in headers)
            + "\r\n").encode()


def test_chunked_decoder_gives_the_same_body_for_any_split():
    body = sse_body("a", "b", "c") * 3
    wire = chunked(body, 17)
    rng = random.Random(7)
    for _ in range(200):
        decoder, out, pos = _Chunked(), [], 0
        while pos < len(wire):
            step = rng.randint(1, 30)
            out.append(decoder.feed(wire[pos:pos + step]))
            pos += step
        assert b"".join(out) == body and decoder.done


@pytest.mark.parametrize("wire", [b"zz\r\n", b"-5\r\nhello\r\n", b"3\r\nabcXY\r\n", b"f" * 5000])
def test_chunked_decoder_refuses_broken_framing(wire):
    with pytest.raises(LLMError) as info:
        _Chunked().feed(wire)
    assert info.value.code == "upstream_error"


@pytest.mark.parametrize("framing", ["chunked", "sized", "close"])
def test_body_framings_and_bytes_that_came_with_the_headers(llm, framing):
    body = sse_body("one ", "two")
    if framing == "chunked":
        wire = response_head("Transfer-Encoding: chunked") + chunked(body)
    elif framing == "sized":
        wire = response_head(f"Content-Length: {len(body)}") + body
    else:
        wire = response_head("Connection: close") + body
    server = RawUpstream(wire)  # one write: the body's first bytes arrive in http.client's header buffer
    try:
        events = list(llm.stream_chat(server.base_url, KEY, "m", MESSAGES))
    finally:
        server.close()
    assert text_of(events) == "one two" and events[-1] == Finish("stop", None)


def test_gzip_encoded_stream_is_decoded(llm):
    compressor = zlib.compressobj(wbits=31)
    body = compressor.compress(sse_body("zipped")) + compressor.flush()
    server = RawUpstream(response_head("Transfer-Encoding: chunked", "Content-Encoding: gzip"), chunked(body, 9),
                         pause=0.01)
    try:
        assert text_of(run(llm, server)) == "zipped"
    finally:
        server.close()


def test_an_encoding_we_cannot_read_is_a_clear_error(llm):
    server = RawUpstream(response_head("Transfer-Encoding: chunked", "Content-Encoding: br") + chunked(b"xx"))
    try:
        with pytest.raises(LLMError) as info:
            run(llm, server)
    finally:
        server.close()
    assert info.value.code == "upstream_error" and "encoding" in info.value.message


def test_a_read_that_times_out_can_be_retried_and_interrupt_ends_a_wait(llm):
    """What lets the relay ping from the reading greenlet: a timed-out read loses nothing."""
    wire = chunked(sse_body("late"))
    server = RawUpstream(response_head("Transfer-Encoding: chunked"), wire[:30], wire[30:], pause=0.4, hold=2)
    try:
        stream = llm.open_stream(server.base_url, KEY, "m", MESSAGES)
        assert stream.read(0.05) is None  # nothing yet: no error, nothing lost
        events = []
        while not stream.finished:
            events += stream.read(2) or []
        assert text_of(events) == "late"
        stream.close()
    finally:
        server.close()

    silent = RawUpstream(response_head("Transfer-Encoding: chunked"), hold=3)
    try:
        stream = llm.open_stream(silent.base_url, KEY, "m", MESSAGES)
        threading.Timer(0.2, stream.interrupt).start()
        started = time.monotonic()
        with pytest.raises(LLMError):
            stream.read(2.5)
        assert time.monotonic() - started < 1
        stream.close()
    finally:
        silent.close()


def _loopback_tls(tmp_path: Path) -> tuple[str, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: (its file, a server context that presents it)."""
    cert_file, key_file = self_signed_cert(tmp_path, "127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return cert_file, context


def test_a_stream_over_tls_is_relayed_as_it_comes(tmp_path):
    """Over TLS a recv() hands out one record at a time; the reader waits on the socket only when the TLS
    layer holds nothing more, so a burst of many records is read at once, and a silent one times out."""
    cafile, context = _loopback_tls(tmp_path)
    texts = [f"w{i}-" + "x" * 900 for i in range(60)]  # ~60 KB: several TLS records in one burst
    server = RawUpstream(response_head("Transfer-Encoding: chunked"), chunked(sse_body(*texts), 50000), hold=3,
                         tls=context)

    class TrustingAdapter(HTTPAdapter):
        def send(self, request, **kwargs):
            return super().send(request, **{**kwargs, "verify": cafile})

    def factory() -> requests.Session:
        session = requests.Session()
        session.mount("https://", TrustingAdapter())
        return session

    try:
        stream = LLMClient(session_factory=factory, read_timeout=5).open_stream(server.base_url, KEY, "m", MESSAGES)
        started, events = time.monotonic(), []
        while not stream.finished:
            got = stream.read(1.0)
            assert got is not None, "waited on the socket while the burst was still being read"
            events += got
        assert time.monotonic() - started < 1
        assert text_of(events) == "".join(texts)
        stream.close()
    finally:
        server.close()

    # The same stream through a relay that cuts the TLS bytes into small pieces: the socket turns readable
    # many times while a record is still incomplete, and each time the reader must simply wait again.
    server = RawUpstream(response_head("Transfer-Encoding: chunked"), chunked(sse_body(*texts), 50000), hold=3,
                         tls=context)
    relay = socket.create_server(("127.0.0.1", 0))
    target = ("127.0.0.1", int(server.base_url.rsplit(":", 1)[1].split("/")[0]))

    def trickle() -> None:
        client, _ = relay.accept()
        upstream = socket.create_connection(target)
        threading.Thread(target=lambda: [upstream.sendall(d) for d in iter(lambda: client.recv(65536), b"")],
                         daemon=True).start()
        while data := upstream.recv(65536):
            for i in range(0, len(data), 700):
                client.sendall(data[i:i + 700])
                time.sleep(0.001)
        client.close()

    threading.Thread(target=trickle, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{relay.getsockname()[1]}/v1"
        stream = LLMClient(session_factory=factory, read_timeout=5).open_stream(url, KEY, "m", MESSAGES)
        events = []
        while not stream.finished:
            events += stream.read(2.0) or []
        assert text_of(events) == "".join(texts)
        stream.close()
    finally:
        relay.close()
        server.close()

    silent = RawUpstream(response_head("Transfer-Encoding: chunked"), hold=2, tls=context)
    try:
        stream = LLMClient(session_factory=factory, read_timeout=5).open_stream(silent.base_url, KEY, "m", MESSAGES)
        assert stream.read(0.2) is None
        stream.close()
    finally:
        silent.close()
