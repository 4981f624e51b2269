"""job_input: validation of the job input, overrides and image references (docs/api.md)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from comfy_worker.job_errors import JobError
from comfy_worker.job_input import (
    S3Config,
    apply_overrides,
    decode_base64,
    parse_job_input,
    parse_s3_config,
    rename_references,
)

WORKFLOWS = Path(__file__).resolve().parent / "data"  # real request bodies


def real(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())["input"]


def error_of(raw) -> JobError:
    with pytest.raises(JobError) as info:
        parse_job_input(raw)
    return info.value


def test_real_workflows_are_accepted_and_copied():
    for name in ("workflow_sdxl_turbo.json", "workflow_flux1_schnell.json", "workflow_sd3.json"):
        raw = real(name)
        parsed = parse_job_input(raw)
        assert parsed.workflow == raw["workflow"] and parsed.workflow is not raw["workflow"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("text", "must be a JSON object"),
        ({}, "has no 'workflow'"),
        ({"workflow": []}, "'workflow' must be a JSON object"),
        ({"workflow": {}}, "is empty"),
        ({"workflow": {"1": {"inputs": {}}}}, "have no 'class_type'"),
        ({"workflow": {"1": {"class_type": "X", "inputs": []}}}, "'inputs' that is not an object"),
        ({"workflow": {"1": {"class_type": "X"}}, "prompt": 1}, "Unknown input key(s) 'prompt'"),
        ({"workflow": {"1": {"class_type": "X"}}, "timeout": 0}, "'timeout' must be a positive number"),
        ({"workflow": {"1": {"class_type": "X"}}, "timeout": True}, "'timeout' must be a positive number"),
        ({"workflow": {"1": {"class_type": "X"}}, "comfy_org_api_key": ""}, "non-empty string"),
        ({"workflow": {"1": {"class_type": "X"}}, "overrides": {}}, "'overrides' must be a list"),
        (
            {"workflow": {"1": {"class_type": "X"}}, "overrides": [{"field": "a", "value": 1}]},
            "exactly one of 'node_id'",
        ),
        ({"workflow": {"1": {"class_type": "X"}}, "overrides": [{"node_id": "1", "value": 1}]}, "needs a 'field'"),
        ({"workflow": {"1": {"class_type": "X"}}, "overrides": [{"node_id": "1", "field": "a"}]}, "has no 'value'"),
    ],
)
def test_bad_inputs_get_one_readable_sentence(raw, needle):
    err = error_of(raw)
    assert needle in err.message
    assert err.message[-1] in ".?"


def test_ui_format_is_rejected_with_export_instructions():
    err = error_of({"workflow": {"nodes": [], "links": [], "version": 0.4}})
    assert "UI format" in err.message and "Workflow > Export (API)" in err.message


@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,", "DATA:image/png;base64,"])
def test_base64_with_or_without_data_uri(prefix):
    payload = base64.b64encode(b"\x89PNG\r\n\x1a\n-bytes-").decode()
    parsed = parse_job_input(
        {"workflow": {"1": {"class_type": "X"}}, "images": [{"name": "a.png", "image": prefix + payload}]}
    )
    assert parsed.images[0].data == b"\x89PNG\r\n\x1a\n-bytes-"


def test_url_safe_unpadded_and_wrapped_base64():
    data = bytes(range(250))
    text = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert decode_base64(text[:40] + "\n" + text[40:], "x") == data


@pytest.mark.parametrize("bad", ["not base64!!", "data:image/png;base64,%%%", "===="])
def test_bad_base64_names_the_image(bad):
    err = error_of({"workflow": {"1": {"class_type": "X"}}, "images": [{"name": "in.png", "image": bad}]})
    assert "'in.png'" in err.message and "base64" in err.message


@pytest.mark.parametrize("name", ["../x.png", "a/b.png", "a\\b.png", "..", "x\x00.png", "", "  ", None])
def test_image_names_must_be_plain(name):
    err = error_of({"workflow": {"1": {"class_type": "X"}}, "images": [{"name": name, "image": "AAAA"}]})
    assert "name" in err.message


def test_image_names_must_be_unique_and_have_one_source():
    wf = {"1": {"class_type": "X"}}
    err = error_of({"workflow": wf, "images": [{"name": "a.png", "image": "AAAA"}, {"name": "a.png", "image": "AAAA"}]})
    assert "more than once" in err.message
    err = error_of({"workflow": wf, "images": [{"name": "a.png"}]})
    assert "exactly one of 'image' (base64) or 'url'" in err.message
    err = error_of({"workflow": wf, "images": [{"name": "a.png", "url": "ftp://host/a.png"}]})
    assert "only http:// and https://" in err.message


def test_overrides_by_id_title_and_list_index_on_a_real_workflow():
    wf = real("workflow_sdxl_turbo.json")["workflow"]
    apply_overrides(
        wf,
        [
            {"node_id": "6", "field": "inputs.text", "value": "a lighthouse"},
            {"title": "KSampler", "field": "inputs.seed", "value": 7},
            {"title": "Empty Latent Image", "field": "inputs.width", "value": 512},
            {"node_id": 3, "field": "inputs.model.1", "value": 0},
            {"node_id": "3", "field": "inputs.new_optional", "value": True},
        ],
    )
    assert wf["6"]["inputs"]["text"] == "a lighthouse"
    assert wf["3"]["inputs"]["seed"] == 7 and wf["3"]["inputs"]["new_optional"] is True
    assert wf["5"]["inputs"]["width"] == 512
    assert wf["3"]["inputs"]["model"] == ["4", 0]


def test_nested_list_path():
    wf = {"1": {"class_type": "LoraStack", "inputs": {"loras": [{"name": "a", "strength": 1.0}, {"name": "b"}]}}}
    apply_overrides(wf, [{"node_id": "1", "field": "inputs.loras.0.strength", "value": 0.5}])
    assert wf["1"]["inputs"]["loras"][0]["strength"] == 0.5
    with pytest.raises(JobError, match="list of 2 item"):
        apply_overrides(wf, [{"node_id": "1", "field": "inputs.loras.5.strength", "value": 0.5}])
    with pytest.raises(JobError, match="is a str value"):
        apply_overrides(wf, [{"node_id": "1", "field": "inputs.loras.1.name.x", "value": 0.5}])


def test_unknown_targets_list_what_exists():
    wf = real("workflow_sdxl_turbo.json")["workflow"]
    with pytest.raises(JobError) as info:
        apply_overrides(wf, [{"node_id": "42", "field": "inputs.text", "value": "x"}])
    assert "'42'" in info.value.message and "4 (CheckpointLoaderSimple, 'Load Checkpoint')" in info.value.message
    with pytest.raises(JobError) as info:
        apply_overrides(wf, [{"title": "Prompt", "field": "inputs.text", "value": "x"}])
    assert "'Load Checkpoint'" in info.value.message and "'KSampler'" in info.value.message
    # an ambiguous title (two CLIP Text Encode nodes) asks for node_id
    with pytest.raises(JobError, match="matches nodes 6, 7"):
        apply_overrides(wf, [{"title": "CLIP Text Encode (Prompt)", "field": "inputs.text", "value": "x"}])
    with pytest.raises(JobError) as info:
        apply_overrides(wf, [{"node_id": "3", "field": "input.seed", "value": 1}])
    assert "'input'" in info.value.message and "'inputs'" in info.value.message
    with pytest.raises(JobError, match=r"did you mean inputs\.seed"):
        apply_overrides(wf, [{"node_id": "3", "field": "seed", "value": 1}])


def test_rename_references_touches_values_not_links():
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "in.png [input]"}},
        "3": {"class_type": "Batch", "inputs": {"files": ["in.png", "other.png", "in.png"], "link": ["in.png", 0]}},
        "4": {"class_type": "Text", "inputs": {"text": "a photo of in.png"}},
    }
    assert rename_references(wf, {"in.png": "in-abc.png"}) == 4
    assert wf["1"]["inputs"]["image"] == "in-abc.png"
    assert wf["2"]["inputs"]["image"] == "in-abc.png [input]"
    assert wf["3"]["inputs"]["files"] == ["in-abc.png", "other.png", "in-abc.png"]
    assert wf["3"]["inputs"]["link"] == ["in.png", 0]
    assert wf["4"]["inputs"]["text"] == "a photo of in.png"


@pytest.mark.parametrize("url", ["http://[bad/x", "http:///no-host.png", "https://"])
def test_unparsable_url_names_the_image(url):
    err = error_of({"workflow": {"1": {"class_type": "X"}}, "images": [{"name": "in.png", "url": url}]})
    assert "'in.png'" in err.message and "not a valid URL" in err.message


def test_dots_inside_a_name_are_fine():
    parsed = parse_job_input(
        {"workflow": {"1": {"class_type": "X"}}, "images": [{"name": "a..b.png", "image": "AAAA"}]}
    )
    assert parsed.images[0].name == "a..b.png"


def test_overrides_are_applied_in_order_so_the_later_one_wins():
    workflow = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8}, "_meta": {"title": "Canvas"}}}
    apply_overrides(
        workflow,
        [
            {"node_id": "1", "field": "inputs.width", "value": 16},
            {"title": "Canvas", "field": "inputs.width", "value": 32},
        ],
    )
    assert workflow["1"]["inputs"]["width"] == 32


# ---- s3Config (RunPod's per-request bucket, beside the input) ---------------------------------------------
S3_ID, S3_SECRET = "AKIA-job-id-5150", "job-secret-0xC0FFEE"
S3_OK = {"accessId": S3_ID, "accessSecret": S3_SECRET, "bucketName": "my-outputs", "endpointUrl": "https://s3.example"}
ENDPOINT_FIX = (
    "; send the endpoint alone, such as https://s3.eu-west-1.amazonaws.com or "
    "https://<account id>.r2.cloudflarestorage.com."
)


def test_s3_config_becomes_a_record_that_keeps_its_keys_out_of_repr():
    assert parse_s3_config(None) is None
    parsed = parse_s3_config({**S3_OK, "endpointUrl": "http://127.0.0.1:9000/"})
    assert parsed == S3Config("http://127.0.0.1:9000/", "my-outputs", S3_ID, S3_SECRET)
    assert S3_ID not in repr(parsed) and S3_SECRET not in repr(parsed)


@pytest.mark.parametrize(
    ("raw", "message", "details"),
    [
        (
            "text",
            "'s3Config' must be a JSON object with accessId, accessSecret, bucketName, endpointUrl, got str.",
            {"key": "s3Config", "allowed_keys": ["accessId", "accessSecret", "bucketName", "endpointUrl"]},
        ),
        (
            {**S3_OK, "region": "auto", "accessKey": S3_ID},
            "Unknown s3Config key(s) 'accessKey', 'region'; allowed keys are accessId, accessSecret, bucketName, "
            "endpointUrl.",
            {"unknown_keys": ["accessKey", "region"], "allowed_keys": list(S3_OK)},
        ),
        (
            {k: v for k, v in S3_OK.items() if k != "accessSecret"},
            "s3Config.accessSecret is missing: it must be a non-empty string, the secret access key.",
            {"key": "s3Config.accessSecret"},
        ),
        (
            {**S3_OK, "accessId": 5150},
            "s3Config.accessId is not a string (got int): it must be a non-empty string, the access key id.",
            {"key": "s3Config.accessId"},
        ),
        (
            {**S3_OK, "bucketName": "  "},
            "s3Config.bucketName is empty: it must be a non-empty string, the name of an existing bucket.",
            {"key": "s3Config.bucketName"},
        ),
        (
            {**S3_OK, "accessSecret": S3_SECRET + "\n"},
            "s3Config.accessSecret starts or ends with whitespace (a stray space or line break?): it must be a "
            "non-empty string, the secret access key.",
            {"key": "s3Config.accessSecret"},
        ),
        (
            {**S3_OK, "bucketName": "outputs/run-1"},
            "s3Config.bucketName is not a valid bucket name: use only letters, digits, '.', '-' and '_' (no '/', "
            "no spaces), such as my-outputs.",
            {"key": "s3Config.bucketName"},
        ),
    ],
    ids=["not-an-object", "unknown-keys", "missing", "not-a-string", "empty", "whitespace", "bucket-with-slash"],
)
def test_a_bad_s3_config_names_the_key_and_the_fix_never_a_value(raw, message, details):
    with pytest.raises(JobError) as info:
        parse_s3_config(raw)
    assert info.value.message == message
    assert info.value.details == details
    assert S3_SECRET not in info.value.message and "5150" not in info.value.message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("s3.example", "it is not an http:// or https:// URL"),
        ("ftp://s3.example", "it is not an http:// or https:// URL"),
        ("https://", "it has no host name"),
        (f"https://s3.example/?X-Amz-Credential={S3_ID}", "it has a query string or fragment"),
        ("https://s3.example?", "it has a query string or fragment"),
        ("https://s3.example/#top", "it has a query string or fragment"),
        (
            f"https://{S3_ID}:{S3_SECRET}@s3.example",
            "it carries user:password@ credentials (they belong in accessId and accessSecret)",
        ),
        ("https://s3.example:99999", "it cannot be parsed (Port out of range 0-65535)"),
        ("https://s3.example/a b", "it contains spaces or control characters"),
    ],
    ids=["no-scheme", "ftp", "no-host", "query", "empty-query", "fragment", "userinfo", "bad-port", "space"],
)
def test_the_s3_endpoint_must_be_a_plain_http_url_and_is_never_echoed(url, problem):
    with pytest.raises(JobError) as info:
        parse_s3_config({**S3_OK, "endpointUrl": url})
    assert info.value.message == f"s3Config.endpointUrl is not a usable S3 endpoint: {problem}{ENDPOINT_FIX}"
    assert info.value.details == {"key": "s3Config.endpointUrl"}
    assert S3_ID not in info.value.message and S3_SECRET not in info.value.message


@pytest.mark.parametrize("destination", [".locks/upscale_models", "loras/.cache", ".hidden"])
def test_a_job_model_never_goes_into_a_hidden_folder(destination):
    """models/.locks holds every worker's download locks and in-use markers: no job writes there."""
    entry = {"url": "https://huggingface.co/o/r/resolve/main/m.safetensors", "destination": destination}
    err = error_of({"workflow": {"1": {"class_type": "X"}}, "models": [entry]})
    assert err.message.startswith(f"input.models is invalid: models[0] ({entry['url']}): destination: must not name")
    assert err.details == {"key": "models[0].destination"}
