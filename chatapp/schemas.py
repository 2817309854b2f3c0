"""Marshmallow schemas: *In validates a request (unknown fields are refused), *Out shapes a response."""

from __future__ import annotations

import unicodedata

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from chatapp.clock import isoformat

# ---------------------------------------------------------------- fields


# Bidi overrides and isolates can make a name display as something else ("Trojan Source"); other format
# characters (ZWJ/ZWNJ in emoji and Indic/Persian text, emoji tag sequences) are legitimate.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _has_control(value: str) -> bool:
    return any(unicodedata.category(char) in {"Cc", "Cs"} or char in _BIDI_CONTROLS for char in value)


class Text(fields.String):
    """A trimmed single-line string without control characters (emoji ZWJ sequences kept intact)."""

    def __init__(self, *, min_length: int = 1, max_length: int = 255, **kwargs):
        self.min_length, self.max_length = min_length, max_length
        super().__init__(**kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs).strip()
        if _has_control(text):
            raise ValidationError("Must not contain control characters.")
        if not self.min_length <= len(text) <= self.max_length:
            raise ValidationError(f"Length must be between {self.min_length} and {self.max_length}.")
        return text


class Email(fields.String):
    def _deserialize(self, value, attr, data, **kwargs):
        email = super()._deserialize(value, attr, data, **kwargs).strip().lower()
        if len(email) > 254:
            raise ValidationError("Must be at most 254 characters.")
        validate.Email(error="Not a valid email address.")(email)
        return email


class Secret(fields.String):
    """Taken as given (no trimming: spaces may be part of a password), bounded."""

    def __init__(self, *, max_length: int = 1024, **kwargs):
        self.max_length = max_length
        super().__init__(**kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(text) > self.max_length:
            raise ValidationError(f"Must be at most {self.max_length} characters.")
        return text


class Timestamp(fields.Field):
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-24T08:00:00.123Z."""

    def _serialize(self, value, attr, obj, **kwargs):
        return isoformat(value)


def _ids(maximum: int = 100):
    return fields.List(fields.String(validate=validate.Length(1, 64)), required=True,
                       validate=validate.Length(1, maximum))


class Content(fields.Field):
    """OpenAI message content: a string, or a list of text / image_url parts."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not 1 <= len(value) <= 50:
            raise ValidationError("Must be a string or a list of 1-50 content parts.")
        for index, part in enumerate(value):
            problem = _part_problem(part)
            if problem:
                raise ValidationError(f"Part {index}: {problem}")
        return value


def _part_problem(part) -> str | None:
    if not isinstance(part, dict):
        return "must be an object."
    if part.get("type") == "text":
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            return 'a text part is {"type": "text", "text": string}.'
        return None
    if part.get("type") == "image_url":
        image = part.get("image_url")
        if (set(part) != {"type", "image_url"} or not isinstance(image, dict)
                or not isinstance(image.get("url"), str) or not set(image) <= {"url", "detail"}
                or image.get("detail", "auto") not in {"auto", "low", "high"}):
            return 'an image part is {"type": "image_url", "image_url": {"url": string, "detail"?}}.'
        if len(image["url"]) > 4096:
            return "image url too long."
        return None
    return 'type must be "text" or "image_url".'


class QuerySchema(Schema):
    class Meta:
        unknown = EXCLUDE  # stray query parameters (cache busters) are harmless


# ---------------------------------------------------------------- users


class UserOut(Schema):
    id = fields.String()
    email = fields.String()
    username = fields.String()
    plan = fields.String()
    created_at = Timestamp()


class TokenPairOut(Schema):
    access_token = fields.String()
    refresh_token = fields.String()
    token_type = fields.String(metadata={"example": "Bearer"})
    expires_in = fields.Integer(metadata={"description": "access token lifetime, seconds"})
    refresh_expires_in = fields.Integer(metadata={"description": "refresh token lifetime, seconds"})
    user = fields.Nested(UserOut)


class RegisterIn(Schema):
    email = Email(required=True)
    username = Text(required=True, max_length=64)
    password = Secret(required=True, max_length=1024)


class LoginIn(Schema):
    email = fields.String(required=True, validate=validate.Length(1, 320))
    password = Secret(required=True)


class UsernameIn(Schema):
    username = Text(required=True, max_length=64)


class EmailIn(Schema):
    email = Email(required=True)


class PasswordChangeIn(Schema):
    current_password = Secret(required=True)
    new_password = Secret(required=True)


# ---------------------------------------------------------------- model configs

_PARAMS_DOC = {"description": "extra OpenAI request fields (temperature, top_p, max_tokens, stop, ...), "
                              "at most 4 KiB; may not set model, messages or stream"}


class ModelConfigOut(Schema):
    id = fields.String()
    name = fields.String()
    base_url = fields.String()
    model = fields.String()
    api_key_hint = fields.String(allow_none=True, metadata={"example": "sk-…3f9a"})
    params = fields.Dict()
    created_at = Timestamp()
    updated_at = Timestamp()


class ModelConfigListOut(Schema):
    items = fields.List(fields.Nested(ModelConfigOut))


class ModelConfigCreateIn(Schema):
    name = Text(required=True, max_length=100)
    base_url = Text(required=True, max_length=2048)
    model = Text(required=True, max_length=200)
    api_key = Secret(allow_none=True, max_length=1024, load_only=True)
    params = fields.Dict(keys=fields.String(), metadata=_PARAMS_DOC)


class ModelConfigUpdateIn(Schema):
    id = fields.String(required=True, validate=validate.Length(1, 64))
    name = Text(max_length=100)
    base_url = Text(max_length=2048)
    model = Text(max_length=200)
    api_key = Secret(allow_none=True, max_length=1024, load_only=True,
                     metadata={"description": "a new key; null removes the stored one"})
    params = fields.Dict(keys=fields.String(), metadata=_PARAMS_DOC)


class CanCreateIn(Schema):
    count = fields.Integer(validate=validate.Range(0, 1_000_000),
                           metadata={"description": "what the client shows; informational only"})


class CanCreateOut(Schema):
    can_create = fields.Boolean()
    count = fields.Integer()
    limit = fields.Integer(allow_none=True)


class IdsIn(Schema):
    ids = _ids()


class DeletedOut(Schema):
    deleted = fields.List(fields.String())


# ---------------------------------------------------------------- conversations and chat


class ModelSourceIn(Schema):
    """Where the model comes from: inline base_url + model, else model_config_id, else the conversation's."""

    base_url = Text(max_length=2048)
    model = Text(max_length=200)
    api_key = Secret(allow_none=True, max_length=1024)
    params = fields.Dict(keys=fields.String(), metadata=_PARAMS_DOC)
    model_config_id = fields.String(allow_none=True, validate=validate.Length(1, 64))


class ConversationOut(Schema):
    id = fields.String()
    title = fields.String(allow_none=True)
    model_config_id = fields.String(allow_none=True)
    created_at = Timestamp()
    updated_at = Timestamp()


class ConversationPageOut(Schema):
    items = fields.List(fields.Nested(ConversationOut))
    next_cursor = fields.String(allow_none=True)


class PageArgs(QuerySchema):
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 200))
    cursor = fields.String(validate=validate.Length(1, 512))


