"""Outbound-request guard (SSRF): only public addresses, or operator-allowlisted ones, are ever dialled.

Why not requests-hardened (1.3.0): it has no operator allowlist (only an allow-loopback flag), no injectable
resolver, and it checks only the first getaddrinfo() result, whereas every address must pass here. So
this module pins the checked address itself, in urllib3's ``_new_conn``; the socket work still goes
through urllib3's own ``create_connection`` (timeouts, socket options), called with numeric addresses.
"""

from __future__ import annotations

import ipaddress
import re
import select
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
)
from urllib3.util import connection as _u3conn
from urllib3.util import parse_url
from urllib3.util.timeout import _DEFAULT_TIMEOUT

try:  # the system's poll(), also once gevent has patched the select module
    from gevent.monkey import get_original

    _system_poll = get_original("select", "poll")
except ImportError:  # pragma: no cover - gevent is part of the stack
    _system_poll = select.poll

__all__ = ["CheckedURL", "OutboundGuard", "OutboundURLForbidden", "default_resolver", "is_public_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Whitespace, control characters and backslashes have no business in a model URL; refusing them up front
# removes parser differentials (e.g. WHATWG parsers treat "\" as "/").
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
# Hosts made only of decimal / 0x-hex labels: libc's inet_aton() (used by getaddrinfo) reads 127.1,
# 2130706433, 0x7f000001 and 0177.0.0.1 as IPv4 addresses, so we decode them the same way ourselves.
_NUMERIC_HOST = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+))*")

# Ranges that ipaddress' is_global/is_private miss or that differ between CPython patch releases.
_BLOCKED_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "100.64.0.0/10",  # CGNAT: routes to provider-internal workloads
        "192.0.0.0/24",  # IETF protocol assignments (DS-Lite, NAT64 discovery)
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # 6to4 relay anycast
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast (is_global is True for most of it)
        "240.0.0.0/4",  # reserved, incl. broadcast
    )
)
_BLOCKED_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/8",  # unspecified, loopback, IPv4-compatible, other reserved
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, incl. Teredo 2001::/32 (client address is obfuscated)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation (RFC 9637)
        "5f00::/16",  # SRv6 SIDs
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local
        "ff00::/8",  # multicast
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class OutboundURLForbidden(Exception):
    """Refused by the guard. str(exc) is a short safe reason (never includes credentials or the URL)."""


@dataclass(frozen=True)
class CheckedURL:
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, well-known NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _normalise_ip(ip: IPAddress) -> IPAddress:
    # ::ffff:a.b.c.d is the v4 host in disguise: judge (and dial) it as v4.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public_address(ip: IPAddress) -> bool:
    """True if ``ip`` is a globally routable unicast address (no embedded non-public IPv4 either)."""
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = _embedded_v4(ip)
        if v4 is not None:
            return is_public_address(v4)
        blocked: Iterable[IPNetwork] = _BLOCKED_V6
    else:
        blocked = _BLOCKED_V4
    if any(ip in net for net in blocked):
        return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _ip_literal(host: str) -> IPAddress | None:
    """Parse ``host`` as an IP literal, including the legacy inet_aton forms; None for a host name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            # e.g. 08.0.0.1 or 4294967296: getaddrinfo would send it to DNS; nothing legitimate looks so.
            raise OutboundURLForbidden("invalid numeric host") from None
    return None


def _normalise_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def default_resolver(host: str, port: int) -> list[str]:
    """getaddrinfo() looked up at call time, so gevent's cooperative version is used once patched."""
    family = _u3conn.allowed_gai_family()
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)]


