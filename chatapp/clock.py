"""The one clock: everything that needs the time asks here, so tests can move it."""

from __future__ import annotations

import os
import secrets
import time
import uuid
from datetime import datetime, timezone

_offset = 0.0  # seconds added by tests that travel in time


def now() -> datetime:
    """Aware UTC now, truncated to milliseconds (what the API shows and what lists sort by)."""
    moment = datetime.fromtimestamp(time.time() + _offset, tz=timezone.utc)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def travel(seconds: float) -> None:
    """Test hook: shift the clock forward (or back with a negative value)."""
    global _offset
    _offset += seconds


def reset() -> None:
    global _offset
    _offset = 0.0


def isoformat(moment: datetime | None) -> str | None:
    """UTC with milliseconds and a Z: 2026-01-02T03:04:05.678Z (naive values are UTC already).

    Every timestamp of every list and history row passes here, so it uses datetime's own C formatting:
    strftime and astimezone made it a tenth of the CPU of a GET /conversation.
    """
    if moment is None:
        return None
    if moment.tzinfo is not timezone.utc:
        moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"  # "+00:00" -> "Z"


_last_ms = 0
_seq = 0


def new_id() -> str:
    """A UUIDv7 string: random enough to be opaque, time-ordered so ties sort in creation order.

    Within one process the 12-bit sequence keeps ids strictly increasing even in the same millisecond,
    which is what makes a user message sort before the assistant reply created right after it.
    """
    global _last_ms, _seq
    ms = int(time.time() * 1000)
    if ms <= _last_ms:
        _seq += 1
        if _seq > 0xFFF:  # sequence exhausted: borrow the next millisecond
            _last_ms += 1
            _seq = 0
        ms = _last_ms
    else:
        _last_ms, _seq = ms, secrets.randbelow(0x200)
    value = (ms & 0xFFFFFFFFFFFF) << 80 | 0x7 << 76 | _seq << 64 | 0b10 << 62 | secrets.randbits(62)
    return str(uuid.UUID(int=value))


def process_tag() -> str:
    """Identifies this worker process in rows it owns (streaming messages): host:pid:start."""
    pid = os.getpid()
    if _tag[0] != pid:  # once per process (a fork gets its own), not once per send
        _tag[:] = [pid, f"{os.uname().nodename}:{pid}:{_process_start(pid) or 0}"]
    return _tag[1]


_tag: list = [None, ""]


def worker_alive(tag: str | None) -> bool:
    """Whether the process a tag names still runs; another host's is assumed alive (only age condemns it)."""
    if not tag:
        return False
    host, _, rest = tag.partition(":")
    pid, _, started = rest.partition(":")
    if host != os.uname().nodename:
        return True
    try:
        return _process_start(int(pid)) == started
    except ValueError:
        return False


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
