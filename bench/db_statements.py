"""Count the database statements of one chat turn (and of the CRUD calls the benchmark loads).

Runs the app in-process (gevent-patched, as in a gunicorn worker) against the database named by the
CHATAPP_* environment, with the Flask test client, and counts every statement the engine sends with a
SQLAlchemy ``before_cursor_execute`` listener. Reads ``{"upstream": "http://127.0.0.1:PORT/v1"}`` on
stdin (the benchmark's fake model server); prints one JSON object on stdout:

    {"send": {"before_stream": n, "during_stream": n, "after_stream": n, "total": n, "per_chunk": x,
              "chunks": 50, "statements": [...]}, "send_second_turn": {...},
     "get_conversations": {...}, "get_history": {...}, "login": {...}}
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402

PASSWORD = "bench correct horse battery staple"


def main() -> None:
    order = json.load(sys.stdin)
    from sqlalchemy import event

    from chatapp import create_app
    from chatapp.extensions import db

    app = create_app()
    client = app.test_client()
    seen: list[str] = []
    with app.app_context():
        engine = db.engine

    def record(_conn, _cursor, statement, _params, _context, _executemany) -> None:
        seen.append(" ".join(statement.split())[:160])

    email = f"stmt-{uuid.uuid4().hex[:10]}@example.com"
    response = client.post("/api/v1/user/register", json={"email": email, "username": "Stmt", "password": PASSWORD})
    assert response.status_code == 201, response.get_data(as_text=True)
    auth = {"Authorization": f"Bearer {response.get_json()['access_token']}"}
    response = client.post("/api/v1/model_config/create", headers=auth, json={
        "name": "bench", "base_url": order["upstream"], "model": "bench", "api_key": "sk-bench-0123456789"})
    assert response.status_code == 201, response.get_data(as_text=True)
    config_id = response.get_json()["id"]
    response = client.post("/api/v1/conversation/create", headers=auth, json={"model_config_id": config_id})
    assert response.status_code == 201, response.get_data(as_text=True)
    conversation_id = response.get_json()["id"]
    event.listen(engine, "before_cursor_execute", record)

    def send() -> dict:
        seen.clear()
        response = client.post("/api/v1/chat/send", headers=auth, json={
            "conversation_id": conversation_id, "message": {"content": "Hello bench"}})
        assert response.status_code == 200, response.get_data(as_text=True)
        before = len(seen)
        first_content = last_content = None
        chunks = 0
        for piece in response.response:
            if b"event: content.delta" in piece:
                chunks += piece.count(b"event: content.delta")
                if first_content is None:
                    first_content = len(seen)
                last_content = len(seen)
        response.close()
        first_content = before if first_content is None else first_content
        last_content = first_content if last_content is None else last_content
        return {"before_stream": first_content, "during_stream": last_content - first_content,
                "after_stream": len(seen) - last_content, "total": len(seen),
                "per_chunk": (last_content - first_content) / max(1, chunks - 1), "chunks": chunks,
                "statements": list(seen)}

    def call(method: str, path: str, **kwargs) -> dict:
        seen.clear()
        response = client.open(path, method=method, **kwargs)
        assert response.status_code == 200, response.get_data(as_text=True)
        return {"total": len(seen), "statements": list(seen)}

    out = {"send": send(), "send_second_turn": send(),
           "get_conversations": call("GET", "/api/v1/conversation", headers=auth),
           "get_history": call("GET", f"/api/v1/chat/{conversation_id}", headers=auth),
           "login": call("POST", "/api/v1/user/login", json={"email": email, "password": PASSWORD})}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
