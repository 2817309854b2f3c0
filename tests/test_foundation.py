"""Issue 2, in process: one error shape, request ids, JSON log lines, config, OpenAPI, migrations, CORS and
response headers. The same tests run on SQLite and, with CHATAPP_TEST_DATABASE_URL, on PostgreSQL."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import types
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import event, text

import chatapp
import config
from chatapp import clock, create_app, crypto
from chatapp.extensions import db
from tests.conftest import PG_URL, ROOT, assert_error, remember_secret

LOG_FIELDS = ("time", "level", "request_id", "trace_id", "client_ip", "method", "path", "message")
LOG_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


# ------------------------------------------------------------------ helpers


def log_records(path) -> list[dict]:
    """Every line of the log file, each of which must be one JSON object with the 8 fields."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"log line {number} is not JSON: {line[:300]!r}")
        assert isinstance(record, dict), line
        missing = [name for name in LOG_FIELDS if name not in record]
        assert not missing, (missing, line[:300])
        assert LOG_TIME.match(record["time"]), record["time"]
        records.append(record)
    return records


def lines_for(path, request_id: str) -> list[dict]:
    return [record for record in log_records(path) if record["request_id"] == request_id]


def access_lines(path, request_id: str) -> list[dict]:
    return [record for record in lines_for(path, request_id) if "duration_ms" in record]


@pytest.fixture
def make_app(settings):
    """create_app() with overrides on top of the test settings; engines disposed afterwards."""
    made = []

    def make(**overrides):
        application = create_app({**settings, **overrides})
        made.append(application)
        return application

    yield make
    for application in made:
        with application.app_context():
            db.session.remove()
            db.engine.dispose()


def new_request_id() -> str:
    return f"test-{uuid.uuid4().hex}"


# ------------------------------------------------------------------ the API's timestamps


@pytest.mark.parametrize(("moment", "expected"), [
    (datetime(2026, 1, 2, 3, 4, 5, 678999, tzinfo=timezone.utc), "2026-01-02T03:04:05.678Z"),  # truncated
    (datetime(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05.000Z"),  # naive: stored UTC
    (datetime(2026, 1, 2, 8, 4, 5, 1000, tzinfo=timezone(timedelta(hours=5))), "2026-01-02T03:04:05.001Z"),
    (datetime(2025, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-1))), "2026-01-01T00:30:00.000Z"),
    (None, None),
])
def test_timestamps_are_utc_with_milliseconds_and_z(moment, expected):
    assert clock.isoformat(moment) == expected


