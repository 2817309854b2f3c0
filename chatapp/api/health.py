"""Liveness and readiness probes (no auth)."""

from __future__ import annotations

from flask_smorest import Blueprint
from sqlalchemy import text

from chatapp.errors import ServiceUnavailable
from chatapp.extensions import db

blp = Blueprint("health", __name__, description="Probes")


@blp.get("/healthz")
def healthz():
    """The process is up."""
    return {"status": "ok"}


@blp.get("/readyz")
def readyz():
    """The database answers."""
    try:
        db.session.execute(text("SELECT 1"))
    except Exception as error:
        db.session.rollback()
        raise ServiceUnavailable("database_unavailable", "The database is unavailable.") from error
    return {"status": "ok", "database": "ok"}
