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


# ---------------------------------------------------------------- fast responses


_MISSING = object()


def _field_writer(field: fields.Field):
    """value -> JSON value, as marshmallow's field would serialize it, or None when it is not a plain field."""
    kind = type(field)
    if kind is fields.String:
        return lambda value: None if value is None else str(value)
    if kind is fields.Integer:
        return lambda value: None if value is None else int(value)
    if kind is fields.Boolean:
        return lambda value: None if value is None else bool(value)
    if kind is fields.Raw:
        return lambda value: value
    if kind is Timestamp:
        return isoformat
    if kind is fields.Dict and field.key_field is None and field.value_field is None:
        return lambda value: None if value is None else dict(value)
    if kind is fields.Dict and type(field.key_field) is fields.String and type(field.value_field) is fields.String:
        return lambda value: None if value is None else {
            str(key): None if item is None else str(item) for key, item in value.items()}
    if kind is fields.Nested and isinstance(field.schema, OutSchema) and field.schema._plan() is not None:
        inner, many = field.schema._plan(), field.many
        return lambda value: None if value is None else [inner(each) for each in value] if many else inner(value)
    if kind is fields.List:
        inner = _field_writer(field.inner)
        if inner is not None:
            return lambda value: None if value is None else [inner(each) for each in value]
    return None


class OutSchema(Schema):
    """A response schema that also documents the response; dump() skips marshmallow's per-field machinery.

    marshmallow spends ~15 us per field per object (GET /conversation: a third of the request's CPU). For
    schemas made only of plain fields and no hooks, dump() runs a plan compiled once per schema instance
    that gives the same output (tests/test_schemas.py compares both on every *Out schema); anything else
    falls back to marshmallow.
    """

    def _plan(self):
        try:
            return self.__dict__["_compiled"]
        except KeyError:
            pass
        plan = None
        if not any(self._hooks.values()) and not self.only and not self.exclude:
            steps = []
            for name, field in self.dump_fields.items():
                writer = _field_writer(field)
                if writer is None:
                    steps = None
                    break
                steps.append((field.attribute or name, field.data_key or name, writer))
            if steps is not None:
                def plan(obj, steps=tuple(steps)):
                    get = obj.get if isinstance(obj, dict) else lambda attr, default: getattr(obj, attr, default)
                    out = {}
                    for attr, key, writer in steps:
                        value = get(attr, _MISSING)
                        if value is not _MISSING:
                            out[key] = writer(value)
                    return out
        self.__dict__["_compiled"] = plan
        return plan

    def dump(self, obj, *, many: bool | None = None):
        plan = self._plan()
        if plan is None:
            return super().dump(obj, many=many)
        return [plan(each) for each in obj] if (self.many if many is None else many) else plan(obj)


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


class UserOut(OutSchema):
    id = fields.String()
    email = fields.String()
    username = fields.String()
    plan = fields.String()
    created_at = Timestamp()


class TokenPairOut(OutSchema):
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


class ModelConfigOut(OutSchema):
    id = fields.String()
    name = fields.String()
    base_url = fields.String()
    model = fields.String()
    api_key_hint = fields.String(allow_none=True, metadata={"example": "sk-…3f9a"})
    params = fields.Dict()
    created_at = Timestamp()
    updated_at = Timestamp()


class ModelConfigListOut(OutSchema):
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


class CanCreateOut(OutSchema):
    can_create = fields.Boolean()
    count = fields.Integer()
    limit = fields.Integer(allow_none=True)


class IdsIn(Schema):
    ids = _ids()


class DeletedOut(OutSchema):
    deleted = fields.List(fields.String())


# ---------------------------------------------------------------- conversations and chat


class ModelSourceIn(Schema):
    """Where the model comes from: inline base_url + model, else model_config_id, else the conversation's."""

    base_url = Text(max_length=2048)
    model = Text(max_length=200)
    api_key = Secret(allow_none=True, max_length=1024)
    params = fields.Dict(keys=fields.String(), metadata=_PARAMS_DOC)
    model_config_id = fields.String(allow_none=True, validate=validate.Length(1, 64))


class ConversationOut(OutSchema):
    id = fields.String()
    title = fields.String(allow_none=True)
    model_config_id = fields.String(allow_none=True)
    created_at = Timestamp()
    updated_at = Timestamp()


class ConversationPageOut(OutSchema):
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


class TitleOut(OutSchema):
    conversation_id = fields.String()
    title = fields.String()


class UploadUrlIn(Schema):
    conversation_id = fields.String(required=True, validate=validate.Length(1, 64))
    suffixes = fields.List(fields.String(validate=validate.Length(1, 10)), required=True,
                           validate=validate.Length(1, 10))


class UploadUrlOut(OutSchema):
    class Item(OutSchema):
        key = fields.String()
        url = fields.String()
        method = fields.String()
        headers = fields.Dict(keys=fields.String(), values=fields.String())
        expires_in = fields.Integer()

    items = fields.List(fields.Nested(Item))


class HistoryArgs(QuerySchema):
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 500))
    before = fields.String(validate=validate.Length(1, 64))


class MessageOut(OutSchema):
    id = fields.String()
    role = fields.String()
    content = fields.Raw(metadata={"description": "a string or a list of text / image_url parts"})
    status = fields.String(metadata={"enum": ["streaming", "completed", "incomplete", "failed"]})
    model = fields.String(allow_none=True)
    finish_reason = fields.String(allow_none=True)
    usage = fields.Dict(allow_none=True)
    reasoning_content = fields.String(allow_none=True)
    created_at = Timestamp()


class HistoryOut(OutSchema):
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
