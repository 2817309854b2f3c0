"""Tests for chatapp.netguard. Nothing here ever dials anything but 127.0.0.0/8: the autouse ``dials``
fixture wraps socket.connect, records every dial and fails the test on a non-loopback address; non-local
names never reach DNS (injected resolvers, and getaddrinfo is fenced to numeric hosts and "localhost")."""

from __future__ import annotations

import ast
import http.server
import ipaddress
import pathlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator

import pytest
import requests

from chatapp import netguard
from chatapp.netguard import CheckedURL, OutboundGuard, OutboundURLForbidden
from tests.conftest import self_signed_cert

PUBLIC = "93.184.216.34"  # only ever returned by fake resolvers for check_url(); never dialled


pytestmark = pytest.mark.usefixtures("dials")  # the loopback-only fence of tests/conftest.py


def fixed(mapping: dict[str, list[str]], calls: list[str] | None = None) -> Callable[[str, int], list[str]]:
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in mapping:
            raise socket.gaierror(socket.EAI_NONAME, "unknown test host")
        return mapping[host]

    return resolve


# --- address classes --------------------------------------------------------------------------------

FORBIDDEN_ADDRESSES = [
    "127.0.0.1", "127.8.9.10",  # loopback
    "10.0.0.1", "172.16.5.4", "172.31.255.255", "192.168.1.1",  # RFC 1918
    "169.254.169.254", "169.254.0.23", "169.254.1.1",  # link-local, cloud metadata
    "100.64.0.1", "100.127.255.254",  # CGNAT
    "224.0.0.1", "239.255.255.250", "233.252.0.1",  # multicast
    "0.0.0.0", "0.1.2.3",  # unspecified / this network
    "240.0.0.1", "255.255.255.255",  # reserved, broadcast
    "192.0.2.1", "198.51.100.1", "203.0.113.1", "198.18.0.1",  # documentation, benchmarking
    "192.0.0.170", "192.88.99.1",  # IETF protocol assignments, 6to4 relay
    "::1", "::",  # v6 loopback, unspecified
    "fc00::1", "fd12:3456::1",  # ULA
    "fe80::1", "fe80::1%eth0", "fec0::1",  # link-local, site-local
    "ff02::1", "ff0e::1",  # multicast
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:100.64.0.1",  # v4-mapped
    "::127.0.0.1",  # v4-compatible (deprecated)
    "2002:7f00:1::1", "2002:a00:1::1", "2002:a9fe:a9fe::1",  # 6to4 embedding private v4
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::1",  # NAT64 embedding private v4, local NAT64
    "2001::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001:db8::1", "3fff::1",  # documentation
    "100::1", "5f00::1",  # discard-only, SRv6
]  # fmt: skip


@pytest.mark.parametrize("addr", FORBIDDEN_ADDRESSES)
def test_non_public_address_classes_refused(addr: str, dials: list) -> None:
    guard = OutboundGuard(resolver=fixed({"target.test": [addr]}))
    with pytest.raises(OutboundURLForbidden):
        guard.check_url("http://target.test/")
    with pytest.raises(OutboundURLForbidden), guard.session() as s:
        s.post("http://target.test/v1/chat", json={"x": 1}, timeout=5)
    assert dials == []


@pytest.mark.parametrize(
    "addr",
    [PUBLIC, "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808"],
)
def test_public_addresses_pass_check_url(addr: str, dials: list) -> None:
    guard = OutboundGuard(resolver=fixed({"model.example": [addr]}))
    checked = guard.check_url("https://Model.Example./v1")
    expected = str(netguard._normalise_ip(ipaddress.ip_address(addr)))
    assert checked == CheckedURL(scheme="https", host="model.example", port=443, addresses=(expected,))
    assert dials == []  # check_url resolves but never connects


# --- the issue's list -------------------------------------------------------------------------------

ISSUE_LITERAL_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.0.23/",
    "http://10.0.0.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://0.0.0.0/",
    "http://127.1/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0X7F000001/",
    "http://0177.0.0.1/",
    "http://0x7f.1/",
    "http://127.0.0.1./",
    "http://017700000001/",
    "http://08.0.0.1/",  # numeric-looking but not inet_aton-valid: refused, not sent to DNS
    "https://[fe80::1%25eth0]:8443/",
]


