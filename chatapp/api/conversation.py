"""Conversations: /api/v1/conversation."""

from __future__ import annotations

from flask import current_app
from flask_jwt_extended import current_user, jwt_required
from flask_smorest import Blueprint

from chatapp.deps import deps, storage
from chatapp.errors import ApiError
from chatapp.extensions import db
from chatapp.llm import LLMError
from chatapp.schemas import (
    ConversationCreateIn,
    ConversationOut,
    ConversationPageOut,
    DeletedOut,
    GenerateTitleIn,
    IdsIn,
    PageArgs,
    TitleOut,
)
from chatapp.services import conversations, model_configs
from chatapp.services.chat import ChatLimits

blp = Blueprint("conversation", __name__, description="Conversations")
ACCESS = [{"access": []}]


@blp.get("")
@jwt_required()
@blp.arguments(PageArgs(), location="query")
@blp.response(200, ConversationPageOut)
@blp.doc(security=ACCESS)
def list_conversations(args):
    """The caller's conversations, newest activity first (cursor pagination)."""
    return conversations.list_page(db.session, current_user.id, limit=args["limit"], cursor=args.get("cursor"))


@blp.post("/create")
@jwt_required()
@blp.arguments(ConversationCreateIn())
@blp.response(201, ConversationOut)
@blp.alt_response(404, description="model_config_not_found")
@blp.doc(security=ACCESS)
def create(data):
    """Start a conversation, optionally bound to one of the caller's model configs."""
    conversation = conversations.create(db.session, current_user.id, data.get("model_config_id"))
    db.session.commit()
    return conversation


@blp.post("/generate_title")
@jwt_required()
@blp.arguments(GenerateTitleIn())
@blp.response(200, TitleOut)
@blp.alt_response(404, description="conversation_not_found")
@blp.alt_response(422, description="validation_error / model_not_configured / model_url_forbidden / invalid_image")
@blp.alt_response(502, description="upstream_error")
@blp.alt_response(504, description="upstream_timeout")
@blp.doc(security=ACCESS)
def generate_title(data):
    """Ask the model for a short title and store it on the conversation."""
    services = deps()
    conversation = conversations.get_owned_conversation(db.session, current_user.id, data["conversation_id"])
    source = model_configs.resolve_source(db.session, services.keyring, services.guard, user_id=current_user.id,
                                          data=data, conversation=conversation)
    user_id, conversation_id = current_user.id, conversation.id
    db.session.commit()  # give the connection back while the model thinks
    try:
        title = conversations.suggest_title(
            services.llm, storage(), user_id=user_id, conversation_id=conversation_id, source=source,
            messages=data["messages"], timeout=current_app.config["LLM_TITLE_TIMEOUT"],
            limits=ChatLimits.from_config(current_app.config))
    except LLMError as error:
        raise ApiError(error.code, error.message, status=error.status) from None
    conversations.save_title(db.session, conversation_id, title)
    db.session.commit()
    return {"conversation_id": conversation_id, "title": title}


@blp.post("/delete")
@jwt_required()
@blp.arguments(IdsIn())
@blp.response(200, DeletedOut)
@blp.doc(security=ACCESS)
def delete(data):
    """Delete conversations with their messages and images; ids that are not the caller's are ignored."""
    deleted = conversations.delete_many(db.session, current_user.id, data["ids"])
    db.session.commit()
    conversations.delete_images(storage(), current_user.id, deleted)
    return {"deleted": deleted}
