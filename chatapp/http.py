"""Rules every request and response follows, whatever the endpoint."""

from __future__ import annotations

from flask import request
from flask.sessions import SessionInterface
from werkzeug.exceptions import RequestEntityTooLarge

from chatapp.errors import ApiError, NotFound

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class NoCookieSessions(SessionInterface):
    """Callers authenticate with bearer tokens; there are no cookie sessions. Flask's default interface
    builds a signing serializer on every request just to find no cookie; this gives Flask its null
    session (which refuses writes) at once."""

    def open_session(self, app, request):
        return None  # Flask then uses make_null_session()

    def save_session(self, app, session, response) -> None:
        return None


# Endpoints whose only write is one statement, atomic by itself, after their reads: a send stores its turn with
# a single INSERT (both rows), and its reply is saved later on a connection of its own.
ONE_STATEMENT_WRITERS = frozenset({"chat.send"})


def without_a_transaction():
    """An authenticated GET, or a send, runs its statements without BEGIN and COMMIT/ROLLBACK.

    On PostgreSQL those are two of the four round trips of a GET /conversation and two of a send's six. Each
    statement still reads one consistent snapshot, as it did inside a READ COMMITTED transaction. The
    isolation level goes back to the default when the connection returns to the pool. (Not registered for
    SQLite: see register_request_rules.)
    """
    if "Authorization" not in request.headers:  # nothing will query: no connection to take
        return
    if request.method == "GET" or request.endpoint in ONE_STATEMENT_WRITERS:
        from chatapp.extensions import db

        db.session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


def check_json_body():
    """Bodies are JSON objects: say so clearly (400/415) instead of a confusing field-by-field 422."""
    if request.method not in _BODY_METHODS or request.path.startswith("/api/v1/storage/"):
        return
    if not request.content_length and "chunked" not in request.headers.get("Transfer-Encoding", "").lower():
        return
    if not request.is_json:
        raise ApiError("unsupported_media_type", "Send the body as application/json.", status=415)
    try:
        body = request.get_json(silent=True)  # reads at most MAX_CONTENT_LENGTH bytes: larger is 413 here
    except RecursionError:
        raise ApiError("malformed_json", "The body is nested too deeply.", status=400) from None
    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if request.content_length is None and limit and len(raw) >= limit:
        # A chunked body has no length to refuse up front, and werkzeug's stream stops quietly at the
        # limit: a body that filled it was cut short, so it is too large, not malformed.
        raise RequestEntityTooLarge()
    if body is None and raw and raw.strip() != b"null":
        raise ApiError("malformed_json", "The body is not valid JSON.", status=400)
    if not isinstance(body, dict):
        if raw:  # a list, a number, a string or null
            raise ApiError("body_not_object", "The body must be a JSON object.", status=400)
        return
    _refuse_unstorable(body.items())


def check_text_params():
    """Path and query values reach the database as text, where NUL or an unpaired surrogate fails the
    statement on PostgreSQL. No id holds one, so such a path id names nothing (404 with the resource's code,
    as for any unknown id), and such a query value is invalid (422, as in a body)."""
    for name, value in (request.view_args or {}).items():
        if name.endswith("_id") and not _storable(value):
            raise NotFound.of(name.removesuffix("_id"))
    _refuse_unstorable(request.args.items(multi=True))


def _refuse_unstorable(fields) -> None:
    """422 naming the first (name, value) pair whose name or value is not storable text."""
    for name, value in fields:
        if not (_storable(name) and _storable(value)):
            raise ApiError("validation_error", "Some fields are invalid.", status=422, details={
                name if _storable(name) else "_schema": ["Text may not contain NUL or unpaired surrogates."]})


def _storable(value) -> bool:
    """NUL and unpaired surrogates are valid JSON escapes but not storable text (PostgreSQL refuses them)."""
    if isinstance(value, str):
        if "\x00" in value:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_storable(key) and _storable(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_storable(item) for item in value)
    return True


def security_headers(response):
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if request.path.startswith("/api/v1/") and response.mimetype == "application/json":
        # Tokens, keys' hints and chat history must not sit in shared or browser caches.
        response.headers.setdefault("Cache-Control", "no-store")
    return response
