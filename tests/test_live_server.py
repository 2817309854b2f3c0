"""Issue 2 against the real thing: gunicorn + gevent workers, over HTTP, with the server's own log file.

Two module-wide servers: the production app (`wsgi:app`, two workers) and a test-only app with slow routes
(`tests/live_app_slow.py`, one worker) for the overlap and log-context tests.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import PG_URL, start_live_server, stop_live_server
from tests.test_foundation import GENERATED_ID, LOG_FIELDS, LOG_TIME

CONCURRENT = 50


@pytest.fixture(scope="module")
def server(tmp_path_factory, _schema_template):
    live = start_live_server(tmp_path_factory.mktemp("live_foundation"), workers=2)
    yield live
    stop_live_server(live)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory, _schema_template):
    live = start_live_server(tmp_path_factory.mktemp("live_slow"), workers=1, app_module="tests.live_app_slow:app")
    yield live
    stop_live_server(live)


@pytest.fixture(scope="module")
def account(server):
    return server.register()


def records(live) -> list[dict]:
    parsed = []
    for number, line in enumerate(live.log_lines(), 1):
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"line {number} of the server log is not JSON: {line[:300]!r}")
    return parsed


def wait_for_lines(live, request_ids, predicate=lambda record: "duration_ms" in record, timeout=10.0) -> dict:
    """Poll the server's log until every request id has a line matching `predicate` (bounded)."""
    wanted = set(request_ids)
    deadline = time.monotonic() + timeout
    while True:
        by_id: dict[str, list[dict]] = {}
        for record in records(live):
            if record.get("request_id") in wanted:
                by_id.setdefault(record["request_id"], []).append(record)
        if all(any(predicate(record) for record in by_id.get(rid, [])) for rid in wanted):
            return by_id
        if time.monotonic() > deadline:
            missing = [rid for rid in wanted if not any(predicate(r) for r in by_id.get(rid, []))]
            pytest.fail(f"no log line for {len(missing)} request ids, e.g. {missing[:3]}")
        time.sleep(0.1)


def fetch_all(requests_to_make: list[tuple], workers: int) -> list[requests.Response]:
    """Fire (method, url, kwargs) requests at once, one thread and one connection each."""
    def fire(item):
        method, url, kwargs = item
        with requests.Session() as session:
            return session.request(method, url, timeout=30, **kwargs)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fire, requests_to_make))


# ------------------------------------------------------------------ the production app


def test_probes_and_request_id_over_http(server):
    healthz = requests.get(f"{server.url}/healthz", timeout=5, headers={"X-Request-ID": "live-probe-1"})
    assert healthz.status_code == 200 and healthz.json() == {"status": "ok"}
    assert healthz.headers["X-Request-ID"] == "live-probe-1"
    readyz = requests.get(f"{server.url}/readyz", timeout=5, headers={"X-Request-ID": "bad id with spaces"})
    assert readyz.status_code == 200 and readyz.json() == {"status": "ok", "database": "ok"}
    assert GENERATED_ID.match(readyz.headers["X-Request-ID"])


