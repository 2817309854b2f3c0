"""Seed a chatapp database for the benchmark through the app's own models (fast bulk inserts).

Run with the project's venv and the same CHATAPP_* environment as the server under test; reads a JSON
object on stdin, prints one JSON object on stdout:

    {"user_id": "...", "model_config_id": "...", "conversations": 9000}      -> {"conversations": [ids]}
    {"history": {"conversation_id": "...", "messages": 1000}}                -> {"messages": 1000}

Conversations are what the API would create (owned by the user, with the model config); history
messages alternate user/assistant, all `completed`, one millisecond apart, oldest first.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta


def main() -> None:
    order = json.load(sys.stdin)
    from sqlalchemy import insert

    from chatapp import clock, create_app
    from chatapp.extensions import db
    from chatapp.models import Conversation, Message

    app = create_app()
    out: dict = {}
    with app.app_context():
        base = clock.now() - timedelta(days=1)
        if order.get("conversations"):
            rows = [{"id": clock.new_id(), "user_id": order["user_id"], "title": f"bench {index}",
                     "model_config_id": order["model_config_id"], "created_at": base, "updated_at": base}
                    for index in range(order["conversations"])]
            for start in range(0, len(rows), 1000):
                db.session.execute(insert(Conversation), rows[start:start + 1000])
            out["conversations"] = [row["id"] for row in rows]
        history = order.get("history")
        if history:
            rows = []
            for index in range(history["messages"]):
                moment = base + timedelta(milliseconds=index)
                user = index % 2 == 0
                rows.append({
                    "id": clock.new_id(), "conversation_id": history["conversation_id"],
                    "role": "user" if user else "assistant",
                    "content": (f"Question {index}: how does the relay keep up with the model?" if user else
                                f"Answer {index}: " + "it forwards each chunk as soon as it arrives. " * 6),
                    "status": "completed", "model": None if user else "bench",
                    "finish_reason": None if user else "stop",
                    "usage": None if user else {"prompt_tokens": 12, "completion_tokens": 60, "total_tokens": 72},
                    "created_at": moment, "updated_at": moment,
                })
            for start in range(0, len(rows), 1000):
                db.session.execute(insert(Message), rows[start:start + 1000])
            out["messages"] = len(rows)
        db.session.commit()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
