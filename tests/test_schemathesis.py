"""Property-based API tests: schemathesis generates valid and invalid requests for every operation of our own
openapi.json (in-process WSGI) and checks there is never a 5xx and every response matches the document."""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode, checks
from schemathesis.specs.openapi import checks as openapi_checks

from chatapp.netguard import OutboundGuard
from tests.conftest import PASSWORD, remember_secret

MAX_EXAMPLES = 30
CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
]


@pytest.fixture
def api_schema(app):
    # Generated base_urls name random hosts: answer every lookup with a private address instead of asking DNS,
    # so nothing leaves the machine and the guard's refusal path is exercised.
    app.extensions["chatapp"].guard = OutboundGuard(allowlist=["127.0.0.1"], resolver=lambda host, port: ["10.0.0.1"])
    loaded = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    # Valid and invalid inputs both: a wrong type or a missing field must be a clean 4xx, never a 5xx.
    loaded.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


def _login(api, email: str) -> dict:
    response = api.post("user/login", {"email": email, "password": PASSWORD})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    remember_secret(body["access_token"])
    remember_secret(body["refresh_token"])
    return body


@pytest.fixture
def seeded(api, alice):
    """Real ids for the generator's examples to hit besides random ones: a config and a conversation."""
    config = api.post("model_config/create", {"name": "local", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
                      token=alice.access).get_json()
    conversation = api.post("conversation/create", {"model_config_id": config["id"]}, token=alice.access).get_json()
    return {"account": alice, "config": config, "conversation": conversation}


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_every_operation_conforms_and_never_fails(case, api, seeded):
    security = case.operation.definition.raw.get("security") or []
    wanted = {name for requirement in security for name in requirement}
    if "refresh" in wanted:
        # Refresh-token operations end sessions (logout, password change): each example gets its own.
        token = _login(api, seeded["account"].email)["refresh_token"]
    elif "access" in wanted:
        token = seeded["account"].access
    else:
        token = None
    headers = dict(case.headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    headers["X-Request-ID"] = uuid.uuid4().hex
    case.headers = headers
    response = case.call()
    case.validate_response(response, checks=CHECKS)


def test_stateful_sequences_create_use_delete(api_schema, seeded):
    """Sequences along the links schemathesis infers from the document: create a config, open a conversation
    with it, send, title, list, delete... every step still never a 5xx and always as documented."""
    headers = {"Authorization": f"Bearer {seeded['account'].access}"}

    class Machine(api_schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": headers}

        def validate_response(self, response, case, **kwargs):
            case.validate_response(response, checks=CHECKS)

    Machine.run(settings=settings(max_examples=25, stateful_step_count=6, deadline=None,
                                  suppress_health_check=list(HealthCheck)))
