"""Chat: history, and `send`, which stores the turn and relays the model's reply as SSE events.

The relay never holds a database connection while it waits on the model: the user message and an
empty assistant message (status `streaming`) are committed before the model is called, and one
UPDATE at the end stores what arrived, on every way out (done, upstream error, client gone,
worker shutting down). A unique partial index allows one `streaming` row per conversation, so a
second send is refused (409) by the database itself, across all workers.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import gevent
from gevent import Greenlet, GreenletExit
from sqlalchemy import (
    Engine,
    Row,
    String,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal_column,
    tuple_,
    update,
)
from sqlalchemy import select as select_rows
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from chatapp import clock, logs, sse
from chatapp.errors import Conflict, NotFound, TooManyRequests
from chatapp.llm import ChatStream, ContentDelta, LLMClient, LLMError, ReasoningDelta
from chatapp.models import IS_STREAMING, Conversation, Message, ModelConfig
from chatapp.services import content as contents
from chatapp.services.model_configs import ModelSource, StoredConfig
from chatapp.storage import Storage

log = logging.getLogger(__name__)
STALE_GRACE_SECONDS = 60
SAVE_ATTEMPTS = 4  # about 3 s of retries when the database is briefly busy or restarting


@dataclass(frozen=True)
class ChatLimits:
    context_messages: int
    context_chars: int
    message_chars: int
    message_images: int
    check_exists: bool
    download_seconds: int
    upload_max_bytes: int
    stream_max_seconds: float = 1800

    @classmethod
    def from_config(cls, config: dict) -> ChatLimits:
        return cls(config["CONTEXT_MAX_MESSAGES"], config["CONTEXT_MAX_CHARS"], config["MESSAGE_MAX_CHARS"],
                   config["MESSAGE_MAX_IMAGES"], config["STORAGE_CHECK_EXISTS"], config["DOWNLOAD_URL_SECONDS"],
                   config["UPLOAD_MAX_BYTES"], config["STREAM_MAX_SECONDS"])

    def stored_form(self, content, storage: Storage, *, user_id: str, conversation_id: str):
        """Checked against the limits, image URLs reduced to keys this user may use in this conversation."""
        contents.check_limits(content, max_chars=self.message_chars, max_images=self.message_images)
        return contents.to_keys(content, storage, user_id=user_id, conversation_id=conversation_id,
                                check_exists=self.check_exists, max_bytes=self.upload_max_bytes)


# ------------------------------------------------------------------ history


def history(session: Session, storage: Storage, *, user_id: str, conversation_id: str, limit: int,
            before: str | None, download_seconds: int) -> dict:
    """The newest `limit` messages before `before`, oldest first, images as fresh download URLs."""
    params = {"user_id": user_id, "conversation_id": conversation_id, "limit": limit + 1, "before": before}
    rows = session.execute(_HISTORY_BEFORE if before else _HISTORY_NEWEST, params).all()
    if not rows:  # an empty page, or nothing to page: a second, small statement tells which
        found = session.execute(_HISTORY_FOUND, params).one()
        if not found.conversation:
            raise NotFound.of("conversation")
        if before and not found.anchor:
            raise NotFound.of("message")
    presign = _presigner(storage, download_seconds)
    items = [message_view(message, presign) for message in reversed(rows[:limit])]
    return {"items": items, "has_more": len(rows) > limit}


def _history_statements():
    # Built once, as rows rather than ORM objects: a page is up to 500 messages, and loading each as an
    # instance, with the conversation from session.get before them, was about 40 % of a GET /chat/<id>.
    # The ownership check rides along as an uncorrelated EXISTS (evaluated once), so a page is one statement
    # that still reads the newest messages straight off ix_messages_conversation_created, stopping at the limit.
    c, m = Conversation.__table__.c, Message.__table__.c
    anchor = Message.__table__.alias("anchor")
    owned = exists().where(c.id == bindparam("conversation_id"), c.user_id == bindparam("user_id"))
    is_anchor = (anchor.c.id == bindparam("before"), anchor.c.conversation_id == bindparam("conversation_id"))
    # NULL, so no row, unless `before` names a message of this conversation.
    moment = select_rows(anchor.c.created_at).where(*is_anchor).scalar_subquery()
    newest = (select_rows(m.id, m.role, m.content, m.status, m.model, m.finish_reason, m.usage, m.reasoning_content,
                          m.created_at)
              .where(m.conversation_id == bindparam("conversation_id"), owned)
              .order_by(m.created_at.desc(), m.id.desc()).limit(bindparam("limit")))
    # A row-value comparison, so both databases start the index scan at the anchor instead of walking to it.
    before = newest.where(tuple_(m.created_at, m.id) < tuple_(moment, bindparam("before")))
    return newest, before, select_rows(owned.label("conversation"), exists().where(*is_anchor).label("anchor"))


_HISTORY_NEWEST, _HISTORY_BEFORE, _HISTORY_FOUND = _history_statements()


def message_view(message: Row, presign: Callable[[str], str]) -> dict:
    """A stored message (a row of the history statement) as the API shows it."""
    return {
        "id": message.id, "role": message.role, "content": contents.to_urls(message.content, presign),
        "status": message.status, "model": message.model, "finish_reason": message.finish_reason,
        "usage": message.usage, "reasoning_content": message.reasoning_content, "created_at": message.created_at,
    }


def _presigner(storage: Storage, seconds: int) -> Callable[[str], str]:
    return lambda key: storage.presign_download(key, expires_in=seconds)


# ------------------------------------------------------------------ send: before the stream


@dataclass(frozen=True)
class SendTarget:
    """What one send needs from the database, read in one statement."""

    conversation_id: str
    user_id: str
    model_config_id: str | None
    busy: bool  # a reply is streaming here already (maybe a stale one the store step will reap)
    config: StoredConfig | None  # the config the send names (or the conversation's), if it is the caller's
    context: list[dict] = field(repr=False)  # stored messages, newest first (up to the context limit)


def load_for_send(session: Session, user_id: str, conversation_id: str, *, config_id: str | None,
                  max_streams: int, context_messages: int) -> SendTarget:
    """The conversation, its model config, the newest stored messages and the user's running streams: one
    statement, a row per context message (one row when there are none)."""
    rows = session.execute(_LOAD_FOR_SEND, {"user_id": user_id, "conversation_id": conversation_id,
                                            "config_id": config_id, "context": context_messages}).all()
    if not rows:
        raise NotFound.of("conversation")
    first = rows[0]
    if first.running >= max_streams:
        raise TooManyRequests("too_many_streams", f"At most {max_streams} replies may stream at once; "
                              "wait for one to finish.", headers={"Retry-After": "1"})
    config = None
    if first.config_id is not None:
        config = StoredConfig(first.config_id, first.user_id, first.config_base_url, first.config_model,
                              first.config_api_key_encrypted, first.config_params)
    context = [{"role": row.role, "content": row.content} for row in rows if row.role is not None]
    return SendTarget(first.id, first.user_id, first.model_config_id, bool(first.busy), config, context)


def _load_for_send_statement():
    c, mc, m = Conversation.__table__.c, ModelConfig.__table__.c, Message.__table__.c
    # Counted from the (partial-indexed, short) list of streaming rows, each looked up by primary key: a join
    # from the user's conversations would visit every conversation the user ever had (thousands, growing).
    owner = Conversation.__table__.alias("owner")
    running = (select_rows(func.count()).select_from(Message.__table__)
               .where(IS_STREAMING,
                      select_rows(owner.c.user_id).where(owner.c.id == m.conversation_id).scalar_subquery()
                      == bindparam("user_id"))
               .scalar_subquery())
    busy = (select_rows(func.count()).select_from(Message.__table__)
            .where(m.conversation_id == bindparam("conversation_id"), IS_STREAMING).scalar_subquery())
    # The two statuses as SQL literals: in_() of Python values is an "expanding" parameter, which SQLAlchemy
    # renders into the SQL text again at every execution (~35 us, half of this statement's cost on SQLite).
    stored = (literal_column("'completed'"), literal_column("'incomplete'"))
    newest = (select_rows(m.id).where(m.conversation_id == bindparam("conversation_id"), m.status.in_(stored))
              .order_by(m.created_at.desc(), m.id.desc()).limit(bindparam("context")))
    return (select_rows(c.id, c.user_id, c.model_config_id, running.label("running"), busy.label("busy"),
                        mc.id.label("config_id"), mc.base_url.label("config_base_url"),
                        mc.model.label("config_model"), mc.api_key_encrypted.label("config_api_key_encrypted"),
                        mc.params.label("config_params"), m.role, m.content)
            .select_from(Conversation.__table__
                         .outerjoin(ModelConfig.__table__,
                                    and_(mc.id == func.coalesce(bindparam("config_id", type_=String), c.model_config_id),
                                         mc.user_id == c.user_id))
                         .outerjoin(Message.__table__, m.id.in_(newest)))
            .where(c.id == bindparam("conversation_id"), c.user_id == bindparam("user_id"))
            .order_by(m.created_at.desc(), m.id.desc()))


_LOAD_FOR_SEND = _load_for_send_statement()


@dataclass
class PreparedTurn:
    conversation_id: str
    user_message_id: str
    assistant_message_id: str
    source: ModelSource
    model_messages: list[dict] = field(repr=False)
    rows: list[dict] = field(repr=False)  # the two rows of _INSERT_TURN


def prepare_turn(storage: Storage, *, target: SendTarget, source: ModelSource, data: dict,
                 limits: ChatLimits) -> PreparedTurn:
    """Everything that can fail as a JSON error (but a busy conversation) happens here; nothing is written."""
    new_message = data["message"] if "message" in data else data["messages"][-1]
    sent_context = [] if "message" in data else data["messages"][:-1]

    def stored_form(content):
        return limits.stored_form(content, storage, user_id=target.user_id, conversation_id=target.conversation_id)

    user_content = stored_form(new_message["content"])
    context = ([{"role": item.get("role", "user"), "content": stored_form(item["content"])} for item in sent_context]
               if "messages" in data else _fitting_context(target.context, limits))

    user_id, assistant_id = clock.new_id(), clock.new_id()
    now = clock.now()  # one moment for both rows: their ids (UUIDv7, increasing) order them
    shared = {"conversation_id": target.conversation_id, "created_at": now, "updated_at": now,
              "finish_reason": None, "reasoning_content": None, "error_code": None}
    rows = [{**shared, "id": user_id, "role": "user", "content": user_content, "status": "completed",
             "model": None, "worker": None},
            {**shared, "id": assistant_id, "role": "assistant", "content": "", "status": "streaming",
             "model": source.model, "worker": clock.process_tag()}]
    presign = _presigner(storage, limits.download_seconds)
    model_messages = [{"role": item["role"], "content": contents.to_urls(item["content"], presign)}
                      for item in [*context, {"role": "user", "content": user_content}]]
    return PreparedTurn(target.conversation_id, user_id, assistant_id, source, model_messages, rows)


def store_turn(session: Session, turn: PreparedTurn, limits: ChatLimits) -> None:
    """Commit the user message and the `streaming` reply row (409 while another reply streams here)."""
    _insert_turn(session, turn.conversation_id, turn.rows,
                 stale_after=limits.stream_max_seconds + STALE_GRACE_SECONDS)


def _fitting_context(newest_first: list[dict], limits: ChatLimits) -> list[dict]:
    """The newest stored messages that fit the budget, oldest first; failed and empty replies left out."""
    context, budget = [], limits.context_chars
    for item in newest_first:
        budget -= contents.text_length(item["content"])
        if budget < 0:
            break
        if item["content"]:
            context.append(item)
    return context[::-1]


def _insert_turn(session: Session, conversation_id: str, rows: list[dict], *, stale_after: float) -> None:
    # One INSERT for both rows; conversations.updated_at follows by itself (a database trigger, migration 0002).
    for attempt in range(2):
        try:
            session.execute(_INSERT_TURN, rows).all()
            session.commit()
            return
        except IntegrityError:
            # On PostgreSQL a send runs in autocommit (http.without_a_transaction); the rollback hands that
            # connection back, so the reaper's SELECT and UPDATE and the retry run in a transaction of their own.
            session.rollback()
            # Another reply is streaming here, unless its worker died (or, alive, outlived the stream limit
            # without saving, e.g. the final UPDATE failed): then free the conversation once.
            if attempt or not reap_stale_streams(session, conversation_id=conversation_id,
                                                 max_age_seconds=stale_after):
                raise Conflict("conversation_busy", "A reply is still streaming in this conversation.") from None
            session.commit()


# ------------------------------------------------------------------ send: the stream


@dataclass
class Outcome:
    """What the stream collected; saved on every way out."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    status: str = "incomplete"
    finish_reason: str | None = "cancelled"
    usage: dict | None = None
    error: LLMError | None = None


