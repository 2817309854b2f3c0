"""Login rate limits held in Redis bind every gunicorn worker together (issue 3, last "Done means" point).

Two workers, many logins on fresh connections: exactly the limit passes, and /proc shows that both workers
answered some of them (else a per-worker limit would have passed this test too).
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from tests.conftest import remember_secret, start_live_server, stop_live_server

REDIS_URL = "redis://127.0.0.1:6379/0"
LIMIT = 5
ATTEMPTS = 30


def _redis() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    return client


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _server_socket_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server's end of our connection, from the kernel's TCP table."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if (local_port, remote_port) == (server_port, client_port):
                return fields[9]
    return None


def _owner(workers: list[int], inode: str) -> int | None:
    target = f"socket:[{inode}]"
    for pid in workers:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def _login(port: int, workers: list[int], email: str, password: str) -> tuple[int, dict, dict, int | None]:
    """One login on a connection of its own; which worker served it is read while the connection is open."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request("POST", "/api/v1/user/login", body=json.dumps({"email": email, "password": password}),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        body = json.loads(response.read() or b"{}")
        inode = _server_socket_inode(port, connection.sock.getsockname()[1])
        worker = _owner(workers, inode) if inode else None
        return response.status, dict(response.getheaders()), body, worker
    finally:
        connection.close()


def test_the_login_limit_holds_across_two_gunicorn_workers(tmp_path, app):
    # `app` only so the PostgreSQL run truncates what the server wrote.
    client = _redis()
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc to tell the workers apart")
    # flask-limiter's key prefix is not a CHATAPP_* setting: a window length of this run's own makes the
    # Redis key unique, so another run of the suite against the same Redis cannot eat into the limit.
    seconds = 3600 + secrets.randbelow(10**6)
    limit = f"{LIMIT} per {seconds} seconds"
    server = start_live_server(tmp_path, workers=2, extra_env={
        "CHATAPP_RATELIMIT_STORAGE_URI": REDIS_URL,
        "CHATAPP_RATELIMIT_LOGIN": limit,
        "CHATAPP_RATELIMIT_LOGIN_FAILURES": "100000 per minute",
    })
    try:
        account = server.register()
        remember_secret(account.password)
        port = int(server.url.rsplit(":", 1)[1])
        workers = _children(server.process.pid)
        assert len(workers) == 2, workers
        # Batches of concurrent logins until both workers have answered some: which worker accepts a
        # connection is up to the kernel and gevent, and one fast worker may take a whole batch.
        results: list = []
        with ThreadPoolExecutor(max_workers=10) as pool:
            while len(results) < ATTEMPTS or ({w for *_, w in results} != set(workers) and len(results) < 300):
                results += pool.map(lambda _: _login(port, workers, account.email, account.password), range(10))
    finally:
        stop_live_server(server)
        for key in client.scan_iter(match=f"*/{LIMIT}/{seconds}/second*"):
            client.delete(key)

    statuses = [status for status, *_ in results]
    assert statuses.count(200) == LIMIT, statuses
    assert statuses.count(429) == len(results) - LIMIT, statuses
    for status, headers, body, _worker in results:
        if status == 200:
            remember_secret(body["access_token"])
            remember_secret(body["refresh_token"])
        else:
            assert body["code"] == "rate_limited" and body["request_id"] == headers["X-Request-ID"]
            assert 0 < int(headers["Retry-After"]) <= seconds
    served_by = {worker for *_, worker in results}
    assert served_by == set(workers), f"both workers must have answered: {served_by} vs {workers}"

    log_text = server.log_path.read_text(encoding="utf-8")
    assert "POST /api/v1/user/login 429" in log_text  # the server did log these requests...
    leaked = [secret for secret in [account.password, account.access, account.refresh]
              + [body[name] for status, _, body, _ in results if status == 200
                 for name in ("access_token", "refresh_token")] if secret in log_text]
    assert not leaked  # ...and no password or token with them