class OutboundGuard:
    def __init__(self, allowlist: Iterable[str] = (), resolver: Resolver | None = None) -> None:
        self._resolver: Resolver = resolver or default_resolver
        hosts: set[str] = set()
        v4: list[ipaddress.IPv4Network] = []
        v6: list[ipaddress.IPv6Network] = []
        for raw in allowlist:
            entry = raw.strip()
            if not entry:
                continue
            try:
                net = ipaddress.ip_network(entry.strip("[]"), strict=False)
            except ValueError:
                name = _normalise_host(entry)
                if not re.fullmatch(r"[a-z0-9_.-]+", name) or _NUMERIC_HOST.fullmatch(name):
                    raise ValueError(f"invalid allowlist entry: {entry!r}") from None
                hosts.add(name)
                continue
            if isinstance(net, ipaddress.IPv4Network):
                v4.append(net)
            elif (mapped := net.network_address.ipv4_mapped) is not None and net.prefixlen >= 96:
                v4.append(ipaddress.IPv4Network((mapped, net.prefixlen - 96)))
            else:
                v6.append(net)
        self._hosts = frozenset(hosts)
        self._v4 = tuple(v4)
        self._v6 = tuple(v6)

    def _allowlisted(self, ip: IPAddress) -> bool:
        nets: Iterable[IPNetwork] = self._v4 if isinstance(ip, ipaddress.IPv4Address) else self._v6
        return any(ip in net for net in nets)

    @staticmethod
    def parse(url: str) -> tuple[str, str, int]:
        """Syntax checks only (no DNS): returns (scheme, normalised host, port)."""
        if not isinstance(url, str) or _BAD_URL_CHARS.search(url):
            raise OutboundURLForbidden("malformed URL")
        try:
            parts = parse_url(url)  # the parser requests itself uses, so both agree on the host
        except LocationParseError:
            raise OutboundURLForbidden("malformed URL") from None
        scheme = (parts.scheme or "").lower()
        if scheme not in _DEFAULT_PORTS:
            raise OutboundURLForbidden("only http and https URLs are allowed")
        if parts.auth is not None or "@" in (parts.netloc or ""):
            raise OutboundURLForbidden("credentials in the URL are not allowed")
        host = _normalise_host(parts.host or "")
        if not host:
            raise OutboundURLForbidden("URL has no host")
        port = _DEFAULT_PORTS[scheme] if parts.port is None else parts.port
        if not 0 < port < 65536:
            raise OutboundURLForbidden("invalid port")
        return scheme, host, port

    def resolve(self, host: str, port: int) -> tuple[str, ...]:
        """Resolve ``host`` and return its addresses if every one may be dialled.

        Raises OutboundURLForbidden, or OSError (socket.gaierror) if the name does not resolve.
        """
        host = _normalise_host(host)
        literal = _ip_literal(host)
        if literal is not None:
            ips = [literal]  # never handed to the resolver, so it cannot re-interpret it
        else:
            try:
                ips = [ipaddress.ip_address(a.split("%", 1)[0]) for a in self._resolver(host, port)]
            except ValueError:
                raise OutboundURLForbidden("resolver returned an invalid address") from None
        if not ips:
            raise socket.gaierror(socket.EAI_NONAME, "host has no addresses")
        host_ok = host in self._hosts
        out: list[str] = []
        for ip in map(_normalise_ip, ips):
            if not (host_ok or self._allowlisted(ip) or is_public_address(ip)):
                raise OutboundURLForbidden("host resolves to a non-public address")
            if str(ip) not in out:
                out.append(str(ip))
        return tuple(out)

    def check_url(self, url: str) -> CheckedURL:
        scheme, host, port = self.parse(url)
        try:
            addresses = self.resolve(host, port)
        except OSError:
            raise OutboundURLForbidden("host could not be resolved") from None
        return CheckedURL(scheme=scheme, host=host, port=port, addresses=addresses)

    def session(self, pool_maxsize: int = 100) -> requests.Session:
        """A Session that re-resolves and checks at connect time and never follows redirects.

        A refused address raises OutboundURLForbidden itself (not a requests exception) out of
        session.get/post; unreachable hosts, DNS failures and timeouts stay requests.ConnectionError /
        requests.Timeout.
        """
        s = _NoRedirectSession()
        s.trust_env = False  # no proxies from the environment, no .netrc credentials
        s.max_redirects = 0
        for prefix in ("http://", "https://"):
            s.mount(prefix, _GuardedAdapter(self, pool_maxsize))
        return s