def test_errors_over_http_keep_the_shape(server):
    def check(response, status, code):
        assert response.status_code == status, response.text[:300]
        assert response.headers["Content-Type"].startswith("application/json")
        body = response.json()
        assert body["code"] == code and body["request_id"] == response.headers["X-Request-ID"]
        assert "Traceback" not in response.text

    check(requests.get(server.api("no/such/path"), timeout=5), 404, "not_found")
    check(requests.delete(f"{server.url}/healthz", timeout=5), 405, "method_not_allowed")
    check(requests.get(server.api("user/me"), timeout=5), 401, "token_missing")
    check(requests.post(server.api("user/login"), data=b"{oops", timeout=5,
                        headers={"Content-Type": "application/json"}), 400, "malformed_json")
    check(requests.post(server.api("user/login"), data=b"x=1", timeout=5,
                        headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
    check(requests.post(server.api("user/login"), json={"email": 1}, timeout=5), 422, "validation_error")
    too_big = b'{"email": "' + b"a" * (3 * 1024 * 1024) + b'"}'  # over the 2 MiB default
    check(requests.post(server.api("user/login"), data=too_big, timeout=10,
                        headers={"Content-Type": "application/json"}), 413, "payload_too_large")

    def chunks():  # no Content-Length: gunicorn passes the chunked body through, werkzeug caps it
        for _ in range(48):
            yield b" " * (64 * 1024)
        yield b"{}"

    check(requests.post(server.api("user/login"), data=chunks(), timeout=10,
                        headers={"Content-Type": "application/json"}), 413, "payload_too_large")


def test_fifty_concurrent_requests_each_log_their_own_ids(server, account):
    # Alternate two endpoints so a mixed-up line would show the wrong path, status or trace.
    plan = []
    for number in range(CONCURRENT):
        request_id = f"live-{number:02d}-{uuid.uuid4().hex[:12]}"
        trace_id = uuid.uuid4().hex
        headers = {"X-Request-ID": request_id, "X-Forwarded-For": "203.0.113.9",
                   "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
        if number % 2:
            path, status = "/readyz", 200
        else:
            path, status = "/api/v1/user/me", 200
            headers.update(account.headers)
        plan.append((request_id, trace_id, path, status, headers))

    started = time.monotonic()
    responses = fetch_all([("GET", f"{server.url}{path}", {"headers": headers})
                           for _, _, path, _, headers in plan], workers=CONCURRENT)
    assert time.monotonic() - started < 20
    for (request_id, _, path, status, _), response in zip(plan, responses, strict=True):
        assert response.status_code == status, (path, response.text[:200])
        assert response.headers["X-Request-ID"] == request_id
        if path.startswith("/api/"):
            assert response.json()["id"] == account.user["id"]

    by_id = wait_for_lines(server, [request_id for request_id, *_ in plan])
    for request_id, trace_id, path, status, _ in plan:
        lines = by_id[request_id]
        access = [line for line in lines if "duration_ms" in line]
        assert len(access) == 1, lines
        assert access[0]["status"] == status
        for line in lines:  # every line this request wrote is stamped with this request's fields only
            assert (line["method"], line["path"], line["trace_id"]) == ("GET", path, trace_id), line
            assert line["client_ip"] == "127.0.0.1"  # X-Forwarded-For is not trusted by default


def test_every_line_of_the_live_log_is_json_with_all_fields(server, account):
    lines = records(server)
    assert lines
    for line in lines:
        missing = [name for name in LOG_FIELDS if name not in line]
        assert not missing, (missing, line)
        assert LOG_TIME.match(line["time"]), line
    messages = [line["message"] for line in lines]
    for start_up in ("Starting gunicorn", "Listening at", "Booting worker"):
        found = [line for line in lines if line["message"].startswith(start_up)]
        assert found, (start_up, messages[:10])
        for line in found:
            assert all(line[name] is None for name in ("request_id", "trace_id", "client_ip", "method", "path"))
    # CHATAPP_WORKERS=2 was honoured.
    assert len([message for message in messages if message.startswith("Booting worker")]) >= 2
    assert any(message == "Using worker: gevent" for message in messages)


def test_no_secret_reaches_the_live_log(server, account):
    text = "\n".join(server.log_lines())
    for secret in (account.access, account.refresh, account.password):
        assert secret not in text


# ------------------------------------------------------------------ gevent: one worker, overlapping waits


def _overlap(slow_server, path: str, seconds: float = 1.0) -> tuple[float, list[dict]]:
    started = time.monotonic()
    responses = fetch_all([("GET", f"{slow_server.url}{path}", {"params": {"seconds": seconds}})] * 2, workers=2)
    elapsed = time.monotonic() - started
    for response in responses:
        assert response.status_code == 200, response.text[:300]
    return elapsed, [response.json() for response in responses]


def test_two_slow_requests_overlap_in_one_gevent_worker(slow_server):
    elapsed, bodies = _overlap(slow_server, "/test/sleep")
    assert all(body["finished"] - body["started"] >= 0.95 for body in bodies)
    assert elapsed < 1.8, f"two 1 s sleeps took {elapsed:.2f} s: the worker served them one after the other"


@pytest.mark.skipif(not PG_URL, reason="SQLite calls never yield to gevent (ARCHITECTURE.md: short transactions "
                                       "instead); the driver proof needs PostgreSQL (CHATAPP_TEST_DATABASE_URL)")
def test_two_slow_postgres_queries_overlap_in_one_gevent_worker(slow_server):
    elapsed, bodies = _overlap(slow_server, "/test/pg_sleep")
    assert all(body["finished"] - body["started"] >= 0.95 for body in bodies)
    # Overlapping in one process: the second query started before the first finished.
    first, second = sorted(bodies, key=lambda body: body["started"])
    assert second["started"] < first["finished"]
    assert elapsed < 1.8, f"two pg_sleep(1) took {elapsed:.2f} s: psycopg blocked the gevent loop"


def test_log_context_survives_interleaving_and_spawned_greenlets(slow_server):
    request_ids = [f"weave-{number:02d}-{uuid.uuid4().hex[:8]}" for number in range(20)]
    responses = fetch_all([("GET", f"{slow_server.url}/test/interleave",
                            {"params": {"seconds": 0.1}, "headers": {"X-Request-ID": request_id}})
                           for request_id in request_ids], workers=len(request_ids))
    for request_id, response in zip(request_ids, responses, strict=True):
        assert response.status_code == 200 and response.json() == {"request_id": request_id}
    by_id = wait_for_lines(slow_server, request_ids)
    for request_id in request_ids:
        messages = sorted(line["message"] for line in by_id[request_id] if "duration_ms" not in line)
        assert messages == ["interleave end", "interleave spawned", "interleave start"], by_id[request_id]
        assert {line["path"] for line in by_id[request_id]} == {"/test/interleave"}


def test_lines_written_while_streaming_carry_the_request(slow_server):
    request_ids = [f"stream-{number}-{uuid.uuid4().hex[:8]}" for number in range(3)]
    responses = fetch_all([("GET", f"{slow_server.url}/test/stream",
                            {"params": {"seconds": 0.1}, "headers": {"X-Request-ID": request_id}})
                           for request_id in request_ids], workers=len(request_ids))
    for response in responses:
        assert response.text == "chunk 0\nchunk 1\nchunk 2\n"
    by_id = wait_for_lines(slow_server, request_ids, predicate=lambda line: line["message"] == "stream chunk 2")
    for request_id in request_ids:
        chunks = [line for line in by_id[request_id] if line["message"].startswith("stream chunk")]
        assert [line["message"] for line in chunks] == ["stream chunk 0", "stream chunk 1", "stream chunk 2"]
        assert all(line["path"] == "/test/stream" and line["method"] == "GET" for line in chunks)


# ------------------------------------------------------------------ the master loads the app once


def test_workers_forked_after_a_reload_serve_and_log(tmp_path, _schema_template):
    """The master loads the app once (preload_app) and forks every worker from it, a HUP's too. The HUP also
    resets the master's logging from gunicorn's logconfig: each worker sets up its own handlers after the fork,
    so a reload must not silence the app's log lines. Nothing the app started at load runs in a worker (no
    traceback on stderr)."""
    live = start_live_server(tmp_path, workers=1)
    try:
        first = set(live.workers())
        os.kill(live.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while not (live.workers() and not first & set(live.workers())):
            assert time.monotonic() < deadline, "the reload forked no new worker"
            time.sleep(0.1)
        request_id = f"after-reload-{uuid.uuid4().hex[:8]}"
        response = requests.get(f"{live.url}/healthz", timeout=10, headers={"X-Request-ID": request_id})
        assert response.status_code == 200
        wait_for_lines(live, [request_id])
    finally:
        stop_live_server(live)
    assert "Traceback" not in (tmp_path / "gunicorn.stderr").read_text(errors="replace")