def test_a_new_row_is_not_edited_a_millisecond_after_it_was_made(api, alice, monkeypatch):
    # Every reading of the clock lands on a later millisecond, as two readings now and then do for real.
    real, ticks = clock.time, iter(range(10**6))
    monkeypatch.setattr(clock, "time", types.SimpleNamespace(time=lambda: real.time() + next(ticks) / 1000))
    config = api.post("model_config/create", {"name": "c", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
                      token=alice.access).get_json()
    conversation = api.post("conversation/create", {"model_config_id": config["id"]}, token=alice.access).get_json()
    for row in (config, conversation):
        assert row["created_at"] == row["updated_at"], row


# ------------------------------------------------------------------ the database pool


def _pings(monkeypatch, app) -> list:
    pings = []
    with app.app_context():
        dialect = db.engine.dialect
        real = dialect.do_ping
        monkeypatch.setattr(dialect, "do_ping", lambda connection: pings.append(connection) or real(connection))
    return pings


def test_a_connection_used_a_moment_ago_is_not_pinged(app, monkeypatch):
    monkeypatch.setattr(chatapp, "POOL_PING_IDLE_SECONDS", 60)
    pings = _pings(monkeypatch, app)
    with app.app_context():
        for _ in range(3):
            with db.engine.connect() as connection:
                assert connection.execute(text("select 1")).scalar() == 1
    assert pings == []  # no round trip of its own on a busy server


def test_an_idle_pooled_connection_that_died_is_replaced_before_use(app, monkeypatch):
    monkeypatch.setattr(chatapp, "POOL_PING_IDLE_SECONDS", 0)  # every pooled connection counts as idle
    pings = _pings(monkeypatch, app)
    with app.app_context():
        with db.engine.connect() as connection:
            dead = connection.connection.dbapi_connection
        dead.close()  # as a database restart or an idle timeout would, while it waits in the pool
        with db.engine.connect() as connection:
            assert connection.execute(text("select 1")).scalar() == 1  # the request never saw it
            assert connection.connection.dbapi_connection is not dead
    assert dead in pings


@contextlib.contextmanager
def _statements(app):
    """Every statement run meanwhile, as (its first word, its connection's isolation level)."""
    seen = []

    def record(connection, _cursor, statement, *_rest):
        seen.append((statement.split()[0], connection.get_execution_options().get("isolation_level")))

    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        with app.app_context():
            event.remove(db.engine, "before_cursor_execute", record)


@pytest.mark.skipif(not PG_URL, reason="PostgreSQL only: SQLite's driver begins no transaction for reads")
def test_an_authenticated_get_reads_without_begin_and_rollback(app, api, alice):
    with _statements(app) as seen:
        assert api.get("/api/v1/conversation", token=alice.access).status_code == 200
        reads, seen[:] = list(seen), []
        assert api.post("/api/v1/conversation/create", json={}, token=alice.access).status_code == 201
        writes = list(seen)
    assert reads and all(level == "AUTOCOMMIT" for _, level in reads), reads
    # The pooled connection went back to transactions: a write's statements still commit together.
    assert any(kind == "INSERT" for kind, _ in writes) and all(level is None for _, level in writes), writes


@pytest.mark.skipif(not PG_URL, reason="PostgreSQL only: SQLite's driver begins no transaction for reads")
def test_a_send_runs_without_begin_and_commit_and_stores_its_turn(app, api, alice, fake_upstream):
    conversation_id = _conversation(api, alice, fake_upstream)
    with _statements(app) as seen:
        _send(api, alice, conversation_id)
    assert [kind for kind, _ in seen] == ["SELECT", "SELECT", "INSERT", "UPDATE"], seen
    assert all(level == "AUTOCOMMIT" for _, level in seen), seen
    items = api.get(f"chat/{conversation_id}", token=alice.access).get_json()["items"]
    assert [(item["role"], item["status"]) for item in items] == [("user", "completed"), ("assistant", "completed")]


def _conversation(api, account, fake_upstream) -> str:
    config = api.post("model_config/create", {"name": "c", "base_url": fake_upstream.base_url, "model": "m"},
                      token=account.access).get_json()
    return api.post("conversation/create", {"model_config_id": config["id"]}, token=account.access).get_json()["id"]


def _send(api, account, conversation_id: str) -> None:
    with api.client.post("/api/v1/chat/send", headers={"Authorization": f"Bearer {account.access}"},
                         json={"conversation_id": conversation_id, "message": {"content": "hi"}}) as reply:
        assert reply.status_code == 200
        assert b"message.completed" in reply.get_data()


@pytest.mark.skipif(bool(PG_URL), reason="SQLite only")
def test_sends_leave_sqlites_prepared_statements_alone(app, api, alice, fake_upstream):
    # An isolation-level reset (what autocommit costs SQLite when the connection goes back to the pool) runs
    # PRAGMA read_uncommitted, which expires every statement prepared on the connection: each statement of
    # the next request on it was parsed and planned again.
    ran = []
    with app.app_context():
        db.engine.dispose()  # every connection from here on is traced

        def trace(dbapi_connection, _record):
            dbapi_connection.set_trace_callback(ran.append)

        event.listen(db.engine, "connect", trace)
    try:
        _send(api, alice, _conversation(api, alice, fake_upstream))
        _send(api, alice, _conversation(api, alice, fake_upstream))
    finally:
        with app.app_context():
            event.remove(db.engine, "connect", trace)
    assert any(statement.startswith("UPDATE messages") for statement in ran), ran  # the replies were saved
    assert not [statement for statement in ran if "read_uncommitted" in statement]


def test_the_streaming_rows_predicate_is_sql_not_a_parameter():
    # Bound, the value decides whether the partial index uq_messages_one_streaming applies: SQLite then
    # prepares the send's SELECT again at every execution, and a PostgreSQL generic plan scans every message.
    from sqlalchemy.dialects import postgresql, sqlite

    from chatapp.services.chat import _LOAD_FOR_SEND

    for dialect in (sqlite.dialect(), postgresql.dialect()):
        compiled = _LOAD_FOR_SEND.compile(dialect=dialect)
        assert "status = 'streaming'" in str(compiled)
        assert "streaming" not in compiled.params.values()


def test_the_hot_statements_are_rendered_once():
    # An "expanding" parameter (in_() of Python values) is rendered into the SQL text again at every
    # execution: it made the send's SELECT cost ~35 us more on SQLite.
    from sqlalchemy.dialects import postgresql, sqlite

    from chatapp.services.chat import (
        _HISTORY_BEFORE,
        _HISTORY_FOUND,
        _HISTORY_NEWEST,
        _INSERT_TURN,
        _LOAD_FOR_SEND,
        _SAVE_REPLY,
    )
    from chatapp.services.conversations import _LIST_AFTER_CURSOR, _LIST_FIRST_PAGE
    from chatapp.tokens import _SESSION_CHECK

    for statement in (_SESSION_CHECK, _LOAD_FOR_SEND, _INSERT_TURN, _SAVE_REPLY, _LIST_FIRST_PAGE, _LIST_AFTER_CURSOR,
                      _HISTORY_NEWEST, _HISTORY_BEFORE, _HISTORY_FOUND):
        for dialect in (sqlite.dialect(), postgresql.dialect()):
            compiled = statement.compile(dialect=dialect)
            assert not [name for name, param in compiled.binds.items() if param.expanding], str(compiled)


# ------------------------------------------------------------------ every error kind, one shape


def test_unknown_path_is_404_json(api):
    assert_error(api.get("/api/v1/no/such/thing"), 404, "not_found")
    body = assert_error(api.get("/nowhere.html"), 404, "not_found")
    assert set(body) == {"code", "message", "request_id"}


@pytest.mark.parametrize(("method", "path"), [("PUT", "/healthz"), ("GET", "/api/v1/user/login"),
                                              ("DELETE", "/api/v1/user/me")])
def test_wrong_method_is_405_json_with_allow(client, method, path):
    response = client.open(path, method=method)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"]


def test_body_over_the_limit_is_413_before_parsing(make_app):
    client = make_app(MAX_BODY_BYTES=64).test_client()
    oversized = json.dumps({"email": "a@example.com", "password": "x" * 100})
    response = client.post("/api/v1/user/login", data=oversized, content_type="application/json")
    assert_error(response, 413, "payload_too_large")
    # The limit is about bytes, not validity: garbage over the limit is 413, not 400.
    response = client.post("/api/v1/user/login", data="{" * 65, content_type="application/json")
    assert_error(response, 413, "payload_too_large")
    # At the limit it is parsed as usual (here: validation).
    fits = json.dumps({"email": "a@example.com", "password": "p" * 10}).ljust(64)
    assert_error(client.post("/api/v1/user/login", data=fits, content_type="application/json"), 401)


def _chunked(client, body: bytes):
    """A body without Content-Length, as gunicorn hands over a chunked upload (wsgi.input_terminated)."""
    return client.post("/api/v1/user/login", input_stream=io.BytesIO(body), content_type="application/json",
                       headers={"Transfer-Encoding": "chunked"},
                       environ_overrides={"wsgi.input_terminated": True})


def test_chunked_body_over_the_limit_is_413(make_app):
    client = make_app(MAX_BODY_BYTES=64).test_client()
    # Valid JSON that the limit would cut into invalid JSON: must be "too large", not "malformed".
    assert_error(_chunked(client, json.dumps({"email": "a@example.com", "password": "x" * 200}).encode()),
                 413, "payload_too_large")
    # Whitespace padding: cut at the limit it would still parse; it must not sneak through.
    padded = json.dumps({"email": "a@example.com", "password": "p" * 10}).encode() + b" " * 100
    assert_error(_chunked(client, padded), 413, "payload_too_large")
    # A small chunked body goes through to the view.
    small = json.dumps({"email": "a@example.com"}).encode()
    body = assert_error(_chunked(client, small), 422, "validation_error")
    assert "password" in body["details"]


@pytest.mark.parametrize(("raw", "code"), [
    (b"{not json", "malformed_json"),
    (b'{"email": "a@example.com",}', "malformed_json"),
    (b"\xff\xfe\x00", "malformed_json"),
    (b"[1, 2, 3]", "body_not_object"),
    (b'[{"email": "a@example.com"}]', "body_not_object"),
    (b'"a string"', "body_not_object"),
    (b"42", "body_not_object"),
    (b"null", None),
])
def test_malformed_or_non_object_json_is_400(api, raw, code):
    response = api.post("user/login", data=raw, content_type="application/json")
    assert_error(response, 400, code)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_non_json_body_is_415(api, content_type):
    response = api.post("user/login", data="email=a@example.com&password=x", content_type=content_type)
    assert_error(response, 415, "unsupported_media_type")


def test_validation_error_is_422_with_details_by_field(api):
    body = assert_error(api.post("user/login", {"email": 3}), 422, "validation_error")
    assert set(body["details"]) == {"email", "password"}
    assert all(isinstance(problems, list) and problems for problems in body["details"].values())
    body = assert_error(api.post("user/login", {"email": "a@example.com", "password": "p" * 10, "extra": 1}),
                        422, "validation_error")
    assert list(body["details"]) == ["extra"]
    # An empty body with a JSON type is "fields missing", not a crash.
    body = assert_error(api.post("user/login", data=b"", content_type="application/json"), 422)
    assert {"email", "password"} <= set(body["details"])


@pytest.mark.parametrize(("headers", "code"), [
    ({}, "token_missing"),
    ({"Authorization": "Bearer garbage"}, "token_invalid"),
    ({"Authorization": "Bearer a.b.c"}, "token_invalid"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
    ({"Authorization": "Bearer"}, None),
])
def test_jwt_failures_are_401_in_our_shape(api, headers, code):
    response = api.get("user/me", headers=headers)
    body = assert_error(response, 401, code)
    assert "msg" not in body  # flask-jwt-extended's own shape never leaks through
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_wrong_token_type_is_401(api, alice):
    assert_error(api.get("user/me", token=alice.refresh), 401)
    assert_error(api.post("user/refresh", token=alice.access), 401)


def test_unexpected_exception_is_500_without_details(app, client, settings):
    @app.get("/test/explode")
    def explode():
        raise RuntimeError("kaboom: secret internal detail")

    request_id = new_request_id()
    response = client.get("/test/explode", headers={"X-Request-ID": request_id})
    body = assert_error(response, 500, "internal_error")
    text = response.get_data(as_text=True)
    assert "kaboom" not in text and "RuntimeError" not in text and "Traceback" not in text
    assert body["request_id"] == request_id
    # The operator gets the traceback, in the log, tied to the request.
    errors = [record for record in lines_for(settings["LOG_FILE"], request_id) if record["level"] == "ERROR"]
    assert len(errors) == 1 and "kaboom" in errors[0]["exc_info"]
    assert [record["status"] for record in access_lines(settings["LOG_FILE"], request_id)] == [500]


@pytest.mark.parametrize("url", ["sqlite:///{tmp}/missing/dir/chatapp.sqlite3",
                                 "postgresql+psycopg://postgres@127.0.0.1:1/chatapp_nowhere"])
def test_readyz_is_503_when_the_database_is_unreachable(make_app, tmp_path, url):
    broken = make_app(SQLALCHEMY_DATABASE_URI=url.format(tmp=tmp_path)).test_client()
    assert broken.get("/healthz").status_code == 200  # the process is up, just not ready
    assert_error(broken.get("/readyz"), 503, "database_unavailable")
    # An endpoint that needs the database is an outage too (retry), not a bug (500).
    response = broken.post("/api/v1/user/login", json={"email": "a@example.com", "password": "p" * 10})
    assert_error(response, 503, "database_unavailable")


def test_health_probes_answer_without_auth(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ok", "database": "ok"}


# ------------------------------------------------------------------ X-Request-ID and trace ids


def test_sane_request_id_is_echoed_everywhere(api, settings):
    request_id = "client-42.abc:DEF_" + "9" * 100  # 118 characters of the allowed alphabet
    response = api.get("/api/v1/nope", headers={"X-Request-ID": request_id})
    assert response.headers["X-Request-ID"] == request_id
    assert response.get_json()["request_id"] == request_id
    assert access_lines(settings["LOG_FILE"], request_id)


@pytest.mark.parametrize("incoming", [
    "x" * 129,
    "has space",
    "abc\r\nX-Injected: yes",
    "abc\nX-Injected: yes",
    "<script>alert(1)</script>",
    "a/b",
    "",
])
def test_insane_request_id_is_replaced(client, settings, incoming):
    # Through the WSGI environ: the test client itself refuses to send a header with a newline.
    response = client.get("/api/v1/nope", environ_overrides={"HTTP_X_REQUEST_ID": incoming})
    generated = response.headers["X-Request-ID"]
    assert generated != incoming and GENERATED_ID.match(generated)
    assert response.get_json()["request_id"] == generated
    assert "X-Injected" not in response.headers
    assert access_lines(settings["LOG_FILE"], generated)


def test_each_request_without_an_id_gets_its_own(client):
    ids = {client.get("/healthz").headers["X-Request-ID"] for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize(("headers", "expected"), [
    ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}, "4bf92f3577b34da6a3ce929d0e0e4736"),
    ({"traceparent": "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"}, "4bf92f3577b34da6a3ce929d0e0e4736"),
    ({"X-Trace-ID": "trace-from-the-gateway-1"}, "trace-from-the-gateway-1"),
    ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "X-Trace-ID": "other"},
     "4bf92f3577b34da6a3ce929d0e0e4736"),
    ({"traceparent": "garbage", "X-Trace-ID": "fallback-trace"}, "fallback-trace"),
    ({"traceparent": "garbage"}, None),
    ({"X-Trace-ID": "no spaces allowed"}, None),
])
def test_trace_id_comes_from_traceparent_or_x_trace_id(client, settings, headers, expected):
    request_id = new_request_id()
    client.get("/healthz", headers={"X-Request-ID": request_id, **headers})
    (line,) = access_lines(settings["LOG_FILE"], request_id)
    if expected:
        assert line["trace_id"] == expected
    else:
        assert GENERATED_ID.match(line["trace_id"])


