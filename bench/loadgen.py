"""Load generator for the benchmark, as its own process: raw HTTP/1.1 over gevent sockets, 127.0.0.1 only.

    python bench/loadgen.py SPEC.json      # prints one JSON result line on stdout

SPEC is a JSON object; ``mode`` picks what to do:

``stream``  C concurrent streams (``concurrency``), each slot running ``rounds`` streams one after
            another (closed loop, all slots start together). Per stream it records the time to the
            first content byte (TTFT, from just before connect), every gap between content chunks
            (chunks arriving in one read count as gaps of 0: bunching), the total time and errors.
            A content chunk is one occurrence of ``content_marker`` in the raw bytes; the stream ends
            at ``end_marker`` (or at EOF for a close-delimited answer).
``hold``    ``streams`` concurrent streams opened with at most ``ramp`` in setup at once; once all
            have their first content chunk (or failed, or ``ramp_timeout`` passed) it prints a
            ``HELD {...}`` line and waits for a line on stdin, then holds ``hold_seconds`` more,
            closes every stream and reports how many were served without error or stall.
``http``    request/response load on keep-alive connections: closed loop with ``concurrency``
            connections for ``duration`` seconds, or open loop at ``rate`` requests/s (latency counted
            from each request's scheduled time, so a slow server cannot hide its queue).

Requests come ready-made from the spec (``requests``: a list of raw HTTP request strings, used by
slot/index round-robin), so this process spends its time on sockets, not on building requests.
"""

from __future__ import annotations

import json
import math
import resource
import socket
import sys
import time

import gevent
from gevent import socket as gsocket
from gevent.fileobject import FileObject
from gevent.lock import Semaphore
from gevent.queue import Queue

HOST = "127.0.0.1"
now = time.perf_counter


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "min": min(values), "p50": pct(values, 50), "p90": pct(values, 90),
            "p99": pct(values, 99), "max": max(values), "mean": sum(values) / len(values)}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------ one stream


