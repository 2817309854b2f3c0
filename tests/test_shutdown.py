"""Stopping the server (SIGTERM to gunicorn's master, as systemd or Kubernetes do) while replies stream: each
stream ends properly with message.completed, and what had arrived is stored as incomplete, not lost."""

from __future__ import annotations

import signal
import time

from sqlalchemy import create_engine, select

from chatapp.models import Message
from tests.conftest import start_live_server
from tests.fake_upstream import FakeUpstream
from tests.test_chat_stream import Chat, assert_well_formed, inline, text_of

messages = Message.__table__


def test_sigterm_ends_running_streams_cleanly_before_the_kill(tmp_path):
    with FakeUpstream() as fake:
        server = start_live_server(tmp_path, extra_env={"CHATAPP_GRACEFUL_TIMEOUT": "4"})
        try:
            fake.script(reply="x" * 200, chunk_size=1, gap=0.1)
            chats = [Chat(server, server.register()) for _ in range(3)]
            streams = []
            for chat in chats:
                conversation_id = chat.conversation()
                stream = chat.stream(conversation_id, **inline(fake))
                streams.append((conversation_id, stream, stream.until("content.delta", 2)))
            stopped_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            results = [(conversation_id, head + stream.rest()) for conversation_id, stream, head in streams]
            assert time.monotonic() - stopped_at < 4, "streams must end before the master's SIGKILL"
            assert server.process.wait(timeout=10) == 0
        finally:
            if server.process.poll() is None:
                server.process.kill()
        engine = create_engine(server.env["CHATAPP_DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as connection:
            for conversation_id, events in results:
                completed = assert_well_formed(events, "incomplete")
                assert completed["finish_reason"] == "cancelled"
                row = connection.execute(select(messages.c.status, messages.c.content).where(
                    messages.c.conversation_id == conversation_id, messages.c.role == "assistant")).one()
                assert row.status == "incomplete"
                assert row.content == text_of(events) and len(text_of(events)) >= 2
        engine.dispose()