# ------------------------------------------------------------------ log lines


def test_log_file_lines_are_json_with_all_fields(api, alice, settings):
    request_id = new_request_id()
    api.get("user/me", token=alice.access, headers={"X-Request-ID": request_id})
    records = log_records(settings["LOG_FILE"])  # every line of the file, from every test so far
    assert records
    (line,) = [record for record in records if record["request_id"] == request_id and "status" in record]
    assert line["level"] == "INFO"
    assert (line["method"], line["path"], line["client_ip"]) == ("GET", "/api/v1/user/me", "127.0.0.1")
    assert GENERATED_ID.match(line["trace_id"])
    written = datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - written).total_seconds()) < 60


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("GET", "/healthz", {}, 200),
    ("GET", "/api/v1/user/me", {}, 401),
    ("GET", "/api/v1/nope", {}, 404),
    ("PUT", "/healthz", {}, 405),
    ("POST", "/api/v1/user/login", {"data": b"[1]", "content_type": "application/json"}, 400),
    ("POST", "/api/v1/user/login", {"json": {}}, 422),
])
def test_one_access_line_per_request_with_status_and_duration(client, settings, method, path, kwargs, status):
    request_id = new_request_id()
    response = client.open(path, method=method, headers={"X-Request-ID": request_id}, **kwargs)
    assert response.status_code == status
    (line,) = access_lines(settings["LOG_FILE"], request_id)
    assert line["status"] == status and line["level"] == "INFO"
    assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0
    assert (line["method"], line["path"]) == (method, path)


