"""flask-smorest's Api, answering its own HTTP errors in our error shape, plus shared OpenAPI parts."""

from __future__ import annotations

from flask_smorest import Api
from marshmallow import Schema, fields


class ErrorSchema(Schema):
    code = fields.String(required=True, metadata={"example": "validation_error"})
    message = fields.String(required=True)
    details = fields.Dict(metadata={"description": "for validation_error: {field: [problems]}"})
    request_id = fields.String(allow_none=True)

DESCRIPTION = """\
chatapp: user accounts, per-user OpenAI-compatible model endpoints, conversations and streamed replies.

* Authenticate with `Authorization: Bearer <token>`; endpoints say whether they want the **access** or the
  **refresh** token. A token of the wrong type is a 401.
* Every error has the shape `{"code", "message", "details"?, "request_id"}`.
* `POST /chat/send` answers `text/event-stream` with the events `message.created`, `reasoning.delta`,
  `content.delta`, `error` and `message.completed` (always last, exactly once).
* Beyond the contract: non-JSON bodies are 415, a JSON body that is not an object is 400 `body_not_object`,
  NUL or unpaired surrogates in strings (body or query) are 422, in a path id 404; extra codes `model_config_key_unreadable` (422),
  `too_many_streams` (429), `object_exists` (409), `not_an_image` (415), `storage_full` (507),
  `database_unavailable` and `database_busy` (503), and the stream error `stream_timeout`. A reply cut by a shutdown is
  `incomplete` / `cancelled`. See the README's "Choices where the contract is silent".
* The interactive page at `/api/v1/docs` loads Swagger UI from a CDN (jsDelivr); the JSON document at
  `/api/v1/openapi.json` needs nothing from outside.
"""


class ChatApi(Api):
    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error):
        from chatapp.errors import http_error_response

        return http_error_response(error)


def api_settings() -> dict:
    return {
        "API_TITLE": "chatapp",
        "API_VERSION": "v1",
        "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/api/v1",
        "OPENAPI_JSON_PATH": "openapi.json",
        "OPENAPI_SWAGGER_UI_PATH": "docs",
        "OPENAPI_SWAGGER_UI_URL": "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/",
        "API_SPEC_OPTIONS": {
            "info": {"description": DESCRIPTION},
            "components": {"securitySchemes": {
                "access": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                           "description": "access token"},
                "refresh": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                            "description": "refresh token"},
            }},
        },
    }