@pytest.mark.parametrize("url", ISSUE_LITERAL_URLS)
def test_literal_hosts_refused_without_asking_resolver(url: str, dials: list) -> None:
    calls: list[str] = []

    def liar(host: str, port: int) -> list[str]:  # would call anything public
        calls.append(host)
        return [PUBLIC]

    guard = OutboundGuard(resolver=liar)
    with pytest.raises(OutboundURLForbidden):
        guard.check_url(url)
    with pytest.raises(OutboundURLForbidden), guard.session() as s:
        s.get(url, timeout=5)
    assert calls == [] and dials == []


def test_hostname_resolving_to_loopback_refused(dials: list) -> None:
    guard = OutboundGuard(resolver=fixed({"sneaky.example": ["127.0.0.1"]}))
    with pytest.raises(OutboundURLForbidden, match="non-public"):
        guard.check_url("http://sneaky.example/")
    assert dials == []


def test_default_resolver_localhost_refused(dials: list) -> None:
    with pytest.raises(OutboundURLForbidden):
        OutboundGuard().check_url("http://localhost:1/")
    assert dials == []


@pytest.mark.parametrize("order", [[PUBLIC, "10.1.2.3"], ["10.1.2.3", PUBLIC], [PUBLIC, "::1"]])
def test_any_private_address_refuses_the_host(order: list[str], dials: list) -> None:
    guard = OutboundGuard(resolver=fixed({"mixed.example": order}))
    with pytest.raises(OutboundURLForbidden):
        guard.check_url("http://mixed.example/")
    assert dials == []


def test_unresolvable_host_is_forbidden_for_check_url() -> None:
    with pytest.raises(OutboundURLForbidden, match="resolved"):
        OutboundGuard(resolver=fixed({})).check_url("http://nx.example/")
    with pytest.raises(OutboundURLForbidden, match="resolved"):
        OutboundGuard(resolver=fixed({"empty.example": []})).check_url("http://empty.example/")
    with pytest.raises(OutboundURLForbidden, match="invalid address"):
        OutboundGuard(resolver=fixed({"bad.example": ["not-an-ip"]})).check_url("http://bad.example/")


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://model.example/",
        "gopher://model.example:70/",
        "javascript:alert(1)",
        "//model.example/",
        "model.example/v1",
        "http:///v1",
        "http://",
        "http://model.example:0/",
        "http://model.example:65536/",
        "http://model.example:abc/",
        "http://model.example\\@10.0.0.1/",
        "http://model.example/ x",
        " http://model.example/",
        "http://model.example/\r\nX-Injected: 1",
    ],
)
def test_malformed_and_non_http_urls_refused(url: str, dials: list) -> None:
    guard = OutboundGuard(resolver=fixed({"model.example": [PUBLIC]}))
    with pytest.raises(OutboundURLForbidden):
        guard.check_url(url)
    assert dials == []


@pytest.mark.parametrize(
    "url",
    [
        "http://user:s3cr3t-pw@model.example/",
        "http://user@model.example/",
        "https://:s3cr3t-pw@model.example/",
    ],
)
def test_userinfo_refused_and_not_echoed(url: str, dials: list) -> None:
    guard = OutboundGuard(resolver=fixed({"model.example": [PUBLIC]}))
    with pytest.raises(OutboundURLForbidden) as exc:
        guard.check_url(url)
    assert "s3cr3t" not in str(exc.value) and "user" not in str(exc.value)
    with pytest.raises(OutboundURLForbidden), guard.session() as s:
        s.get(url, timeout=5)
    assert dials == []


def test_non_http_schemes_not_served_by_session() -> None:
    with OutboundGuard().session() as s, pytest.raises(requests.exceptions.InvalidSchema):
        s.get("file:///etc/passwd")


# --- allowlist --------------------------------------------------------------------------------------


def test_allowlist_by_hostname() -> None:
    res = fixed({"model.internal": ["10.0.0.5", "fd00::5"], "other.internal": ["10.0.0.6"]})
    guard = OutboundGuard(["  Model.Internal. ", ""], resolver=res)
    assert guard.check_url("http://MODEL.internal:8080/v1").addresses == ("10.0.0.5", "fd00::5")
    with pytest.raises(OutboundURLForbidden):
        guard.check_url("http://other.internal/")  # a host name entry opens only that name
    with pytest.raises(OutboundURLForbidden):
        guard.check_url("http://sub.model.internal/")