def test_access_line_for_a_registered_user(api, settings):
    request_id = new_request_id()
    account = api.register()
    response = api.get("user/me", token=account.access, headers={"X-Request-ID": request_id})
    assert response.status_code == 200
    assert [line["status"] for line in access_lines(settings["LOG_FILE"], request_id)] == [200]


@pytest.mark.parametrize(("trusted", "forwarded", "expected"), [
    (0, "203.0.113.7", "10.1.2.3"),
    (1, "203.0.113.7", "203.0.113.7"),
    (1, "198.51.100.66, 203.0.113.7", "203.0.113.7"),  # only the hop the proxy added is believed
    (2, "198.51.100.66, 203.0.113.7", "198.51.100.66"),
])
def test_client_ip_honours_x_forwarded_for_only_for_trusted_hops(make_app, settings, trusted, forwarded,
                                                                  expected):
    client = make_app(TRUSTED_PROXIES=trusted).test_client()
    request_id = new_request_id()
    client.get("/healthz", headers={"X-Request-ID": request_id, "X-Forwarded-For": forwarded},
               environ_base={"REMOTE_ADDR": "10.1.2.3"})
    (line,) = access_lines(settings["LOG_FILE"], request_id)
    assert line["client_ip"] == expected


def test_default_trusts_no_proxy():
    assert config.load_config(env={})["TRUSTED_PROXIES"] == 0


