"""A fast fake OpenAI-compatible model server for the benchmark, as its own process.

Raw HTTP/1.1 on gevent's StreamServer (one greenlet per connection, keep-alive, no WSGI layer), so it
costs a few microseconds per chunk and is never the bottleneck. It listens on 127.0.0.1 only.

    python bench/upstream.py [--port 0] [--first-delay 0.05] [--gap 0.02] [--chunks 50]
                             [--hold-gap 0.5] [--hold-chunks 200]

prints ``READY <port>`` once it accepts connections. `POST /v1/chat/completions` (or
`/chat/completions`) with ``"stream": true`` answers an SSE stream; the request's ``model`` picks a
preset (any other name gets ``bench``):

* ``bench``        chunked transfer encoding: first content chunk after --first-delay, then one
                   content chunk every --gap, --chunks content chunks in all, then finish, usage, [DONE];
* ``bench-close``  the same, but close-delimited (no Content-Length, no chunking: the body ends
                   when the socket closes), the case that line-buffered clients get wrong;
* ``bench-hold``   a slow stream for the hold test: one chunk every --hold-gap, --hold-chunks in all;
* ``bench-short``  as ``bench`` with one content chunk: a relay's cost per reply, apart from its cost per chunk.

Every content piece carries the marker ``@@`` exactly once, so a client can count content chunks in
raw bytes whatever the relay re-encodes. Without ``"stream": true`` it answers one JSON completion.
`GET /healthz` answers 200; `GET /stats` answers {"active", "streams", "peak", "errors"}.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import socket
import sys
import time
import uuid

import gevent
from gevent.server import StreamServer

HOST = "127.0.0.1"
MARKER = "@@"
MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024


class Upstream:
    def __init__(self, first_delay: float, gap: float, chunks: int, hold_gap: float, hold_chunks: int) -> None:
        self.presets = {
            "bench": (first_delay, gap, chunks, False),
            "bench-close": (first_delay, gap, chunks, True),
            "bench-hold": (first_delay, hold_gap, hold_chunks, False),
            "bench-short": (first_delay, gap, 1, False),
        }
        self.active = 0
        self.peak = 0
        self.streams = 0
        self.errors = 0

    # ---------------------------------------------------------------- connection loop
    def handle(self, sock: socket.socket, _address) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:  # keep-alive: one request after another on this connection
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                    if len(buf) > MAX_HEAD:
                        return
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                parts = lines[0].split(b" ")
                if len(parts) != 3:
                    return
                method, path = parts[0], parts[1]
                length = 0
                close = parts[2] == b"HTTP/1.0"
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value.strip())
                    elif name == b"connection":
                        close = value.strip().lower() == b"close"
                if length > MAX_BODY:
                    return
                while len(buf) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                keep = self.route(sock, method, path.split(b"?")[0], body)
                if close or not keep:
                    return
        except OSError:
            self.errors += 1  # the client went away mid-answer (normal in the hold test)
        finally:
            sock.close()

    def route(self, sock: socket.socket, method: bytes, path: bytes, body: bytes) -> bool:
        if method == b"GET" and path == b"/healthz":
            return self.json(sock, 200, {"status": "ok"})
        if method == b"GET" and path == b"/stats":
            return self.json(sock, 200, {"active": self.active, "streams": self.streams, "peak": self.peak,
                                         "errors": self.errors})
        if method == b"GET" and path.rstrip(b"/") in (b"/v1/models", b"/models"):
            return self.json(sock, 200, {"object": "list", "data": [
                {"id": name, "object": "model", "owned_by": "bench"} for name in self.presets]})
        if method != b"POST" or path.rstrip(b"/") not in (b"/v1/chat/completions", b"/chat/completions"):
            return self.json(sock, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        try:
            request = json.loads(body)
            model = str(request.get("model") or "bench")
        except (ValueError, AttributeError):
            return self.json(sock, 400, {"error": {"message": "bad JSON", "type": "invalid_request_error"}})
        first_delay, gap, chunks, close_delimited = self.presets.get(model, self.presets["bench"])
        if not request.get("stream"):
            gevent.sleep(first_delay)
            text = "".join(self.piece(i) for i in range(chunks))
            return self.json(sock, 200, {
                "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": chunks, "total_tokens": chunks + 5}})
        usage = bool((request.get("stream_options") or {}).get("include_usage"))
        self.streams += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            self.stream(sock, model, first_delay, gap, chunks, close_delimited, usage)
        finally:
            self.active -= 1
        return not close_delimited

    # ---------------------------------------------------------------- answers
    @staticmethod
    def piece(index: int) -> str:
        return f"t{index:03d}{MARKER} "

    @staticmethod
    def json(sock: socket.socket, status: int, obj) -> bool:
        data = json.dumps(obj).encode()
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
        sock.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (status, reason, len(data), data))
        return True

    def stream(self, sock: socket.socket, model: str, first_delay: float, gap: float, chunks: int,
               close_delimited: bool, usage: bool) -> None:
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n"
                + (b"Connection: close\r\n\r\n" if close_delimited else b"Transfer-Encoding: chunked\r\n\r\n"))
        base = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model}

        def event(obj: dict) -> str:
            return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"

        def delta(payload: dict, finish: str | None = None) -> str:
            return event({**base, "choices": [{"index": 0, "delta": payload, "finish_reason": finish}]})

        def frame(text: str) -> bytes:
            data = text.encode()
            return data if close_delimited else b"%x\r\n%b\r\n" % (len(data), data)

        sock.sendall(head)
        gevent.sleep(first_delay)
        # OpenAI sends the role first, at the moment of the first token: one write with the first piece.
        first = delta({"role": "assistant", "content": ""})
        for index in range(chunks):
            if index:
                gevent.sleep(gap)  # relative sleeps: a late tick never makes two chunks bunch up here
            text = delta({"content": self.piece(index)})
            sock.sendall(frame(first + text if index == 0 else text))
        tail = delta({}, "stop")
        if usage:
            tail += event({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": chunks,
                                                            "total_tokens": chunks + 5}})
        tail += "data: [DONE]\n\n"
        sock.sendall(frame(tail) + (b"" if close_delimited else b"0\r\n\r\n"))
        if close_delimited:
            sock.shutdown(socket.SHUT_WR)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--first-delay", type=float, default=0.05)
    parser.add_argument("--gap", type=float, default=0.02)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--hold-gap", type=float, default=0.5)
    parser.add_argument("--hold-chunks", type=int, default=200)
    args = parser.parse_args()
    raise_nofile()
    upstream = Upstream(args.first_delay, args.gap, args.chunks, args.hold_gap, args.hold_chunks)
    server = StreamServer((HOST, args.port), upstream.handle, backlog=4096)
    server.start()
    gevent.signal_handler(signal.SIGTERM, server.stop, 1)
    gevent.signal_handler(signal.SIGINT, server.stop, 1)
    print(f"READY {server.server_port}", flush=True)
    server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