def test_allowlist_by_ip_and_cidr() -> None:
    res = fixed(
        {"a.internal": ["10.0.0.5"], "b.internal": ["10.0.0.5", "192.168.0.1"], "c.internal": ["fd00::7"]}
    )
    by_ip = OutboundGuard(["10.0.0.5"], resolver=res)
    assert by_ip.check_url("http://a.internal/").addresses == ("10.0.0.5",)
    assert by_ip.check_url("http://10.0.0.5/").host == "10.0.0.5"
    with pytest.raises(OutboundURLForbidden):
        by_ip.check_url("http://10.0.0.6/")
    by_cidr = OutboundGuard(["10.0.0.0/8", "fd00::/8"], resolver=res)
    assert by_cidr.check_url("http://a.internal/").addresses == ("10.0.0.5",)
    assert by_cidr.check_url("http://c.internal/").addresses == ("fd00::7",)
    assert by_cidr.check_url("http://[::ffff:10.9.9.9]/").addresses == ("10.9.9.9",)
    with pytest.raises(OutboundURLForbidden):
        by_cidr.check_url("http://b.internal/")  # every address must be public or allowlisted
    assert OutboundGuard(["[::1]"]).check_url("http://[::1]:8000/").addresses == ("::1",)


@pytest.mark.parametrize(
    "entry", ["http://model.internal", "10.0.0.0/33", "127.1", "a b", "model.internal:8080"]
)
def test_bad_allowlist_entries_rejected(entry: str) -> None:
    with pytest.raises(ValueError):
        OutboundGuard([entry])


# --- real local servers -----------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable

    def _reply(self, body: bytes) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.1/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(f"host={self.headers['Host']}".encode())

    def do_POST(self) -> None:
        self._reply(self.rfile.read(int(self.headers["Content-Length"])))

    def log_message(self, *args: object) -> None:
        pass


def _serve(server: http.server.HTTPServer) -> Iterator[int]:
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


@pytest.fixture
def local_port() -> Iterator[int]:
    yield from _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler))


def test_local_server_needs_allowlist(local_port: int, dials: list) -> None:
    url = f"http://127.0.0.1:{local_port}/v1/chat"
    with OutboundGuard().session() as s, pytest.raises(OutboundURLForbidden):
        s.post(url, json={"q": 1}, timeout=5)
    assert dials == []
    for entry in ("127.0.0.1", "127.0.0.0/8"):
        with OutboundGuard([entry]).session() as s:
            r = s.post(url, data=b"hello", timeout=5)
        assert (r.status_code, r.content) == (200, b"hello")
    assert [d[:2] for d in dials] == [("127.0.0.1", local_port)] * 2


def test_host_header_kept_and_connection_pinned(local_port: int, dials: list) -> None:
    calls: list[str] = []
    guard = OutboundGuard(["model.local"], resolver=fixed({"model.local": ["127.0.0.1"]}, calls))
    with guard.session() as s:
        r1 = s.get(f"http://model.local:{local_port}/", timeout=5)
        r2 = s.get(f"http://model.local:{local_port}/", timeout=(3, 5))
    assert r1.text == r2.text == f"host=model.local:{local_port}"
    # One dial, to the resolved address, with the connect timeout applied; the second request reused it.
    assert dials == [("127.0.0.1", local_port, 5)]
    assert calls == ["model.local"]


def test_next_checked_address_tried_on_failure(local_port: int, dials: list) -> None:
    guard = OutboundGuard(["127.0.0.0/8"], resolver=fixed({"multi.local": ["127.0.0.2", "127.0.0.1"]}))
    with guard.session() as s:
        assert s.get(f"http://multi.local:{local_port}/", timeout=5).status_code == 200
    assert [d[:2] for d in dials] == [("127.0.0.2", local_port), ("127.0.0.1", local_port)]


def test_dns_rebinding_refused_at_connect(local_port: int, dials: list) -> None:
    answers = iter([[PUBLIC], ["127.0.0.1"]])
    guard = OutboundGuard(resolver=lambda host, port: next(answers))
    url = f"http://rebind.example:{local_port}/"
    assert guard.check_url(url).addresses == (PUBLIC,)  # validation time: looks public
    with guard.session() as s, pytest.raises(OutboundURLForbidden):
        s.get(url, timeout=5)  # connect time: re-resolved to loopback, refused before dialling
    assert dials == []


def test_redirect_not_followed(local_port: int, dials: list) -> None:
    with OutboundGuard(["127.0.0.1"]).session() as s:
        for follow in (True, False):
            r = s.get(f"http://127.0.0.1:{local_port}/redirect", timeout=5, allow_redirects=follow)
            assert r.status_code == 302 and r.headers["Location"] == "http://10.0.0.1/"
            assert r.history == [] and r.next is None
    assert {d[0] for d in dials} == {"127.0.0.1"}


