"""Per-user model endpoints: /api/v1/model_config."""

from __future__ import annotations

from flask_jwt_extended import current_user, get_jwt, jwt_required
from flask_smorest import Blueprint

from chatapp.deps import deps
from chatapp.extensions import db
from chatapp.schemas import (
    CanCreateIn,
    CanCreateOut,
    DeletedOut,
    IdsIn,
    ModelConfigCreateIn,
    ModelConfigListOut,
    ModelConfigOut,
    ModelConfigUpdateIn,
)
from chatapp.services import model_configs

blp = Blueprint("model_config", __name__, description="Model endpoints (API keys are write-only)")
ACCESS = [{"access": []}]


@blp.get("")
@jwt_required()
@blp.response(200, ModelConfigListOut)
@blp.doc(security=ACCESS)
def list_configs():
    """The caller's model configs (not paged: the plan bounds how many there are)."""
    return {"items": model_configs.list_configs(db.session, current_user.id)}


@blp.post("/can_create")
@jwt_required()
@blp.arguments(CanCreateIn())
@blp.response(200, CanCreateOut)
@blp.doc(security=ACCESS)
def can_create(_data):
    """Whether the token's plan allows one more config; `count` is the server's own count."""
    allowed, count, limit = model_configs.creation_verdict(db.session, current_user.id, get_jwt())
    return {"can_create": allowed, "count": count, "limit": limit}


@blp.post("/create")
@jwt_required()
@blp.arguments(ModelConfigCreateIn())
@blp.response(201, ModelConfigOut)
@blp.alt_response(403, description="model_config_limit_reached / forbidden")
@blp.alt_response(422, description="validation_error / model_url_forbidden")
@blp.doc(security=ACCESS)
def create(data):
    """Create a model config."""
    services = deps()
    config = model_configs.create(db.session, services.keyring, services.guard, user_id=current_user.id,
                                  claims=get_jwt(), data=data)
    db.session.commit()
    return config


@blp.post("/update")
@jwt_required()
@blp.arguments(ModelConfigUpdateIn())
@blp.response(200, ModelConfigOut)
@blp.alt_response(404, description="model_config_not_found")
@blp.doc(security=ACCESS)
def update(data):
    """Change some fields of a config; omitted fields stay as they are."""
    services = deps()
    config = model_configs.update(db.session, services.keyring, services.guard, user_id=current_user.id,
                                  data=data)
    db.session.commit()
    return config


@blp.post("/delete")
@jwt_required()
@blp.arguments(IdsIn())
@blp.response(200, DeletedOut)
@blp.doc(security=ACCESS)
def delete(data):
    """Delete configs by id; ids that are not the caller's are ignored."""
    deleted = model_configs.delete_many(db.session, current_user.id, data["ids"])
    db.session.commit()
    return {"deleted": deleted}