def _secrets() -> dict:
    tag = uuid.uuid4().hex[:12]
    return {name: remember_secret(value) for name, value in {
        "bearer": f"abc{tag}.def{tag}.ghi{tag}",
        "jwt": f"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ{tag}.sig{tag}",
        "key": f"sk-{tag}{tag}",
        "password": f"hunter2-{tag}",
        "json_password": f"json-pw-{tag}",
        "json_key": f"plain-key-{tag}",
        "extra_password": f"extra-pw-{tag}",
        "url_password": f"url-pw-{tag}",
    }.items()}


def _log_secrets(logger: logging.Logger, secret: dict) -> None:
    logger.info("login with Bearer %s and key %s and password=%s", secret["bearer"], secret["key"],
                secret["password"])
    logger.info("upstream said %s", secret["jwt"])
    logger.info("body was %s", json.dumps({"password": secret["json_password"], "api_key": secret["json_key"]}))
    logger.info("structured", extra={"body": {"new_password": secret["extra_password"], "n": 1}})
    logger.warning("calling https://user:%s@models.example.com/v1", secret["url_password"])


def test_secrets_are_redacted_in_request_log_lines(app, client, settings):
    secret = _secrets()

    @app.get("/test/leak")
    def leak():
        _log_secrets(logging.getLogger("x"), secret)
        return {"ok": True}

    request_id = new_request_id()
    assert client.get("/test/leak", headers={"X-Request-ID": request_id}).status_code == 200
    raw = [line for line in Path(settings["LOG_FILE"]).read_text(encoding="utf-8").splitlines()
           if request_id in line]
    assert len(raw) == 6  # five messages and the access line
    for line in raw:
        assert all(value not in line for value in secret.values()), line
    lines = lines_for(settings["LOG_FILE"], request_id)  # and each is still one JSON object
    assert lines[0]["message"].startswith("login with Bearer [redacted] and key [redacted")
    assert lines[0]["message"].endswith("password=[redacted]")
    assert lines[3]["body"] == {"new_password": "[redacted]", "n": 1}