class Stream:
    """One streamed request; `run()` fills in the fields below."""

    __slots__ = ("arrivals", "closed_by_us", "end", "error", "sock", "start")

    def __init__(self) -> None:
        self.start = self.end = None
        self.arrivals: list[float] = []  # one time per content chunk; chunks of one read share it
        self.error: str | None = None
        self.sock = None
        self.closed_by_us = False

    @property
    def first(self) -> float | None:
        return self.arrivals[0] if self.arrivals else None

    @property
    def last(self) -> float | None:
        return self.arrivals[-1] if self.arrivals else None

    @property
    def chunks(self) -> int:
        return len(self.arrivals)

    def gaps(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        times = self.arrivals
        return [times[i] - times[i - 1] for i in range(1, len(times)) if since <= times[i] <= until]

    def run(self, port: int, request: bytes, spec: dict, on_first=None) -> Stream:
        marker = spec["content_marker"].encode()
        end_marker = spec["end_marker"].encode()
        error_markers = [m.encode() for m in spec.get("error_markers", [])]
        expected = spec.get("chunks")
        keep_m, keep_e = len(marker) - 1, max([len(end_marker), *map(len, error_markers)]) - 1
        self.start = now()
        try:
            sock = self.sock = gsocket.create_connection((HOST, port), timeout=spec.get("connect_timeout", 10))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(spec.get("idle_timeout", 30))
            sock.sendall(request)
            head = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    self.error = "eof_before_headers"
                    return self
                head += data
                index = head.find(b"\r\n\r\n")
                if index >= 0:
                    break
            status = head[9:12]
            if status != b"200":
                self.error = "http_" + status.decode("ascii", "replace")
                return self
            data = head[index + 4:]
            tail_m = tail_e = b""
            while True:
                if data:
                    t = now()
                    window = tail_m + data
                    count = window.count(marker)
                    tail_m = window[-keep_m:] if keep_m else b""
                    if count:
                        first = not self.arrivals
                        self.arrivals.extend([t] * count)  # several chunks in one read: bunched (gap 0)
                        if first and on_first is not None:
                            on_first(self)
                    window = tail_e + data
                    for error_marker in error_markers:
                        if error_marker in window:
                            self.error = "error_event"
                    if end_marker in window:
                        break
                    tail_e = window[-keep_e:]
                    if self.error:
                        break
                data = sock.recv(65536)
                if not data:
                    if not spec.get("eof_ends", False):
                        self.error = "eof"
                    break
            self.end = now()
            if self.error is None and expected and self.chunks != expected:
                self.error = f"chunks_{self.chunks}_of_{expected}"
        except gevent.GreenletExit:
            self.closed_by_us = True
            raise
        except TimeoutError:
            self.error = "timeout"
        except OSError as exc:
            if not self.closed_by_us:
                self.error = type(exc).__name__
        finally:
            if self.end is None:
                self.end = now()
            if self.first is None and on_first is not None:
                on_first(self)  # failed before its first chunk: frees its ramp slot all the same
            if self.sock is not None:
                self.sock.close()
        return self


# ------------------------------------------------------------------ modes


def run_streams(spec: dict) -> dict:
    port, requests = spec["port"], [r.encode() for r in spec["requests"]]
    concurrency, rounds = spec["concurrency"], spec.get("rounds", 1)
    deadline = now() + spec.get("max_seconds", 120)
    results: list[Stream] = []

    def slot(index: int) -> None:
        request = requests[index % len(requests)]
        for _ in range(rounds):
            if now() > deadline:
                return
            results.append(Stream().run(port, request, spec))

    cpu0, t0 = cpu_seconds(), now()
    workers = [gevent.spawn(slot, i) for i in range(concurrency)]
    gevent.joinall(workers, timeout=spec.get("max_seconds", 120) + 60)
    gevent.killall(workers, block=True, timeout=5)
    wall = now() - t0
    ok = [s for s in results if s.error is None]
    started = [s for s in results if s.first is not None]
    gaps = [g for s in ok for g in s.gaps()]
    errors: dict[str, int] = {}
    for s in results:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
    return {
        "mode": "stream", "concurrency": concurrency, "rounds": rounds, "streams": len(results), "ok": len(ok),
        "errors": sum(errors.values()), "error_kinds": errors, "wall": wall,
        "starts_per_s": len(started) / wall if wall else None,
        "chunks": sum(s.chunks for s in results),
        "ttft": summary([s.first - s.start for s in started]),
        "total": summary([s.end - s.start for s in ok]),
        "gap": summary(gaps),
        "gaps_under_1ms": (sum(1 for g in gaps if g < 0.001) / len(gaps)) if gaps else None,
        "loadgen_cpu": cpu_seconds() - cpu0,
    }


def run_hold(spec: dict) -> dict:
    port, requests = spec["port"], [r.encode() for r in spec["requests"]]
    count, ramp = spec["streams"], Semaphore(spec.get("ramp", 256))
    streams = [Stream() for _ in range(count)]
    first_seen = [0]

    def on_first(stream: Stream) -> None:
        first_seen[0] += 1
        ramp.release()

    def one(index: int) -> None:
        streams[index].run(port, requests[index % len(requests)], spec, on_first)

    cpu0, t0 = cpu_seconds(), now()
    ramp_deadline = t0 + spec.get("ramp_timeout", 60)
    workers = []
    for index in range(count):
        if not ramp.acquire(timeout=max(0.0, ramp_deadline - now())):
            break
        workers.append(gevent.spawn(one, index))
    while first_seen[0] < len(workers) and now() < ramp_deadline:
        gevent.sleep(0.05)
    ramp_seconds = now() - t0
    opened = sum(1 for s in streams if s.first is not None and s.error is None)
    print("HELD " + json.dumps({"opened": opened, "spawned": len(workers), "ramp_seconds": ramp_seconds}),
          flush=True)
    FileObject(sys.stdin, "rb").readline()  # the orchestrator measures the server meanwhile
    window_start = now()
    gevent.sleep(spec.get("hold_seconds", 2.0))
    window_end = now()
    for stream in streams:  # close every socket: the server sees each client go away
        stream.closed_by_us = True
    gevent.killall(workers, block=True, timeout=10)
    stall = spec.get("stall_seconds", 2.0)
    served, stalled, errors, gaps = 0, 0, {}, []
    for stream in streams[:len(workers)]:
        if stream.error:
            errors[stream.error] = errors.get(stream.error, 0) + 1
            continue
        if stream.first is None:
            errors["not_started"] = errors.get("not_started", 0) + 1
            continue
        # Gaps inside the hold window, plus the silence from the last chunk to the window's end.
        silence = window_end - (stream.last or window_start)
        window_gaps = stream.gaps(window_start, window_end)
        gaps.extend(window_gaps)
        if silence > stall or any(g > stall for g in window_gaps):
            stalled += 1
        else:
            served += 1
    return {
        "mode": "hold", "streams": count, "spawned": len(workers), "opened": opened, "served": served,
        "stalled": stalled, "errors": sum(errors.values()), "error_kinds": errors, "ramp_seconds": ramp_seconds,
        "gap": summary(gaps), "ttft": summary([s.first - s.start for s in streams if s.first is not None]),
        "loadgen_cpu": cpu_seconds() - cpu0,
    }


def read_response(sock, buf: bytes) -> tuple[int, bytes, bool]:
    """Read one HTTP response from sock (buf: bytes already read); returns (status, leftover, keep_alive)."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionResetError("eof")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower() + b"\r\n"
    keep = b"connection: close" not in lower
    index = lower.find(b"content-length:")
    if index >= 0:
        length = int(lower[index + 15:lower.find(b"\r\n", index)].strip() or b"0")
        while len(rest) < length:
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("eof")
            rest += data
        return status, rest[length:], keep
    if b"transfer-encoding: chunked" in lower:
        while b"\r\n0\r\n\r\n" not in rest and not rest.startswith(b"0\r\n\r\n"):
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("eof")
            rest += data
        return status, b"", keep
    while True:  # close-delimited
        data = sock.recv(65536)
        if not data:
            return status, b"", False


class Conn:
    __slots__ = ("buf", "sock")

    def __init__(self, port: int, timeout: float) -> None:
        self.sock = gsocket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def call(self, request: bytes) -> tuple[int, bool]:
        self.sock.sendall(request)
        status, self.buf, keep = read_response(self.sock, self.buf)
        return status, keep


def warm_connections(port: int, request: bytes, count: int, timeout: float) -> tuple[list[Conn], float, int]:
    """Open `count` keep-alive connections and get one answer on each (untimed): the measurement then
    starts from a steady state. Returns the connections, how long that took, and how many failed."""
    conns: list[Conn] = []
    failed = [0]

    def one() -> None:
        try:
            conn = Conn(port, timeout)
            conn.call(request)
            conns.append(conn)
        except (OSError, ValueError):
            failed[0] += 1

    started = now()
    workers = [gevent.spawn(one) for _ in range(count)]
    gevent.joinall(workers, timeout=timeout + 5)
    gevent.killall(workers, block=True, timeout=5)
    return conns, now() - started, failed[0]


def run_http(spec: dict) -> dict:
    port, requests = spec["port"], [r.encode() for r in spec["requests"]]
    duration, timeout = spec["duration"], spec.get("timeout", 15)
    latencies: list[float] = []
    errors: dict[str, int] = {}

    def note(error: str) -> None:
        errors[error] = errors.get(error, 0) + 1

    warm_count = spec["concurrency"] if not spec.get("rate") else spec.get("warm_connections", 32)
    conns, warm_seconds, warm_failed = warm_connections(port, requests[0], warm_count, timeout)
    cpu0, t0 = cpu_seconds(), now()
    end = t0 + duration
    if spec.get("rate"):
        rate, idle, opened = spec["rate"], Queue(), [len(conns)]
        for conn in conns:
            idle.put(conn)
        max_conns = spec.get("max_connections", 256)

        def fire(index: int, scheduled: float) -> None:
            conn = None
            try:
                if idle.qsize() == 0 and opened[0] < max_conns:
                    opened[0] += 1
                    conn = Conn(port, timeout)
                else:
                    conn = idle.get(timeout=timeout)
                status, keep = conn.call(requests[index % len(requests)])
                latencies.append(now() - scheduled)
                if status != 200:
                    note(f"http_{status}")
                if keep:
                    idle.put(conn)
                else:
                    conn.sock.close()
                    opened[0] -= 1
            except (OSError, ValueError, gevent.queue.Empty) as exc:
                note(type(exc).__name__)
                if conn is not None:
                    conn.sock.close()
                    opened[0] -= 1

        workers, index = [], 0
        while True:
            scheduled = t0 + index / rate
            if scheduled >= end:
                break
            delay = scheduled - now()
            if delay > 0:
                gevent.sleep(delay)
            workers.append(gevent.spawn(fire, index, scheduled))
            index += 1
        gevent.joinall(workers, timeout=timeout + 5)
        gevent.killall(workers, block=True, timeout=5)
        sent = index
        while idle.qsize():
            idle.get().sock.close()
    else:
        sent_count = [0]

        def closed_loop(slot: int) -> None:
            conn = conns[slot] if slot < len(conns) else None
            index = slot
            while now() < end:
                try:
                    if conn is None:
                        conn = Conn(port, timeout)
                    started = now()
                    sent_count[0] += 1
                    status, keep = conn.call(requests[index % len(requests)])
                    latencies.append(now() - started)
                    if status != 200:
                        note(f"http_{status}")
                    if not keep:
                        conn.sock.close()
                        conn = None
                except (OSError, ValueError) as exc:
                    note(type(exc).__name__)
                    if conn is not None:
                        conn.sock.close()
                    conn = None
                index += spec["concurrency"]
            if conn is not None:
                conn.sock.close()

        workers = [gevent.spawn(closed_loop, i) for i in range(spec["concurrency"])]
        gevent.joinall(workers, timeout=duration + timeout + 5)
        gevent.killall(workers, block=True, timeout=5)
        sent = sent_count[0]
    wall = now() - t0
    failed = sum(errors.values())
    unfinished = max(0, sent - len(latencies) - failed)  # still waiting when the time was up
    if unfinished:
        errors["unfinished"] = unfinished
    return {"mode": "http", "rate": spec.get("rate"), "concurrency": spec.get("concurrency"), "sent": sent,
            "done": len(latencies), "errors": sum(errors.values()), "error_kinds": errors, "wall": wall,
            "req_per_s": len(latencies) / wall if wall else None, "latency": summary(latencies),
            "warm_connections": warm_count, "warm_seconds": warm_seconds, "warm_failed": warm_failed,
            "loadgen_cpu": cpu_seconds() - cpu0}


def main() -> None:
    raise_nofile()
    with open(sys.argv[1], encoding="utf-8") as handle:
        spec = json.load(handle)
    if spec.get("port") is None or not isinstance(spec["port"], int):
        raise SystemExit("spec needs an integer port (the host is always 127.0.0.1)")
    mode = spec["mode"]
    result = {"stream": run_streams, "hold": run_hold, "http": run_http}[mode](spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
