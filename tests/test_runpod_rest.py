"""comfy_worker/runpod_rest.py: RunPod's error answers as one line each (the client's requests run against
the loopback REST API in tests/test_runpod_deploy.py)."""

from __future__ import annotations

import json

import pytest
from support.runpod_rest_fake import RunPodRestFake

from comfy_worker.runpod_rest import RestError, RunPodRest, api_base_url, error_message


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
    assert error_message("GET", "/v2/templates", 502, b"upstream\nconnect\x1berror") == (
        "RunPod answered GET /v2/templates with 502: upstream connect error"
    )
    page = (
        b"<!DOCTYPE html>\n<html><head><title>502 Bad\nGateway</title></head><body>" + b"x" * 5000 + b"</body></html>"
    )
    assert error_message("GET", "/v2/templates", 502, page) == (
        "RunPod answered GET /v2/templates with 502: an HTML page (502 Bad Gateway)"
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


def test_runpod_api_url_is_a_base_url_a_trailing_slash_or_v2_dropped():
    assert api_base_url("https://api.runpod.io") == "https://api.runpod.io"
    assert api_base_url("https://api.runpod.io/") == "https://api.runpod.io"
    assert api_base_url(" https://proxy.example/runpod/v2/ ") == "https://proxy.example/runpod"
    for bad in ("api.runpod.io", "ftp://api.runpod.io", "https://api.runpod.io/?key=abc", "https:///v2"):
        with pytest.raises(ValueError, match="RUNPOD_API_URL") as err:
            api_base_url(bad)
        assert "abc" not in str(err.value)


def test_answers_of_the_wrong_shape_are_one_line_not_a_traceback():
    """A proxy, a login page or another API at RUNPOD_API_URL: HTML, invalid JSON, JSON of another shape."""
    fake = RunPodRestFake("rpa_key_for_rest_test")
    try:
        client = RunPodRest(fake.url + "/v2/", "rpa_key_for_rest_test")  # a user's trailing /v2/
        assert client.list_endpoints() == [] and fake.requests[-1].path == "/v2/serverless"
        answers = {
            ("GET", "/v2/serverless"): (200, "text/html", b"<html><title>Sign in</title><p>who are you?</html>"),
            ("GET", "/v2/templates"): (200, "application/json", b'{"templates": [1,'),
            ("GET", "/v2/network-volumes"): (200, "application/json", b'[{"id": "v"}]'),
            ("POST", "/v2/templates"): (201, "application/json", b'{"name": "t"}'),
        }
        fake.raw_answers.update(answers)
        calls = [
            (client.list_endpoints, "RunPod answered GET /v2/serverless with something that is not JSON: an HTML page (Sign in)"),
            (client.list_templates, "RunPod answered GET /v2/templates with something that is not JSON: {\"templates\": [1,"),
            (client.list_network_volumes, "RunPod answered GET /v2/network-volumes without a list of networkVolumes"),
            (lambda: client.create_template({"name": "t", "image": "i"}), "RunPod answered POST /v2/templates without the object's id"),
        ]  # fmt: skip
        for call, said in calls:
            with pytest.raises(RestError) as err:
                call()
            assert str(err.value).startswith(said)
        fake.raw_answers[("GET", "/v2/serverless")] = (200, "application/json", b'{"endpoints": ["x"]}')
        with pytest.raises(RestError, match="without a list of endpoints"):
            client.list_endpoints()
    finally:
        fake.close()
