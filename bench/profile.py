"""Where chatapp's CPU goes under the benchmark's load: /proc's user/system split, then py-spy on the workers.

    .venv/bin/python bench/profile.py [stream|reply|list|history] [--seconds 15] [--database sqlite|pg]
    .venv/bin/python bench/profile.py reply --smoke     # part of `make bench-smoke`: checks the tool works

Serves the working tree as bench/run.py does (same venv, fake upstream, `make run` settings, seeded
database) and puts one load on it, over and over:

* ``stream``  C=50 streams of 50 chunks (the benchmark's C=50 phase): the cost per chunk;
* ``reply``   C=50 one-chunk replies: a reply's fixed cost (auth, the turn's statements, the model request);
* ``list``    GET /conversation (20 rows) at C=50, closed loop;
* ``history`` GET /chat/<id> (1,000 messages) at C=50, closed loop.

First the load runs alone and the server's CPU per unit (chunk or request) is read from /proc, split into
user and system time. Then it runs again while py-spy samples both workers (``--nonblocking``: the workers
are never paused), and the functions with the most samples are printed, inclusive (the function or anything
it called) and self (the function's own code, system calls included), as a share of all samples of both
workers. py-spy counts a sample wherever a worker's Python thread was not idle, so time spent preempted
inside a system call (a send that woke the reader) counts too: the user/system figures are the CPU, the
profile is where the workers spend it. The collapsed stacks are written to bench/results/ (input for
flamegraph.pl or speedscope). Only 127.0.0.1 is dialled.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import run
from run import RESULTS, VENV_BIN, Bench, Chatapp, crud_load, process_tree, stream_load, tree_cpu_split

LOADS = {  # name: (what one unit is, the load's spec for a system, given run.FULL or run.SMOKE and the upstream)
    "stream": ("chunk", lambda side, cfg, up: stream_load(side, "bench", cfg["c50"], 1, up["chunks"], 120)),
    "reply": ("reply", lambda side, cfg, up: stream_load(side, "bench-short", cfg["c50"], 1, 1, 120)),
    "list": ("request", lambda side, cfg, up: crud_load(side, side.crud_requests()["list"], cfg)),
    "history": ("request", lambda side, cfg, up: crud_load(side, side.crud_requests()["history"], cfg)),
}
_LINE = re.compile(r":\d+\)$")  # "function (file:line)" -> one entry per function, whatever the line


def units(result: dict) -> int:
    return result.get("chunks") if result.get("mode") == "stream" else result.get("done", 0)


def loop(bench: Bench, side: Chatapp, load: str, seconds: float) -> tuple[int, float, float]:
    """Run the load until `seconds` pass; (units served, user and system CPU seconds of the server's tree)."""
    user0, system0 = tree_cpu_split(side.pid)
    served, ends = 0, time.monotonic() + seconds
    while True:
        if side.next_conversation + bench.cfg["c50"] > len(side.conversations):
            side.next_conversation = 0  # the round before has ended: its conversations are free again
        result = bench.loadgen(LOADS[load][1](side, bench.cfg, bench.up), 300)
        if not units(result) or result.get("errors"):
            raise run.BenchError(f"{load}: {run.brief(result)}")
        served += units(result)
        if time.monotonic() >= ends:
            break
    user1, system1 = tree_cpu_split(side.pid)
    return served, user1 - user0, system1 - system0


def top(paths: list[Path], count: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples, the most inclusive functions, the most self functions) of py-spy's raw collapsed stacks."""
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, number = line.rpartition(" ")
            if not number.isdigit():
                continue  # py-spy can print a frame's odd name over several lines; such lines carry no count
            samples = int(number)
            frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
            total += samples
            inclusive.update(dict.fromkeys(frames, samples))
            own[frames[-1]] += samples
    return total, inclusive.most_common(count), own.most_common(count)


def main() -> int:
    parser = argparse.ArgumentParser(description="profile chatapp's workers under one benchmark load")
    parser.add_argument("load", nargs="?", choices=sorted(LOADS), default="stream")
    parser.add_argument("--seconds", type=float, default=15, help="how long each of the two passes runs")
    parser.add_argument("--database", choices=("sqlite", "pg"), default="sqlite")
    parser.add_argument("--rate", type=int, default=200, help="py-spy's samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny loads, one second each: checks the tool")
    args = parser.parse_args()
    seconds = 1.0 if args.smoke else args.seconds
    spy = VENV_BIN / "py-spy"
    if not spy.exists():
        spy = Path(shutil.which("py-spy") or spy)
    run.raise_nofile()
    bench = Bench(run.SMOKE if args.smoke else run.FULL, args.smoke, 3600, None)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    outputs = [RESULTS / f"profile-{args.load}-{args.database}-{stamp}-worker{i}.txt" for i in range(2)]
    failed = True
    try:
        bench.upstream = run.Upstream(bench.procs, bench.workdir, bench.up)
        side = Chatapp("chatapp", "chatapp", bench.database_url("chatapp", args.database), bench.procs,
                       bench.workdir, bench.upstream)
        side.start()
        side.setup(60 if args.smoke else 1000, 10 if args.smoke else 1000)  # 1,000 messages: the history load
        bench.systems = [side]
        bench.settle([side.pid], 10)
        loop(bench, side, args.load, 0)  # warm: pools, caches, lazy imports
        served, user, system = loop(bench, side, args.load, seconds)
        unit = LOADS[args.load][0]
        print(f"\nchatapp ({args.database}), load {args.load}: {served} {unit.replace('y', 'ie')}s in {seconds:.0f} s")
        print(f"server CPU per {unit}: {(user + system) / served * 1e6:.0f} us "
              f"(user {user / served * 1e6:.0f}, system {system / served * 1e6:.0f})")
        workers = [pid for pid in process_tree(side.pid) if pid != side.pid]
        RESULTS.mkdir(exist_ok=True)
        spies = [bench.procs.start([spy, "record", "--pid", pid, "--rate", args.rate, "--duration", int(seconds) + 1,
                                    "--format", "raw", "--output", output, "--nonblocking"],
                                   log_path=bench.workdir / "py-spy.log")
                 for pid, output in zip(workers, outputs, strict=False)]
        time.sleep(0.5)  # py-spy attaching
        loop(bench, side, args.load, seconds)
        for proc in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        written = [path for path in outputs if path.exists() and path.stat().st_size]
        if not written:
            print(f"\npy-spy wrote no samples (can it attach? it needs ptrace); its log: {bench.workdir / 'py-spy.log'}")
            return 1
        total, inclusive, own = top(written, args.top)
        print(f"\npy-spy, {total} samples of {len(workers)} workers at {args.rate}/s; share of all samples:")
        for title, rows in (("inclusive", inclusive), ("self", own)):
            print(f"-- {title}")
            for name, samples in rows:
                print(f"{samples / total * 100:6.1f} %  {name[:110]}")
        print("\ncollapsed stacks: " + ", ".join(str(path.relative_to(run.ROOT)) for path in written))
        failed = False
    finally:
        bench.procs.stop_all()
        bench.drop_pg_databases()
        if failed:
            print(f"profile failed: the logs are in {bench.workdir}")
        else:
            shutil.rmtree(bench.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
