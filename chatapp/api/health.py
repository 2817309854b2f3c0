"""Liveness and readiness probes (no auth)."""

from __future__ import annotations

from flask_smorest import Blueprint
from marshmallow import Schema, fields
from sqlalchemy import text

from chatapp.errors import ServiceUnavailable
from chatapp.extensions import db

blp = Blueprint("health", __name__, description="Probes")


class HealthOut(Schema):
    status = fields.String(metadata={"example": "ok"})
    database = fields.String(metadata={"example": "ok"})


@blp.get("/healthz")
@blp.response(200, HealthOut)
def healthz():
    """The process is up."""
    return {"status": "ok"}


@blp.get("/readyz")
@blp.response(200, HealthOut)
@blp.alt_response(503, description="database_unavailable")
def readyz():
    """The database answers."""
    try:
        db.session.execute(text("SELECT 1"))
    except Exception as error:
        db.session.rollback()
        raise ServiceUnavailable("database_unavailable", "The database is unavailable.") from error
    return {"status": "ok", "database": "ok"}