def test_secrets_are_redacted_outside_requests(app, settings):
    secret = _secrets()
    marker = f"direct-{uuid.uuid4().hex}"
    _log_secrets(logging.getLogger(marker), secret)
    logging.getLogger(marker).error("crashed with password=%s", secret["password"],
                                    exc_info=ValueError(f"api_key={secret['key']}"))
    text = Path(settings["LOG_FILE"]).read_text(encoding="utf-8")
    assert all(value not in text for value in secret.values())
    log_records(settings["LOG_FILE"])  # still JSON, line by line


def test_redaction_keeps_ordinary_text():
    from chatapp.logs import redact

    ordinary = "GET /api/v1/user/me 200 in 3 ms for user 42 (skipped: 0, task-list ok)"
    assert redact(ordinary) == ordinary


@pytest.mark.parametrize("text", ["BEARER abc.def-123", "x eyJhbGciOi.eyJzdWIiOi.c2ln y", "key rk-abcdef123",
                                  "PassWord: hunter2", "Api_Key=zzz", "url https://user:pw@example.com/"])
def test_the_secret_prefilter_lets_every_pattern_through(text):
    """The cheap word test in front of the regexes must never skip a text that one of them would mask."""
    from chatapp.logs import redact

    assert redact(text) != text


@pytest.mark.parametrize(("field", "value"), [("apikey", "looks harmless"), ("session_token", 12345),
                                            ("note", "sk-abcdef1234567"), ("nested", {"password": "x"})])
def test_the_fast_path_of_redaction_still_masks_what_looks_secret(field, value):
    from chatapp.logs import RedactingJsonFormatter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain line", None, None)
    setattr(record, field, value)
    line = json.loads(RedactingJsonFormatter().format(record))
    assert "harmless" not in json.dumps(line) and "12345" not in json.dumps(line)
    assert "abcdef1234567" not in json.dumps(line) and line.get("nested", {}).get("password") != "x"
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "GET /api/v1/conversation 200", None, None)
    assert json.loads(RedactingJsonFormatter().format(plain))["message"] == "GET /api/v1/conversation 200"


# ------------------------------------------------------------------ configuration


def _production(settings: dict, **overrides) -> dict:
    return {**settings, "CHATAPP_ENV": "production", "SECRET_KEY": "p" * 48,
            "ENCRYPTION_KEYS": [crypto.generate_key()], **overrides}


@pytest.mark.parametrize(("overrides", "variable"), [
    ({"SECRET_KEY": config.DEV_SECRET}, "CHATAPP_SECRET_KEY"),
    ({"SECRET_KEY": "short-secret"}, "CHATAPP_SECRET_KEY"),
    ({"SECRET_KEY": ""}, "CHATAPP_SECRET_KEY"),
    ({"ENCRYPTION_KEYS": []}, "CHATAPP_ENCRYPTION_KEYS"),
])
def test_production_refuses_unsafe_secrets(settings, overrides, variable):
    with pytest.raises(config.ConfigError, match=variable):
        create_app(_production(settings, **overrides))


def test_production_starts_with_proper_secrets(make_app):
    application = make_app(CHATAPP_ENV="production", SECRET_KEY="p" * 48, ENCRYPTION_KEYS=[crypto.generate_key()])
    assert application.config["CHATAPP_ENV"] == "production"
    assert application.test_client().get("/healthz").status_code == 200


def test_production_from_the_environment_names_the_variable():
    settings = config.load_config(env={"CHATAPP_ENV": "production"})
    assert settings["SECRET_KEY"] == config.DEV_SECRET
    with pytest.raises(config.ConfigError, match="CHATAPP_SECRET_KEY"):
        config.check_config(settings)
    settings = config.load_config(env={"CHATAPP_ENV": "production", "CHATAPP_SECRET_KEY": "s" * 40})
    with pytest.raises(config.ConfigError, match="CHATAPP_ENCRYPTION_KEYS"):
        config.check_config(settings)


def test_unknown_environment_is_refused():
    with pytest.raises(config.ConfigError, match="CHATAPP_ENV"):
        config.check_config(config.load_config(env={"CHATAPP_ENV": "staging"}))