class _GuardedConnectionMixin:
    """Resolve + check in _new_conn, then dial the checked numeric address: no DNS-rebinding window.

    ``self.host`` stays the URL host, so urllib3 keeps using it for the Host header, SNI and certificate
    verification.
    """

    guard: OutboundGuard
    host: str
    port: int
    timeout: Any
    source_address: tuple[str, int] | None
    socket_options: Any

    @property
    def is_connected(self) -> bool:
        """urllib3's check before it reuses a pooled connection (readable now = closed or broken), made
        with the system's poll(). gevent's poll() switches to the event loop even with a zero timeout, so
        a send's request to the model waited behind whatever else was ready to run (its own INSERT and the
        start of its response among them) and cost a loop iteration and two watchers per request."""
        sock = getattr(self, "sock", None)
        if sock is None:
            return False
        poller = _system_poll()
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)

    def _new_conn(self) -> socket.socket:
        try:
            addresses = self.guard.resolve(self.host, self.port)
        except OSError as e:
            raise NameResolutionError(self.host, self, e) from e  # type: ignore[arg-type]
        err: OSError | None = None
        for ip in addresses:
            try:
                sock = _connect(ip, self.port, self.timeout, self.source_address, self.socket_options)
            except OSError as e:  # try the next checked address, like socket.create_connection
                err = e
                continue
            sys.audit("http.client.connect", self, self.host, self.port)
            return sock
        if isinstance(err, TimeoutError):
            msg = f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            raise ConnectTimeoutError(self, msg) from err
        raise NewConnectionError(self, f"Failed to establish a new connection: {err}") from err  # type: ignore[arg-type]


def _connect(ip: str, port: int, timeout: Any, source_address: tuple[str, int] | None,
             socket_options: Any) -> socket.socket:
    """Connect to an address already resolved and checked. urllib3's create_connection would resolve the
    numeric address again, which under gevent is a round trip through its DNS thread pool per connection
    (a queue of them when a burst of sends opens many connections at once)."""
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    try:
        for option in socket_options or ():
            sock.setsockopt(*option)
        if timeout is not _DEFAULT_TIMEOUT:
            sock.settimeout(timeout)
        if source_address:
            sock.bind(source_address)
        sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _pool_classes(guard: OutboundGuard) -> dict[str, type[HTTPConnectionPool]]:
    # Per-guard classes: urllib3 builds connections from ConnectionCls, and its pool key has no slot for
    # arbitrary objects, so the guard travels as a class attribute.
    conn_http = type("GuardedHTTPConnection", (_GuardedConnectionMixin, HTTPConnection), {"guard": guard})
    conn_https = type("GuardedHTTPSConnection", (_GuardedConnectionMixin, HTTPSConnection), {"guard": guard})
    return {
        "http": type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": conn_http}),
        "https": type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": conn_https}),
    }


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, guard: OutboundGuard, pool_maxsize: int) -> None:
        self._guard = guard  # before super().__init__, which calls init_poolmanager
        super().__init__(pool_maxsize=pool_maxsize, pool_block=False, max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kw: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **kw)
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self._guard)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        # A proxy would make the connect-time check judge the proxy, not the target.
        raise OutboundURLForbidden("proxies are not allowed")

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        self._guard.parse(request.url or "")  # scheme / user-info / port; addresses are checked on connect
        return super().send(request, *args, **kwargs)


class _NoRedirectSession(requests.Session):
    def resolve_redirects(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        # Never follow: a 3xx is returned as the response and the caller treats it as an upstream error.
        return iter(())
