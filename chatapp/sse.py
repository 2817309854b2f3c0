"""Server-Sent Events: one function formats an event, one wraps an event iterator in a Response."""

from __future__ import annotations

import json
from collections.abc import Iterable

from flask import Response

PING = b": ping\n\n"


def event(name: str, data: dict) -> bytes:
    # json.dumps never emits a raw newline, so one `data:` line always holds the whole payload.
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def response(events: Iterable[bytes]) -> Response:
    # direct_passthrough: the events are bytes already, so werkzeug need not wrap them in its encoding generator.
    return Response(events, mimetype="text/event-stream", direct_passthrough=True, headers={
        # Every proxy between us and the browser must pass each event on as it comes.
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