@pytest.mark.parametrize(("name", "value"), [
    ("CHATAPP_MAX_BODY_BYTES", "2MB"),
    ("CHATAPP_TRUSTED_PROXIES", "one"),
    ("CHATAPP_DB_POOL_SIZE", "1.5"),
    ("CHATAPP_JWT_ACCESS_SECONDS", "15m"),
    ("CHATAPP_LLM_READ_TIMEOUT", "soon"),
    ("CHATAPP_PLANS", "{not json"),
])
def test_invalid_number_in_the_environment_names_the_variable(name, value):
    with pytest.raises(config.ConfigError, match=name):
        config.load_config(env={name: value})


def test_defaults_run_on_one_machine():
    settings = config.load_config(env={})
    assert settings["SQLALCHEMY_DATABASE_URI"].startswith("sqlite:///")
    assert settings["SQLALCHEMY_DATABASE_URI"].endswith("/instance/chatapp.sqlite3")
    assert settings["STORAGE_BACKEND"] == "local"
    assert settings["RATELIMIT_STORAGE_URI"] == "memory://"
    assert settings["MAX_BODY_BYTES"] == 2 * 1024 * 1024
    assert settings["CORS_ORIGINS"] == []
    assert settings["CHATAPP_ENV"] == "development"
    config.check_config(settings)


def test_environment_values_are_read(make_app):
    settings = config.load_config(env={"CHATAPP_MAX_BODY_BYTES": "1024", "CHATAPP_TRUSTED_PROXIES": "1",
                                       "CHATAPP_CORS_ORIGINS": "https://a.example, https://b.example",
                                       "CHATAPP_LOG_LEVEL": "warning"})
    assert settings["MAX_BODY_BYTES"] == 1024 and settings["TRUSTED_PROXIES"] == 1
    assert settings["CORS_ORIGINS"] == ["https://a.example", "https://b.example"]
    assert settings["LOG_LEVEL"] == "WARNING"
    assert make_app(MAX_BODY_BYTES=1024).config["MAX_CONTENT_LENGTH"] == 1024


@pytest.mark.parametrize(("given", "expected"), [
    ("postgres://u:p@db.example:5432/chat", "postgresql+psycopg://u:p@db.example:5432/chat"),
    ("postgresql://u@127.0.0.1/chat", "postgresql+psycopg://u@127.0.0.1/chat"),
    ("postgresql+psycopg://u@127.0.0.1/chat", "postgresql+psycopg://u@127.0.0.1/chat"),
    ("sqlite:////tmp/x.sqlite3", "sqlite:////tmp/x.sqlite3"),
])
def test_postgres_urls_use_psycopg3(given, expected):
    assert config.database_url(given) == expected
    assert config.load_config(env={"CHATAPP_DATABASE_URL": given})["SQLALCHEMY_DATABASE_URI"] == expected


# ------------------------------------------------------------------ gunicorn settings


_READ_GUNICORN_CONF = """
import json, runpy
from gevent import monkey
conf = runpy.run_path("gunicorn.conf.py")
settings = {name: value for name, value in conf.items()
            if not name.startswith("_") and isinstance(value, (str, int, float, bool, dict, type(None)))}
print(json.dumps({**settings, "patched": monkey.is_module_patched("socket")}))
"""


