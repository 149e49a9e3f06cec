"""Schemathesis fuzzes every operation of the server's OpenAPI schema over real HTTP against
the real engine (a tiny checkpoint with a short context, so any generation is brief): no
response is a 5xx, each status and body matches what the schema declares, and schema-invalid
requests are refused with a 4xx.

Schema-valid requests may still be refused (a prompt longer than the context, tool_choice
naming an undeclared tool), so "positive data acceptance" is not among the checks.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from swarmoe import LLM
from swarmoe.engine.async_engine import AsyncEngine
from swarmoe.server import create_app
from swarmoe.server.background import serve_in_thread
from swarmoe.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny", seed=6)
    engine = AsyncEngine(LLM(path, max_model_len=160, max_num_seqs=16))
    with serve_in_thread(create_app(engine, "tiny", max_request_bytes=256_000)) as url:
        yield schemathesis.openapi.from_url(url + "/openapi.json")
    engine.shutdown()


OPERATIONS = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
              ("GET", "/v1/models/{model_id}"), ("POST", "/v1/chat/completions"),
              ("POST", "/v1/completions")]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


def test_schema_lists_every_operation(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


# Negative data exists only where there are constrained inputs to break (request bodies).
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
@given(data=st.data())
def test_fuzz(api_schema, method, path, mode, data):
    case = data.draw(api_schema[path][method].as_strategy(generation_mode=mode))
    # Name the served model in most valid requests, or nearly all of them would stop at a 404.
    if mode is GenerationMode.POSITIVE and data.draw(st.integers(0, 4)) > 0:
        if isinstance(case.body, dict):
            case.body["model"] = "tiny"
        if case.path_parameters:
            case.path_parameters["model_id"] = "tiny"
    case.call_and_validate(checks=CHECKS, timeout=60)
