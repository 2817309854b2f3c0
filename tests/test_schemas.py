"""OutSchema's compiled dump gives exactly what marshmallow's own dump gives, for every response schema."""

from __future__ import annotations

import inspect
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from marshmallow import Schema, fields, post_dump

from chatapp import schemas
from chatapp.schemas import OutSchema

WHEN = datetime(2026, 11, 24, 8, 0, 0, 123456, tzinfo=timezone.utc)
OUT_SCHEMAS = sorted((cls for _, cls in inspect.getmembers(schemas, inspect.isclass)
                      if issubclass(cls, OutSchema) and cls is not OutSchema), key=lambda cls: cls.__name__)


def sample(schema: Schema, variant: int):
    """A value for every field, as a dict or as an object, with None and absent attributes mixed in."""
    values = {}
    for name, field in schema.dump_fields.items():
        if variant == 2 and name.endswith("_at"):
            continue  # absent: marshmallow leaves the key out
        if variant == 1 and field.allow_none:
            values[name] = None
        elif isinstance(field, fields.Nested):
            values[name] = [sample(field.schema, variant)] * 2 if field.many else sample(field.schema, variant)
        elif isinstance(field, fields.List):
            inner = field.inner
            values[name] = ([sample(inner.schema, variant), sample(inner.schema, 1)]
                            if isinstance(inner, fields.Nested) else ["a", "b"])
        elif isinstance(field, schemas.Timestamp):
            values[name] = WHEN
        elif isinstance(field, fields.Boolean):
            values[name] = variant == 0
        elif isinstance(field, fields.Integer):
            values[name] = 42
        elif isinstance(field, fields.Dict):
            values[name] = {"temperature": 0.5, "nested": {"x": [1, 2]}}
        elif isinstance(field, fields.Raw):
            values[name] = [{"type": "text", "text": "hi"}] if variant else "plain"
        else:
            values[name] = f"{name}-value é"
    return values if variant != 1 else SimpleNamespace(**values)


@pytest.mark.parametrize("schema_class", OUT_SCHEMAS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_compiled_dump_matches_marshmallow(schema_class, variant):
    schema = schema_class()
    assert schema._plan() is not None, "every response schema should be plain enough to compile"
    obj = sample(schema, variant)
    assert schema.dump(obj) == Schema.dump(schema, obj)
    assert schema.dump([obj, obj], many=True) == Schema.dump(schema, [obj, obj], many=True)


def test_schemas_with_hooks_or_unknown_fields_fall_back_to_marshmallow():
    class Hooked(OutSchema):
        name = fields.String()

        @post_dump
        def shout(self, data, **kwargs):
            return {"name": data["name"].upper()}

    class Method(OutSchema):
        name = fields.Method("get_name")

        def get_name(self, obj):
            return "from method"

    assert Hooked()._plan() is None and Hooked().dump({"name": "a"}) == {"name": "A"}
    assert Method()._plan() is None and Method().dump({}) == {"name": "from method"}
