"""`/openapi.json`: it describes every route, from the schemas that check the requests, and
schemathesis run against the live stack over it finds no server error and only OpenAI-shaped
errors (Anthropic-shaped on `/v1/messages`)."""

from __future__ import annotations

import re

import schemathesis
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from config.settings import load_settings
from services import build_services
from tasks.queue import CeleryQueue
from tests.conftest import TOKENS
from tests.webapp.test_bad_input import HONEST_5XX
from webapp import create_app

EXAMPLES_PER_OPERATION = 12


def _document(stack) -> dict:
    response = urllib3.request("GET", f"{stack.base_url}/openapi.json")
    assert response.status == 200  # public: no token
    return response.json()


def test_the_document_describes_every_route_of_the_app(stack):
    doc = _document(stack)
    assert doc["openapi"].startswith("3.")
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    # The stack's code: its URL map is the truth.
    app = create_app(build_services(load_settings(environ=stack.env), CeleryQueue()))
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (method, path) in documented, (method, path)
    # Scopes are stated, and the checked bodies are the request schemas themselves.
    create = doc["paths"]["/v1/batches"]["post"]
    assert create["x-required-scopes"] == ["batch"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    schema = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert {"input_file_id", "endpoint", "completion_window"} <= set(schema["required"])
    assert schema["properties"]["priority"]["maximum"] == 9
    assert "security" not in doc["paths"]["/healthz"]["get"]
    messages = doc["paths"]["/v1/messages"]["post"]
    assert {"apiKeyHeader": []} in messages["security"]
    assert messages["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/AnthropicErrorResponse")
    assert "apiKeyHeader" not in str(doc["paths"]["/v1/chat/completions"]["post"]["security"])


def test_schemathesis_finds_no_server_error_and_only_openai_errors(stack):
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {TOKENS['all']}"}
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case):
                response = case.call(base_url=stack.base_url, headers=headers, timeout=30)
                if response.status_code < 400:
                    return
                where = f"{case.method} {case.formatted_path} -> {response.status_code}"
                anthropic = case.formatted_path.startswith("/v1/messages")
                try:
                    answer = response.json()
                    error = answer["error"]
                    assert isinstance(error["message"], str)
                    if anthropic:  # Anthropic's shape there, which its SDK reads
                        assert answer["type"] == "error" and isinstance(error["type"], str)
                    else:
                        assert error["code"] is None or isinstance(error["code"], str)
                except (ValueError, KeyError, TypeError, AssertionError):
                    shape = "Anthropic" if anthropic else "OpenAI"
                    failures.append(f"{where}: not {shape}-shaped: {response.content[:200]!r}")
                    return
                # Anthropic's type for a cold model's 503 is overloaded_error.
                code = error["type"] if anthropic else error["code"]
                if response.status_code >= 500 and code not in HONEST_5XX | {"overloaded_error"}:
                    failures.append(f"{where}: {response.content[:200]!r}")

            try:
                call()
            except Unsatisfiable:
                # Nothing negative to make of an operation without parameters or body.
                assert mode is GenerationMode.NEGATIVE, operation.label
    assert operations >= 30
    assert not failures, "\n".join(failures[:20])
