"""The relay benchmark: direct vs chatapp (SQLite, PostgreSQL) vs LiteLLM proxy, interleaved in one run.

    .venv/bin/python bench/run.py            # `make bench`: the full run (under 10 minutes)
    .venv/bin/python bench/run.py --smoke    # `make bench-smoke`: ~10 s check that the harness works

Starts the fake upstream (bench/upstream.py), chatapp under real gunicorn + gevent with `make run`
settings (2 workers) on SQLite and on a fresh PostgreSQL database, and LiteLLM proxy (installed into
bench/.litellm-venv when missing), then runs every load phase against each system in turn, prints a
table with the issue's targets marked MET/MISSED and writes bench/results/<timestamp>.json.
Every connection goes to 127.0.0.1; every process is started in its own process group and stopped on
the way out, whatever happens. See bench/README.md for what each figure means.

Knobs (environment, bench only): BENCH_BUDGET_SECONDS (default 570), BENCH_SYSTEMS (comma list of
direct,chatapp-sqlite,chatapp-pg,litellm), BENCH_LITELLM_INSTALL_TIMEOUT (default 300 s).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PY = Path(sys.executable)
VENV_BIN = PY.parent
LITELLM_VENV = BENCH / ".litellm-venv"
LITELLM_PIN = "1.100.5"
BOOST_NICE = -10  # load generator and upstream (needs root; without it they run at the servers' priority)
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PASSWORD = "bench correct horse battery staple"
MODELS = ("bench", "bench-close", "bench-hold", "bench-short")
UPSTREAM = {"first_delay": 0.05, "gap": 0.02, "chunks": 50, "hold_gap": 0.5, "hold_chunks": 200}
SMOKE_UPSTREAM = {**UPSTREAM, "gap": 0.005, "chunks": 10}  # the smoke checks the harness, not the figures

HOLD_WARMUP = 5  # streams through a freshly restarted server before its idle RSS is read

FULL = {
    "warmup": (10, 1), "c1_rounds": 15, "c50": 50, "c50_rounds": 3, "c200": 200, "c200_rounds": 2,
    "close_rounds": 2, "holds": [1000, 3000, 5000], "hold_seconds": 2.0, "crud_seconds": 3.0, "crud_concurrency": 50,
    "open_rate": 500, "open_seconds": 4.0, "held_crud_rate": 200, "held_crud_seconds": 3.0, "crud_hold": 1000,
    "pg": True, "litellm": True,
}
SMOKE = {
    "warmup": (2, 1), "c1_rounds": 2, "c50": 5, "c50_rounds": 1, "c200": 10, "c200_rounds": 1,
    "close_rounds": 1, "holds": [20], "hold_seconds": 1.0, "crud_seconds": 0.5, "crud_concurrency": 5,
    "open_rate": 100, "open_seconds": 0.5, "held_crud_rate": 50, "held_crud_seconds": 0.5, "crud_hold": 20,
    "pg": False, "litellm": False,
}


class BenchError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes, /proc


class Processes:
    """Every child in its own process group; stop() takes the whole group down (workers included)."""

    def __init__(self) -> None:
        self.items: list[subprocess.Popen] = []
        self.unboosted = False

    def start(self, argv: list[str], *, log_path: Path, env: dict | None = None, cwd: Path = ROOT,
              stdin=subprocess.DEVNULL, stdout=None, boost: bool = False) -> subprocess.Popen:
        """boost: run at a higher priority than the servers under test (the load generator and the
        upstream stand in for other machines; they must not queue behind a saturated server for CPU)."""
        with open(log_path, "ab") as handle:
            proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env, stdin=stdin,
                                    stdout=stdout if stdout is not None else handle, stderr=handle,
                                    start_new_session=True)
        self.items.append(proc)
        if boost:
            try:
                os.setpriority(os.PRIO_PROCESS, proc.pid, BOOST_NICE)
            except OSError:
                self.unboosted = True
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, grace: float = 10) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left (workers of a dead master)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def stop_all(self) -> None:
        for proc in reversed(self.items):
            self.stop(proc)


def _stat(pid: int) -> tuple[int, int, int]:
    """(ppid, user ticks, system ticks) of one process, its reaped children's included."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        rest = handle.read().rsplit(")", 1)[1].split()
    return int(rest[1]), int(rest[11]) + int(rest[13]), int(rest[12]) + int(rest[14])


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(_stat(int(entry))[0], []).append(int(entry))
    tree, index = [root], 0
    while index < len(tree):
        tree.extend(children.get(tree[index], []))
        index += 1
    return tree


