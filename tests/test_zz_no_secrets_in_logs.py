"""Runs last (file order): no password, token or API key the suite handed the app appears in any log file that
the suite's apps and live servers wrote, and every line of those files is a JSON object."""

from __future__ import annotations

import json

import pytest

from tests.conftest import LOG_FILES, SECRETS_USED


def test_no_secret_reached_any_log_file(log_file):
    files = [path for path in LOG_FILES if path.exists()]
    if not files:
        pytest.skip("nothing has logged yet: this check belongs at the end of the whole suite")
    secrets = sorted(secret for secret in SECRETS_USED if len(secret) >= 8)
    leaks = []
    for path in files:
        content = path.read_text(encoding="utf-8", errors="replace")
        for secret in secrets:
            # JWTs are long: their signature part alone would be a leak too.
            for needle in {secret, secret.rsplit(".", 1)[-1]} if secret.count(".") == 2 else {secret}:
                if len(needle) >= 8 and needle in content:
                    leaks.append(f"{path.name}: {needle[:6]}…")
    assert not leaks, leaks


def test_every_log_line_is_a_json_object_with_the_request_fields(log_file):
    for path in (path for path in LOG_FILES if path.exists()):
        # Only newline-terminated lines are complete: a server still shutting down may be mid-write.
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n")[:-1], 1):
            record = json.loads(line)
            missing = {"time", "level", "request_id", "trace_id", "client_ip", "method", "path",
                       "message"} - set(record)
            assert not missing, (path.name, number, missing)
