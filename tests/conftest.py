"""Fixtures: a fresh app + database per test (SQLite, or PostgreSQL when CHATAPP_TEST_DATABASE_URL is
set), an API client with an `auth` helper, and a real gunicorn+gevent server for streaming tests."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from chatapp import clock, create_app
from chatapp.extensions import db

pytest_plugins = ["tests.fake_upstream"]

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("CHATAPP_TEST_DATABASE_URL")
RATELIMIT_URI = os.environ.get("CHATAPP_TEST_RATELIMIT_STORAGE_URI", "memory://")
PASSWORD = "correct horse battery staple"

# Every secret the suite hands the app; test_zz_logs checks none of them reached the log file.
SECRETS_USED: set[str] = set()
LOG_FILES: set[Path] = set()  # every log file the suite's apps and live servers wrote


def remember_secret(value: str) -> str:
    SECRETS_USED.add(value)
    return value


@pytest.fixture(scope="session")
def log_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("logs") / "chatapp.log"
    LOG_FILES.add(path)
    return path


def base_settings(tmp: Path, log_file: Path, database_url: str) -> dict:
    return {
        "SECRET_KEY": "test-secret-" + "x" * 32,
        "INSTANCE_PATH": str(tmp / "instance"),
        "STORAGE_DIR": str(tmp / "instance" / "storage"),
        "SQLALCHEMY_DATABASE_URI": database_url,
        "LOG_FILE": str(log_file),
        "RATELIMIT_STORAGE_URI": RATELIMIT_URI,
        "RATELIMIT_KEY_PREFIX": f"test-{uuid.uuid4().hex[:8]}",
        "RATELIMIT_REGISTER": "100000 per minute",
        "RATELIMIT_LOGIN": "100000 per minute",
        "RATELIMIT_LOGIN_FAILURES": "100000 per minute",
        "MODEL_HOST_ALLOWLIST": ["127.0.0.1"],
        "SSE_PING_SECONDS": 15.0,
    }


@pytest.fixture(scope="session")
def _schema_template(tmp_path_factory) -> str | None:
    """SQLite: migrate one template file and copy it per test. PostgreSQL: migrate the test database once."""
    if PG_URL:
        _migrate(PG_URL)
        return None
    template = tmp_path_factory.mktemp("template") / "template.sqlite3"
    _migrate(f"sqlite:///{template}")
    return str(template)


def _migrate(url: str) -> None:
    env = {**os.environ, "CHATAPP_DATABASE_URL": url, "CHATAPP_LOG_LEVEL": "WARNING"}
    subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"], cwd=ROOT, env=env,
                   check=True, capture_output=True)


def _truncate_all() -> None:
    tables = ", ".join(table.name for table in db.metadata.sorted_tables)
    db.session.execute(db.text(f"TRUNCATE {tables} CASCADE"))
    db.session.commit()


@pytest.fixture
def settings(tmp_path, log_file, _schema_template) -> dict:
    if PG_URL:
        return base_settings(tmp_path, log_file, PG_URL)
    database = tmp_path / "chatapp.sqlite3"
    shutil.copy(_schema_template, database)
    return base_settings(tmp_path, log_file, f"sqlite:///{database}")


def pytest_configure(config):
    config.addinivalue_line("markers", "app_settings(**overrides): config overrides for the `app` fixture")


@pytest.fixture
def app(settings, request):
    # `@pytest.mark.app_settings(RATELIMIT_LOGIN="3 per minute")` builds this test's app with overrides.
    marker = request.node.get_closest_marker("app_settings")
    application = create_app({**settings, **(marker.kwargs if marker else {})})
    yield application
    clock.reset()
    with application.app_context():
        db.session.remove()
        if PG_URL:
            _truncate_all()
        db.engine.dispose()


@dataclass
class Account:
    user: dict
    access: str
    refresh: str
    password: str
    email: str
    extra: dict = field(default_factory=dict)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.access}"}

    @property
    def refresh_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.refresh}"}


class ApiClient:
    """The Flask test client with the chores of auth done: `api.post(path, json, token=...)`."""

    def __init__(self, client):
        self.client = client

    def _call(self, method, path, token=None, headers=None, **kwargs):
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.client.open(path if path.startswith("/") else f"/api/v1/{path}", method=method,
                                headers=headers, **kwargs)

    def get(self, path, token=None, **kwargs):
        return self._call("GET", path, token, **kwargs)

    def post(self, path, json=None, token=None, **kwargs):
        if json is not None:
            kwargs["json"] = json
        return self._call("POST", path, token, **kwargs)

    def register(self, email: str | None = None, username: str = "Tester", password: str = PASSWORD) -> Account:
        email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
        response = self.post("user/register", {"email": email, "username": username, "password": password})
        assert response.status_code == 201, response.get_json()
        body = response.get_json()
        remember_secret(password)
        remember_secret(body["access_token"])
        remember_secret(body["refresh_token"])
        return Account(body["user"], body["access_token"], body["refresh_token"], password, email)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def api(client) -> ApiClient:
    return ApiClient(client)


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def alice(api) -> Account:
    return api.register(username="Alice")


@pytest.fixture
def bob(api) -> Account:
    return api.register(username="Bob")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


_RATE_LIMIT_PORT = urlsplit(RATELIMIT_URI).port if RATELIMIT_URI.startswith("redis") else None


@pytest.fixture
def dials(monkeypatch) -> list[tuple]:
    """The TCP connects a test makes, as (host, port, timeout). Anything but loopback fails the test, and so
    does a DNS lookup of a real name, so even a broken guard under test can never send a packet away.
    The shared rate-limit store (Redis in CI) is allowed and not recorded: it is not a model URL."""
    seen: list[tuple] = []
    real_connect, real_gai = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            if not _is_loopback(address[0]):
                raise AssertionError(f"test tried to dial non-loopback {address!r}")
            if address[1] != _RATE_LIMIT_PORT:
                seen.append((address[0], address[1], self.gettimeout()))
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(name.split("%")[0])
        except ValueError:
            if name != "localhost":
                raise AssertionError(f"test tried a DNS lookup of {name!r}") from None
        return real_gai(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return seen


def assert_error(response, status: int, code: str | None = None) -> dict:
    """The one error shape: JSON with code, message and request_id; never HTML, never a trace."""
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:500])
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body["code"], str) and isinstance(body["message"], str)
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.get_data(as_text=True)
    if code:
        assert body["code"] == code, body
    return body


# ------------------------------------------------------------------ a real gunicorn + gevent server


def self_signed_cert(directory: Path, host: str) -> tuple[str, str]:
    """A self-signed certificate for `host` (a DNS name or an IP literal), its own CA: (cert file, key file)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    try:
        alt_name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt_name = x509.DNSName(host)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([alt_name]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log_path: Path
    env: dict

    def api(self, path: str) -> str:
        return f"{self.url}/api/v1/{path}"

    def workers(self) -> list[int]:
        """The gunicorn master's children: its workers."""
        master = self.process.pid
        with open(f"/proc/{master}/task/{master}/children", encoding="ascii") as handle:
            return [int(pid) for pid in handle.read().split()]

    def register(self, session: requests.Session | None = None) -> Account:
        email = f"live-{uuid.uuid4().hex[:10]}@example.com"
        response = (session or requests).post(self.api("user/register"), timeout=10, json={
            "email": email, "username": "Live", "password": PASSWORD})
        assert response.status_code == 201, response.text
        body = response.json()
        remember_secret(body["access_token"])
        remember_secret(body["refresh_token"])
        return Account(body["user"], body["access_token"], body["refresh_token"], PASSWORD, email)

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(encoding="utf-8").splitlines() if self.log_path.exists() else []


def start_live_server(tmp: Path, extra_env: dict | None = None, workers: int = 1,
                      app_module: str = "wsgi:app", port: int | None = None) -> LiveServer:
    """gunicorn + gevent with gunicorn.conf.py on a free port; `app_module` lets a test serve a test-only app."""
    # `port`: a caller that must know the URL beforehand (e.g. for CHATAPP_PUBLIC_BASE_URL) picks it with free_port()
    port = port or free_port()
    database_url = PG_URL or f"sqlite:///{tmp / 'live.sqlite3'}"
    log_path = tmp / "live.log"
    LOG_FILES.add(log_path)
    env = {
        **os.environ,
        "PORT": str(port), "HOST": "127.0.0.1",
        "CHATAPP_WORKERS": str(workers),
        "CHATAPP_SECRET_KEY": "live-secret-" + "y" * 32,
        "CHATAPP_INSTANCE_PATH": str(tmp / "instance"),
        "CHATAPP_DATABASE_URL": database_url,
        "CHATAPP_LOG_FILE": str(log_path),
        "CHATAPP_RATELIMIT_REGISTER": "100000 per minute",
        "CHATAPP_RATELIMIT_LOGIN": "100000 per minute",
        "CHATAPP_MODEL_HOST_ALLOWLIST": "127.0.0.1",
        **(extra_env or {}),
    }
    if not PG_URL:
        _migrate(database_url)
    stderr_path = tmp / "gunicorn.stderr"
    # (gunicorn.conf.py turns gunicorn's control socket off, whose per-user path parallel servers would share.)
    with open(stderr_path, "ab") as stderr:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py", app_module],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return LiveServer(url, process, log_path, env)
        except (requests.ConnectionError, requests.Timeout):  # a booting worker may accept but not answer yet
            pass
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    process.wait(timeout=5)
    raise RuntimeError(f"gunicorn did not start; log:\n{log_path.read_text() if log_path.exists() else ''}"
                       f"\nstderr:\n{stderr_path.read_text(errors='replace')[-4000:]}")


def stop_live_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, _schema_template):
    server = start_live_server(tmp_path_factory.mktemp("live"))
    yield server
    stop_live_server(server)
