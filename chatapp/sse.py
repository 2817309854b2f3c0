"""Server-Sent Events: one function formats an event, one wraps an event iterator in a Response."""

from __future__ import annotations

import json
from collections.abc import Iterable

from flask import Response

PING = b": ping\n\n"


# One encoder for every event: json.dumps builds a new JSONEncoder on each call when given an option.
_to_json = json.JSONEncoder(ensure_ascii=False).encode
_DELTA_HEADS = {name: b"event: " + name.encode() + b'\ndata: {"delta": ' for name in ("content.delta", "reasoning.delta")}


def event(name: str, data: dict) -> bytes:
    # JSON never holds a raw newline, so one `data:` line always holds the whole payload.
    return b"event: " + name.encode() + b"\ndata: " + _to_json(data).encode() + b"\n\n"


def delta(name: str, text: str) -> bytes:
    """event(name, {"delta": text}) for the per-token events, byte for byte, without building the dict."""
    return _DELTA_HEADS[name] + _to_json(text).encode() + b"}\n\n"


def response(events: Iterable[bytes]) -> Response:
    # direct_passthrough: the events are bytes already, so werkzeug need not wrap them in its encoding generator.
    return Response(events, mimetype="text/event-stream", direct_passthrough=True, headers={
        # Every proxy between us and the browser must pass each event on as it comes.
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