def tree_cpu_split(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds, reaped children included, of a process and all its descendants."""
    user = system = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            _, pid_user, pid_system = _stat(pid)
            user, system = user + pid_user, system + pid_system
    return user / CLK_TCK, system / CLK_TCK


def tree_cpu(root: int) -> float:
    """CPU seconds (user+system, reaped children included) of a process and all its descendants."""
    return sum(tree_cpu_split(root))


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu() -> float:
    """CPU seconds of this process and every child it has reaped (servers, load generators, scripts)."""
    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def _tree_sum(root: int, proc_file: str, field: str) -> int:
    """Sum of one kB figure (bytes) from /proc/<pid>/<proc_file> over a process and all its descendants."""
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/{proc_file}", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def tree_rss(root: int) -> int:
    """Sum of VmRSS (bytes) over a process tree."""
    return _tree_sum(root, "status", "VmRSS:")


def tree_pss(root: int) -> int:
    """Sum of Pss (bytes) over a process tree: each shared page counted once, split among its sharers."""
    return _tree_sum(root, "smaps_rollup", "Pss:")


# ------------------------------------------------------------------ HTTP helpers (127.0.0.1 only)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def call(port: int, method: str, path: str, body=None, token: str | None = None, timeout: float = 30):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            return response.status, data
    finally:
        conn.close()


def wait_http(port: int, path: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until GET path answers 200 (polled every 10 ms); BenchError if the process dies first."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise BenchError(f"exited with code {proc.returncode} before answering {path}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if call(port, "GET", path, timeout=2)[0] == 200:
                return time.monotonic() - started
        time.sleep(0.01)
    raise BenchError(f"no 200 from {path} within {timeout:.0f} s")


def raw_request(method: str, path: str, port: int, body=None, token: str | None = None) -> str:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "User-Agent: chatapp-bench"]
    data = ""
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        data = json.dumps(body)
        lines += ["Content-Type: application/json", f"Content-Length: {len(data.encode())}"]
    return "\r\n".join(lines) + "\r\n\r\n" + data


def read_line(stream, timeout: float) -> str:
    """One line from a child's stdout pipe, or BenchError after timeout."""
    deadline, buf = time.monotonic() + timeout, b""
    fd = stream.fileno()
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError("timed out waiting for the load generator")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            byte = os.read(fd, 1)
            if not byte:
                raise BenchError("the load generator exited early")
            buf += byte
    return buf.decode().rstrip("\n")


# ------------------------------------------------------------------ systems under test


class System:
    name = ""
    label = ""
    kind = ""

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.skipped: str | None = None
        self.info: dict = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stream_spec(self, model: str, slots: int) -> dict:
        raise NotImplementedError


class Upstream:
    def __init__(self, procs: Processes, workdir: Path, settings: dict) -> None:
        self.port = free_port()
        self.proc = procs.start(
            [PY, BENCH / "upstream.py", "--port", self.port, "--first-delay", settings["first_delay"],
             "--gap", settings["gap"], "--chunks", settings["chunks"], "--hold-gap", settings["hold_gap"],
             "--hold-chunks", settings["hold_chunks"]], log_path=workdir / "upstream.log", boost=True)
        wait_http(self.port, "/healthz", self.proc, 15)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"


class Direct(System):
    name, label, kind = "direct", "direct", "direct"

    def __init__(self, upstream: Upstream) -> None:
        super().__init__()
        self.port, self.proc = upstream.port, upstream.proc

    def stream_spec(self, model: str, slots: int) -> dict:
        body = {"model": model, "messages": [{"role": "user", "content": "Hello bench"}], "stream": True,
                "stream_options": {"include_usage": True}}
        return {"port": self.port, "requests": [raw_request("POST", "/v1/chat/completions", self.port, body)],
                "content_marker": "@@", "end_marker": "data: [DONE]", "error_markers": ['data: {"error"']}


class Chatapp(System):
    kind = "chatapp"

    def __init__(self, name: str, label: str, database_url: str, procs: Processes, workdir: Path,
                 upstream: Upstream, root: Path = ROOT) -> None:
        super().__init__()
        self.name, self.label, self.database_url = name, label, database_url
        self.root = root  # the checkout served: bench/ab.py serves another commit's beside this one
        self.procs, self.workdir, self.upstream = procs, workdir / name, upstream
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conversations: list[str] = []
        self.next_conversation = 0
        self.configs: dict[str, str] = {}
        self.token = ""
        self.crud: dict = {}

    def env(self) -> dict:
        env = {key: value for key, value in os.environ.items() if not key.startswith("CHATAPP_")}
        env.update({
            "PORT": str(self.port), "HOST": HOST, "PYTHONPATH": str(self.root),
            "CHATAPP_WORKERS": "2",  # `make run`'s setting, pinned so the comparison stays the issue's
            "CHATAPP_WORKER_CONNECTIONS": "6000",  # room for the 5,000-stream hold test in one worker
            "CHATAPP_SECRET_KEY": "bench-secret-" + "z" * 32,
            "CHATAPP_INSTANCE_PATH": str(self.workdir / "instance"),
            "CHATAPP_DATABASE_URL": self.database_url,
            "CHATAPP_MODEL_HOST_ALLOWLIST": HOST,
            "CHATAPP_RATELIMIT_REGISTER": "1000000 per minute",
            "CHATAPP_RATELIMIT_LOGIN": "1000000 per minute",
            "CHATAPP_RATELIMIT_LOGIN_FAILURES": "1000000 per minute",
            "CHATAPP_RATELIMIT_PASSWORD_FAILURES": "1000000 per minute",
            "CHATAPP_STREAMS_PER_USER": "1000000",  # every stream of the benchmark belongs to one user
            "CHATAPP_JWT_ACCESS_SECONDS": "7200",  # the run's tokens must outlive the run
        })
        return env

    def _script(self, script: str, order: dict, timeout: float = 120) -> dict:
        result = subprocess.run([str(PY), str(BENCH / script)], input=json.dumps(order), capture_output=True,
                                text=True, env=self.env(), cwd=self.root, timeout=timeout)
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if result.returncode or not lines:
            raise BenchError(f"{script} failed ({result.returncode}): {result.stderr[-2000:]}")
        return json.loads(lines[-1][7:])

    def start(self, migrate: bool = True) -> float:
        """Migrate, then serve as `make run` does; returns seconds from process start to /healthz 200."""
        if migrate:
            started = time.monotonic()
            result = subprocess.run([str(VENV_BIN / "flask"), "--app", "wsgi", "db", "upgrade"], env=self.env(),
                                    cwd=self.root, capture_output=True, text=True, timeout=120)
            if result.returncode:
                raise BenchError(f"migrations failed: {result.stderr[-2000:]}")
            self.info["migrate_seconds"] = time.monotonic() - started
        # As `make run` does (gunicorn.conf.py turns the control socket off, so two servers coexist).
        self.proc = self.procs.start([VENV_BIN / "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                     env=self.env(), log_path=self.workdir / "gunicorn.log", cwd=self.root)
        startup = wait_http(self.port, "/healthz", self.proc, 30)
        self.info.setdefault("startup_seconds", startup)
        return startup

    def restart(self) -> float:
        if self.proc is not None:
            self.procs.stop(self.proc)
        return self.start(migrate=False)

    def setup(self, conversations: int, history_messages: int) -> None:
        status, body = call(self.port, "POST", "/api/v1/user/register", {
            "email": f"bench-{self.name}@example.com", "username": "Bench", "password": PASSWORD})
        if status != 201:
            raise BenchError(f"register: {status} {body}")
        self.token, user_id = body["access_token"], body["user"]["id"]
        for model in MODELS:
            status, body = call(self.port, "POST", "/api/v1/model_config/create", {
                "name": model, "base_url": self.upstream.base_url, "model": model,
                "api_key": "sk-bench-0123456789abcdef"}, self.token)
            if status != 201:
                raise BenchError(f"model_config/create: {status} {body}")
            self.configs[model] = body["id"]
        # The CRUD user: 20 conversations (the list), one of them with a history of 1,000 messages.
        email = f"crud-{self.name}@example.com"
        status, body = call(self.port, "POST", "/api/v1/user/register", {
            "email": email, "username": "Crud", "password": PASSWORD})
        if status != 201:
            raise BenchError(f"register: {status} {body}")
        crud_token = body["access_token"]
        status, body = call(self.port, "POST", "/api/v1/model_config/create", {
            "name": "bench", "base_url": self.upstream.base_url, "model": "bench"}, crud_token)
        if status != 201:
            raise BenchError(f"model_config/create: {status} {body}")
        crud_config, crud_conversations = body["id"], []
        for _ in range(20):
            status, body = call(self.port, "POST", "/api/v1/conversation/create", {"model_config_id": crud_config},
                                crud_token)
            if status != 201:
                raise BenchError(f"conversation/create: {status} {body}")
            crud_conversations.append(body["id"])
        self.conversations = self._script("seed.py", {
            "user_id": user_id, "model_config_id": self.configs["bench"], "conversations": conversations,
            "history": {"conversation_id": crud_conversations[0], "messages": history_messages}})["conversations"]
        self.crud = {"token": crud_token, "email": email, "history": crud_conversations[0]}
        status, body = call(self.port, "GET", "/api/v1/conversation", token=crud_token)
        if status != 200 or len(body["items"]) != 20:
            raise BenchError(f"GET /conversation: {status}, expected 20 rows")

    def statements(self) -> dict:
        return self._script("db_statements.py", {"upstream": self.upstream.base_url})

    def allocate(self, count: int) -> list[str]:
        """Fresh conversations: a conversation streams one reply at a time, so one per concurrent stream."""
        if self.next_conversation + count > len(self.conversations):
            raise BenchError("ran out of seeded conversations")
        chosen = self.conversations[self.next_conversation:self.next_conversation + count]
        self.next_conversation += count
        return chosen

    def stream_spec(self, model: str, slots: int) -> dict:
        requests = [raw_request("POST", "/api/v1/chat/send", self.port, {
            "conversation_id": conversation, "message": {"content": "Hello bench"},
            "model_config_id": self.configs[model]}, self.token) for conversation in self.allocate(slots)]
        return {"port": self.port, "requests": requests, "content_marker": "@@",
                "end_marker": "event: message.completed", "error_markers": ["event: error"]}

    def crud_requests(self) -> dict:
        token = self.crud["token"]
        return {
            "list": [raw_request("GET", "/api/v1/conversation", self.port, token=token)],
            "history": [raw_request("GET", f"/api/v1/chat/{self.crud['history']}", self.port, token=token)],
            "login": [raw_request("POST", "/api/v1/user/login", self.port,
                                  {"email": self.crud["email"], "password": PASSWORD})],
        }


class LiteLLM(System):
    name, label, kind = "litellm", "litellm", "litellm"

    def __init__(self, procs: Processes, workdir: Path, upstream: Upstream) -> None:
        super().__init__()
        self.procs, self.workdir, self.upstream = procs, workdir / "litellm", upstream
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()

    @staticmethod
    def installed_version() -> str | None:
        python = LITELLM_VENV / "bin" / "python"
        if not python.exists():
            return None
        result = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                                capture_output=True, text=True, timeout=60)
        return result.stdout.strip() if result.returncode == 0 else None

    @classmethod
    def ensure_installed(cls, timeout: float) -> str | None:
        """None when litellm[proxy]==PIN is ready in bench/.litellm-venv, else why it is not."""
        if cls.installed_version() == LITELLM_PIN:
            return None
        log(f"installing litellm[proxy]=={LITELLM_PIN} into {LITELLM_VENV} (once; up to {timeout:.0f} s)")
        started = time.monotonic()
        try:
            if not (LITELLM_VENV / "bin" / "python").exists():
                base = getattr(sys, "_base_executable", None) or shutil.which("python3.11") or "python3"
                subprocess.run([base, "-m", "venv", str(LITELLM_VENV)], check=True, timeout=120,
                               capture_output=True)
            remaining = timeout - (time.monotonic() - started)
            result = subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "--disable-pip-version-check",
                                     "-q", f"litellm[proxy]=={LITELLM_PIN}"], capture_output=True, text=True,
                                    timeout=max(10.0, remaining))
        except subprocess.TimeoutExpired:
            return f"installing litellm[proxy]=={LITELLM_PIN} took longer than {timeout:.0f} s"
        except (OSError, subprocess.CalledProcessError) as exc:
            return f"could not create {LITELLM_VENV}: {exc}"
        if result.returncode:
            errors = [line for line in result.stderr.splitlines() if "is ignored" not in line]
            return f"pip install litellm[proxy]=={LITELLM_PIN} failed: {' | '.join(errors[-3:])}"
        if cls.installed_version() != LITELLM_PIN:
            return f"litellm {LITELLM_PIN} not importable after install"
        log(f"litellm installed in {time.monotonic() - started:.0f} s")
        return None

    def start(self) -> float:
        models = [{"model_name": model, "litellm_params": {
            "model": f"openai/{model}", "api_base": self.upstream.base_url, "api_key": "sk-bench-0123456789abcdef"}}
            for model in MODELS]
        config = {
            "model_list": models,
            "litellm_settings": {"drop_params": True, "telemetry": False, "success_callback": [],
                                 "failure_callback": [], "callbacks": [], "request_timeout": 600,
                                 "set_verbose": False, "json_logs": False},
            "general_settings": {"disable_spend_logs": True, "disable_error_logs": True,
                                 "store_model_in_db": False, "background_health_checks": False},
        }
        config_path = self.workdir / "config.yaml"
        config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
        loopback_proxy = "http://127.0.0.1:9"  # anything not bound for 127.0.0.1 goes nowhere
        env = {key: value for key, value in os.environ.items()
               if not key.upper().endswith("_PROXY") and not key.startswith(("LITELLM", "OPENAI", "DATABASE"))}
        env.update({
            "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MODEL_COST_MAP_URL": "http://127.0.0.1:9/x",
            "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION",
            "DISABLE_ADMIN_UI": "True", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HTTP_PROXY": loopback_proxy, "HTTPS_PROXY": loopback_proxy, "ALL_PROXY": loopback_proxy,
            "http_proxy": loopback_proxy, "https_proxy": loopback_proxy, "all_proxy": loopback_proxy,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        })
        started = time.monotonic()
        self.proc = self.procs.start(
            [LITELLM_VENV / "bin" / "litellm", "--config", config_path, "--host", HOST, "--port", self.port,
             "--num_workers", "2", "--telemetry", "False"], env=env, cwd=self.workdir,
            log_path=self.workdir / "litellm.log")
        wait_http(self.port, "/health/liveliness", self.proc, 120)
        self.info.setdefault("startup_seconds", time.monotonic() - started)
        return time.monotonic() - started

    def restart(self) -> float:
        if self.proc is not None:
            self.procs.stop(self.proc)
        return self.start()

    def stream_spec(self, model: str, slots: int) -> dict:
        body = {"model": model, "messages": [{"role": "user", "content": "Hello bench"}], "stream": True}
        return {"port": self.port, "requests": [raw_request("POST", "/v1/chat/completions", self.port, body)],
                "content_marker": "@@", "end_marker": "data: [DONE]", "error_markers": ['data: {"error"']}


