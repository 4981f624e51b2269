"""deploy.sh --endpoint (comfy_worker/runpod_deploy.py, runpod_rest.py) against a loopback server that
speaks RunPod's REST API 2.0.0 and checks every request body against RunPod's OpenAPI schema
(tests/support/runpod_rest_fake.py): create, update in place, the settings it sends, secrets, errors,
--dry-run, --from-workflow and --smoke. The main paths run ./deploy.sh as a user does (--image, no build)."""

from __future__ import annotations

import base64
import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.node_data import NodeDataServer
from support.runpod_rest_fake import RunPodRestFake

from comfy_worker import runpod_deploy
from comfy_worker.file_names import url_filename

ROOT = Path(__file__).resolve().parents[1]
KEY = "rpa_TESTKEY_0123456789abcdef"
LOCAL_HF_TOKEN = "hf_local_machine_token_9876543210"
IMAGE = "ghcr.io/me/comfy-worker@sha256:" + "ab" * 32
VOLUMES = [{"id": "vol7x2k9q", "name": "comfy-models", "size": 100, "dataCenter": "EU-RO-1", "type": "STANDARD"}]
TEMPLATES = sorted(
    Path(p)
    for p in glob.glob(
        os.path.join(
            sys.prefix, "lib", "python3*", "site-packages", "comfyui_workflow_templates_*", "templates", "*.json"
        )
    )
)
SCRUBBED = ("RUNPOD_API_KEY", "RUNPOD_API_URL", "HF_TOKEN", "CIVITAI_TOKEN", "GITHUB_TOKEN", "CONFIG_YML", "PYTHON")


@pytest.fixture
def fake():
    server = RunPodRestFake(KEY, volumes=VOLUMES)
    yield server
    server.close()


@pytest.fixture(scope="module")
def node_data():
    server = NodeDataServer()
    yield server
    server.close()


@pytest.fixture
def env(fake, node_data, tmp_path, monkeypatch):
    """The user's shell: the key, RunPod's API at the fake, a token of their own that must never travel."""
    values = {
        "RUNPOD_API_KEY": KEY,
        "RUNPOD_API_URL": fake.url,
        "HF_TOKEN": LOCAL_HF_TOKEN,
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
        **node_data.env(),
    }
    for name in SCRUBBED:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return {**{k: v for k, v in os.environ.items() if k not in SCRUBBED}, **values}


