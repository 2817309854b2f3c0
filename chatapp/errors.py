"""One error shape for every failure: {"code", "message", "details", "request_id"}.

Views and services raise ApiError (or a subclass); werkzeug's HTTP errors, flask-smorest's validation
errors, flask-jwt-extended's token errors and anything unexpected are all turned into the same shape
here, so a client never sees an HTML page or a stack trace.
"""

from __future__ import annotations

import logging

from flask import jsonify
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from chatapp import logs

log = logging.getLogger(__name__)

HTTP_CODES = {
    400: ("bad_request", "The request could not be understood."),
    401: ("unauthorized", "Authentication is required."),
    403: ("forbidden", "You are not allowed to do this."),
    404: ("not_found", "There is nothing at this address."),
    405: ("method_not_allowed", "This method is not allowed here."),
    409: ("conflict", "The request conflicts with the current state."),
    413: ("payload_too_large", "The request body is too large."),
    415: ("unsupported_media_type", "Send the body as application/json."),
    422: ("validation_error", "Some fields are invalid."),
    429: ("rate_limited", "Too many requests; try again later."),
    500: ("internal_error", "Something went wrong on our side."),
    502: ("upstream_error", "The model server failed."),
    503: ("service_unavailable", "The service is temporarily unavailable."),
    504: ("upstream_timeout", "The model server did not answer in time."),
}


class ApiError(Exception):
    status = 400

    def __init__(self, code: str, message: str, *, details: dict | None = None,
                 status: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}
        if status is not None:
            self.status = status


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404

    @classmethod
    def of(cls, resource: str) -> NotFound:
        """Missing and foreign resources get this same answer, so ids reveal nothing."""
        return cls(f"{resource}_not_found", f"{resource.replace('_', ' ').capitalize()} not found.")


class Conflict(ApiError):
    status = 409


class Unprocessable(ApiError):
    status = 422

    @classmethod
    def field(cls, field: str, problem: str) -> Unprocessable:
        return cls("validation_error", "Some fields are invalid.", details={field: [problem]})


class TooManyRequests(ApiError):
    status = 429


class ServiceUnavailable(ApiError):
    status = 503


def error_response(status: int, code: str, message: str, details: dict | None = None, headers=None):
    body = {"code": code, "message": message, "request_id": logs.current("request_id")}
    if details is not None:
        body["details"] = details
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _flatten_messages(messages: dict) -> dict:
    """webargs nests errors by location ({"json": {...}}); clients only care about field names."""
    details: dict = {}
    for location_errors in messages.values():
        if isinstance(location_errors, dict):
            for field, problems in location_errors.items():
                details[field] = problems if isinstance(problems, list | dict) else [str(problems)]
        else:
            details.setdefault("_schema", []).extend(location_errors)
    return details


def http_error_response(error: HTTPException):
    status = error.code or 500
    code, message = HTTP_CODES.get(status, ("http_error", error.name))
    details = None
    data = getattr(error, "data", None) or {}
    if status == 422:
        details = _flatten_messages(data.get("messages", {})) or {"_schema": ["Invalid input."]}
    if status == 429:
        message = f"Too many requests ({error.description}); try again later."
    headers = {}
    for name, value in error.get_headers() if status in (405, 429) else []:
        if name.lower() in {"allow", "retry-after"}:
            headers[name] = value
    return error_response(status, code, message, details, headers)


def handle_api_error(error: ApiError):
    return error_response(error.status, error.code, error.message, error.details, error.headers)


# What a driver says when the database cannot be reached (PostgreSQL) or opened / is busy for too long (SQLite).
_OUTAGE_WORDS = ("connect", "unable to open database", "database is locked")


def handle_database_error(error: DBAPIError):
    # A lost connection is an outage, not a bug: answer 503 so clients retry. The pool recovers by itself
    # (the failed connection invalidates it, and idle connections are checked before use).
    reason = str(error.orig).lower()
    if error.connection_invalidated or any(word in reason for word in _OUTAGE_WORDS):
        log.warning("database unavailable: %s", type(error.orig).__name__)
        return error_response(503, "database_unavailable", "The database is unavailable; try again shortly.")
    return handle_unexpected(error)


def handle_pool_timeout(_error: PoolTimeout):
    # Every pooled connection is busy (a load spike): a short wait and a retry will do.
    log.warning("database connection pool exhausted")
    return error_response(503, "database_busy", "The server is busy; try again in a moment.",
                          headers={"Retry-After": "1"})


def handle_unexpected(error: Exception):
    if isinstance(error, HTTPException):
        return http_error_response(error)
    log.exception("unhandled error")
    return error_response(500, "internal_error", "Something went wrong on our side.")


def init_app(app) -> None:
    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(HTTPException, http_error_response)
    app.register_error_handler(DBAPIError, handle_database_error)
    app.register_error_handler(PoolTimeout, handle_pool_timeout)
    app.register_error_handler(Exception, handle_unexpected)
