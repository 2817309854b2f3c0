"""Rules every request and response follows, whatever the endpoint."""

from __future__ import annotations

from flask import request

from chatapp.errors import ApiError

_BODY_METHODS = {"POST", "PUT", "PATCH"}


def check_json_body():
    """Bodies are JSON objects: say so clearly (400/415) instead of a confusing field-by-field 422."""
    if request.method not in _BODY_METHODS or request.path.startswith("/api/v1/storage/"):
        return
    if not request.content_length and "chunked" not in request.headers.get("Transfer-Encoding", "").lower():
        return
    if not request.is_json:
        raise ApiError("unsupported_media_type", "Send the body as application/json.", status=415)
    body = request.get_json(silent=True)  # reads at most MAX_CONTENT_LENGTH bytes: larger is 413 here
    if body is None and request.get_data(cache=True):
        raise ApiError("malformed_json", "The body is not valid JSON.", status=400)
    if body is not None and not isinstance(body, dict):
        raise ApiError("body_not_object", "The body must be a JSON object.", status=400)


def security_headers(response):
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if request.path.startswith("/api/v1/") and response.mimetype == "application/json":
        # Tokens, keys' hints and chat history must not sit in shared or browser caches.
        response.headers.setdefault("Cache-Control", "no-store")
    return response