class _RelayControl:
    """A running relay's stop switch, flipped from outside its greenlet (client watcher, worker shutdown).

    A stop kills the request to the model while it is being opened, or interrupts the upstream read
    (socket shutdown) once it streams, so the relay's loop sees `reason` at once.
    """

    __slots__ = ("opening", "reason", "stream")

    def __init__(self, opening: Greenlet) -> None:
        self.opening: Greenlet | None = opening
        self.reason: str | None = None
        self.stream: ChatStream | None = None

    def stop(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        if self.stream is not None:
            self.stream.interrupt()
        elif self.opening is not None:
            self.opening.kill(block=False)


_running: set[_RelayControl] = set()  # this worker's running relays, for end_all_streams()


def end_all_streams() -> int:
    """Worker shutdown: every running relay saves what it has (incomplete) and ends its stream properly."""
    for control in list(_running):
        control.stop("shutdown")
    return len(_running)


@dataclass(frozen=True)
class RelaySettings:
    ping_seconds: float
    max_seconds: float

    @classmethod
    def from_config(cls, config: dict) -> RelaySettings:
        return cls(config["SSE_PING_SECONDS"], config["STREAM_MAX_SECONDS"])


def open_upstream(turn: PreparedTurn, llm: LLMClient) -> Greenlet:
    """Send the turn to the model from a short-lived greenlet, and let it run at once: the request leaves
    before the turn is stored (the model's first token is the longest wait of a send), then the greenlet
    waits on the model's answer while the caller stores the turn. Its value: the open ChatStream, or the
    LLMError it met."""
    source = turn.source

    def opening():
        try:
            return llm.open_stream(source.base_url, source.api_key, source.model, turn.model_messages,
                                   source.params)
        except Exception as error:  # noqa: BLE001 - handed to the relay, which ends the stream with it
            return error if isinstance(error, LLMError) else _unexpected(error, "opening the model's stream")

    greenlet = logs.spawn(opening)
    # Without this the request would leave only when the caller first waits: on PostgreSQL during the INSERT,
    # on SQLite (whose calls never yield) only once the response starts, after the commit.
    gevent.sleep(0)
    return greenlet


def _unexpected(error: Exception, doing: str) -> LLMError:
    """A bug must still end the stream cleanly: logged with its traceback, told to the client as an upstream error."""
    log.error("%s failed", doing, exc_info=error)
    return LLMError("upstream_error", "The reply could not be read.")


def cancel_opening(opening: Greenlet) -> None:
    """The turn will not be relayed: stop the request to the model, or close the stream it opened."""
    opening.kill(block=True, timeout=2)
    if isinstance(opening.value, ChatStream):
        opening.value.close()


def relay(turn: PreparedTurn, opening: Greenlet, engine: Engine, settings: RelaySettings,
          client_socket: socket.socket | None = None) -> Iterator[bytes]:
    """The SSE byte stream for one turn. Closing it (the client left) stops the upstream at once.

    One greenlet does it all: it reads the upstream with a timeout of at most the ping interval, so
    silence turns into pings, and writes each read's events in one piece.
    """
    ids = {"conversation_id": turn.conversation_id, "user_message_id": turn.user_message_id,
           "assistant_message_id": turn.assistant_message_id}
    outcome = Outcome()
    control = _RelayControl(opening)
    watcher = _watch_client(client_socket, control) if client_socket is not None else None
    deadline = time.monotonic() + settings.max_seconds
    _running.add(control)
    try:
        yield sse.event("message.created", ids)
        opened = opening.get()  # a ChatStream, an LLMError, or GreenletExit when a stop killed the request
        control.opening = None
        if isinstance(opened, Exception):
            raise opened
        control.stream = stream = opened if isinstance(opened, ChatStream) else None
        while stream is not None and control.reason is None and not stream.finished:
            wait = min(settings.ping_seconds, deadline - time.monotonic())
            if wait <= 0:
                outcome.error = LLMError("stream_timeout", "The reply took longer than the server allows.")
                break
            events = stream.read(wait)
            if control.reason is not None:
                break
            if events is None:
                yield sse.PING
                continue
            out = []
            for item in events:
                if type(item) is ContentDelta:
                    text = _storable_text(item.text)
                    outcome.content.append(text)
                    out.append(sse.delta("content.delta", text))
                elif type(item) is ReasoningDelta:
                    text = _storable_text(item.text)
                    outcome.reasoning.append(text)
                    out.append(sse.delta("reasoning.delta", text))
                else:
                    outcome.status, outcome.finish_reason, outcome.usage = "completed", item.reason or "stop", item.usage
            if out:
                yield out[0] if len(out) == 1 else b"".join(out)
    except LLMError as error:
        if control.reason is None:  # not the read we interrupted ourselves
            outcome.error = error
    except GeneratorExit:
        control.reason = "client_gone"  # gunicorn closes us when a write fails: the client has gone
        raise
    except GreenletExit:
        # The worker is stopping: past its graceful timeout gunicorn kills the handlers. Save what arrived
        # (incomplete, the Outcome default) and still end the stream, so the client knows where it stopped.
        pass
    except Exception as error:  # noqa: BLE001 - saved with what came, and the stream still ends properly
        outcome.error = _unexpected(error, "relay")
    finally:
        _running.discard(control)
        if watcher is not None:
            watcher.close()
        # Stop reading first, so what is saved is final and the upstream sees the disconnect now.
        if control.stream is not None:
            control.stream.close()
        elif control.opening is not None:
            cancel_opening(control.opening)
        if outcome.error is not None:
            outcome.status, outcome.finish_reason = "failed", "error"
        elif control.reason == "client_gone" and outcome.status != "completed":
            outcome.status, outcome.finish_reason = "incomplete", "cancelled"
        _save(engine, turn, outcome)
    if control.reason != "client_gone":
        if outcome.error is not None:
            yield sse.event("error", {"code": outcome.error.code, "message": outcome.error.message})
        yield sse.event("message.completed", {**ids, "status": outcome.status,
                                              "finish_reason": outcome.finish_reason, "usage": outcome.usage})


def _storable_text(text: str) -> str:
    """An upstream's JSON may hold a lone surrogate ("\\ud83d", half an emoji split across chunks) or a NUL:
    the first cannot be sent as UTF-8 (it would break the stream), neither can be stored by PostgreSQL (the
    reply would be lost), so both become U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text.replace("\x00", "\ufffd")


class _ClientWatch:
    """Notices a client that hung up while the model is silent (otherwise only the next write would).

    A bare event-loop watcher on the client's socket rather than a greenlet: it costs no stack per stream.
    """

    __slots__ = ("_control", "_socket", "_watcher")

    def __init__(self, client_socket: socket.socket, control: _RelayControl) -> None:
        self._socket, self._control = client_socket, control
        self._watcher = gevent.get_hub().loop.io(client_socket.fileno(), 1)
        self._watcher.start(self._readable)

    def _readable(self) -> None:
        try:
            gone = self._socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return
        except OSError:
            gone = True
        self._watcher.stop()  # gone, or the client sent something: either way, nothing more to watch
        if gone:
            self._control.stop("client_gone")

    def close(self) -> None:
        self._watcher.stop()
        self._watcher.close()


def _watch_client(client_socket: socket.socket, control: _RelayControl) -> _ClientWatch | None:
    try:
        return _ClientWatch(client_socket, control)
    except (OSError, ValueError):  # a socket already closed: the first write will tell
        return None


def _save(engine: Engine, turn: PreparedTurn, outcome: Outcome) -> None:
    values = {
        "message_id": turn.assistant_message_id,
        "content": "".join(outcome.content), "reasoning_content": "".join(outcome.reasoning) or None,
        "status": outcome.status, "finish_reason": outcome.finish_reason, "usage": outcome.usage,
        "error_code": outcome.error.code if outcome.error else None, "updated_at": clock.now(),
    }
    for attempt in range(SAVE_ATTEMPTS):
        try:
            # One statement on a bare connection (no ORM session). conversations.updated_at follows by trigger.
            with _single_write(engine) as connection:
                connection.execute(_SAVE_REPLY, values)
            break
        except (PoolTimeout, OperationalError):
            # A busy pool or a database restart: the text is all in memory, so wait a little and retry.
            if attempt + 1 == SAVE_ATTEMPTS:
                log.exception("could not store the reply %s", turn.assistant_message_id)
                return
            gevent.sleep(0.5 * (attempt + 1))
        except Exception:
            # The stream still ends properly; the row stays `streaming` and the reaper marks it incomplete.
            log.exception("could not store the reply %s", turn.assistant_message_id)
            return
    log.info("reply stored", extra={"assistant_message_id": turn.assistant_message_id, "status": outcome.status,
                                    "finish_reason": outcome.finish_reason, "chars": len(values["content"])})


def _single_write(engine: Engine):
    """A connection that commits the one statement it runs, with the least work for its database.

    PostgreSQL: autocommit, no BEGIN/COMMIT round trips (this runs once per reply). SQLite: an ordinary
    transaction, which is the same work there. Autocommit would cost more: handing the connection back to
    the pool resets its isolation level with `PRAGMA read_uncommitted`, and that pragma expires every
    statement SQLite had prepared on the connection, so the next request on it parsed and planned each of
    its statements again (~0.2 ms a send).
    """
    if engine.dialect.name == "sqlite":
        return engine.begin()
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


# Both rows of a turn in one statement: an executemany of an INSERT with RETURNING is sent by SQLAlchemy as a
# single multi-VALUES INSERT ("insertmanyvalues", SQLite and PostgreSQL alike), from a compiled form it caches.
# (A literal insert().values([...]) is never cached: compiling it cost more per send than running it on SQLite.
# A plain executemany would be a pipeline of two statements with psycopg.)
_INSERT_TURN = insert(Message.__table__).returning(Message.__table__.c.id)
_SAVE_REPLY = (update(Message.__table__).where(Message.__table__.c.id == bindparam("message_id"))
               .values(content=bindparam("content"), reasoning_content=bindparam("reasoning_content"),
                       status=bindparam("status"), finish_reason=bindparam("finish_reason"),
                       usage=bindparam("usage"), error_code=bindparam("error_code"), worker=None,
                       updated_at=bindparam("updated_at")))


# ------------------------------------------------------------------ the reaper


def reap_stale_streams(session: Session, *, conversation_id: str | None = None,
                       max_age_seconds: float | None = None) -> int:
    """Mark `streaming` rows whose worker is gone (or older than the stream limit) as incomplete."""
    query = select_rows(Message.id, Message.worker, Message.created_at).where(IS_STREAMING)
    if conversation_id:
        query = query.where(Message.conversation_id == conversation_id)
    cutoff = clock.now() - timedelta(seconds=max_age_seconds) if max_age_seconds is not None else None
    stale = [row.id for row in session.execute(query)
             if not clock.worker_alive(row.worker) or (cutoff is not None and row.created_at < cutoff)]
    if stale:
        # Core, not ORM: the ORM cannot evaluate IS_STREAMING in Python and would fetch the ids back (RETURNING).
        session.execute(update(Message.__table__).where(Message.__table__.c.id.in_(stale), IS_STREAMING).values(
            status="incomplete", finish_reason="cancelled", worker=None, updated_at=clock.now()))
        log.warning("marked %d stale streams incomplete", len(stale))
    return len(stale)
