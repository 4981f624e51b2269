"""comfy_worker/runpod_rest.py: RunPod's error answers as one line each (the client's requests run against
the loopback REST API in tests/test_runpod_deploy.py)."""

from __future__ import annotations

import json

import pytest
from support.runpod_rest_fake import RunPodRestFake

from comfy_worker.runpod_rest import RestError, RunPodRest, error_message


def problem(status: int, title: str, detail: str, errors=None) -> bytes:
    return json.dumps(
        {"title": title, "status": status, "detail": detail, **({"errors": errors} if errors else {})}
    ).encode()


def test_a_refused_key_names_runpod_api_key():
    line = error_message("GET", "/v2/serverless", 401, problem(401, "Unauthorized", "invalid bearer token"))
    assert line.startswith("RunPod refused with RUNPOD_API_KEY (401 Unauthorized: invalid bearer token)")
    line = error_message("POST", "/v2/serverless", 403, problem(403, "Forbidden", "access denied"))
    assert "RUNPOD_API_KEY" in line and "403 Forbidden: access denied" in line and "read/write" in line


def test_validation_errors_name_each_field_and_other_bodies_are_shown_cleanly():
    body = problem(
        422, "Unprocessable Entity", "Request validation failed.", ["$.workers.idleTimeout: 0 is less than 1"]
    )
    assert error_message("PATCH", "/v2/serverless/x", 422, body) == (
        "RunPod answered PATCH /v2/serverless/x with 422: Unprocessable Entity: Request validation failed. "
        "($.workers.idleTimeout: 0 is less than 1)"
    )
    assert error_message("GET", "/v2/templates", 502, b"<html>\nBad\x1bgateway</html>") == (
        "RunPod answered GET /v2/templates with 502: <html> Bad gateway</html>"
    )


def test_a_body_the_schema_refuses_comes_back_as_422_naming_the_field():
    fake = RunPodRestFake("rpa_key_for_rest_test")
    try:
        client = RunPodRest(fake.url, "rpa_key_for_rest_test")
        with pytest.raises(RestError) as err:
            client.create_template({"name": "t", "image": "i", "bogus": 1})
        assert err.value.status == 422 and "'bogus' was unexpected" in str(err.value)
        assert "rpa_key_for_rest_test" not in str(err.value)
    finally:
        fake.close()