def test_env_proxy_ignored_and_explicit_proxy_refused(
    local_port: int, dials: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    with OutboundGuard(["127.0.0.1"]).session() as s:
        assert s.trust_env is False
        assert s.get(f"http://127.0.0.1:{local_port}/", timeout=5).status_code == 200
        with pytest.raises(OutboundURLForbidden):
            s.get(f"http://127.0.0.1:{local_port}/", proxies={"http": "http://127.0.0.1:9"}, timeout=5)
    assert [d[:2] for d in dials] == [("127.0.0.1", local_port)]


def test_connection_errors_stay_requests_errors(dials: list, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    guard = OutboundGuard(["127.0.0.1"], resolver=fixed({}))
    with guard.session() as s:
        with pytest.raises(requests.ConnectionError) as refused:
            s.get(f"http://127.0.0.1:{closed_port}/", timeout=5)
        assert not isinstance(refused.value, requests.Timeout)
        with pytest.raises(requests.ConnectionError):
            s.get("http://nx.example/", timeout=5)  # resolver failure at connect time

        def timing_out(self: socket.socket, address: tuple) -> None:  # type: ignore[type-arg]
            dials.append((address[0], address[1], self.gettimeout()))
            raise TimeoutError("timed out")

        monkeypatch.setattr(socket.socket, "connect", timing_out)
        with pytest.raises(requests.ConnectTimeout):
            s.get(f"http://127.0.0.1:{closed_port}/", timeout=(0.25, 5))
    assert dials[-1] == ("127.0.0.1", closed_port, 0.25)


def test_pool_settings() -> None:
    with OutboundGuard().session(pool_maxsize=7) as s:
        for prefix in ("http://", "https://"):
            adapter = s.get_adapter(prefix + "x.example/")
            assert isinstance(adapter, netguard._GuardedAdapter)
            assert (adapter._pool_maxsize, adapter._pool_block) == (7, False)
            pm = adapter.poolmanager
            pool = pm.connection_from_host("x.example", 1234, scheme=prefix[:-3])
            assert pool is pm.connection_from_host("x.example", 1234, scheme=prefix[:-3])
            assert pool is not pm.connection_from_host("y.example", 1234, scheme=prefix[:-3])
            assert pool.pool.maxsize == 7 and pool.block is False


# --- HTTPS: SNI and certificate verification stay on the URL host name ------------------------------


@pytest.fixture
def tls_server(tmp_path: pathlib.Path) -> Iterator[tuple[int, str, list[str | None]]]:
    cert_file, key_file = self_signed_cert(tmp_path, "model.test")
    sni: list[str | None] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.sni_callback = lambda sock, server_name, _ctx: sni.append(server_name)

    class TLSServer(http.server.ThreadingHTTPServer):
        def get_request(self):  # type: ignore[no-untyped-def]
            conn, addr = super().get_request()
            return ctx.wrap_socket(conn, server_side=True), addr

        def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
            pass  # the failed-verification case aborts the handshake on purpose

    for port in _serve(TLSServer(("127.0.0.1", 0), _Handler)):
        yield port, str(cert_file), sni


def test_https_sni_and_verification_use_hostname(tls_server: tuple[int, str, list], dials: list) -> None:
    port, cafile, sni = tls_server
    res = fixed({"model.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    with OutboundGuard(["127.0.0.1"], resolver=res).session() as s:
        r = s.get(f"https://model.test:{port}/", verify=cafile, timeout=5)
        assert r.text == f"host=model.test:{port}"
        with pytest.raises(requests.exceptions.SSLError):
            s.get(f"https://other.test:{port}/", verify=cafile, timeout=5)  # cert is for model.test only
    assert sni[:2] == ["model.test", "other.test"]
    assert {d[0] for d in dials} == {"127.0.0.1"}


# --- module hygiene ---------------------------------------------------------------------------------


def test_module_imports_neither_flask_nor_chatapp() -> None:
    tree = ast.parse(pathlib.Path(netguard.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] in {"flask", "chatapp"}]


def test_a_pooled_connection_the_server_closed_is_not_reused() -> None:
    """is_connected (urllib3's check before reuse) sees an idle open connection, and one the server closed."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    conn_class = netguard._pool_classes(OutboundGuard(allowlist=["127.0.0.1"]))["http"].ConnectionCls
    conn = conn_class("127.0.0.1", port)
    try:
        assert not conn.is_connected  # no socket yet
        conn.connect()
        accepted, _ = listener.accept()
        assert conn.is_connected
        accepted.close()
        for _ in range(100):  # the FIN arrives in microseconds on loopback
            if not conn.is_connected:
                break
            threading.Event().wait(0.01)
        assert not conn.is_connected
    finally:
        conn.close()
        listener.close()