# ------------------------------------------------------------------ the run


class Bench:
    def __init__(self, cfg: dict, smoke: bool, budget: float, only: set[str] | None) -> None:
        self.cfg, self.smoke, self.only = cfg, smoke, only
        self.up = SMOKE_UPSTREAM if smoke else UPSTREAM
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.procs = Processes()
        self.workdir = Path(tempfile.mkdtemp(prefix="chatapp-bench-"))
        self.systems: list[System] = []
        self.upstream: Upstream | None = None
        self.pg_databases: list[str] = []  # created by create_pg_database, dropped by close()
        self.spec_count = 0
        self.notes: list[str] = []
        self.machine0: float | None = None
        self.own0 = 0.0
        self.report: dict = {
            "meta": {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "smoke": smoke,
                     "cpus": os.cpu_count(), "python": platform.python_version(), "upstream": self.up,
                     "config": cfg, "commit": self._commit()},
            "systems": {}, "phases": {}, "crud": {}, "hold": {}, "statements": {}, "skipped": {},
        }

    @staticmethod
    def _commit() -> str | None:
        """HEAD, with '+dirty' when chatapp's code has uncommitted changes (read-only git calls)."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "chatapp", "config.py",
                                    "gunicorn.conf.py", "wsgi.py", "migrations"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=10).stdout.strip()
            return (head + ("+dirty" if dirty else "")) or None
        return None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def wanted(self, name: str) -> bool:
        return self.only is None or name in self.only

    def skip(self, name: str, why: str) -> None:
        label = {"litellm": "LiteLLM", "chatapp-pg": "PostgreSQL", "chatapp-sqlite": "chatapp (SQLite)"}.get(name, name)
        message = f"{label} skipped: {why}"
        self.report["skipped"][name] = why
        self.notes.append(message)
        log(message)

    # -------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        litellm_problem = None
        if cfg["litellm"] and self.wanted("litellm"):
            litellm_problem = LiteLLM.ensure_installed(float(os.environ.get("BENCH_LITELLM_INSTALL_TIMEOUT", 300)))
        self.upstream = Upstream(self.procs, self.workdir, self.up)
        log(f"upstream on {self.upstream.base_url}")
        direct = Direct(self.upstream)
        self.systems.append(direct)
        conversations = self.conversations_needed()
        candidates = []
        if self.wanted("chatapp-sqlite"):
            candidates.append(("chatapp-sqlite", "chatapp SQLite",
                               f"sqlite:///{self.workdir / 'chatapp-sqlite.sqlite3'}"))
        if cfg["pg"] and self.wanted("chatapp-pg"):
            url, why = self.create_pg_database()
            if url:
                candidates.append(("chatapp-pg", "chatapp PG", url))
            else:
                self.skip("chatapp-pg", why)
        for name, label, url in candidates:
            app = Chatapp(name, label, url, self.procs, self.workdir, self.upstream)
            try:
                app.start()
                self.settle([app.pid], 10)
                app.info["idle_rss_bytes"] = tree_rss(app.pid)
                app.info["idle_pss_bytes"] = tree_pss(app.pid)
                log(f"{name}: started in {app.info['startup_seconds']:.2f} s, idle RSS "
                    f"{app.info['idle_rss_bytes'] / 2**20:.0f} MB; seeding {conversations} conversations")
                app.setup(conversations, 1000)
                self.report["statements"][name] = app.statements()
            except (BenchError, OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
                self.skip(name, f"could not start or set up: {exc}")
                if app.proc is not None:
                    self.procs.stop(app.proc)
                continue
            self.systems.append(app)
        if cfg["litellm"] and self.wanted("litellm"):
            if litellm_problem:
                self.skip("litellm", litellm_problem)
            else:
                proxy = LiteLLM(self.procs, self.workdir, self.upstream)
                try:
                    proxy.start()
                    self.settle([proxy.pid], 15)
                    proxy.info["idle_rss_bytes"] = tree_rss(proxy.pid)
                    proxy.info["idle_pss_bytes"] = tree_pss(proxy.pid)
                    log(f"litellm: started in {proxy.info['startup_seconds']:.1f} s")
                    self.systems.append(proxy)
                except (BenchError, OSError) as exc:
                    tail = (proxy.workdir / "litellm.log").read_text(errors="replace")[-1500:]
                    self.skip("litellm", f"could not start: {exc}; log tail: {tail}")
                    if proxy.proc is not None:
                        self.procs.stop(proxy.proc)
        # One stream through each system before measuring anything: a broken system is skipped, not timed.
        for system in list(self.systems):
            result = self.loadgen(stream_load(system, "bench", 1, 1, self.up["chunks"], 20), 60)
            if result["ok"] != 1:
                self.systems.remove(system)
                self.skip(system.name, f"a single stream failed: {result['error_kinds']}")
        for system in self.systems:
            self.report["systems"][system.name] = {"label": system.label, "kind": system.kind, **system.info}

    def conversations_needed(self) -> int:
        cfg = self.cfg
        return (1 + cfg["warmup"][0] + 1 + cfg["c50"] + cfg["c200"] + cfg["c50"] * 2 + sum(cfg["holds"])
                + HOLD_WARMUP * len(cfg["holds"]) + 50)

    def create_pg_database(self) -> tuple[str | None, str]:
        if not shutil.which("createdb") or not shutil.which("pg_isready"):
            return None, "createdb/pg_isready not found (install PostgreSQL client tools)"
        ready = subprocess.run(["pg_isready", "-h", HOST, "-p", "5432", "-q"], timeout=15)
        if ready.returncode:
            return None, "no PostgreSQL answering on 127.0.0.1:5432"
        name = f"chatapp_bench_{os.getpid()}_{int(time.time())}_{len(self.pg_databases)}"
        result = subprocess.run(["createdb", "-h", HOST, "-U", "postgres", name], capture_output=True, text=True,
                                timeout=60)
        if result.returncode:
            return None, f"createdb failed: {result.stderr.strip()}"
        self.pg_databases.append(name)
        return f"postgresql+psycopg://postgres@{HOST}:5432/{name}", ""

    def database_url(self, name: str, kind: str) -> str:
        """A fresh database for one chatapp: an SQLite file in the run's folder, or a new PostgreSQL database."""
        if kind == "sqlite":
            return f"sqlite:///{self.workdir / (name + '.sqlite3')}"
        url, why = self.create_pg_database()
        if url is None:
            raise BenchError(why)
        return url

    def drop_pg_databases(self) -> None:
        while self.pg_databases:
            name = self.pg_databases.pop()
            subprocess.run(["dropdb", "-h", HOST, "-U", "postgres", "--if-exists", "--force", name],
                           capture_output=True, timeout=60)

    # -------------------------------------------------------------- measuring helpers
    def server_pids(self) -> list[int]:
        pids = [system.pid for system in self.systems if system.proc is not None and system.proc.poll() is None]
        return sorted(set(pids))

    def settle(self, pids: list[int] | None = None, max_wait: float = 15) -> float:
        """Wait until the servers are idle (< 4 % of a core over 250 ms), so phases don't overlap."""
        pids = self.server_pids() if pids is None else pids
        started = time.monotonic()
        previous = sum(tree_cpu(pid) for pid in pids)
        while time.monotonic() - started < max_wait:
            time.sleep(0.25)
            current = sum(tree_cpu(pid) for pid in pids)
            if current - previous < 0.01:
                break
            previous = current
        return time.monotonic() - started

    def loadgen(self, spec: dict, timeout: float) -> dict:
        self.spec_count += 1
        path = self.workdir / f"spec-{self.spec_count}.json"
        path.write_text(json.dumps(spec))
        proc = self.procs.start([PY, BENCH / "loadgen.py", path], stdout=subprocess.PIPE,
                                log_path=self.workdir / "loadgen.log", boost=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.procs.stop(proc)
            raise BenchError(f"load generator timed out after {timeout:.0f} s") from None
        lines = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise BenchError(f"load generator failed ({proc.returncode}); see {self.workdir / 'loadgen.log'}")
        return json.loads(lines[-1][7:])

    def measured(self, system: System, spec: dict, timeout: float) -> dict:
        """Run one load phase with the server's and the upstream's CPU (from /proc) read around it."""
        self.settle()
        assert self.upstream is not None
        cpu0, up0 = tree_cpu(system.pid), tree_cpu(self.upstream.proc.pid)
        result = self.loadgen(spec, timeout)
        cpu1, up1 = tree_cpu(system.pid), tree_cpu(self.upstream.proc.pid)
        result["server_cpu"] = cpu1 - cpu0
        result["upstream_cpu"] = up1 - up0
        if result.get("chunks"):
            result["server_cpu_per_chunk_us"] = result["server_cpu"] / result["chunks"] * 1e6
        return result

    @staticmethod
    def order(systems: list[System], index: int) -> list[System]:
        shift = index % len(systems) if systems else 0
        return systems[shift:] + systems[:shift]

    # -------------------------------------------------------------- phases
    def stream_phases(self) -> None:
        cfg, up = self.cfg, self.up
        chunks = up["chunks"]
        phases = [
            ("warmup", "bench", cfg["warmup"][0], cfg["warmup"][1], chunks),
            ("c1", "bench", 1, cfg["c1_rounds"], chunks),
            ("c50", "bench", cfg["c50"], cfg["c50_rounds"], chunks),
            ("c200", "bench", cfg["c200"], cfg["c200_rounds"], chunks),
            ("c50_close", "bench-close", cfg["c50"], cfg["close_rounds"], chunks),
            # The same load as c50 with one-chunk replies: its CPU is the cost per reply, and c50's CPU less this,
            # spread over the other chunks, the cost of each further chunk (derive()).
            ("c50_short", "bench-short", cfg["c50"], cfg["c50_rounds"], 1),
        ]
        for index, (phase, model, concurrency, rounds, chunks) in enumerate(phases):
            stream_seconds = up["first_delay"] + up["gap"] * (chunks - 1)
            estimate = rounds * (stream_seconds + 0.3) + 1  # per system, on a server that keeps up
            max_seconds = estimate * 3 + 5  # no new stream starts after this; a slow system is cut short
            if self.remaining() < estimate * 1.5 * len(self.systems):
                self.notes.append(f"phase {phase} skipped: time budget")
                continue
            results = self.report["phases"].setdefault(phase, {})
            for system in self.order(self.systems, index):
                spec = stream_load(system, model, concurrency, rounds, chunks, max_seconds)
                try:
                    result = self.measured(system, spec, max_seconds + 90)
                except BenchError as exc:
                    result = {"failed": str(exc)}
                results[system.name] = result
                log(f"{phase:9} {system.name:15} {brief(result)}")

    def crud_phases(self) -> None:
        cfg = self.cfg
        for system in [s for s in self.systems if isinstance(s, Chatapp)]:
            if self.remaining() < 30:
                self.notes.append(f"CRUD on {system.name} skipped: time budget")
                continue
            requests = system.crud_requests()
            out = self.report["crud"].setdefault(system.name, {})
            for name in ("list", "history", "login"):
                out[name] = self.measured(system, crud_load(system, requests[name], cfg), cfg["crud_seconds"] + 60)
                log(f"crud      {system.name:15} {name:8} {brief(out[name])}")
            spec = {"mode": "http", "port": system.port, "requests": requests["list"], "rate": cfg["open_rate"],
                    "duration": cfg["open_seconds"], "timeout": 10}
            out["list_open_loop"] = self.measured(system, spec, cfg["open_seconds"] + 60)
            log(f"crud      {system.name:15} open-loop {brief(out['list_open_loop'])}")

    def hold_phases(self) -> None:
        cfg = self.cfg
        gave_up: dict[str, int] = {}
        # chatapp first, LiteLLM last: if the time budget runs out, the system under study is not the one cut.
        rank = {"chatapp": 0, "direct": 1, "litellm": 2}
        systems = sorted(self.systems, key=lambda system: rank[system.kind])
        for count in cfg["holds"]:
            ramp_timeout = 10 + count / 100
            results = self.report["hold"].setdefault(str(count), {})
            for system in systems:
                if system.name in gave_up:
                    results[system.name] = {"skipped": f"did not serve all {gave_up[system.name]}"}
                    continue
                needed = ramp_timeout + cfg["hold_seconds"] + 30
                if self.remaining() < needed:
                    results[system.name] = {"skipped": "time budget"}
                    self.notes.append(f"hold {count} on {system.name} skipped: time budget")
                    continue
                crud = (self.cfg["held_crud_rate"] if isinstance(system, Chatapp) and count == cfg["crud_hold"]
                        else None)
                try:
                    result = self.hold(system, count, ramp_timeout, crud)
                except BenchError as exc:
                    result = {"failed": str(exc), "served": 0}
                results[system.name] = result
                log(f"hold {count:<5}{system.name:15} {brief(result)}")
                if result.get("served", 0) < count:
                    gave_up[system.name] = count

    def fresh(self, system: System) -> float | None:
        """Restart a server and put a few streams through it: each hold size starts from the same state,
        so its RSS growth is the held streams' own (not what earlier phases left in the heap)."""
        if isinstance(system, Direct):
            return None
        try:
            startup = system.restart()  # type: ignore[attr-defined]
        except BenchError as exc:
            raise BenchError(f"restart failed: {exc}") from exc
        self.loadgen(stream_load(system, "bench", HOLD_WARMUP, 1, self.up["chunks"], 20), 60)
        return startup

    def hold(self, system: System, count: int, ramp_timeout: float, crud_rate: int | None) -> dict:
        restart_startup = self.fresh(system)
        self.settle(max_wait=30)
        idle_rss = tree_rss(system.pid)
        cpu0 = tree_cpu(system.pid)
        spec = {**system.stream_spec("bench-hold", count), "mode": "hold", "streams": count, "ramp": 256,
                "ramp_timeout": ramp_timeout, "hold_seconds": self.cfg["hold_seconds"], "stall_seconds": 2.0,
                "idle_timeout": 30}
        self.spec_count += 1
        path = self.workdir / f"spec-{self.spec_count}.json"
        path.write_text(json.dumps(spec))
        proc = self.procs.start([PY, BENCH / "loadgen.py", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                log_path=self.workdir / "loadgen.log", boost=True)
        try:
            line = read_line(proc.stdout, ramp_timeout + 60)
            if not line.startswith("HELD "):
                raise BenchError(f"unexpected load generator output: {line[:200]}")
            held = json.loads(line[5:])
            samples = []
            for _ in range(3):
                samples.append(tree_rss(system.pid))
                time.sleep(0.3)
            held_rss = max(samples)
            assert self.upstream is not None
            upstream_active = call(self.upstream.port, "GET", "/stats")[1]["active"]
            crud = None
            if crud_rate and isinstance(system, Chatapp):
                crud = self.loadgen({"mode": "http", "port": system.port, "requests": system.crud_requests()["list"],
                                     "rate": crud_rate, "duration": self.cfg["held_crud_seconds"], "timeout": 10},
                                    self.cfg["held_crud_seconds"] + 60)
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            while True:
                line = read_line(proc.stdout, self.cfg["hold_seconds"] + 60)
                if line.startswith("RESULT "):
                    break
            result = json.loads(line[7:])
        finally:
            self.procs.stop(proc)
        opened = held["opened"]
        result.update({
            "opened_when_measured": opened, "idle_rss_bytes": idle_rss, "held_rss_bytes": held_rss,
            "upstream_active": upstream_active, "restart_startup_seconds": restart_startup,
            "per_stream_rss_bytes": (held_rss - idle_rss) / opened if opened else None,
            "server_cpu": tree_cpu(system.pid) - cpu0, "crud_while_held": crud,
        })
        return result

    # -------------------------------------------------------------- main
    def run(self) -> None:
        busy0 = machine_busy()
        time.sleep(1)
        others = machine_busy() - busy0
        self.report["meta"]["busy_before_start"] = others
        if others > 0.2:
            self.notes.append(f"the machine was not idle at the start ({others * 100:.0f} % of a core busy with "
                              "other work): figures may be disturbed")
        self.machine0, self.own0 = machine_busy(), own_cpu()
        self.setup()
        self.stream_phases()
        self.crud_phases()
        self.hold_phases()

    def close(self) -> None:
        for system in self.systems:
            if system.proc is not None and system.proc.poll() is None and system.kind != "direct":
                self.report["systems"][system.name]["rss_after_bytes"] = tree_rss(system.pid)
        self.procs.stop_all()
        self.drop_pg_databases()
        if self.machine0 is not None:
            total, own = machine_busy() - self.machine0, own_cpu() - self.own0
            self.report["meta"]["cpu_seconds"] = {"machine": total, "harness_and_servers": own,
                                                   "other_processes": total - own}
            if total - own > 0.25 * total and total > 10:
                self.notes.append(f"other processes used {total - own:.0f} of the machine's {total:.0f} CPU seconds "
                                  "during the run (PostgreSQL's backends count here; a test suite running beside "
                                  "would too): check before trusting the figures")
        if self.procs.unboosted:
            self.notes.append("could not raise the load generator's and upstream's priority (not root?): "
                              "under saturation their timestamps include CPU queueing")
        self.report["meta"]["seconds"] = time.monotonic() - self.started
        self.report["notes"] = self.notes


def stream_load(system: System, model: str, concurrency: int, rounds: int, chunks: int, max_seconds: float) -> dict:
    """The load generator's `stream` mode against `system`: `concurrency` streams at once, `rounds` times over."""
    return {**system.stream_spec(model, concurrency), "mode": "stream", "concurrency": concurrency, "rounds": rounds,
            "chunks": chunks, "max_seconds": max_seconds}


def crud_load(system: System, requests: list[str], cfg: dict) -> dict:
    """The load generator's closed-loop `http` mode: the CRUD phases' concurrency, for their duration."""
    return {"mode": "http", "port": system.port, "requests": requests, "concurrency": cfg["crud_concurrency"],
            "duration": cfg["crud_seconds"]}


# ------------------------------------------------------------------ reporting


def ms(value) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def brief(result: dict) -> str:
    if "failed" in result:
        return f"FAILED: {result['failed']}"
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if result.get("mode") == "stream":
        return (f"ok {result['ok']}/{result['streams']} ttft p50 {ms(result['ttft'].get('p50'))} "
                f"p99 {ms(result['ttft'].get('p99'))} ms, gap p99 {ms(result['gap'].get('p99'))} ms, "
                f"{result['starts_per_s']:.0f} starts/s, cpu {result.get('server_cpu_per_chunk_us', 0):.0f} us/chunk")
    if result.get("mode") == "http":
        return (f"{result['req_per_s']:.0f} req/s p99 {ms(result['latency'].get('p99'))} ms "
                f"errors {result['errors']}")
    if result.get("mode") == "hold":
        per = result.get("per_stream_rss_bytes")
        return (f"served {result['served']}/{result['streams']} (stalled {result['stalled']}, errors "
                f"{result['errors']}, open when measured {result['opened_when_measured']}) ramp "
                f"{result['ramp_seconds']:.1f} s, held RSS "
                f"{result['held_rss_bytes'] / 2**20:.0f} MB, {'-' if per is None else f'{per / 1024:.0f}'} KiB/stream")
    return json.dumps(result)[:200]


def derive(report: dict) -> dict:
    """Overheads against direct, CPU per chunk: the figures the targets are stated in."""
    phases, derived = report["phases"], {}
    for name in report["systems"]:
        out = derived.setdefault(name, {})
        for phase in ("c1", "c50", "c200", "c50_close"):
            mine, base = phases.get(phase, {}).get(name), phases.get(phase, {}).get("direct")
            if not mine or "failed" in mine:
                continue
            out[f"{phase}_ttft_p50"] = mine["ttft"].get("p50")
            out[f"{phase}_ttft_p99"] = mine["ttft"].get("p99")
            out[f"{phase}_errors"] = mine["errors"]
            out[f"{phase}_gap_p99"] = mine["gap"].get("p99")
            out[f"{phase}_bunched"] = mine["gaps_under_1ms"]
            out[f"{phase}_starts_per_s"] = mine["starts_per_s"]
            if name != "direct" and base and "failed" not in base and mine["ttft"].get("p50") is not None:
                out[f"{phase}_ttft_overhead_p50"] = mine["ttft"]["p50"] - base["ttft"]["p50"]
                out[f"{phase}_ttft_overhead_p99"] = mine["ttft"]["p99"] - base["ttft"]["p99"]
                if mine["gap"].get("p99") is not None and base["gap"].get("p99") is not None:
                    out[f"{phase}_added_gap_p99"] = mine["gap"]["p99"] - base["gap"]["p99"]
        cpu = chunks = 0.0
        for phase in ("c50", "c200"):
            mine = phases.get(phase, {}).get(name)
            if mine and "failed" not in mine and mine.get("chunks"):
                cpu += mine["server_cpu"]
                chunks += mine["chunks"]
        out["cpu_per_chunk_us"] = cpu / chunks * 1e6 if chunks else None
        # Per reply (one-chunk replies) and per further chunk (c50's replies less that): the two costs the per-chunk
        # figure above mixes; with 50-chunk replies a reply's fixed cost adds its 1/50th to every chunk.
        short, full = phases.get("c50_short", {}).get(name), phases.get("c50", {}).get(name)
        if short and full and "failed" not in short and "failed" not in full and short.get("ok") and full.get("ok"):
            per_reply, per_further_chunk = reply_costs(short, full)
            out["cpu_per_reply_ms"] = per_reply * 1e3
            if per_further_chunk is not None:
                out["cpu_per_further_chunk_us"] = per_further_chunk * 1e6
    return derived


def reply_costs(short: dict, full: dict) -> tuple[float, float | None]:
    """Server CPU seconds per reply (one-chunk replies) and per further chunk (full replies less that)."""
    per_reply = short["server_cpu"] / short["ok"]
    chunks_per_reply = full["chunks"] / full["ok"]
    if chunks_per_reply <= 1:
        return per_reply, None
    return per_reply, (full["server_cpu"] / full["ok"] - per_reply) / (chunks_per_reply - 1)


TARGETS = [
    # (key, description, comparison, limit, relaxed on PostgreSQL by 1.5x)
    ("c1_ttft_overhead_p50", "C=1 TTFT overhead p50 <= 3 ms", "le", 0.003, True),
    ("c1_ttft_overhead_p99", "C=1 TTFT overhead p99 <= 5 ms", "le", 0.005, True),
    ("c50_ttft_overhead_p99", "C=50 TTFT overhead p99 <= 40 ms", "le", 0.040, True),
    ("c50_vs_litellm", "C=50 TTFT overhead p99 <= 0.1x LiteLLM's", "le", 0.1, True),
    ("c200_starts_per_s", "C=200 >= 150 stream starts/s", "ge", 150, True),
    ("c200_errors", "C=200 0 errors", "le", 0, False),
    ("c200_vs_litellm", "C=200 starts/s >= 5x LiteLLM's", "ge", 5, True),
    ("c50_added_gap_p99", "C=50 added inter-chunk p99 <= 5 ms", "le", 0.005, True),
    ("c50_bunched", "C=50 gaps under 1 ms < 1 %", "lt", 0.01, False),
    ("c50_close_added_gap_p99", "close-delimited C=50 added inter-chunk p99 <= 5 ms", "le", 0.005, True),
    ("c50_close_bunched", "close-delimited C=50 gaps under 1 ms < 1 %", "lt", 0.01, False),
    ("cpu_per_chunk_us", "server CPU <= 100 us per relayed chunk", "le", 100, True),
    ("hold_5000_served", "5,000 held streams served without error", "eq", 5000, False),
    ("per_stream_kib", "<= 60 KiB RSS per held stream", "le", 60, True),
    ("idle_rss_mb", "idle RSS <= 150 MB", "le", 150, True),
    ("startup_seconds", "startup <= 2 s", "le", 2, True),
    ("list_req_per_s", "GET /conversation >= 1,000 req/s at C=50", "ge", 1000, True),
    ("list_open_loop_p99", "GET /conversation open loop 500 req/s p99 <= 10 ms", "le", 0.010, True),
    ("held_crud_p99", "CRUD 200 req/s with 1,000 held p99 <= 25 ms", "le", 0.025, True),
    ("statements_per_turn", "<= 4 database statements per chat turn", "le", 4, False),
    ("statements_per_chunk", "no database statement per chunk", "le", 0, False),
]


def target_values(report: dict, derived: dict, name: str) -> dict:
    mine, litellm = derived.get(name, {}), derived.get("litellm", {})
    values = dict(mine)
    if litellm.get("c50_ttft_overhead_p99") and mine.get("c50_ttft_overhead_p99") is not None:
        values["c50_vs_litellm"] = mine["c50_ttft_overhead_p99"] / litellm["c50_ttft_overhead_p99"]
    if litellm.get("c200_starts_per_s") and mine.get("c200_starts_per_s") is not None:
        values["c200_vs_litellm"] = mine["c200_starts_per_s"] / litellm["c200_starts_per_s"]
    hold = report["hold"]
    tried = [(int(size), hold[size][name]) for size in hold if "served" in hold[size].get(name, {})]
    if tried:
        size, result = max(tried)
        values["hold_5000_served"] = (size, result["served"])
    largest = [hold[size][name] for size in sorted(hold, key=int, reverse=True)
               if name in hold[size] and hold[size][name].get("per_stream_rss_bytes")]
    if largest:
        values["per_stream_kib"] = largest[0]["per_stream_rss_bytes"] / 1024
    system = report["systems"].get(name, {})
    if system.get("idle_rss_bytes"):
        values["idle_rss_mb"] = system["idle_rss_bytes"] / 1e6
    values["startup_seconds"] = system.get("startup_seconds")
    crud = report["crud"].get(name, {})
    if "list" in crud:
        values["list_req_per_s"] = crud["list"]["req_per_s"]
    if "list_open_loop" in crud:
        values["list_open_loop_p99"] = crud["list_open_loop"]["latency"].get("p99")
    held = hold.get(str(report["meta"]["config"]["crud_hold"]), {}).get(name, {}).get("crud_while_held")
    if held:
        values["held_crud_p99"] = held["latency"].get("p99")
    statements = report["statements"].get(name)
    if statements:
        values["statements_per_turn"] = statements["send_second_turn"]["total"]
        values["statements_per_chunk"] = statements["send_second_turn"]["during_stream"]
    return values


def evaluate(report: dict, derived: dict) -> list[dict]:
    verdicts = []
    for name, system in report["systems"].items():
        if system["kind"] != "chatapp":
            continue
        values = target_values(report, derived, name)
        relax = 1.5 if name == "chatapp-pg" else 1.0
        for key, text, op, limit, relaxable in TARGETS:
            value = values.get(key)
            factor = relax if relaxable else 1.0
            bound = limit * factor if op in ("le", "lt") else limit / factor if op == "ge" else limit
            if value is None:
                met = None
            elif op == "le":
                met = value <= bound
            elif op == "lt":
                met = value < bound
            elif op == "ge":
                met = value >= bound
            else:
                met = value == (bound, bound)
            verdicts.append({"system": name, "target": text, "key": key, "value": value, "bound": bound,
                             "met": met, "relaxed": factor != 1.0})
    return verdicts


def fmt_target(key: str, value) -> str:
    if value is None:
        return "not measured"
    if key.endswith(("_p50", "_p99")) and not key.startswith("statements"):
        return f"{value * 1000:.1f} ms"
    if key.endswith("bunched"):
        return f"{value * 100:.2f} %"
    if key.endswith("_vs_litellm"):
        return f"{value:.2f}x"
    if key == "hold_5000_served":
        size, served = value
        return f"{served} of {size} served" + ("" if size == 5000 else " (larger sizes not tried)")
    if key == "idle_rss_mb":
        return f"{value:.0f} MB"
    if key == "per_stream_kib":
        return f"{value:.0f} KiB"
    if key == "startup_seconds":
        return f"{value:.2f} s"
    if key.endswith(("per_s", "_us")):
        return f"{value:.0f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def render(report: dict, derived: dict, verdicts: list[dict]) -> str:
    names = list(report["systems"])
    phases, cfg = report["phases"], report["meta"]["config"]
    width = max(15, *(len(n) + 2 for n in names)) if names else 15
    lines = []

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"{label:<44}" + "".join(f"{cell:>{width}}" for cell in cells))

    def pair(a, b) -> str:
        return f"{ms(a)}/{ms(b)}" if a is not None or b is not None else "-"

    def plus(value) -> str:
        return "-" if value is None else f"{value * 1000:+.1f}"

    def cell(phase: str, name: str, fn) -> str:
        result = phases.get(phase, {}).get(name)
        if not result:
            return "-"
        if "failed" in result:
            return "FAILED"
        try:
            return fn(result)
        except (KeyError, TypeError):
            return "-"

    up = report["meta"]["upstream"]
    lines.append(f"chatapp relay benchmark, {report['meta']['started']}, commit {report['meta']['commit']}, "
                 f"{report['meta']['cpus']} CPUs; upstream: first token {up['first_delay'] * 1000:.0f} ms, "
                 f"{up['chunks']} chunks {up['gap'] * 1000:.0f} ms apart")
    row("", names)
    lines.append("STREAMS (ms; overhead = minus direct, same phase)")
    c1, c50, c200 = 1, cfg["c50"], cfg["c200"]
    row(f"C={c1} TTFT p50/p99", [cell("c1", n, lambda r: pair(r["ttft"]["p50"], r["ttft"]["p99"])) for n in names])
    row(f"C={c1} TTFT overhead p50/p99", [f"{plus(derived[n].get('c1_ttft_overhead_p50'))}/"
                                         f"{plus(derived[n].get('c1_ttft_overhead_p99'))}" for n in names])
    row(f"C={c50} TTFT p50/p99", [cell("c50", n, lambda r: pair(r["ttft"]["p50"], r["ttft"]["p99"])) for n in names])
    row(f"C={c50} TTFT overhead p50/p99", [f"{plus(derived[n].get('c50_ttft_overhead_p50'))}/"
                                          f"{plus(derived[n].get('c50_ttft_overhead_p99'))}" for n in names])
    row(f"C={c200} TTFT p50/p99", [cell("c200", n, lambda r: pair(r["ttft"]["p50"], r["ttft"]["p99"]))
                                  for n in names])
    row(f"C={c200} TTFT overhead p50/p99", [f"{plus(derived[n].get('c200_ttft_overhead_p50'))}/"
                                           f"{plus(derived[n].get('c200_ttft_overhead_p99'))}" for n in names])
    row(f"C={c200} stream starts/s", [cell("c200", n, lambda r: f"{r['starts_per_s']:.0f}") for n in names])
    row(f"errors C={c1}/{c50}/{c200}/close", ["/".join(cell(p, n, lambda r: str(r["errors"]))
                                                  for p in ("c1", "c50", "c200", "c50_close")) for n in names])
    row(f"C={c50} gap p50/p99 (upstream: {up['gap'] * 1000:.0f})", [cell("c50", n, lambda r: pair(r["gap"]["p50"], r["gap"]["p99"]))
                                               for n in names])
    row(f"C={c50} added inter-chunk p99", [plus(derived[n].get("c50_added_gap_p99")) for n in names])
    row(f"C={c50} gaps under 1 ms (%)", [cell("c50", n, lambda r: f"{r['gaps_under_1ms'] * 100:.2f}") for n in names])
    row(f"close-delimited C={c50} gap p50/p99", [cell("c50_close", n, lambda r: pair(r["gap"]["p50"], r["gap"]["p99"]))
                                                for n in names])
    row(f"close-delimited C={c50} added p99", [plus(derived[n].get("c50_close_added_gap_p99")) for n in names])
    row(f"close-delimited C={c50} gaps < 1 ms (%)", [cell("c50_close", n, lambda r: f"{r['gaps_under_1ms'] * 100:.2f}")
                                                    for n in names])
    row(f"C={c50} total stream time p50 (ms)", [cell("c50", n, lambda r: ms(r["total"]["p50"])) for n in names])
    row(f"server CPU per chunk, C={c50}+{c200} (us)",
        [("-" if derived[n].get("cpu_per_chunk_us") is None else f"{derived[n]['cpu_per_chunk_us']:.0f}")
         for n in names])
    row("  of which per reply (ms) / per further chunk (us)",
        [("-" if derived[n].get("cpu_per_reply_ms") is None else f"{derived[n]['cpu_per_reply_ms']:.2f} / " +
          ("-" if derived[n].get("cpu_per_further_chunk_us") is None else f"{derived[n]['cpu_per_further_chunk_us']:.0f}"))
         for n in names])
    # The same upstream doing the same work per chunk in both phases: what an idle machine adds to every wake-up.
    row(f"upstream CPU per chunk, C={c1} / C={c50} (us)",
        ["/".join(cell(p, n, lambda r: f"{r['upstream_cpu'] / r['chunks'] * 1e6:.0f}" if r.get("chunks") else "-")
                  for p in ("c1", "c50")) for n in names])
    row(f"loadgen CPU per chunk, C={c200} (us)",
        [cell("c200", n, lambda r: f"{r['loadgen_cpu'] / r['chunks'] * 1e6:.0f}") for n in names])
    lines.append("PROCESS (direct = the fake upstream itself)")
    systems = report["systems"]
    row("startup to /healthz 200 (s)", [f"{systems[n]['startup_seconds']:.2f}" if systems[n].get("startup_seconds")
                                        else "-" for n in names])
    row("idle RSS after start (MB)", [f"{systems[n]['idle_rss_bytes'] / 1e6:.0f}" if systems[n].get("idle_rss_bytes")
                                      else "-" for n in names])
    row("idle PSS after start (MB)", [f"{systems[n]['idle_pss_bytes'] / 1e6:.0f}" if systems[n].get("idle_pss_bytes")
                                      else "-" for n in names])
    for size in sorted(report["hold"], key=int):
        results = report["hold"][size]

        def hold_cell(name: str, fn, results=results) -> str:
            result = results.get(name)
            if not result:
                return "-"
            if "skipped" in result:
                return "skipped"
            if "failed" in result:
                return "FAILED"
            return fn(result)

        lines.append(f"HOLD {size} streams (one chunk per {up['hold_gap'] * 1000:.0f} ms)")
        row("  served without error or stall", [hold_cell(n, lambda r: f"{r['served']}") for n in names])
        row("  stalled (>2 s silent) / errors", [hold_cell(n, lambda r: f"{r['stalled']}/{r['errors']}")
                                                 for n in names])
        row("  open when RSS was read", [hold_cell(n, lambda r: f"{r['opened_when_measured']}") for n in names])
        row("  ramp to all open (s)", [hold_cell(n, lambda r: f"{r['ramp_seconds']:.1f}") for n in names])
        row("  RSS held / idle fresh (MB)", [hold_cell(n, lambda r: f"{r['held_rss_bytes'] / 1e6:.0f}/"
                                                                     f"{r['idle_rss_bytes'] / 1e6:.0f}") for n in names])
        row("  RSS per held stream (KiB)", [hold_cell(n, lambda r: "-" if r["per_stream_rss_bytes"] is None else
                                                      f"{r['per_stream_rss_bytes'] / 1024:.0f}") for n in names])
        row("  gap p99/max while held (ms)", [hold_cell(n, lambda r: pair(r["gap"].get("p99"), r["gap"].get("max")))
                                              for n in names])
        if any((results.get(n) or {}).get("crud_while_held") for n in names):
            row(f"  GET /conversation {cfg['held_crud_rate']}/s p99 (ms)",
                [hold_cell(n, lambda r: ms(r["crud_while_held"]["latency"].get("p99")) if r.get("crud_while_held")
                           else "-") for n in names])
    crud_names = [n for n in names if n in report["crud"]]
    if crud_names:
        lines.append(f"CRUD (C={cfg['crud_concurrency']} closed loop on warm keep-alive connections: req/s, p99 ms, "
                     "errors)")
        labels = {"list": "GET /conversation (20 rows)", "history": "GET /chat/<id> (1,000 messages)",
                  "login": "POST /user/login"}
        for key, label in labels.items():
            row(label, ["-" if n not in crud_names or key not in report["crud"][n] else
                        f"{report['crud'][n][key]['req_per_s']:.0f} {ms(report['crud'][n][key]['latency'].get('p99'))}"
                        f" {report['crud'][n][key]['errors']}" for n in names])
        row(f"GET /conversation open loop {cfg['open_rate']}/s p99",
            ["-" if n not in crud_names or "list_open_loop" not in report["crud"][n] else
             f"{ms(report['crud'][n]['list_open_loop']['latency'].get('p99'))} "
             f"({report['crud'][n]['list_open_loop']['errors']} err)" for n in names])
    for name, statements in report["statements"].items():
        turn = statements["send_second_turn"]
        lines.append(f"DB statements per chat turn ({name}): {turn['total']} (before the stream {turn['before_stream']}, "
                     f"while streaming {turn['during_stream']}, after {turn['after_stream']}); GET /conversation "
                     f"{statements['get_conversations']['total']}, GET /chat/<id> {statements['get_history']['total']}, "
                     f"login {statements['login']['total']}")
    if report["meta"]["smoke"]:
        lines.append("TARGETS: not judged in a smoke run (tiny loads, a faster upstream)")
    elif verdicts:
        lines.append("TARGETS (issue 7; chatapp-pg judged with 1.5x slack where marked ~)")
        for verdict in verdicts:
            mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[verdict["met"]]
            lines.append(f"  [{mark}] {verdict['system']:15} {verdict['target']}{' ~' if verdict['relaxed'] else ''}:"
                         f" {fmt_target(verdict['key'], verdict['value'])}")
        lines.append("  [n/a   ] a slow query in one request does not stall the others: not measured here "
                     "(the test suite's concurrent pg_sleep test covers it)")
    for note in report.get("notes", []):
        lines.append(f"NOTE: {note}")
    cpu = report["meta"].get("cpu_seconds")
    if cpu:
        lines.append(f"machine CPU during the run: {cpu['machine']:.0f} s, of which this harness and its servers "
                     f"{cpu['harness_and_servers']:.0f} s, other processes (PostgreSQL backends included) "
                     f"{cpu['other_processes']:.0f} s")
    lines.append(f"run took {report['meta'].get('seconds', 0):.0f} s")
    return "\n".join(lines)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children (servers, loadgen) inherit it


def main() -> int:
    parser = argparse.ArgumentParser(description="chatapp relay benchmark (see bench/README.md)")
    parser.add_argument("--smoke", action="store_true", help="a ~10 s run that checks the harness works")
    parser.add_argument("--systems", default=os.environ.get("BENCH_SYSTEMS"),
                        help="comma list: direct,chatapp-sqlite,chatapp-pg,litellm")
    args = parser.parse_args()
    raise_nofile()
    only = {"direct", *args.systems.split(",")} if args.systems else None
    budget = float(os.environ.get("BENCH_BUDGET_SECONDS", 120 if args.smoke else 570))
    bench = Bench(SMOKE if args.smoke else FULL, args.smoke, budget, only)

    def stop_on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGHUP, stop_on_signal)
    failure = None
    try:
        bench.run()
    except (BenchError, KeyboardInterrupt) as exc:
        failure = f"{type(exc).__name__}: {exc}"
        bench.notes.append(f"run stopped early: {failure}")
    finally:
        bench.close()
    derived = derive(bench.report)
    verdicts = evaluate(bench.report, derived)
    bench.report["derived"], bench.report["targets"] = derived, verdicts
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"{'smoke-' if args.smoke else ''}{stamp}.json"
    out.write_text(json.dumps(bench.report, indent=1))
    print(render(bench.report, derived, verdicts))
    broken = [name for name, phase in bench.report["phases"].get("c1", {}).items() if phase.get("ok", 0) == 0]
    if args.smoke and not failure and (broken or "chatapp-sqlite" not in bench.report["systems"]):
        failure = f"no successful stream through {broken or ['chatapp-sqlite']}"
    keep = failure or os.environ.get("BENCH_KEEP_LOGS")
    print(f"results: {out}" + (f"  (server and load generator logs kept in {bench.workdir})" if keep else ""))
    if not keep:
        shutil.rmtree(bench.workdir, ignore_errors=True)
    if failure:
        print(f"bench FAILED: {failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
