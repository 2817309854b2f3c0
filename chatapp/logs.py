"""JSON log lines that carry the request they belong to.

A before_request hook puts the request's fields into a context variable; a logging filter stamps them
on every record. Context variables follow the greenlet (and `spawn()` copies them into greenlets a
request starts), so lines written while a stream runs carry their own request's ids even with
thousands of requests interleaved in one gevent worker. A redacting formatter is the last line of
defence: whatever a message contains, tokens, passwords and API keys are masked before it is written.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
import uuid
from datetime import date, datetime, timezone
from datetime import time as time_of_day

from pythonjsonlogger.json import JsonFormatter

from chatapp import clock

FIELDS = ("request_id", "trace_id", "client_ip", "method", "path")
_request_fields: contextvars.ContextVar[dict | None] = contextvars.ContextVar("request_fields", default=None)

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_SECRETS = [
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-]+"), r"\1[redacted]"),
    (re.compile(r"eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*"), "[redacted-jwt]"),
    (re.compile(r"\b(sk|rk|pk|ak)-[A-Za-z0-9_\-]{6,}"), "[redacted-key]"),
    (re.compile(r"(?i)([\"']?(?:password|new_password|current_password|api_key|secret|token|authorization)"
                r"[\"']?\s*[:=]\s*)(\"[^\"]*\"|'[^']*'|[^\s,}&]+)"), r"\1[redacted]"),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://[^/\s:@]*:)[^/\s@]+@"), r"\1[redacted]@"),  # user:pass@ in URLs
]
# Structured fields (extra={...}, dict messages) whose name says the value is a secret.
_SECRET_KEY = re.compile(r"(?i)password|api_?key|secret|token|authorization")
_PLAIN = (int, float, bool, type(None), datetime, date, time_of_day)


# Words that every pattern above implies (lower-cased; "k-" stands for the key prefixes): most strings (ids,
# paths, messages) have none and skip the five subs. Substring tests on the lower-cased text take ~2 us for
# a whole log line; one case-insensitive regex alternation took ~28 us.
_MAYBE_SECRET_WORDS = ("bearer", "eyj", "k-", "password", "apikey", "api_key", "secret", "token", "authorization",
                       "://")


def _maybe_secret(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in _MAYBE_SECRET_WORDS)


def redact(text: str) -> str:
    if not _maybe_secret(text):
        return text
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value, key: str = ""):
    if key and _SECRET_KEY.search(key) and value is not None:
        return "[redacted]"
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {name: _redact_value(item, str(name)) for name, item in value.items()}
    if isinstance(value, list | tuple | set):
        return [_redact_value(item) for item in value]
    return value if isinstance(value, _PLAIN) else redact(str(value))


def current(field: str):
    fields = _request_fields.get()
    return fields.get(field) if fields else None


def bind(fields: dict | None) -> contextvars.Token:
    return _request_fields.set(fields)


class RequestContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        fields = _request_fields.get() or {}
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, fields.get(name))
        return True


class RedactingJsonFormatter(JsonFormatter):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("fmt", "%(asctime)s %(levelname)s " + " ".join(f"%({f})s" for f in FIELDS) + " %(message)s")
        kwargs.setdefault("rename_fields", {"asctime": "time", "levelname": "level"})
        kwargs.setdefault("json_ensure_ascii", False)
        super().__init__(*args, **kwargs)

    def formatTime(self, record, datefmt=None):  # logging's method name
        return clock.isoformat(datetime.fromtimestamp(record.created, tz=timezone.utc))

    def format(self, record: logging.LogRecord) -> str:
        # stdout and the log file each format every record: the second handler reuses the first's line.
        line = record.__dict__.get("_chatapp_line")
        if line is None:
            line = super().format(record)
            record._chatapp_line = line
        return line

    def process_log_record(self, log_data: dict) -> dict:
        # Field by field, before serialising: masking the finished JSON text missed secrets inside escaped
        # quotes (a logged JSON body) and could eat a closing quote, leaving a line that is not JSON.
        if _nothing_to_redact(log_data):
            return log_data  # most lines: one search over all names and texts instead of one per field
        return {name: _redact_value(value, name) for name, value in log_data.items()}


def _nothing_to_redact(log_data: dict) -> bool:
    texts = list(log_data)  # the names too: a field named like a secret is masked whatever its value
    for value in log_data.values():
        if type(value) is str:
            texts.append(value)
        elif not isinstance(value, _PLAIN):
            return False  # nested or unusual values take the careful path
    return not _maybe_secret("\n".join(texts))


_HANDLER_MARK = "_chatapp_handler"


def file_handler(path: str) -> logging.Handler:
    """A size-rotated file that gunicorn's master and workers can all append to (rotation under a lock)."""
    from concurrent_log_handler import ConcurrentRotatingFileHandler

    return ConcurrentRotatingFileHandler(path, "a", maxBytes=50 * 1024 * 1024, backupCount=5, encoding="utf-8")


def configure(level: str = "INFO", log_file: str | None = None) -> None:
    """Route the root logger to stdout (and a rotating file) as JSON; safe to call more than once."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file:
        handlers.append(file_handler(log_file))
    for handler in handlers:
        setattr(handler, _HANDLER_MARK, True)
        handler.addFilter(RequestContextFilter())
        handler.setFormatter(RedactingJsonFormatter())
        root.addHandler(handler)
    root.setLevel(level)
    # Werkzeug's own access lines would duplicate ours (and are not JSON); alembic announces its plugins at
    # import in every worker, which says nothing to an operator.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def spawn(function, *args, **kwargs):
    """gevent.spawn that carries the caller's log context into the new greenlet."""
    import gevent

    return gevent.spawn(contextvars.copy_context().run, function, *args, **kwargs)


access_log = logging.getLogger("chatapp.access")


def _start_request() -> None:
    from flask import g, request

    g.request_started = time.perf_counter()
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if _SANE_ID.match(incoming) else uuid.uuid4().hex
    traceparent = _TRACEPARENT.match(request.headers.get("traceparent", "").strip().lower())
    trace_header = request.headers.get("X-Trace-ID", "")
    if traceparent:
        trace_id = traceparent.group(1)
    elif _SANE_ID.match(trace_header):
        trace_id = trace_header
    else:
        trace_id = uuid.uuid4().hex
    bind({"request_id": request_id, "trace_id": trace_id, "client_ip": request.remote_addr,
          "method": request.method, "path": request.path})


def _finish_request(response):
    from flask import g, request

    response.headers["X-Request-ID"] = current("request_id") or ""
    started = g.get("request_started")
    duration_ms = round((time.perf_counter() - started) * 1000, 2) if started else None
    access_log.info("%s %s %s", request.method, request.path, response.status_code,
                    extra={"status": response.status_code, "duration_ms": duration_ms,
                           "streamed": response.is_streamed})
    return response


class _ForgetRequestFields:
    """WSGI middleware: a request's fields live until its response (a stream included) is closed."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        from werkzeug.wsgi import ClosingIterator

        return ClosingIterator(self.wsgi_app(environ, start_response), [lambda: bind(None)])


def init_app(app) -> None:
    configure(app.config["LOG_LEVEL"], app.config.get("LOG_FILE"))
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.wsgi_app = _ForgetRequestFields(app.wsgi_app)
