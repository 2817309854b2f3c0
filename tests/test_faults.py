"""Fault injection against the real server: the database restarting under load, a worker killed mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import PG_URL, assert_error, start_live_server, stop_live_server
from tests.fake_upstream import FakeUpstream
from tests.test_chat_stream import Chat, inline


def _restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
                   check=True, capture_output=True, timeout=60)


@pytest.mark.skipif(not PG_URL or not Path("/etc/postgresql").is_dir(), reason="needs the local PostgreSQL cluster")
def test_postgres_restart_under_load_is_503_then_recovers(tmp_path, _schema_template):
    server = start_live_server(tmp_path)
    try:
        chat = Chat(server, server.register())
        outcomes: list[tuple[str, int, str | None]] = []
        odd: list[tuple[str, int, str]] = []
        stop = threading.Event()

        def load():
            session = requests.Session()
            while not stop.is_set():
                for kind, call in (("read", lambda: session.get(server.api("user/me"), headers=chat.account.headers,
                                                                   timeout=10)),
                                   ("write", lambda: session.post(server.api("conversation/create"), json={},
                                                                  headers=chat.account.headers, timeout=10))):
                    try:
                        response = call()
                    except requests.RequestException:
                        outcomes.append((kind, 0, None))  # unknown: the write may or may not have happened
                        continue
                    created = response.json().get("id") if response.status_code == 201 else None
                    outcomes.append((kind, response.status_code, created))
                    if response.status_code >= 500 and not (
                            response.headers["Content-Type"].startswith("application/json")
                            and response.json()["code"] == "database_unavailable"):
                        odd.append((kind, response.status_code, response.text[:300]))
                time.sleep(0.02)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        _restart_postgres()
        time.sleep(1.5)
        stop.set()
        for worker in workers:
            worker.join(timeout=15)

        assert not odd, odd  # an outage is a 503 database_unavailable JSON, never another 5xx
        statuses = {status for _, status, _ in outcomes}
        assert statuses <= {0, 200, 201, 503}, statuses  # an outage is a 503, never a 500
        assert 503 in statuses, "the restart was not noticed: the test proved nothing"
        # Recovered by itself: the pool pre-pings and reconnects.
        deadline = time.monotonic() + 10
        while chat.get("user/me").status_code != 200:
            assert time.monotonic() < deadline, "the service did not recover"
            time.sleep(0.2)
        # No half-written rows: every 201 exists, and a 503 never left a row behind (only a request whose
        # connection broke, status 0, may have been written without the client hearing of it).
        created = {conversation for kind, status, conversation in outcomes if kind == "write" and status == 201}
        unknown = sum(1 for kind, status, _ in outcomes if kind == "write" and status == 0)
        listed, cursor = set(), None
        while True:
            page = chat.get("conversation", limit=200, **({"cursor": cursor} if cursor else {})).json()
            listed |= {item["id"] for item in page["items"]}
            if not (cursor := page["next_cursor"]):
                break
        assert created <= listed and len(listed - created) <= unknown
    finally:
        stop_live_server(server)


def test_worker_killed_mid_stream_is_reaped_and_the_conversation_works_again(tmp_path, _schema_template):
    """SIGKILL (OOM killer, a crash): nothing can run in the dying worker; the next send frees the conversation."""
    with FakeUpstream() as fake:
        server = start_live_server(tmp_path, extra_env={"CHATAPP_GRACEFUL_TIMEOUT": "2"})
        try:
            chat = Chat(server, server.register())
            conversation_id = chat.conversation()
            fake.script(reply="y" * 100, chunk_size=1, gap=0.1)
            stream = chat.stream(conversation_id, **inline(fake))
            stream.until("content.delta", 2)
            (worker,) = server.workers()
            os.kill(worker, signal.SIGKILL)
            stream.response.close()
            deadline = time.monotonic() + 15
            while True:  # gunicorn boots a new worker
                try:
                    if chat.get("user/me").status_code == 200:
                        break
                except requests.RequestException:
                    pass
                assert time.monotonic() < deadline, "no new worker"
                time.sleep(0.2)
            assert chat.history(conversation_id)[-1]["status"] == "streaming"  # nobody could save it
            fake.script(reply="after the crash")
            events = chat.stream(conversation_id, **inline(fake)).rest()
            assert events[-1].name == "message.completed" and events[-1].data["status"] == "completed"
            statuses = [(item["role"], item["status"]) for item in chat.history(conversation_id)]
            assert statuses == [("user", "completed"), ("assistant", "incomplete"),
                                ("user", "completed"), ("assistant", "completed")]
        finally:
            stop_live_server(server)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KiB filesystem for the image store (tmpfs; needs root, as CI and the dev machines have)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_image_disk_is_507_json_and_leaves_nothing_behind(app, api, alice, tiny_disk):
    from tests.test_images import padded_png, put, upload_items

    app.extensions["chatapp"].storage.root = tiny_disk
    conversation_id = api.post("conversation/create", {}, token=alice.access).get_json()["id"]
    statuses = []
    for _ in range(4):
        item = upload_items(api, alice, conversation_id)[0]
        response = put(api, item, padded_png(30_000))
        statuses.append(response.status_code)
        if response.status_code == 507:
            body = response.get_json()
            assert body["code"] == "storage_full" and body["request_id"]
            break
    assert statuses[-1] == 507 and set(statuses[:-1]) == {200}, statuses
    leftovers = [path.name for path in tiny_disk.rglob("*") if path.is_file() and path.name.startswith(".upload")]
    assert leftovers == []  # the half-written temp file was removed


@pytest.mark.app_settings(DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=0.2)
def test_an_exhausted_connection_pool_is_503_with_retry_after(app, api, alice):
    from chatapp.extensions import db

    with app.app_context():
        held = db.engine.connect()  # the pool's only connection, taken
        try:
            response = api.get("user/me", token=alice.access)
        finally:
            held.close()
    body = assert_error(response, 503, "database_busy")
    assert response.headers["Retry-After"] == "1" and "busy" in body["message"]
    assert api.get("user/me", token=alice.access).status_code == 200  # and fine once a connection is free
