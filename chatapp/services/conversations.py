"""Conversations: the newest-first list, creation, batch deletion with images, generated titles."""

from __future__ import annotations

import base64
import json
import logging
import re
from datetime import datetime

from sqlalchemy import and_, bindparam, delete, or_, select, update
from sqlalchemy.orm import Session

from chatapp import clock
from chatapp.errors import NotFound, Unprocessable
from chatapp.llm import LLMClient
from chatapp.models import Conversation, Message
from chatapp.services import content as contents
from chatapp.services.chat import ChatLimits
from chatapp.services.model_configs import ModelSource, get_owned
from chatapp.storage import Storage, StorageError, image_prefix

log = logging.getLogger(__name__)
TITLE_MAX = 60
_QUOTES = "\"'`“”‘’「」『』"
TITLE_PROMPT = ("Write a short title (at most 6 words) for the conversation below, in the conversation's "
                "language. Answer with the title only: no quotes, no prefix, no punctuation at the end.")


def get_owned_conversation(session: Session, user_id: str, conversation_id: str) -> Conversation:
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.user_id != user_id:
        raise NotFound.of("conversation")
    return conversation


def _encode_cursor(conversation: Conversation) -> str:
    raw = json.dumps([conversation.updated_at.isoformat(), conversation.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        moment, last_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(moment), str(last_id)
    except (ValueError, TypeError):
        raise Unprocessable.field("cursor", "Not a cursor this API issued.") from None


def list_page(session: Session, user_id: str, *, limit: int, cursor: str | None) -> dict:
    """Newest activity first, id breaking ties; keyset pagination so pages never skip or repeat."""
    params: dict = {"user_id": user_id, "limit": limit + 1}
    if cursor:
        params["moment"], params["last_id"] = _decode_cursor(cursor)
    rows = session.execute(_LIST_AFTER_CURSOR if cursor else _LIST_FIRST_PAGE, params).all()
    more = len(rows) > limit
    return {"items": rows[:limit], "next_cursor": _encode_cursor(rows[limit - 1]) if more else None}


def _list_statement(after_cursor: bool):
    # Built once, as rows rather than ORM objects: the list is the most frequent call after the session check.
    c = Conversation.__table__.c
    query = select(c.id, c.title, c.model_config_id, c.created_at, c.updated_at).where(
        c.user_id == bindparam("user_id"))
    if after_cursor:
        query = query.where(or_(c.updated_at < bindparam("moment"),
                                and_(c.updated_at == bindparam("moment"), c.id < bindparam("last_id"))))
    return query.order_by(c.updated_at.desc(), c.id.desc()).limit(bindparam("limit"))


_LIST_FIRST_PAGE = _list_statement(after_cursor=False)
_LIST_AFTER_CURSOR = _list_statement(after_cursor=True)


def create(session: Session, user_id: str, model_config_id: str | None) -> Conversation:
    if model_config_id:
        get_owned(session, user_id, model_config_id)
    conversation = Conversation(user_id=user_id, model_config_id=model_config_id)
    session.add(conversation)
    return conversation


def delete_many(session: Session, user_id: str, ids: list[str]) -> list[str]:
    owned = set(session.scalars(select(Conversation.id).where(Conversation.user_id == user_id,
                                                              Conversation.id.in_(set(ids)))))
    if owned:
        session.execute(delete(Message).where(Message.conversation_id.in_(owned)))
        session.execute(delete(Conversation).where(Conversation.id.in_(owned)))
    return [conversation_id for conversation_id in dict.fromkeys(ids) if conversation_id in owned]


def delete_images(storage: Storage, user_id: str, conversation_ids: list[str]) -> None:
    """After the rows are gone: a storage failure leaves orphaned files (logged), never a half-deleted chat."""
    for conversation_id in conversation_ids:
        try:
            storage.delete_prefix(image_prefix(user_id, conversation_id))
        except StorageError:
            log.exception("could not delete the images of conversation %s", conversation_id)


def clean_title(raw: str) -> str:
    """One line, at most 60 characters, without quotes, markdown emphasis or a 'Title:' prefix."""
    line = next((item for item in raw.splitlines() if item.strip()), "")
    line = line.replace("**", "").replace("__", "")  # markdown bold, also around "Title:" ("**Title:** ...")
    line = re.sub(r"^\s*(?:#+\s*)?(?:title|标题)\s*[:：]\s*", "", line, flags=re.I)
    line = re.sub(r"\s+", " ", line)
    # Peel until nothing changes: a period may sit outside the quotes ('"Greeting Chat".'); quotes only
    # come off in pairs, so '"Greeting" Chat' keeps its quotes.
    previous = None
    while line != previous:
        previous = line
        line = line.strip().strip("*_#").rstrip("。.").strip()
        if len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
            line = line[1:-1]
    if len(line) > TITLE_MAX:
        line = line[: TITLE_MAX - 1].rstrip() + "…"
    return line


def title_messages(messages: list[dict], presign) -> list[dict]:
    """The model sees the conversation as one user turn to summarise (long texts cut to keep it cheap)."""
    model_messages = [{"role": "system", "content": TITLE_PROMPT}]
    for message in messages[-20:]:
        content = message["content"]
        if isinstance(content, str):
            content = content[:4000]
        model_messages.append({"role": message.get("role", "user"), "content": contents.to_urls(content, presign)})
    return model_messages


def suggest_title(llm: LLMClient, storage: Storage, *, user_id: str, conversation_id: str, source: ModelSource,
                  messages: list[dict], timeout: float, limits: ChatLimits) -> str:
    """Ask the model; touches no database, so no connection is held while it thinks."""
    stored = [{**message, "content": limits.stored_form(message["content"], storage, user_id=user_id,
                                                        conversation_id=conversation_id)}
              for message in messages]
    presign = _presigner(storage, limits.download_seconds)
    completion = llm.complete(source.base_url, source.api_key, source.model, title_messages(stored, presign),
                              source.params, timeout=timeout)
    return clean_title(completion.text) or clean_title(_first_text(messages)) or "New conversation"


def save_title(session: Session, conversation_id: str, title: str) -> None:
    session.execute(update(Conversation).where(Conversation.id == conversation_id)
                    .values(title=title, updated_at=clock.now()))


def _first_text(messages: list[dict]) -> str:
    for message in messages:
        content = message["content"]
        text = content if isinstance(content, str) else " ".join(
            part["text"] for part in content if part["type"] == "text")
        if text.strip():
            return text
    return ""


def _presigner(storage: Storage, seconds: int):
    return lambda key: storage.presign_download(key, expires_in=seconds)