def write_config(tmp_path: Path, models=(), name="config.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"models": list(models), "nodes": []}, sort_keys=False))
    return path


def deploy_sh(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "deploy.sh"), *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def module(*args, capsys) -> tuple[int, str, str]:
    code = runpod_deploy.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def config_of(body: dict) -> str:
    return base64.b64decode(body["env"]["CONFIG_YML"]).decode()


def assert_nothing_secret_travelled(fake: RunPodRestFake, *outputs: str) -> None:
    """The local token is in no request; the key only in the Authorization header, never in output."""
    for req in fake.requests:
        headers = {k: v for k, v in req.headers.items() if k.lower() != "authorization"}
        text = req.path + json.dumps(headers) + req.body.decode()
        assert LOCAL_HF_TOKEN not in text and KEY not in text, req
    for text in outputs:
        assert LOCAL_HF_TOKEN not in text and KEY not in text
    assert fake.invalid == []


# --- create, then update in place ------------------------------------------------------------------
def test_create_then_update_in_place_with_a_changed_config(fake, env, tmp_path):
    config = write_config(
        tmp_path, [{"url": "https://huggingface.co/o/r/resolve/main/a.safetensors", "destination": "checkpoints"}]
    )
    args = ["--endpoint", "my-comfy", "--image", IMAGE, "--config", config, "--gpu", "ADA_24", "--gpu", "AMPERE_48"]
    args += ["--network-volume", "comfy-models", "--env-secret", "HF_TOKEN=hf_token", "--env", "COMFY_JOB_TIMEOUT=900"]
    first = deploy_sh(*args, env=env)
    assert first.returncode == 0, first.stderr
    (post_template,) = fake.sent("POST", "/v2/templates")
    (post_endpoint,) = fake.sent("POST", "/v2/serverless")
    template, body = post_template.json(), post_endpoint.json()
    assert template["serverless"] is True and template["image"] == IMAGE
    assert body["name"] == "my-comfy" and body["image"] == IMAGE and body["templateId"] in fake.templates
    assert body["flashboot"] == "FLASHBOOT"  # RunPod's default is OFF: always set explicitly
    assert body["gpu"] == {"pools": ["ADA_24", "AMPERE_48"], "minCudaVersion": "12.8"}
    assert body["networkVolumes"] == ["vol7x2k9q"]  # looked up by name
    assert body["env"]["HF_TOKEN"] == "{{ RUNPOD_SECRET_hf_token }}"
    assert body["env"]["COMFY_JOB_TIMEOUT"] == "900"
    assert config_of(body) == config.read_text()
    (endpoint,) = fake.endpoints.values()
    assert f"endpoint my-comfy: created (id {endpoint['id']})" in first.stdout
    assert f"runsync: {fake.url}/v2/{endpoint['id']}/runsync" in first.stdout
    assert f"run:     {fake.url}/v2/{endpoint['id']}/run" in first.stdout
    assert '-H "Authorization: Bearer $RUNPOD_API_KEY"' in first.stdout  # the variable, never its value

    config.write_text(config.read_text() + "comfyui:\n  ref: v0.3.75\n")
    second = deploy_sh(*args, "--flashboot", "PRIORITY_FLASHBOOT", env=env)
    assert second.returncode == 0, second.stderr
    assert len(fake.sent("POST", "/v2/")) == 2 and len(fake.endpoints) == 1 == len(fake.templates)
    (patch,) = fake.sent("PATCH", "/v2/serverless/")
    assert patch.path == f"/v2/serverless/{endpoint['id']}"
    assert set(patch.json()) == {"templateId", "env", "flashboot"}  # only what changed
    assert config_of(fake.endpoints[endpoint["id"]]) == config.read_text()
    assert fake.endpoints[endpoint["id"]]["flashboot"] == "PRIORITY_FLASHBOOT"
    assert f"endpoint my-comfy: updated (id {endpoint['id']}), 2 change(s):" in second.stdout
    assert "env CONFIG_YML: changed (the config)" in second.stdout
    assert "flashboot: FLASHBOOT -> PRIORITY_FLASHBOOT" in second.stdout
    assert len(fake.sent("PATCH", "/v2/templates/")) == 1

    third = deploy_sh(*args, "--flashboot", "PRIORITY_FLASHBOOT", env=env)
    assert third.returncode == 0, third.stderr
    assert f"endpoint my-comfy: unchanged (id {endpoint['id']})" in third.stdout
    assert len(fake.sent("PATCH", "/v2/")) == 2  # nothing sent when nothing changed
    assert_nothing_secret_travelled(fake, *(r.stdout + r.stderr for r in (first, second, third)))


def test_update_sets_workers_timeouts_and_cuda_and_leaves_the_rest(fake, env, tmp_path, capsys):
    config = write_config(tmp_path)
    base = ["--endpoint", "e1", "--image", IMAGE, "--config", config]
    assert module(*base, "--network-volume", "vol7x2k9q", capsys=capsys)[0] == 0
    (endpoint,) = fake.endpoints.values()
    assert endpoint["gpu"]["pools"] == ["ADA_24", "AMPERE_24"] and endpoint["networkVolumes"] == ["vol7x2k9q"]
    endpoint["env"]["SET_BY_HAND"] = "1"  # in the console: the next deploy removes it, and says so
    code, out, err = module(
        *base, "--workers-min", 1, "--workers-max", 5, "--idle-timeout", 30, "--execution-timeout", 900,
        "--cuda", "12.8", "--cuda", "12.9", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    (patch,) = fake.sent("PATCH", "/v2/serverless/")
    sent = patch.json()
    assert sent["workers"] == {"min": 1, "max": 5, "idleTimeout": 30} and sent["timeout"] == 900_000
    assert sent["gpu"] == {"allowedCudaVersions": ["12.8", "12.9"], "minCudaVersion": ""}  # the floor is cleared
    assert "networkVolumes" not in sent and "pools" not in sent["gpu"]  # not given: left as they are
    assert endpoint["networkVolumes"] == ["vol7x2k9q"] and endpoint["gpu"]["minCudaVersion"] is None
    assert "execution timeout: 300 s -> 900 s" in out and "CUDA versions: 12.8 or newer -> 12.8, 12.9" in out
    assert "env SET_BY_HAND: removed" in out and set(sent["env"]) == {"CONFIG_YML"}
    assert fake.invalid == []


def test_flashboot_off_is_sent_when_asked(fake, env, tmp_path, capsys):
    code, _, err = module(
        "--endpoint", "e2", "--image", IMAGE, "--config", write_config(tmp_path), "--flashboot", "off", capsys=capsys
    )
    assert code == 0, err
    assert fake.sent("POST", "/v2/serverless")[0].json()["flashboot"] == "OFF"


def test_workers_are_patched_whole_and_a_min_above_the_max_is_refused_before_any_write(fake, env, tmp_path, capsys):
    """Only --workers-max given: the PATCH carries the whole block (min, idleTimeout kept as they are);
    a minimum above the maximum (given, the endpoint's, or RunPod's default 3 on create) writes nothing."""
    base = ["--endpoint", "w1", "--image", IMAGE, "--config", write_config(tmp_path)]
    code, _, err = module(*base, "--workers-min", 5, capsys=capsys)  # RunPod's default max is 3
    assert code == 2 and "workers would be min 5, max 3 (RunPod's default for a new one is min 0, max 3)" in err
    assert fake.sent("POST", "/v2/") == []
    assert module(*base, "--workers-min", 1, "--workers-max", 4, "--idle-timeout", 20, capsys=capsys)[0] == 0
    code, out, err = module(*base, "--workers-max", 6, capsys=capsys)
    assert code == 0, err
    (patch,) = fake.sent("PATCH", "/v2/serverless/")
    assert patch.json()["workers"] == {"min": 1, "max": 6, "idleTimeout": 20} and "workers max: 4 -> 6" in out
    assert set(patch.json()) == {"workers"}  # no templateId: it would re-apply the container (a new release)
    fake.requests.clear()
    code, _, err = module(*base, "--workers-min", 8, capsys=capsys)
    assert code == 2 and "workers would be min 8, max 6 (the endpoint 'w1' has min 1, max 6)" in err
    assert [r.method for r in fake.requests] == ["GET"]  # looked up, nothing written


def test_gpu_pools_are_upper_cased_and_an_unknown_one_is_warned_about(fake, env, tmp_path, capsys):
    base = ["--endpoint", "g1", "--image", IMAGE, "--config", write_config(tmp_path)]
    code, _, err = module(*base, "--gpu", "ada-24", capsys=capsys)
    assert code == 2 and "--gpu 'ADA-24': give a RunPod GPU pool id, e.g. --gpu ADA_24" in err
    code, _, err = module(*base, "--gpu", "ada_32_pro", "--gpu", "blackwell_96", capsys=capsys)
    assert code == 0 and "warning" not in err, err
    assert fake.sent("POST", "/v2/serverless")[0].json()["gpu"]["pools"] == ["ADA_32_PRO", "BLACKWELL_96"]
    code, _, err = module(*base, "--gpu", "ADA_9000", "--dry-run", capsys=capsys)
    assert code == 0 and "warning: --gpu ADA_9000: not among RunPod's documented GPU pools" in err
    code, _, err = module(*base, "--gpu", "ADA_9000", "--check-only", capsys=capsys)
    assert code == 0 and "warning" not in err  # deploy.sh -t's check before the build: said once, after it


def test_an_endpoint_named_with_runpods_old_flashboot_suffix_is_updated_not_doubled(fake, env, tmp_path, capsys):
    """Endpoints made when RunPod marked FlashBoot with " -fb" on the name are the same endpoint."""
    old = fake.create_endpoint(
        {"name": "legacy -fb", "type": "QUEUE", "image": "old/image:1", "flashboot": "FLASHBOOT",
         "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4}, "gpu": {"pools": ["ADA_24"]}}
    )  # fmt: skip
    code, out, err = module("--endpoint", "legacy", "--image", IMAGE, "--config", write_config(tmp_path), capsys=capsys)
    assert code == 0, err
    assert fake.sent("POST", "/v2/serverless") == [] and list(fake.endpoints) == [old["id"]]
    assert f"endpoint legacy: updated (id {old['id']})" in out and fake.endpoints[old["id"]]["image"] == IMAGE


# --- secrets --------------------------------------------------------------------------------------------
def test_secrets_are_referenced_never_copied(fake, env, tmp_path, capsys):
    config = write_config(tmp_path)
    base = ["--endpoint", "e3", "--image", IMAGE, "--config", config]
    code, _, err = module(*base, "--env", "HF_TOKEN=hf_abc", capsys=capsys)
    assert code == 2 and "--env-secret HF_TOKEN=<secret name>" in err
    code, _, err = module(*base, "--env", "MODE=a", "--env-secret", "MODE=b", capsys=capsys)
    assert code == 2 and "MODE is given more than once (--env, --env-secret): give it once" in err
    for name in ("OPENAI_API_KEY", "HUGGING_FACE_HUB_TOKEN", "my_password", "S3_SECRET_KEY"):  # named as secrets
        code, _, err = module(*base, "--env", f"{name}=abc", capsys=capsys)
        assert code == 2 and f"--env {name}=...: {name} is a secret" in err
    code, _, err = module(*base, "--env", f"MY_SETTING={LOCAL_HF_TOKEN}", capsys=capsys)
    assert code == 2 and "the value of this machine's HF_TOKEN" in err and LOCAL_HF_TOKEN not in err
    pasted = write_config(
        tmp_path, [{"url": f"https://example.com/{LOCAL_HF_TOKEN}.safetensors", "destination": "loras"}], "pasted.yml"
    )
    code, _, err = module("--endpoint", "e3", "--image", IMAGE, "--config", pasted, capsys=capsys)
    assert code == 2 and "the value of this machine's HF_TOKEN" in err and LOCAL_HF_TOKEN not in err  # base64 or not
    assert fake.requests == []
    code, _, err = module(*base, "--env-secret", "CIVITAI_TOKEN=civitai", capsys=capsys)
    assert code == 0, err
    assert fake.endpoints.popitem()[1]["env"]["CIVITAI_TOKEN"] == "{{ RUNPOD_SECRET_civitai }}"


# --- errors -------------------------------------------------------------------------------------------
def test_a_wrong_key_is_one_line_naming_runpod_api_key(fake, env, tmp_path):
    r = deploy_sh(
        "--endpoint",
        "e",
        "--image",
        IMAGE,
        "--config",
        write_config(tmp_path),
        env={**env, "RUNPOD_API_KEY": "rpa_wrong_key_123456"},
    )
    assert r.returncode == 1
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "RUNPOD_API_KEY" in line and "401" in line and "rpa_wrong_key_123456" not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr and fake.sent("POST", "/v2/") == []


def test_a_422_names_the_field_and_the_next_run_reuses_the_template(fake, env, tmp_path):
    config = write_config(tmp_path)
    r = deploy_sh("--endpoint", "e4", "--image", IMAGE, "--config", config, "--gpu", "ADA_9000", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "422" in r.stderr and "$.gpu.pools[0]: 'ADA_9000' is not a serverless GPU pool" in r.stderr
    (template_id,) = fake.templates
    assert f"the template 'e4 (comfy-worker)' ({template_id}) was created, the endpoint 'e4' was not" in r.stderr
    assert fake.endpoints == {}
    r = deploy_sh("--endpoint", "e4", "--image", IMAGE, "--config", config, "--gpu", "ADA_24", env=env)
    assert r.returncode == 0, r.stderr
    assert len(fake.sent("POST", "/v2/templates")) == 1  # reused, not made twice
    assert f"template e4 (comfy-worker): unchanged (id {template_id})" in r.stdout
    assert fake.endpoints.popitem()[1]["gpu"]["pools"] == ["ADA_24"]


def test_an_unreachable_api_names_the_url_and_the_cause(env, tmp_path, capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RUNPOD_API_URL", f"http://127.0.0.1:{port}")
    code, out, err = module("--endpoint", "e", "--image", IMAGE, "--config", write_config(tmp_path), capsys=capsys)
    assert code == 1 and out == ""
    assert err.startswith(f"error: cannot reach RunPod's API at http://127.0.0.1:{port}/v2/serverless: ")
    assert "refused" in err.lower() and "Traceback" not in err


def test_odd_api_urls_and_answers_are_one_line_without_a_traceback(fake, env, tmp_path, capsys, monkeypatch):
    """RUNPOD_API_URL without a scheme is refused before any request; one with a trailing /v2/ works;
    an API answering JSON of another shape is one line, exit 1 (an exception would fail the test)."""
    args = ["--endpoint", "u1", "--image", IMAGE, "--config", write_config(tmp_path)]
    monkeypatch.setenv("RUNPOD_API_URL", fake.url.removeprefix("http://"))
    code, _, err = module(*args, capsys=capsys)
    assert code == 2 and "is not an API base URL: give one like https://api.runpod.io" in err and fake.requests == []
    monkeypatch.setenv("RUNPOD_API_URL", fake.url + "/v2/")
    assert module(*args, capsys=capsys)[0] == 0
    assert {req.path for req in fake.requests} == {"/v2/serverless", "/v2/templates"}
    fake.raw_answers[("GET", "/v2/serverless")] = (200, "application/json", b'[{"id": "x"}]')
    code, _, err = module(*args, capsys=capsys)
    assert code == 1 and err.startswith("error: RunPod answered GET /v2/serverless without a list of endpoints")


def test_the_key_is_required_and_two_endpoints_of_one_name_are_refused(fake, env, tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path)
    for _ in range(2):  # someone made two in the console
        fake.create_endpoint(
            {
                "name": "twin",
                "type": "QUEUE",
                "image": IMAGE,
                "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
                "gpu": {"pools": ["ADA_24"]},
            }
        )
    code, _, err = module("--endpoint", "twin", "--image", IMAGE, "--config", config, capsys=capsys)
    assert code == 1 and "2 endpoints are named 'twin'" in err and fake.sent("POST", "/v2/") == []
    monkeypatch.delenv("RUNPOD_API_KEY")
    code, _, err = module("--endpoint", "x", "--image", IMAGE, "--config", config, capsys=capsys)
    assert code == 2 and "RUNPOD_API_KEY is not set" in err


# --- --dry-run -----------------------------------------------------------------------------------------
def test_dry_run_prints_the_requests_and_sends_none(fake, env, tmp_path):
    args = ["--endpoint", "e5", "--image", IMAGE, "--config", write_config(tmp_path), "--dry-run"]
    r = deploy_sh(*args, "--env-secret", "HF_TOKEN=hf_token", "--network-volume", "comfy-models", env=env)
    assert r.returncode == 0, r.stderr
    assert fake.requests == []
    assert f"POST {fake.url}/v2/serverless" in r.stdout and f"GET {fake.url}/v2/network-volumes" in r.stdout
    assert '"flashboot": "FLASHBOOT"' in r.stdout and "{{ RUNPOD_SECRET_hf_token }}" in r.stdout
    assert_nothing_secret_travelled(fake, r.stdout + r.stderr)


# --- --from-workflow ------------------------------------------------------------------------------------
def embedded_models(template: dict) -> set[tuple[str, str, str]]:
    return {
        (m["url"], m["directory"], m["name"])
        for n in template["nodes"]
        for m in (n.get("properties") or {}).get("models") or []
    }


def test_from_workflow_deploys_a_templates_embedded_models(fake, env, tmp_path):
    source = next(p for p in TEMPLATES if p.name == "flux_schnell_full_text_to_image.json")
    workflow = tmp_path / "flux.json"
    workflow.write_text(source.read_text())
    config = write_config(tmp_path)
    r = deploy_sh("--endpoint", "flux", "--image", IMAGE, "--config", config, "--from-workflow", workflow, env=env)
    assert r.returncode == 0, r.stderr
    kept = tmp_path / "flux.config.yml"
    assert f"--from-workflow: wrote {kept}" in r.stdout
    deployed = config_of(fake.sent("POST", "/v2/serverless")[0].json())
    assert deployed == kept.read_text()
    models = yaml.safe_load(deployed)["models"]
    expected = embedded_models(json.loads(source.read_text()))
    assert len(expected) == 4
    assert {(m["url"], m["destination"], m.get("filename") or url_filename(m["url"])) for m in models} == expected
    assert f"ok: {kept} is valid (4 model(s), 0 node(s)" in r.stdout + r.stderr


def test_from_workflow_with_dry_run_writes_no_config_file_and_sends_nothing(fake, env, tmp_path):
    """--dry-run leaves nothing behind: the merged config goes into the printed request, not next to the
    workflow."""
    source = next(p for p in TEMPLATES if p.name == "flux_schnell_full_text_to_image.json")
    workflow = tmp_path / "flux.json"
    workflow.write_text(source.read_text())
    args = ["--endpoint", "flux", "--image", IMAGE, "--config", write_config(tmp_path), "--from-workflow", workflow]
    r = deploy_sh(*args, "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert fake.requests == [] and not (tmp_path / "flux.config.yml").exists()
    assert "wrote" not in r.stdout and "CONFIG_YML" in r.stdout


def test_from_workflow_with_an_unknown_class_is_refused_before_any_request(fake, env, tmp_path, capsys):
    workflow = tmp_path / "odd.json"
    node = {"id": 1, "type": "NoSuchNodeAnywhere", "mode": 0, "properties": {}, "widgets_values": []}
    workflow.write_text(json.dumps({"last_node_id": 1, "nodes": [node], "links": []}))
    r = deploy_sh(
        "--endpoint", "odd", "--image", IMAGE, "--config", write_config(tmp_path), "--from-workflow", workflow, env=env
    )
    assert r.returncode == 1
    assert "NoSuchNodeAnywhere" in r.stderr and "nothing was sent to RunPod" in r.stderr
    assert fake.requests == [] and not (tmp_path / "odd.config.yml").exists()
    missing = tmp_path / "missing.json"
    code, _, err = module(
        "--endpoint", "odd", "--image", IMAGE, "--config", write_config(tmp_path),
        "--from-workflow", workflow, "--from-workflow", missing, capsys=capsys,
    )  # fmt: skip
    assert code == 1 and f"  {missing}: cannot read the file (No such file or directory)" in err
    assert fake.requests == []


# --- --smoke --------------------------------------------------------------------------------------------
def test_smoke_sends_a_job_through_runsync_and_prints_latency_and_shape(fake, env, tmp_path, capsys):
    code, out, err = module(
        "--endpoint", "e6", "--image", IMAGE, "--config", write_config(tmp_path), "--smoke", capsys=capsys
    )
    assert code == 0, err
    (job,) = [r for r in fake.requests if r.path.endswith("/runsync")]
    assert job.json() == json.loads((ROOT / "examples" / "quickstart.json").read_text())
    assert job.headers["Authorization"] == f"Bearer {KEY}"
    assert "smoke: COMPLETED in " in out and "output: images: 1 (base64 png)" in out
    fake.job_answer = {"status": "FAILED", "error": "ComfyUI could not load the model"}
    code, out, err = module(
        "--endpoint", "e6", "--image", IMAGE, "--config", write_config(tmp_path), "--smoke", capsys=capsys
    )
    assert code == 1 and "smoke: FAILED" in err and "could not load the model" in err
    fake.requests.clear()
    for text, said in (("{oops", "not JSON ("), ('{"prompt": {}}', 'not a job: give a JSON object with "input"')):
        (tmp_path / "job.json").write_text(text)
        code, out, err = module(
            "--endpoint", "e6", "--image", IMAGE, "--config", write_config(tmp_path),
            "--smoke-request", tmp_path / "job.json", capsys=capsys,
        )  # fmt: skip
        assert code == 2 and f"error: --smoke-request {tmp_path / 'job.json'}: {said}" in err
    assert fake.requests == []  # refused before deploying


def test_an_invalid_config_is_refused_with_the_validate_only_messages_before_any_request(fake, env, tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("models:\n  - url: https://example.com/a.safetensors\n")  # no destination
    code, _, err = module("--endpoint", "e7", "--image", IMAGE, "--config", bad, capsys=capsys)
    assert code == 2 and f"error: {bad} is invalid (1 problem(s)):" in err and "destination" in err
    assert fake.requests == []


def test_an_endpoint_answered_without_request_urls_gets_runpods_queue_urls():
    """requestUrls is optional in RunPod's Endpoint schema: the URLs are then RunPod's pattern."""
    assert runpod_deploy.request_urls({"id": "4m7x2k9q"}) == (
        "https://api.runpod.ai/v2/4m7x2k9q/run",
        "https://api.runpod.ai/v2/4m7x2k9q/runsync",
    )