def _gunicorn_conf(**env) -> dict:
    """gunicorn.conf.py's settings, read in a process of its own as gunicorn's master does: it monkey-patches."""
    environ = {name: value for name, value in os.environ.items()
               if name not in ("CHATAPP_WORKERS", "CHATAPP_WORKER_CONNECTIONS", "CHATAPP_LOG_FILE", "HOST", "PORT")}
    result = subprocess.run([sys.executable, "-c", _READ_GUNICORN_CONF], cwd=ROOT, env={**environ, **env},
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_gunicorn_conf_is_gevent_with_preload_after_the_patch():
    conf = _gunicorn_conf()
    assert conf["worker_class"] == "gevent"
    assert conf["preload_app"] is True and conf["patched"] is True  # the app is loaded into a patched master
    assert conf["control_socket_disable"] is True
    assert conf["bind"] == "127.0.0.1:8000"
    assert conf["workers"] == 2 and conf["worker_connections"] == 5000
    assert conf["timeout"] >= 30 and conf["graceful_timeout"] >= 10
    assert conf["accesslog"] is None  # the app writes the one access line per request


def test_gunicorn_conf_honours_the_environment(tmp_path):
    conf = _gunicorn_conf(CHATAPP_WORKERS="7", CHATAPP_WORKER_CONNECTIONS="123",
                          HOST="0.0.0.0", PORT="9123", CHATAPP_LOG_FILE=str(tmp_path / "g.log"))
    assert (conf["workers"], conf["worker_connections"], conf["bind"]) == (7, 123, "0.0.0.0:9123")
    assert conf["logconfig_dict"]["handlers"]["file"]["filename"] == str(tmp_path / "g.log")
    with pytest.raises(config.ConfigError, match="CHATAPP_WORKERS"):
        config.gunicorn_settings(env={"CHATAPP_WORKERS": "many"})


@pytest.mark.parametrize("log_file", [None, "chatapp.log"])
def test_gunicorn_logconfig_is_complete_after_merging_defaults(tmp_path, log_file):
    """gunicorn merges logconfig_dict over its defaults; every handler named must then exist."""
    from gunicorn.glogging import CONFIG_DEFAULTS

    env = {"CHATAPP_LOG_FILE": str(tmp_path / log_file)} if log_file else {}
    merged = {**CONFIG_DEFAULTS, **_gunicorn_conf(**env)["logconfig_dict"]}
    handlers = set(merged["handlers"])
    assert set(merged["root"]["handlers"]) <= handlers
    for logger in merged["loggers"].values():
        assert set(logger["handlers"]) <= handlers
    assert merged["loggers"]["gunicorn.error"]["propagate"] is False  # not twice through the root


# ------------------------------------------------------------------ OpenAPI


def test_openapi_document(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    document = response.get_json()
    assert document["openapi"].startswith("3.")
    schemes = document["components"]["securitySchemes"]
    assert {"access", "refresh"} <= set(schemes)
    assert all(schemes[name]["scheme"] == "bearer" for name in ("access", "refresh"))
    paths = set(document["paths"])
    assert {"/api/v1/user/register", "/api/v1/user/login", "/api/v1/user/me", "/api/v1/model_config",
            "/api/v1/model_config/create", "/healthz", "/readyz"} <= paths
    assert "CDN" in document["info"]["description"]


def test_docs_page_says_it_loads_from_a_cdn(client):
    response = client.get("/api/v1/docs")
    assert response.status_code == 200 and response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "cdn.jsdelivr.net" in page and "/api/v1/openapi.json" in page


# ------------------------------------------------------------------ migrations


def _flask_db(command: str, database_url: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHATAPP_DATABASE_URL": database_url, "CHATAPP_INSTANCE_PATH": str(tmp_path / "instance"),
           "CHATAPP_LOG_FILE": "", "CHATAPP_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "db", command], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_migrations_match_the_models_on_a_fresh_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    upgrade = _flask_db("upgrade", url, tmp_path)
    assert upgrade.returncode == 0, upgrade.stderr[-2000:]
    check = _flask_db("check", url, tmp_path)
    assert check.returncode == 0, (check.stdout[-2000:], check.stderr[-2000:])
    assert "No new upgrade operations detected" in check.stdout + check.stderr


@pytest.mark.skipif(not PG_URL, reason="PostgreSQL runs only with CHATAPP_TEST_DATABASE_URL")
def test_migrations_match_the_models_on_postgresql(_schema_template, tmp_path):
    check = _flask_db("check", PG_URL, tmp_path)
    assert check.returncode == 0, (check.stdout[-2000:], check.stderr[-2000:])


# ------------------------------------------------------------------ CORS and response headers


def test_no_cors_headers_by_default(client):
    preflight = client.options("/api/v1/user/me", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in preflight.headers
    response = client.get("/api/v1/user/me", headers={"Origin": "https://app.example.com"})
    assert not [name for name in response.headers.keys() if name.lower().startswith("access-control-")]


def test_cors_for_configured_origins_only(make_app):
    client = make_app(CORS_ORIGINS=["https://app.example.com"]).test_client()
    preflight = client.options("/api/v1/user/me", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization, Content-Type, X-Request-ID"})
    assert preflight.status_code in (200, 204)
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert {"authorization", "content-type", "x-request-id"} <= {item.strip() for item in allowed.split(",")}
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    # The actual answer (an error, here) is readable by the page, X-Request-ID included.
    response = client.get("/api/v1/user/me", headers={"Origin": "https://app.example.com"})
    assert_error(response, 401)
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "x-request-id" in response.headers["Access-Control-Expose-Headers"].lower()
    for other in ("https://evil.example.com", "https://app.example.com.evil.example", "null"):
        refused = client.options("/api/v1/user/me", headers={"Origin": other, "Access-Control-Request-Method": "GET"})
        assert "Access-Control-Allow-Origin" not in refused.headers, other
        response = client.get("/api/v1/user/me", headers={"Origin": other})
        assert "Access-Control-Allow-Origin" not in response.headers, other


def test_security_headers_and_no_store(api, alice):
    for response in (api.get("user/me", token=alice.access), api.get("user/me"), api.get("/api/v1/nope"),
                     api.post("user/login", {"email": "a@example.com", "password": "wrong password"})):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "no-store" in response.headers["Cache-Control"]
    probe = api.get("/healthz")
    assert probe.headers["X-Content-Type-Options"] == "nosniff" and probe.headers["X-Request-ID"]