class ConversationCreateIn(Schema):
    model_config_id = fields.String(allow_none=True, validate=validate.Length(1, 64))


class MessageIn(Schema):
    role = fields.String(validate=validate.OneOf(["system", "user", "assistant"]))
    content = Content(required=True)


class GenerateTitleIn(ModelSourceIn):
    conversation_id = fields.String(required=True, validate=validate.Length(1, 64))
    messages = fields.List(fields.Nested(MessageIn), required=True, validate=validate.Length(1, 200))


class TitleOut(Schema):
    conversation_id = fields.String()
    title = fields.String()


class UploadUrlIn(Schema):
    conversation_id = fields.String(required=True, validate=validate.Length(1, 64))
    suffixes = fields.List(fields.String(validate=validate.Length(1, 10)), required=True,
                           validate=validate.Length(1, 10))


class UploadUrlOut(Schema):
    class Item(Schema):
        key = fields.String()
        url = fields.String()
        method = fields.String()
        headers = fields.Dict(keys=fields.String(), values=fields.String())
        expires_in = fields.Integer()

    items = fields.List(fields.Nested(Item))


class HistoryArgs(QuerySchema):
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 500))
    before = fields.String(validate=validate.Length(1, 64))


class MessageOut(Schema):
    id = fields.String()
    role = fields.String()
    content = fields.Raw(metadata={"description": "a string or a list of text / image_url parts"})
    status = fields.String(metadata={"enum": ["streaming", "completed", "incomplete", "failed"]})
    model = fields.String(allow_none=True)
    finish_reason = fields.String(allow_none=True)
    usage = fields.Dict(allow_none=True)
    reasoning_content = fields.String(allow_none=True)
    created_at = Timestamp()


class HistoryOut(Schema):
    items = fields.List(fields.Nested(MessageOut))
    has_more = fields.Boolean()


class SendIn(ModelSourceIn):
    conversation_id = fields.String(required=True, validate=validate.Length(1, 64))
    message = fields.Nested(MessageIn)
    messages = fields.List(fields.Nested(MessageIn), validate=validate.Length(1, 500))

    @validates_schema
    def _one_form(self, data, **kwargs):
        if ("message" in data) == ("messages" in data):
            raise ValidationError("Send exactly one of `message` or `messages`.", "message")
        last = data["message"] if "message" in data else data["messages"][-1]
        if last.get("role", "user") != "user":
            raise ValidationError("The new message must have role `user`.", "message")
