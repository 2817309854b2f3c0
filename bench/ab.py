"""Interleaved A/B: this checkout against another commit of chatapp, under the benchmark's streamed load.

    .venv/bin/python bench/ab.py BASE [--rounds 10] [--database sqlite|pg]
    .venv/bin/python bench/ab.py HEAD --smoke       # part of `make bench-smoke`: checks the harness works

This VM's speed drifts by a third within an hour, so two full runs of `make bench` cannot tell a 10 %
change from the weather. Two versions served side by side, measured in alternating order, can. BASE (any
git revision) is checked out into a temporary git worktree and served beside the working tree: same venv,
same fake upstream, `make run` settings. Each round runs, for each side: C=50 streams of 50 chunks, C=50
one-chunk replies (their CPU is the cost per reply), and C=1 streams. Prints every round, then the
medians, and each side's summed RSS and PSS when idle and after the rounds. Only 127.0.0.1 is dialled.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import run
from run import ROOT, Bench, Chatapp, log, reply_costs, stream_load, tree_pss, tree_rss

FIGURES = (  # key, label, format
    ("per_chunk_us", "server CPU per chunk at C=50 (us)", "{:.0f}"),
    ("reply_ms", "  of which per reply (ms)", "{:.2f}"),
    ("further_us", "  and per further chunk (us)", "{:.0f}"),
    ("c50_p99_ms", "C=50 TTFT p99 (ms)", "{:.1f}"),
    ("c1_p50_ms", "C=1 TTFT p50 (ms)", "{:.1f}"),
)


def phase(bench: Bench, side: Chatapp, model: str, concurrency: int, rounds: int, chunks: int) -> dict:
    result = bench.measured(side, stream_load(side, model, concurrency, rounds, chunks, 120), 300)
    if not result.get("ok") or result.get("errors"):
        raise run.BenchError(f"{side.name} {model} C={concurrency}: {run.brief(result)}")
    return result


def one_round(bench: Bench, side: Chatapp, cfg: dict, chunks: int) -> dict:
    full = phase(bench, side, "bench", cfg["c50"], cfg["c50_rounds"], chunks)
    short = phase(bench, side, "bench-short", cfg["c50"], cfg["c50_rounds"], 1)
    c1 = phase(bench, side, "bench", 1, cfg["c1_rounds"], chunks)
    reply, further = reply_costs(short, full)
    return {"per_chunk_us": full["server_cpu_per_chunk_us"], "reply_ms": reply * 1e3, "further_us": further * 1e6,
            "c50_p99_ms": full["ttft"]["p99"] * 1e3, "c1_p50_ms": c1["ttft"]["p50"] * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description="interleaved A/B of two chatapp commits (see bench/README.md)")
    parser.add_argument("base", help="the git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--database", choices=("sqlite", "pg"), default="sqlite")
    parser.add_argument("--smoke", action="store_true", help="one tiny round: checks the harness works")
    args = parser.parse_args()
    run.raise_nofile()
    cfg = run.SMOKE if args.smoke else run.FULL
    upstream = run.SMOKE_UPSTREAM if args.smoke else run.UPSTREAM
    rounds = 1 if args.smoke else args.rounds
    bench = Bench(cfg, args.smoke, 3600, None)
    checkout = Path(tempfile.mkdtemp(prefix="chatapp-ab-")) / "base"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(checkout), args.base], cwd=ROOT, check=True)
    failed = True
    try:
        bench.upstream = run.Upstream(bench.procs, bench.workdir, upstream)
        sides, memory = [], {}
        per_side = rounds * (cfg["c50"] * 2 + 1) + 10  # each phase takes a conversation per concurrent stream
        for name, root in (("base", checkout), ("this", ROOT)):
            side = Chatapp(name, name, bench.database_url(name, args.database), bench.procs, bench.workdir,
                           bench.upstream, root=root)
            side.start()
            bench.settle([side.pid], 10)
            memory[name] = [tree_rss(side.pid), tree_pss(side.pid)]
            side.setup(per_side, 10)
            sides.append(side)
        bench.systems = list(sides)  # what measured() waits to be idle before each phase
        results: dict[str, list[dict]] = {side.name: [] for side in sides}
        for number in range(rounds):
            for side in Bench.order(sides, number):
                figures = one_round(bench, side, cfg, upstream["chunks"])
                results[side.name].append(figures)
                log(f"round {number + 1} {side.name}: " + ", ".join(f"{key} {value:.1f}"
                                                                    for key, value in figures.items()))
        for side in sides:
            memory[side.name] += [tree_rss(side.pid), tree_pss(side.pid)]
        failed = False
    finally:
        bench.procs.stop_all()
        bench.drop_pg_databases()
        subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=ROOT, capture_output=True)
        shutil.rmtree(checkout.parent, ignore_errors=True)
        if failed:
            print(f"A/B failed: the servers' and load generator's logs are in {bench.workdir}")
        else:
            shutil.rmtree(bench.workdir, ignore_errors=True)
    print(f"\nA/B, {rounds} rounds on {args.database}, medians: base = {args.base}, this = the working tree")
    print(f"{'':40}{'base':>12}{'this':>12}")
    for key, label, fmt in FIGURES:
        cells = [fmt.format(statistics.median(item[key] for item in results[name])) for name in ("base", "this")]
        print(f"{label:40}{cells[0]:>12}{cells[1]:>12}")
    for index, label in enumerate(("idle RSS / PSS (MB)", "after the rounds RSS / PSS (MB)")):
        cells = [f"{memory[name][2 * index] / 1e6:.0f} / {memory[name][2 * index + 1] / 1e6:.0f}"
                 for name in ("base", "this")]
        print(f"{label:40}{cells[0]:>12}{cells[1]:>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
