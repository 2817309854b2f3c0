"""Chat: /api/v1/chat — upload URLs, history, and the streamed `send`."""

from __future__ import annotations

from flask import current_app, request
from flask_jwt_extended import current_user, jwt_required
from flask_smorest import Blueprint

from chatapp import sse
from chatapp.deps import deps, storage
from chatapp.errors import Unprocessable
from chatapp.extensions import db
from chatapp.schemas import HistoryArgs, HistoryOut, SendIn, UploadUrlIn, UploadUrlOut
from chatapp.services import chat, conversations, model_configs
from chatapp.storage import IMAGE_SUFFIXES, content_type_for, make_image_key

blp = Blueprint("chat", __name__, description="Images, history and streamed replies")
ACCESS = [{"access": []}]

SSE_DOC = {
    "description": "text/event-stream: message.created, reasoning.delta*, content.delta*, error?, "
                   "message.completed (always last, exactly once); `: ping` comments during silence",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


@blp.post("/get_upload_presigned_url")
@jwt_required()
@blp.arguments(UploadUrlIn())
@blp.response(200, UploadUrlOut)
@blp.alt_response(404, description="conversation_not_found")
@blp.doc(security=ACCESS)
def get_upload_presigned_url(data):
    """Presigned PUT URLs for images; keys are made by the server under the caller's conversation."""
    suffixes = [suffix.lower().lstrip(".") for suffix in data["suffixes"]]
    bad = sorted({suffix for suffix in suffixes if suffix not in IMAGE_SUFFIXES})
    if bad:
        raise Unprocessable.field("suffixes", f"Not an accepted image type: {', '.join(bad)} "
                                              f"(accepted: {', '.join(IMAGE_SUFFIXES)}).")
    conversation = conversations.get_owned_conversation(db.session, current_user.id, data["conversation_id"])
    backend, config = storage(), current_app.config
    items = []
    for suffix in suffixes:
        key = make_image_key(current_user.id, conversation.id, suffix)
        upload = backend.presign_upload(key, content_type_for(key), config["UPLOAD_MAX_BYTES"],
                                        config["UPLOAD_URL_SECONDS"])
        items.append(upload.as_dict())
    return {"items": items}


@blp.get("/<conversation_id>")
@jwt_required()
@blp.arguments(HistoryArgs(), location="query")
@blp.response(200, HistoryOut)
@blp.alt_response(404, description="conversation_not_found / message_not_found")
@blp.doc(security=ACCESS)
def get_history(args, conversation_id):
    """Messages, oldest first: the newest `limit` before `before`; images as fresh download URLs."""
    return chat.history(db.session, storage(), user_id=current_user.id, conversation_id=conversation_id,
                        limit=args["limit"], before=args.get("before"),
                        download_seconds=current_app.config["DOWNLOAD_URL_SECONDS"])


@blp.post("/send")
@jwt_required()
@blp.arguments(SendIn())
@blp.alt_response(404, description="conversation_not_found / model_config_not_found")
@blp.alt_response(409, description="conversation_busy: a reply is streaming here (the model is not asked; a send "
                                    "that loses a race has its model request cancelled)")
@blp.alt_response(429, description="too_many_streams (CHATAPP_STREAMS_PER_USER)")
@blp.alt_response(422, description="validation_error / model_not_configured / model_url_forbidden / invalid_image")
@blp.doc(security=ACCESS, responses={200: SSE_DOC})
def send(data):
    """Store the user's message and stream the model's reply as Server-Sent Events."""
    services, config = deps(), current_app.config
    target = chat.load_for_send(db.session, current_user.id, data["conversation_id"],
                                config_id=data.get("model_config_id"), max_streams=config["STREAMS_PER_USER"],
                                context_messages=0 if "messages" in data else config["CONTEXT_MAX_MESSAGES"])
    source = model_configs.resolve_source(db.session, services.keyring, services.guard, user_id=current_user.id,
                                          data=data, conversation=target, loaded=target.config)
    limits = chat.ChatLimits.from_config(config)
    turn = chat.prepare_turn(storage(), target=target, source=source, data=data, limits=limits)
    # The model is asked first, from its own greenlet, and thinks while the turn is stored (chat.open_upstream),
    # unless the conversation looks busy (then the store step answers 409, or reaps a dead stream first, and
    # the model is asked only after it).
    opening = None if target.busy else chat.open_upstream(turn, services.llm)
    try:
        chat.store_turn(db.session, turn, limits)
    except BaseException:
        if opening is not None:
            chat.cancel_opening(opening)
        raise
    if opening is None:  # (not `opening or ...`: a Greenlet that already finished is falsy)
        opening = chat.open_upstream(turn, services.llm)
    engine = db.engine
    db.session.remove()  # the stream must not hold a connection while it waits on the model
    return sse.response(chat.relay(turn, opening, engine,
                                   chat.RelaySettings.from_config(config),
                                   client_socket=request.environ.get("gunicorn.socket")))
