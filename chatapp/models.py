"""SQLAlchemy 2.0 models. No app config and no commits in here: services own transactions."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, Text, literal_column
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from chatapp.clock import new_id, now
from chatapp.extensions import db

JsonType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator):
    """Stored as naive UTC (SQLite has no time zones), always handed back aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect):
        return value.replace(tzinfo=timezone.utc) if value is not None else None


def _id_column() -> Mapped[str]:
    return mapped_column(String(36), primary_key=True, default=new_id)


def _same_as_created(context) -> datetime:
    """A new row's updated_at is its created_at, not a second clock reading.

    Two readings of the millisecond clock straddle a tick now and then, and a fresh row would then
    look edited a millisecond after it was made. SQLAlchemy fills defaults in column order, so
    created_at (declared first) is already in the parameters here. (A multi-row insert().values([...])
    that leaves created_at out falls back to the clock; nothing here writes rows that way.)
    """
    return context.get_current_parameters().get("created_at") or now()


class User(db.Model):
    __tablename__ = "users"

    id: Mapped[str] = _id_column()
    email: Mapped[str] = mapped_column(String(254), unique=True)  # stored lower-cased
    username: Mapped[str] = mapped_column(String(64))
    password_hash: Mapped[str] = mapped_column(String(255))
    plan: Mapped[str] = mapped_column(String(32))
    # Bumped by a password change: every token carrying an older value is dead at once.
    token_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_same_as_created, onupdate=now)


class AuthSession(db.Model):
    """One login: the spec's revocation table. Its id is the `sid` claim of both tokens of the session."""

    __tablename__ = "auth_sessions"

    id: Mapped[str] = _id_column()
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    refresh_jti: Mapped[str] = mapped_column(String(36))  # the only refresh token of this session still good
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    refreshed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_reason: Mapped[str | None] = mapped_column(String(32))
    user_agent: Mapped[str | None] = mapped_column(String(255))
    ip: Mapped[str | None] = mapped_column(String(64))

    user: Mapped[User] = relationship(lazy="joined", innerjoin=True)


class ModelConfig(db.Model):
    __tablename__ = "model_configs"

    id: Mapped[str] = _id_column()
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    base_url: Mapped[str] = mapped_column(String(2048))
    model: Mapped[str] = mapped_column(String(200))
    api_key_encrypted: Mapped[str | None] = mapped_column(Text)
    api_key_hint: Mapped[str | None] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_same_as_created)

    __table_args__ = (Index("ix_model_configs_user_created", "user_id", "created_at", "id"),)


class Conversation(db.Model):
    __tablename__ = "conversations"

    id: Mapped[str] = _id_column()
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str | None] = mapped_column(String(200))
    model_config_id: Mapped[str | None] = mapped_column(ForeignKey("model_configs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_same_as_created)

    model_config: Mapped[ModelConfig | None] = relationship(lazy="raise")

    # The list is newest activity first with id as tie-break: this index serves it and its cursor.
    __table_args__ = (Index("ix_conversations_user_updated", "user_id", "updated_at", "id"),)


class Message(db.Model):
    __tablename__ = "messages"

    id: Mapped[str] = _id_column()
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[Any] = mapped_column(JsonType)  # a string or OpenAI parts; images as storage keys only
    status: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(200))
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    usage: Mapped[dict | None] = mapped_column(JsonType)
    reasoning_content: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(128))  # which process streams it (for the reaper)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_same_as_created)

    __table_args__ = (Index("ix_messages_conversation_created", "conversation_id", "created_at", "id"),)


# The rows that are streaming: the predicate of the partial index below, and the one expression queries use to
# find them. It is SQL, not a bound value: when a bound value decides whether a partial index applies, SQLite
# prepares the statement again at every execution, and a PostgreSQL generic plan cannot use the index (it scans
# every message), so a prepared statement is planned again each time instead.
IS_STREAMING = Message.__table__.c.status == literal_column("'streaming'")
# At most one reply streams per conversation, decided by the database across all workers.
Index("uq_messages_one_streaming", Message.__table__.c.conversation_id, unique=True,
      sqlite_where=IS_STREAMING, postgresql_where=IS_STREAMING)
