"""TEST-ONLY WSGI app: chatapp plus a few slow routes, served by gunicorn in tests/test_live_server.py.

Never imported by wsgi.py: the production app has no way to make the database or a worker sleep.
`gunicorn -c gunicorn.conf.py tests.live_app_slow:app`
"""

from __future__ import annotations

import logging
import time

from flask import Response, request
from sqlalchemy import text

from chatapp import create_app, logs
from chatapp.extensions import db

app = create_app()
log = logging.getLogger("chatapp.tests.live_app")


def _seconds() -> float:
    return min(float(request.args.get("seconds", "1")), 5.0)


@app.get("/test/pg_sleep")
def pg_sleep():
    """One slow query: under the gevent worker psycopg must wait on the socket cooperatively."""
    started = time.monotonic()
    db.session.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": _seconds()})
    db.session.rollback()
    return {"started": started, "finished": time.monotonic()}


@app.get("/test/sleep")
def sleep():
    """A slow thing that is not the database (time.sleep is patched by the gevent worker)."""
    started = time.monotonic()
    time.sleep(_seconds())
    return {"started": started, "finished": time.monotonic()}


@app.get("/test/interleave")
def interleave():
    """Log, yield to other greenlets, log from a spawned greenlet, log again: every line must keep its ids."""
    log.info("interleave start")
    time.sleep(_seconds())
    logs.spawn(log.info, "interleave spawned").join(timeout=5)
    time.sleep(_seconds())
    log.info("interleave end")
    return {"request_id": logs.current("request_id")}


@app.get("/test/stream")
def stream():
    """Lines logged by the generator run after the view returned, while the body is being sent."""
    seconds = _seconds()  # the generator runs after the request context is gone

    def chunks():
        for number in range(3):
            time.sleep(seconds)
            log.info("stream chunk %d", number)
            yield f"chunk {number}\n"

    return Response(chunks(), mimetype="text/plain")
