"""A real OpenAI-compatible model server on 127.0.0.1 for tests and benchmarks.

In-process::

    with FakeUpstream() as fake:            # or the `fake_upstream` pytest fixture
        fake.script(reply="Hello", gap=0.2)  # behaviour for the following requests, until reset()
        ...  # POST f"{fake.base_url}/chat/completions"
        fake.requests[-1].body, fake.requests[-1].events, fake.wait_for_disconnect(2)

As a process (prints ``READY <base_url>`` on stdout once it accepts connections)::

    python tests/fake_upstream.py --port 8081 [--options 'gap=0.05;chunks=20']

Per-request behaviour through the request's ``model`` string, so a separate process can be
driven over HTTP: ``fake-echo`` (or any model not starting with ``fake:``) uses the scripted
behaviour; ``fake:key=value;key=value`` overrides options for that request, e.g.
``fake:reply=Hi%20there;gap=0.2;close_delimited``. Values are percent-decoded (write ``;`` as
``%3B``); a bare key means true; booleans accept 1/0/true/false/yes/no. Unknown keys get a 400.

Options (see ``Behaviour``): reply, chunks, chunk_size, first_delay, gap, reasoning, reasoning_field, status,
error_message, redirect, drop_after, hang_after, garbage, close_delimited, crlf, cr, comments,
multiline, no_usage, no_done, finish_reason, set_cookie. ``drop_after``/``hang_after``/``garbage`` count
delta chunks (reasoning and content pieces; the leading role chunk is not counted), so 0 means
"before the first delta".

Timestamps (``RecordedRequest.events``, ``disconnects``) are ``time.monotonic()`` values, which
on Linux are comparable across processes of the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import select
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

HOST = "127.0.0.1"
POLL_INTERVAL = 0.05
_WORDS = re.compile(r"\S+\s*|\s+")


@dataclass(frozen=True)
class Behaviour:
    reply: str | None = None  # None: "echo: " + the last user message's text
    chunks: int | None = None  # split reply (and reasoning) into this many pieces
    chunk_size: int | None = None  # ... or into pieces of this many characters; default: words
    first_delay: float = 0.0  # seconds between the response headers and the first chunk
    gap: float = 0.0  # seconds between delta chunks
    reasoning: str | None = None  # streamed as delta.reasoning_content before the content
    reasoning_field: str = "reasoning_content"  # or "reasoning" (OpenRouter, vLLM)
    status: int | None = None  # answer this HTTP error status with an OpenAI-style JSON error
    error_message: str | None = None  # default message echoes the API key (to test scrubbing)
    redirect: str | None = None  # answer 302 with this Location
    drop_after: int | None = None  # send N delta chunks, then close the socket (no [DONE])
    hang_after: int | None = None  # send N delta chunks, then go silent until disconnect/stop
    garbage: int | None = None  # send a malformed data: line before delta chunk N
    close_delimited: bool = False  # HTTP/1.0 style: no length, no chunking, body ends at close
    crlf: bool = False  # \r\n line endings
    cr: bool = False  # bare \r line endings
    comments: bool = False  # interleave ": keep-alive" comments and blank lines
    multiline: bool = False  # spread each JSON payload over several data: lines
    no_usage: bool = False  # no usage chunk even when stream_options.include_usage
    no_done: bool = False  # end the body without "data: [DONE]"
    finish_reason: str = "stop"  # "" sends no finish_reason chunk
    set_cookie: bool = False  # send Set-Cookie (as sticky load balancers do)


def _to_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("", "1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


_CONVERTERS: dict[str, Any] = {
    f.name: {"int | None": int, "float": float, "bool": _to_bool}.get(str(f.type), str)
    for f in dataclasses.fields(Behaviour)
}


def parse_options(text: str) -> dict[str, Any]:
    """Parse ``key=value;key`` (percent-decoded values) into Behaviour overrides."""
    options: dict[str, Any] = {}
    for item in text.split(";"):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in _CONVERTERS:
            raise ValueError(f"unknown fake option {key!r}")
        options[key] = _CONVERTERS[key](unquote(value))
    return options


def split_text(text: str, beh: Behaviour) -> list[str]:
    if not text:
        return []
    if beh.chunks:
        count = max(1, min(beh.chunks, len(text)))
        size, extra = divmod(len(text), count)
        pieces, start = [], 0
        for index in range(count):
            end = start + size + (1 if index < extra else 0)
            pieces.append(text[start:end])
            start = end
        return pieces
    if beh.chunk_size:
        return [text[i : i + beh.chunk_size] for i in range(0, len(text), beh.chunk_size)]
    return _WORDS.findall(text)


def _message_text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON (None when there was no body)
    started: float
    peer: tuple[str, int]  # the client's address: same port across requests = a pooled connection
    # (monotonic time, kind, text) for everything written after the headers; kinds: role,
    # reasoning, content, finish, usage, done, garbage, comment, drop, hang
    events: list[tuple[float, str, str]] = field(default_factory=list)
    disconnected_at: float | None = None

    def sent(self, kind: str) -> list[tuple[float, str]]:
        return [(t, text) for t, k, text in self.events if k == kind]


class _ClientGone(Exception):
    pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # benchmarks open many connections at once

    def __init__(self, owner: FakeUpstream, port: int) -> None:
        self.owner = owner
        super().__init__((HOST, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Small SSE writes must leave at once, not wait for Nagle + delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.owner._active.add(self.connection)

    def finish(self) -> None:
        self.server.owner._active.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # --- plumbing -------------------------------------------------------------------------
    def _record(self, body: Any) -> RecordedRequest:
        rec = RecordedRequest(
            self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic(),
            self.client_address,
        )
        self.server.owner._record(rec)
        return rec

    def _json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _wait(self, seconds: float, rec: RecordedRequest) -> None:
        """Sleep, but notice at once a client that went away (or a server that stops)."""
        owner = self.server.owner
        deadline = time.monotonic() + seconds
        while True:
            if owner._stopping.is_set():
                raise _ClientGone
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            step = min(POLL_INTERVAL, remaining)
            readable, _, _ = select.select([self.connection], [], [], step)
            if not readable:
                continue
            try:
                peeked = self.connection.recv(1, socket.MSG_PEEK)
            except OSError:
                peeked = b""
            if not peeked:
                owner._disconnected(rec)
                raise _ClientGone
            time.sleep(step)  # the client sent more bytes; don't spin on a readable socket

    # --- routes ---------------------------------------------------------------------------
    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._record(None)
            self._json(200, {"object": "list", "data": [{"id": "fake-echo", "object": "model", "owned_by": "fake"}]})
        else:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        rec = self._record(body)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            return
        if not isinstance(body, dict):
            self._json(400, {"error": {"message": "body must be a JSON object", "type": "invalid_request_error"}})
            return
        beh = self.server.owner.behaviour
        model = str(body.get("model") or "")
        if model.startswith("fake:"):
            try:
                beh = dataclasses.replace(beh, **parse_options(model[5:]))
            except ValueError as exc:
                self._json(400, {"error": {"message": str(exc), "type": "invalid_request_error"}})
                return
        try:
            self._answer(beh, body, rec)
        except _ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.server.owner._disconnected(rec)
            self.close_connection = True

    def _answer(self, beh: Behaviour, body: dict[str, Any], rec: RecordedRequest) -> None:
        if beh.redirect:
            self.send_response(302)
            self.send_header("Location", beh.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if beh.status:
            auth = self.headers.get("Authorization", "")
            message = beh.error_message or f"Fake upstream error {beh.status}; you sent {auth!r}"
            extra = {"Retry-After": "1"} if beh.status == 429 else None
            error = {"message": message, "type": "fake_error", "code": beh.status}
            self._json(beh.status, {"error": error}, extra)
            return
        messages = body.get("messages") or []
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        reply = beh.reply if beh.reply is not None else "echo: " + (_message_text(users[-1]) if users else "")
        reasoning_pieces = split_text(beh.reasoning or "", beh)
        content_pieces = split_text(reply, beh)
        prompt_tokens = sum(len(_message_text(m).split()) for m in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(reasoning_pieces) + len(content_pieces),
            "total_tokens": prompt_tokens + len(reasoning_pieces) + len(content_pieces),
        }
        if body.get("stream"):
            self._stream(beh, body, rec, reasoning_pieces, content_pieces, usage)
            return
        self._wait(beh.first_delay, rec)
        if beh.hang_after is not None:
            self._hang(rec)
        message: dict[str, Any] = {"role": "assistant", "content": reply}
        if beh.reasoning:
            message[beh.reasoning_field] = beh.reasoning
        self._json(200, {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": beh.finish_reason or None}],
            "usage": usage,
        })

    def _hang(self, rec: RecordedRequest) -> None:
        rec.events.append((time.monotonic(), "hang", ""))
        self._wait(float("inf"), rec)

    def _stream(
        self,
        beh: Behaviour,
        body: dict[str, Any],
        rec: RecordedRequest,
        reasoning_pieces: list[str],
        content_pieces: list[str],
        usage: dict[str, int],
    ) -> None:
        chunked = not beh.close_delimited
        newline = "\r\n" if beh.crlf else "\r" if beh.cr else "\n"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and not beh.no_usage
        base = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk",
                "created": int(time.time()), "model": body.get("model")}

        if chunked:
            self.send_response(200)
        else:
            self.protocol_version = "HTTP/1.0"  # this response only: its end is the socket's close
            self.send_response(200)
            self.send_header("Connection", "close")
            self.close_connection = True
        if beh.set_cookie:
            self.send_header("Set-Cookie", f"fake_session={uuid.uuid4().hex}; Path=/")
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def write(kind: str, text: str, raw: str) -> None:
            if beh.comments:
                raw = ": keep-alive" + newline + newline + newline + raw
            data = raw.encode()
            if chunked:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            # Stamped as the write starts: the client can get the bytes before sendall returns, so a stamp taken
            # after it could fall after the client's receipt and make the measured lag negative.
            sent_at = time.monotonic()
            self.wfile.write(data)  # unbuffered socket writer: one sendall per event
            rec.events.append((sent_at, kind, text))

        def event(kind: str, text: str, obj: dict[str, Any]) -> None:
            payload = json.dumps(obj, indent=1) if beh.multiline else json.dumps(obj)
            write(kind, text, "".join(f"data: {line}{newline}" for line in payload.split("\n")) + newline)

        def chunk(delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
            obj = {**base, "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None  # as OpenAI does on every chunk but the last
            return obj

        self._wait(beh.first_delay, rec)
        event("role", "", chunk({"role": "assistant", "content": ""}))
        deltas = [("reasoning", p) for p in reasoning_pieces] + [("content", p) for p in content_pieces]
        for index in range(len(deltas) + 1):
            if index == beh.drop_after:
                rec.events.append((time.monotonic(), "drop", ""))
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if index == beh.hang_after:
                self._hang(rec)
            if index == len(deltas):
                break
            if index == beh.garbage:
                write("garbage", "", "data: {not json" + newline + newline)
            if index and beh.gap:
                self._wait(beh.gap, rec)
            kind, text = deltas[index]
            field_name = beh.reasoning_field if kind == "reasoning" else "content"
            event(kind, text, chunk({field_name: text}))
        if beh.finish_reason:
            event("finish", beh.finish_reason, chunk(None, beh.finish_reason))
        if include_usage:
            event("usage", "", {**base, "choices": [], "usage": usage})
        if not beh.no_done:
            write("done", "", "data: [DONE]" + newline + newline)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


class FakeUpstream:
    """An OpenAI-compatible server in a daemon thread on 127.0.0.1 (port 0: any free port)."""

    def __init__(self, port: int = 0, **options: Any) -> None:
        self._port = port
        self._defaults = Behaviour(**options)
        self.behaviour = self._defaults
        self.requests: list[RecordedRequest] = []
        self.disconnects: list[float] = []  # monotonic times a client left mid-response
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._active: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> FakeUpstream:
        self._stopping.clear()
        self._server = _Server(self, self._port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL},
            name="fake-upstream", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # hanging handlers notice within POLL_INTERVAL
        self._server.shutdown()
        for sock in list(self._active):  # wake keep-alive handlers blocked on a read
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    # --- scripting and inspection ---------------------------------------------------------
    def script(self, **options: Any) -> None:
        """Set the behaviour of the following requests (a fresh Behaviour; unknown keys raise)."""
        self.behaviour = Behaviour(**options)

    def reset(self) -> None:
        self.behaviour = self._defaults
        with self._changed:
            self.requests.clear()
            self.disconnects.clear()

    @property
    def last_request(self) -> RecordedRequest:
        return self.requests[-1]

    def wait_for_requests(self, count: int, timeout: float = 5) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.requests) >= count, timeout)

    def wait_for_disconnect(self, timeout: float = 5, count: int = 1) -> float | None:
        """The monotonic time of the count-th client disconnect, or None on timeout."""
        with self._changed:
            if self._changed.wait_for(lambda: len(self.disconnects) >= count, timeout):
                return self.disconnects[count - 1]
        return None

    def _record(self, rec: RecordedRequest) -> None:
        with self._changed:
            self.requests.append(rec)
            self._changed.notify_all()

    def _disconnected(self, rec: RecordedRequest) -> None:
        now = time.monotonic()
        with self._changed:
            if rec.disconnected_at is None:
                rec.disconnected_at = now
                self.disconnects.append(now)
                self._changed.notify_all()


try:
    import pytest
except ImportError:  # the process mode runs without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def fake_upstream():
        """A started FakeUpstream for one test (stopped afterwards)."""
        with FakeUpstream() as fake:
            yield fake


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--options", default="", help="default behaviour, 'key=value;key=value'")
    args = parser.parse_args()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with FakeUpstream(args.port, **parse_options(args.options)) as fake:
        print(f"READY {fake.base_url}", flush=True)
        while not stop.wait(0.5):
            pass


if __name__ == "__main__":
    main()
