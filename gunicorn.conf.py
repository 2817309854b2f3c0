"""gunicorn settings for chatapp: gevent workers that hold thousands of long-lived streams.

The master loads the app once and forks the workers from it (preload_app), so the ~60 MB of Python objects
the stack builds at import are shared copy-on-write instead of built again in every worker (the tree's idle
PSS falls from ~152 to ~96 MB with two workers). gevent must patch the standard library before the app and
its drivers are imported, so the master patches first, here; the gevent worker's own patch after the fork
then finds everything patched. Consequence: a HUP re-forks workers from the loaded app; new code needs a
restart.
"""

from gevent import monkey

monkey.patch_all()

import gc  # noqa: E402  (everything below is imported after the patch)
import threading  # noqa: E402

from config import gunicorn_settings, load_config  # noqa: E402

_settings = gunicorn_settings()

bind = _settings["bind"]
worker_class = "gevent"
workers = _settings["workers"]
worker_connections = _settings["worker_connections"]
preload_app = True
# gunicorn's control socket runs an asyncio loop in a thread, which the patched master would run as a
# greenlet; chatapp is managed with signals (TERM, HUP, TTIN/TTOU) instead.
control_socket_disable = True
# A stream may be silent for minutes while a model thinks; the gevent worker's heartbeat is independent of
# request length, so `timeout` only catches a blocked worker. Graceful shutdown lets streams finish or save.
timeout = 60
graceful_timeout = _settings["graceful_timeout"]
keepalive = 75
accesslog = None  # chatapp writes its own JSON access line per request


def _no_access_log():
    # With logconfig_dict set, gunicorn builds its access-log atoms for every request even though no handler
    # takes them (~50 us per request in the profile); chatapp's own access line makes them redundant.
    from gunicorn.glogging import Logger

    class ChatappGunicornLogger(Logger):
        access_log_enabled = False

    return ChatappGunicornLogger


logger_class = _no_access_log()
errorlog = "-"
_handlers = {"stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                        "formatter": "json", "filters": ["request"]}}
_log_file = load_config()["LOG_FILE"]
if _log_file:
    # The master's few lines go through a stdlib handler that follows the workers' rotation (it reopens
    # the file when its inode changes).
    _handlers["file"] = {"class": "logging.handlers.WatchedFileHandler", "filename": _log_file,
                         "encoding": "utf-8", "formatter": "json", "filters": ["request"]}
# gunicorn's own lines (start-up, worker exits) use the same JSON format, in the same places, as the app's.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request": {"()": "chatapp.logs.RequestContextFilter"}},
    "formatters": {"json": {"()": "chatapp.logs.RedactingJsonFormatter"}},
    "handlers": _handlers,
    "loggers": {"gunicorn.error": {"handlers": list(_handlers), "level": "INFO", "propagate": False}},
    # gunicorn merges this over its defaults, whose root names a "console" handler we replaced; the app
    # gives the root its own JSON handlers in each worker, so here it gets none (no doubled lines).
    "root": {"level": "INFO", "handlers": []},
}


def post_worker_init(worker):
    """On SIGTERM, let streams run on for most of the graceful period, then end them cleanly ourselves.

    gunicorn's master SIGKILLs a worker at graceful_timeout, the same moment the worker would kill its own
    handlers, so without this a long reply would be cut mid-write and its text lost. Ending the streams a
    little earlier saves each reply (incomplete) and sends the client its message.completed.
    """
    import signal

    import gevent

    from chatapp.services.chat import end_all_streams

    grace = worker.cfg.graceful_timeout
    drain_after = grace - 5 if grace >= 10 else grace / 2
    stop_worker = worker.handle_exit

    def on_sigterm(signum, frame):
        stop_worker(signum, frame)
        gevent.spawn_later(drain_after, end_all_streams)

    signal.signal(signal.SIGTERM, on_sigterm)


def when_ready(server):
    """Before the first fork: let the threads the app started at load end in the master.

    Threads are greenlets in this patched master, and a fork copies a pending one into every worker, where
    it would run against the thread state the fork reset. flask-limiter's in-memory storage starts one at
    load (a 10 ms expiry timer).
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(timeout=1)


def pre_fork(server, worker):
    # The app is loaded: its ~100k long-lived objects (modules, classes, the ORM's and the API doc's
    # structures) go to the collector's permanent generation. A full collection scanned them every time
    # (with 1,000 held streams, a 50-120 ms pause for every request of the worker), and its bookkeeping
    # would write to, and so unshare, the pages the workers inherit.
    gc.freeze()


def post_fork(server, worker):
    """Give the worker what must not be shared across a fork: its own log handlers and database pool."""
    from chatapp import logs
    from chatapp.extensions import db

    app = server.app.wsgi()
    # A HUP reconfigures the master's logging from logconfig_dict, which leaves the root logger bare.
    logs.configure(app.config["LOG_LEVEL"], app.config.get("LOG_FILE"))
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose(close=False)  # the master opens none today; a connection must never be shared
