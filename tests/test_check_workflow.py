"""check_workflow.py on real workflows: the reference request bodies (tests/data), ComfyUI's own
workflow templates (the comfyui_workflow_templates packages ComfyUI's requirements install), images
the real ComfyUI saved, and a live ComfyUI asked with --comfy-host (docs/check_workflow.md)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from PIL import Image
from support.models import UPSCALE_MODEL_NAME
from support.node_data import PACKS, NodeDataServer

import check_workflow
from comfy_worker import workflow_check
from comfy_worker.config_schema import load_config_text
from comfy_worker.file_names import url_filename

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
TEMPLATES = sorted(
    Path(p)
    for p in glob.glob(
        os.path.join(
            sys.prefix, "lib", "python3*", "site-packages", "comfyui_workflow_templates_*", "templates", "*.json"
        )
    )
    if not Path(p).name.startswith("index")
)
HF = "https://huggingface.co/org/repo/resolve/main"


@pytest.fixture(scope="module")
def node_data():
    server = NodeDataServer()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def node_data_env(node_data, tmp_path, monkeypatch):
    """Every check here looks node packs up on loopback, with a cache of its own (the suite is offline)."""
    node_data.down = False
    for name, value in node_data.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return node_data


def write_config(tmp_path: Path, models=(), nodes=(), name="config.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"models": list(models), "nodes": list(nodes)}, sort_keys=False))
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = check_workflow.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "check_workflow.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def embedded_models(template: dict) -> set[tuple[str, str, str]]:
    """(url, directory, name) of every properties.models entry, subgraphs included."""
    nodes = list(template["nodes"])
    for sg in (template.get("definitions") or {}).get("subgraphs") or []:
        nodes += sg.get("nodes") or []
    return {
        (m["url"], m["directory"], m["name"]) for n in nodes for m in (n.get("properties") or {}).get("models") or []
    }


def custom_packs(template: dict) -> set[str]:
    nodes = list(template["nodes"])
    for sg in (template.get("definitions") or {}).get("subgraphs") or []:
        nodes += sg.get("nodes") or []
    return {
        n["properties"]["cnr_id"]
        for n in nodes
        if (n.get("properties") or {}).get("cnr_id") not in (None, "comfy-core")
    }


WITH_MODELS = [p for p in TEMPLATES if embedded_models(json.loads(p.read_text()))]


def suggested_set(text: str) -> set[tuple[str, str, str]]:
    cfg = load_config_text(text, "suggestion")  # what download_models.py --validate-only runs
    return {(m.url, m.destination, m.filename or url_filename(m.url)) for m in cfg.models}


# --- the reference workflows (API format inside job JSON) ----------------------------------------------
REFERENCE = {
    "workflow_sdxl_turbo.json": {("4", "CheckpointLoaderSimple", "ckpt_name", "sd_xl_turbo_1.0_fp16.safetensors")},
    "workflow_sd3.json": {("252", "CheckpointLoaderSimple", "ckpt_name", "sd3_medium_incl_clips_t5xxlfp8.safetensors")},
    "workflow_flux1_schnell.json": {
        ("10", "VAELoader", "vae_name", "ae.safetensors"),
        ("11", "DualCLIPLoader", "clip_name1", "t5xxl_fp8_e4m3fn.safetensors"),
        ("11", "DualCLIPLoader", "clip_name2", "clip_l.safetensors"),
        ("12", "UNETLoader", "unet_name", "flux1-schnell.safetensors"),
    },
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_workflows_name_every_missing_model_one_line_each(name, tmp_path, capsys):
    code, out, _ = run([DATA / name, "--config", write_config(tmp_path), "--json"], capsys)
    report = json.loads(out)
    assert code == 1 == report["exit_code"]
    (wf,) = report["workflows"]
    assert wf["format"] == "job JSON, API format"
    assert {(m["node_id"], m["class_type"], m["input"], m["name"]) for m in wf["models"]} == REFERENCE[name]
    assert len(report["problems"]) == len(REFERENCE[name])
    for (node_id, class_type, input_name, file_name), line in zip(
        sorted(REFERENCE[name]), sorted(report["problems"]), strict=True
    ):
        assert line.startswith(
            f"{DATA / name}: node {node_id} ({class_type}) input {input_name!r}: model file {file_name!r}"
        )


def test_flux_with_its_files_in_the_alias_folders_is_provided(tmp_path, capsys):
    # ComfyUI reads models/unet as diffusion_models and models/clip as text_encoders
    config = write_config(
        tmp_path,
        [
            {"url": f"{HF}/ae.safetensors", "destination": "vae"},
            {"url": f"{HF}/t5xxl_fp8_e4m3fn.safetensors", "destination": "clip"},
            {"url": f"{HF}/clip_l.safetensors", "destination": "text_encoders"},
            {"url": f"{HF}/flux1-schnell.safetensors", "destination": "unet"},
        ],
    )
    code, out, _ = run([DATA / "workflow_flux1_schnell.json", "--config", config], capsys)
    assert code == 0, out
    assert "ok: " in out and "provides every model file" in out


def test_api_format_workflow_with_a_missing_checkpoint(tmp_path, capsys):
    api = json.loads((DATA / "workflow_sdxl_turbo.json").read_text())["input"]["workflow"]
    path = tmp_path / "sdxl_api.json"
    path.write_text(json.dumps(api))
    config = write_config(tmp_path, [{"url": f"{HF}/other.safetensors", "destination": "checkpoints"}])
    code, out, _ = run([path, "--config", config], capsys)
    assert code == 1
    assert f"{path} (API format): 1 model file(s), 7 node(s)" in out
    assert (
        f"  {path}: node 4 (CheckpointLoaderSimple) input 'ckpt_name': model file 'sd_xl_turbo_1.0_fp16.safetensors' "
        f"is not in {config} (CheckpointLoaderSimple reads models/checkpoints)"
    ) in out.splitlines()


def test_a_model_in_the_wrong_folder_is_named_with_the_folder_its_loader_reads(tmp_path, capsys):
    url = "https://huggingface.co/stabilityai/sdxl-turbo/resolve/main/sd_xl_turbo_1.0_fp16.safetensors"
    config = write_config(tmp_path, [{"url": url, "destination": "diffusion_models"}])
    code, out, err = run([DATA / "workflow_sdxl_turbo.json", "--config", config, "--suggest"], capsys)
    assert code == 1
    assert (
        f"  {DATA / 'workflow_sdxl_turbo.json'}: node 4 (CheckpointLoaderSimple) input 'ckpt_name': model file "
        f"'sd_xl_turbo_1.0_fp16.safetensors': {config} puts it at models/diffusion_models/sd_xl_turbo_1.0_fp16.safetensors "
        "(models[0]), but CheckpointLoaderSimple reads models/checkpoints"
    ) in err.splitlines()
    # the suggestion moves it: the same URL into the folder the loader reads
    assert suggested_set(out) == {(url, "checkpoints", "sd_xl_turbo_1.0_fp16.safetensors")}
    assert "# replaces models[0] (models/diffusion_models/sd_xl_turbo_1.0_fp16.safetensors)" in out


def test_a_text_encoder_in_the_vae_folder_is_wrong_but_in_clip_is_right(tmp_path, capsys):
    flux = DATA / "workflow_flux1_schnell.json"
    wrong = write_config(tmp_path, [{"url": f"{HF}/clip_l.safetensors", "destination": "vae"}], name="wrong.yml")
    _, out, _ = run([flux, "--config", wrong, "--json"], capsys)
    clip_l = next(m for m in json.loads(out)["workflows"][0]["models"] if m["name"] == "clip_l.safetensors")
    assert clip_l["status"] == "wrong_folder"
    assert clip_l["detail"].endswith("but DualCLIPLoader reads models/text_encoders (or models/clip)")
    right = write_config(tmp_path, [{"url": f"{HF}/clip_l.safetensors", "destination": "clip"}], name="right.yml")
    _, out, _ = run([flux, "--config", right, "--json"], capsys)
    clip_l = next(m for m in json.loads(out)["workflows"][0]["models"] if m["name"] == "clip_l.safetensors")
    assert clip_l["status"] == "provided"


def windows_lora_workflow(tmp_path: Path, lora: str) -> Path:
    path = tmp_path / "wan_lora_api.json"
    api = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan.safetensors", "weight_dtype": "default"}},
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"lora_name": lora, "strength_model": 1.0, "model": ["1", 0]},
        },
    }
    path.write_text(json.dumps(api))
    return path


def test_a_windows_style_model_path_is_never_provided_and_names_the_slash_form(tmp_path, capsys):
    """issue 20 #10: `lora_name: "wan\\x.safetensors"` with `destination: loras/wan` was reported provided
    (exit 0), and ComfyUI then rejects it: it is a problem (exit 1) that names 'wan/x.safetensors'."""
    workflow = windows_lora_workflow(tmp_path, "wan\\x.safetensors")
    config = write_config(
        tmp_path,
        [
            {"url": f"{HF}/wan.safetensors", "destination": "diffusion_models"},
            {"url": f"{HF}/x.safetensors", "destination": "loras/wan"},
        ],
    )
    code, out, _ = run([workflow, "--config", config, "--json"], capsys)
    assert code == 1
    report = json.loads(out)
    lora = next(m for m in report["workflows"][0]["models"] if m["input"] == "lora_name")
    assert lora["status"] == "backslash" and lora["fixed"] == "wan/x.safetensors"
    assert "use 'wan/x.safetensors' in the workflow" in lora["detail"]
    assert f"{config} provides that: models[1] (models/loras/wan/x.safetensors)" in lora["detail"]
    assert report["problems"] == [f"{workflow}: node 2 (LoraLoaderModelOnly) input 'lora_name': {lora['detail']}"]
    assert report["suggestion"]["models"] == []  # nothing to add to the config: the workflow is what is wrong

    code, out, err = run([workflow, "--config", config, "--suggest"], capsys)
    assert code == 1 and "  backslash     loras/wan\\x.safetensors" in err
    assert "fix the workflow, not the config: write 'wan/x.safetensors'" in out

    # the same workflow written with '/' passes
    code, out, _ = run([windows_lora_workflow(tmp_path, "wan/x.safetensors"), "--config", config], capsys)
    assert code == 0, out


def test_a_windows_style_path_that_is_also_missing_names_both_problems(tmp_path, capsys):
    """issue 20 #10: a '\\' path the config lacks: the backslash is named with the missing file."""
    workflow = windows_lora_workflow(tmp_path, "wan\\x.safetensors")
    config = write_config(tmp_path, [{"url": f"{HF}/wan.safetensors", "destination": "diffusion_models"}])
    code, out, _ = run([workflow, "--config", config, "--json"], capsys)
    assert code == 1
    lora = next(m for m in json.loads(out)["workflows"][0]["models"] if m["input"] == "lora_name")
    assert lora["status"] == "missing" and "use 'wan/x.safetensors' in the workflow" in lora["detail"]
    assert f"is not in {config} (LoraLoaderModelOnly reads models/loras)" in lora["detail"]


# --- ComfyUI's workflow templates -------------------------------------------------------------------
def test_the_templates_are_there():
    assert len(TEMPLATES) >= 150 and len(WITH_MODELS) >= 80, (len(TEMPLATES), len(WITH_MODELS))


def test_every_template_suggestion_is_exactly_its_embedded_models_and_a_config_of_them_passes(tmp_path, capsys):
    empty = write_config(tmp_path, name="empty.yml")
    for template in WITH_MODELS:
        data = json.loads(template.read_text())
        expected = embedded_models(data)
        code, out, err = run([template, "--config", empty, "--suggest", "--include-bypassed"], capsys)
        assert code == 1, (template.name, err)
        assert suggested_set(out) == expected, template.name
        config = write_config(
            tmp_path,
            [
                {"url": url, "destination": directory, **({"filename": name} if url_filename(url) != name else {})}
                for url, directory, name in sorted(expected)
            ],
            [{"url": f"https://github.com/example/{pack}"} for pack in sorted(custom_packs(data))],
            name="full.yml",
        )
        code, out, err = run([template, "--config", config, "--include-bypassed"], capsys)
        assert code == 0, (template.name, out)


@pytest.mark.parametrize("name", ["video_wan2_2_14B_animate.json", "image_qwen_image.json", "lora.json"])
def test_suggest_through_the_cli_validates_with_download_models(name, tmp_path):
    template = next(p for p in TEMPLATES if p.name == name)
    empty = write_config(tmp_path, name="empty.yml")
    result = run_cli(template, "--config", empty, "--suggest")
    assert result.returncode == 1, result.stderr
    assert "problems (" in result.stderr and "problems (" not in result.stdout  # the report goes to stderr
    suggestion = tmp_path / "extra.yml"
    suggestion.write_text(result.stdout)
    check = subprocess.run(
        [sys.executable, str(ROOT / "download_models.py"), "--validate-only", "--config", str(suggestion)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith(f"ok: {suggestion} is valid")


def test_bypassed_loaders_are_skipped_and_listed_as_comments(tmp_path, capsys):
    template = next(p for p in TEMPLATES if p.name == "lora.json")  # its LoraLoader is bypassed
    code, out, err = run([template, "--config", write_config(tmp_path), "--suggest"], capsys)
    assert "MoXinV1.safetensors" not in {n for _, _, n in suggested_set(out)}
    assert "'MoXinV1.safetensors' is not needed, the node is bypassed" in out
    assert "skipped" in err and "MoXinV1.safetensors" in err


def test_template_custom_nodes_from_the_registry_get_their_git_urls(tmp_path, capsys):
    """issue 22 #1: a UI workflow's cnr_id becomes the registry's git URL; the entries validate."""
    template = next(p for p in TEMPLATES if p.name == "video_wan2_2_14B_animate.json")
    code, out, _ = run([template, "--config", write_config(tmp_path), "--suggest"], capsys)
    assert code == 1
    nodes = load_config_text(out, "suggestion").nodes  # what install_nodes.py --validate-only runs
    assert {n.url for n in nodes} == {
        "https://github.com/kijai/ComfyUI-KJNodes",
        "https://github.com/Fannovel16/comfyui_controlnet_aux",
        "https://github.com/kijai/ComfyUI-segment-anything-2",
    }
    assert "# provides BlockifyMask, DrawMaskOnImage, PointsEditor (from cnr_id)" in out


def test_template_custom_nodes_offline_without_a_cache_say_they_could_not_be_looked_up(tmp_path, capsys):
    """issue 22 #1: no network, no cache: the check still runs and says what it could not look up."""
    template = next(p for p in TEMPLATES if p.name == "video_wan2_2_14B_animate.json")
    code, out, err = run([template, "--config", write_config(tmp_path), "--suggest", "--offline"], capsys)
    assert code == 1
    assert yaml.safe_load(out)["nodes"] is None  # only comments: nothing to install without a URL
    assert (
        "# not suggested: BlockifyMask, DrawMaskOnImage, PointsEditor: from the Comfy Registry pack 'comfyui-kjnodes'"
        in out
    )
    assert "not looked up: registry pack 'comfyui-kjnodes' is not in the cache" in err


# --- custom nodes from the UI format ---------------------------------------------------------------
def test_a_custom_node_class_is_reported_with_its_repo_from_aux_id(tmp_path, capsys):
    wf = DATA / "workflow_ui_custom_nodes.json"
    code, out, err = run([wf, "--config", write_config(tmp_path), "--suggest"], capsys)
    assert code == 1
    assert (
        f"{wf}: node 11 (WorkerFilmGrain): custom node class from https://github.com/example-org/comfyui-film-grain, "
        f"which {tmp_path / 'config.yml'} does not install"
    ) in err
    nodes = yaml.safe_load(out)["nodes"]
    assert nodes == [
        {"url": "https://github.com/kijai/ComfyUI-KJNodes"},  # its cnr_id, by the registry
        {
            "url": "https://github.com/example-org/comfyui-film-grain",
            "version": "8c1f2e4b9d3a7f6e5c0b1a2d3e4f5a6b7c8d9e0f",
        },
    ]
    assert "# the workflow was saved with version 1.1.7" in out
    # a config that installs both packs (by repo, and by the registry id as folder name) provides them
    config = write_config(
        tmp_path,
        [
            {
                "url": "https://huggingface.co/stabilityai/sdxl-turbo/resolve/main/sd_xl_turbo_1.0_fp16.safetensors",
                "destination": "checkpoints",
            }
        ],
        [
            {"url": "git@github.com:example-org/comfyui-film-grain.git"},
            {"url": "https://github.com/kijai/ComfyUI-KJNodes"},
        ],
        name="full.yml",
    )
    code, out, _ = run([wf, "--config", config], capsys)
    assert code == 0, out


def test_an_api_format_custom_class_is_unknown_without_a_live_comfyui(tmp_path, capsys):
    api = {"1": {"class_type": "WorkerFilmGrain", "inputs": {"strength": 0.1}}}
    path = tmp_path / "api.json"
    path.write_text(json.dumps(api))
    code, out, _ = run([path, "--config", write_config(tmp_path)], capsys)
    assert code == 1
    assert (
        f"{path}: node 1 (WorkerFilmGrain): not a class of core ComfyUI v0.3.75 and the workflow names no node pack"
        in out
    )


# --- images the real ComfyUI saved -------------------------------------------------------------------
UI_FOR_PNG = {
    "last_node_id": 4,
    "nodes": [
        {
            "id": 2,
            "type": "UpscaleModelLoader",
            "mode": 0,
            "properties": {
                "cnr_id": "comfy-core",
                "models": [
                    {"name": UPSCALE_MODEL_NAME, "url": f"{HF}/{UPSCALE_MODEL_NAME}", "directory": "upscale_models"}
                ],
            },
            "widgets_values": [UPSCALE_MODEL_NAME],
        }
    ],
    "links": [],
}


def saved_images(comfyui) -> dict[str, Path]:
    """Run EmptyImage -> UpscaleModelLoader/ImageUpscaleWithModel -> SaveImage + SaveAnimatedWEBP on the real
    ComfyUI (with a UI-format workflow in extra_pnginfo, as the frontend sends it); the saved files."""
    prefix = f"cw_check_{uuid.uuid4().hex[:8]}"
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0x4080C0}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": UPSCALE_MODEL_NAME}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
        "5": {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {
                "images": ["3", 0],
                "filename_prefix": prefix,
                "fps": 6.0,
                "lossless": True,
                "quality": 80,
                "method": "fastest",
            },
        },
    }
    body = {"prompt": prompt, "client_id": uuid.uuid4().hex, "extra_data": {"extra_pnginfo": {"workflow": UI_FOR_PNG}}}
    request = urllib.request.Request(
        f"{comfyui.url}/prompt", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        prompt_id = json.load(response)["prompt_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        entry = comfyui.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed"):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"prompt {prompt_id} did not finish")
    files = {}
    for node in ("4", "5"):
        (image,) = entry["outputs"][node]["images"]
        files[node] = comfyui.path / "output" / image["subfolder"] / image["filename"]
    return files


def test_images_saved_by_the_real_comfyui_are_read_back(comfyui, tmp_path, capsys):
    files = saved_images(comfyui)
    try:
        png, webp = files["4"], files["5"]
        assert png.suffix == ".png" and webp.suffix == ".webp"
        empty = write_config(tmp_path, name="empty.yml")
        for image, kind in ((png, "PNG"), (webp, "WEBP")):
            code, out, err = run([image, "--config", empty, "--suggest"], capsys)
            assert code == 1, err
            assert f"{image} ({kind} metadata, API format + UI format): 1 model file(s), 5 node(s)" in err
            assert f"{image}: node 2 (UpscaleModelLoader) input 'model_name': model file '{UPSCALE_MODEL_NAME}'" in err
            # the URL comes from the UI format's properties.models, the input from the API format
            assert suggested_set(out) == {(f"{HF}/{UPSCALE_MODEL_NAME}", "upscale_models", UPSCALE_MODEL_NAME)}
        provided = write_config(tmp_path, [{"url": f"{HF}/{UPSCALE_MODEL_NAME}", "destination": "upscale_models"}])
        assert run([png, webp, "--config", provided], capsys)[0] == 0
    finally:
        for path in files.values():
            path.unlink(missing_ok=True)


# --- a live ComfyUI ----------------------------------------------------------------------------------
def test_a_live_comfyui_finds_a_class_that_is_not_installed(comfyui, tmp_path, capsys):
    api = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "WorkerTestSteps", "inputs": {"image": ["1", 0], "steps": 1, "seconds_per_step": 0}},
        "3": {"class_type": "WorkerFilmGrain", "inputs": {"image": ["2", 0], "strength": 0.1}},
        "4": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": UPSCALE_MODEL_NAME}},
    }
    path = tmp_path / "api.json"
    path.write_text(json.dumps(api))
    config = write_config(tmp_path, [{"url": f"{HF}/{UPSCALE_MODEL_NAME}", "destination": "upscale_models"}])
    code, out, _ = run([path, "--config", config, "--comfy-host", comfyui.host, "--json"], capsys)
    report = json.loads(out)
    assert code == 1
    nodes = {n["class_type"]: n for n in report["workflows"][0]["nodes"]}
    assert nodes["EmptyImage"]["status"] == "core"
    assert nodes["WorkerFilmGrain"]["status"] == "not_installed"
    assert nodes["WorkerTestSteps"]["status"] == "not_in_config"
    assert f"{path}: node 3 (WorkerFilmGrain): class not installed on ComfyUI at {comfyui.host}" in report["problems"]
    assert any(
        "custom_nodes/comfy_worker_test_nodes" in p and "node 2 (WorkerTestSteps)" in p for p in report["problems"]
    )
    # a config that installs the test nodes' folder provides that class
    config = write_config(
        tmp_path,
        [{"url": f"{HF}/{UPSCALE_MODEL_NAME}", "destination": "upscale_models"}],
        [{"url": "https://github.com/example/comfy_worker_test_nodes"}],
    )
    del api["3"]
    path.write_text(json.dumps(api))
    code, out, _ = run([path, "--config", config, "--comfy-host", comfyui.host], capsys)
    assert code == 0, out


def test_a_live_comfyui_tells_which_folder_a_list_input_reads(comfyui):
    live = workflow_check.LiveComfy.connect(comfyui.host)
    assert UPSCALE_MODEL_NAME in live.folder_files["upscale_models"]
    assert live.folder_of("UpscaleModelLoader", "model_name") == "upscale_models"
    assert live.folder_of("EmptyImage", "width") is None


def test_an_unreachable_comfy_host_exits_2(tmp_path, capsys):
    code, _, err = run(
        [DATA / "workflow_sd3.json", "--config", write_config(tmp_path), "--comfy-host", "127.0.0.1:9"], capsys
    )
    assert code == 2 and "cannot reach ComfyUI at 127.0.0.1:9" in err


# --- unreadable input and the config source -------------------------------------------------------------
def test_unreadable_inputs_exit_2_naming_the_file_and_why(tmp_path, capsys):
    not_json = tmp_path / "broken.json"
    not_json.write_text('{"1": {"class_type": "EmptyImage", ')
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]")
    bare_png = tmp_path / "bare.png"
    Image.new("RGB", (4, 4)).save(bare_png)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(bare_png.read_bytes()[:20])
    missing = tmp_path / "nope.json"
    code, out, _ = run(
        [
            DATA / "workflow_sd3.json",
            not_json,
            a_list,
            bare_png,
            truncated,
            missing,
            "--config",
            write_config(tmp_path),
        ],
        capsys,
    )
    assert code == 2
    assert (
        f"error: {not_json}: the file is not JSON (Expecting property name enclosed in double quotes at line 1 column 36)"
        in out
    )
    assert f"error: {a_list}: not a ComfyUI workflow: the JSON is a JSON list" in out
    assert f"error: {bare_png}: a PNG image without ComfyUI metadata" in out
    assert f"error: {truncated}: a damaged image" in out
    assert f"error: {missing}: cannot read the file (No such file or directory)" in out
    assert "node 252 (CheckpointLoaderSimple)" in out  # the readable one is still checked


def test_config_comes_from_config_yml_env_when_no_config_is_given():
    config = yaml.safe_dump(
        {"models": [{"url": f"{HF}/sd3_medium_incl_clips_t5xxlfp8.safetensors", "destination": "checkpoints"}]}
    )
    result = run_cli(DATA / "workflow_sd3.json", env={"CONFIG_YML": config})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("config: CONFIG_YML\n")


def test_an_invalid_config_exits_2_naming_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("models:\n  - url: https://x/y.safetensors\n    destination: vae\n    sha265: abc\n")
    code, _, err = run([DATA / "workflow_sd3.json", "--config", bad], capsys)
    assert code == 2 and "unknown key 'sha265'; did you mean 'sha256'?" in err


# --- node packs from ComfyUI-Manager's data (issue 22) -----------------------------------------------
KJ = "https://github.com/kijai/ComfyUI-KJNodes"
VHS = "https://github.com/Kosinkadink/ComfyUI-VideoHelperSuite"
IMPACT = "https://github.com/ltdrdata/ComfyUI-Impact-Pack"
SUBPACK = "https://github.com/ltdrdata/ComfyUI-Impact-Subpack"
IPADAPTER = "https://github.com/cubiq/ComfyUI_IPAdapter_plus"
CN_AUX = "https://github.com/Fannovel16/comfyui_controlnet_aux"
SAM2 = "https://github.com/kijai/ComfyUI-segment-anything-2"
ACN = "https://github.com/Kosinkadink/ComfyUI-Advanced-ControlNet"
# Small workflows of our own (tests/data/packs/README.md) built of the packs' real classes, and the class ->
# pack each really comes from. A naive first match of the map gets several wrong (S3-IO, Swwan, tbox, the
# Dummy pack, the "Hunyuan" pattern).
PACK_WORKFLOWS = {
    "vhs_load_combine.json": {"VHS_LoadVideo": VHS, "VHS_VideoCombine": VHS},
    "vhs_api.json": {"VHS_LoadVideo": VHS, "VHS_VideoCombine": VHS},  # API format
    "vhs_load_path.json": {"VHS_LoadVideoPath": VHS, "VHS_VideoCombine": VHS, "VHS_VideoInfoLoaded": VHS},
    "kjnodes_hunyuan_i2v.json": {
        "GetLatentRangeFromBatch": KJ,
        "ImageNoiseAugmentation": KJ,
        "ImageResizeKJ": KJ,
        "LeapfusionHunyuanI2VPatcher": KJ,
        "PathchSageAttentionKJ": KJ,
        "VHS_VideoCombine": VHS,
    },
    "impact_regions.json": {
        "## sd15-basic-pipe [7f3a1c]": IMPACT,
        **dict.fromkeys(
            [
                "CombineRegionalPrompts",
                "EditBasicPipe",
                "FromBasicPipe",
                "FromBasicPipe_v2",
                "KSamplerAdvancedProvider",
                "RegionalPrompt",
                "RegionalSampler",
            ],
            IMPACT,
        ),
    },
    "impact_face_detailer_sdxl.json": {
        **dict.fromkeys(
            [
                "BasicPipeToDetailerPipeSDXL",
                "DetailerForEachPipe",
                "FaceDetailerPipe",
                "FromDetailerPipeSDXL",
                "ImpactSimpleDetectorSEGSPipe",
                "SAMLoader",
                "ToBasicPipe",
                "ToDetailerPipeSDXL",
            ],
            IMPACT,
        ),
        "UltralyticsDetectorProvider": SUBPACK,
    },
    "impact_mask_segs.json": dict.fromkeys(
        ["MaskToSEGS", "MasksToMaskList", "SAMDetectorSegmented", "SAMLoader", "SEGSToImageList"]
        + ["Segs & Mask ForEach"],
        IMPACT,
    ),
    "acn_anima_lineart.json": {"ACN_AdvancedControlNetApply_v2": ACN, "ACN_AnimaLLLiteLoaderAdvanced": ACN},
    "ipadapter_tiled_sd15.json": {"IPAdapterModelLoader": IPADAPTER, "IPAdapterTiled": IPADAPTER},
    "ipadapter_faceid_sd15.json": {"IPAdapterFaceID": IPADAPTER, "IPAdapterUnifiedLoaderFaceID": IPADAPTER},
    "cn_aux_preprocessors.json": dict.fromkeys(
        [
            "BAE-NormalMapPreprocessor",
            "BinaryPreprocessor",
            "CannyEdgePreprocessor",
            "ColorPreprocessor",
            "DWPreprocessor",
            "FakeScribblePreprocessor",
            "HEDPreprocessor",
            "LeReS-DepthMapPreprocessor",
            "LineArtPreprocessor",
            "M-LSDPreprocessor",
            "MiDaS-DepthMapPreprocessor",
            "MiDaS-NormalMapPreprocessor",
            "OneFormer-ADE20K-SemSegPreprocessor",
            "OneFormer-COCO-SemSegPreprocessor",
            "OpenposePreprocessor",
            "PiDiNetPreprocessor",
            "SAMPreprocessor",
            "ScribblePreprocessor",
            "TilePreprocessor",
            "UniFormer-SemSegPreprocessor",
            "Zoe-DepthMapPreprocessor",
        ],
        CN_AUX,
    ),
}
WAN_ANIMATE = {
    "BlockifyMask": KJ,
    "DrawMaskOnImage": KJ,
    "PointsEditor": KJ,
    "DWPreprocessor": CN_AUX,
    "PixelPerfectResolution": CN_AUX,
    "DownloadAndLoadSAM2Model": SAM2,
    "Sam2Segmentation": SAM2,
}


def as_api_format(ui: dict) -> dict:
    """The same workflow as an API-format export names its nodes (class_type only, no pack ids)."""
    return {str(n["id"]): {"class_type": n["type"], "inputs": {}} for n in ui["nodes"] if n["type"] != "Note"}


def without_pack_ids(ui: dict) -> dict:
    ui = json.loads(json.dumps(ui))
    for node in ui["nodes"] + [n for sg in (ui.get("definitions") or {}).get("subgraphs") or [] for n in sg["nodes"]]:
        for key in ("cnr_id", "aux_id", "ver"):
            (node.get("properties") or {}).pop(key, None)
    return ui


def checked_repos(paths: list[Path], config: Path, capsys, *extra) -> dict[str, list[dict]]:
    code, out, _ = run([*paths, "--config", config, "--json", *extra], capsys)
    report = json.loads(out)
    return {Path(w["path"]).name: w["nodes"] for w in report["workflows"]}


def test_custom_classes_of_real_workflows_get_the_right_repo(tmp_path, capsys):
    """issue 22 #1 #2: on workflows of the packs' real classes (UI format with and without pack ids,
    API format, a template with its cnr_ids removed) at least 95% of custom classes get the right pack, and none is called core."""
    paths = [PACKS / name for name in PACK_WORKFLOWS]
    expected = {name: dict(classes) for name, classes in PACK_WORKFLOWS.items()}
    for name in ("vhs_load_path.json", "kjnodes_hunyuan_i2v.json", "cn_aux_preprocessors.json"):
        api = tmp_path / f"api_{name}"
        api.write_text(json.dumps(as_api_format(json.loads((PACKS / name).read_text()))))
        paths.append(api)
        expected[api.name] = PACK_WORKFLOWS[name]
    template = next(p for p in TEMPLATES if p.name == "video_wan2_2_14B_animate.json")
    stripped = tmp_path / "wan_animate_no_ids.json"
    stripped.write_text(json.dumps(without_pack_ids(json.loads(template.read_text()))))
    paths.append(stripped)
    expected[stripped.name] = WAN_ANIMATE
    found = checked_repos(paths, write_config(tmp_path), capsys, "--include-bypassed")
    right, wrong = 0, []
    for name, classes in expected.items():
        repos = {n["class_type"]: n for n in found[name]}
        for class_type, repo in classes.items():
            node = repos[class_type]
            assert node["status"] != "core", (name, class_type)
            if node["repo"] == repo:
                right += 1
            else:
                wrong.append((name, class_type, node["repo"]))
    assert right / (right + len(wrong)) >= 0.95, wrong
    assert right > 90 and wrong == []


def test_a_second_run_offline_gives_the_same_packs_from_the_cache(tmp_path, capsys, node_data):
    """issue 22 #1: --offline answers from the cache the first run filled, without a request."""
    paths = [PACKS / "kjnodes_hunyuan_i2v.json", PACKS / "impact_mask_segs.json"]
    config = write_config(tmp_path)
    online = checked_repos(paths, config, capsys)
    before = len(node_data.requests)
    offline = checked_repos(paths, config, capsys, "--offline")
    assert len(node_data.requests) == before
    assert offline == online
    assert {n["repo"] for n in online["impact_mask_segs.json"] if n["status"] == "missing"} == {IMPACT}


def test_json_node_entries_carry_repo_and_repo_source(tmp_path, capsys):
    """issue 22 #7: "repo" and "repo_source" for every node; null where no pack is known."""
    wf = json.loads((DATA / "workflow_ui_custom_nodes.json").read_text())
    path = tmp_path / "wf.json"
    wf["nodes"].append({"id": 99, "type": "VHS_VideoCombine", "mode": 0, "properties": {}, "widgets_values": {}})
    wf["nodes"].append({"id": 98, "type": "NoPackHasThisClass", "mode": 0, "properties": {}})
    path.write_text(json.dumps(wf))
    nodes = {n["class_type"]: n for n in checked_repos([path], write_config(tmp_path), capsys)["wf.json"]}
    assert (nodes["WorkerFilmGrain"]["repo"], nodes["WorkerFilmGrain"]["repo_source"]) == (
        "https://github.com/example-org/comfyui-film-grain",
        "aux_id",
    )
    assert (nodes["ImageResizeKJv2"]["repo"], nodes["ImageResizeKJv2"]["repo_source"]) == (KJ, "cnr_id")
    assert (nodes["VHS_VideoCombine"]["repo"], nodes["VHS_VideoCombine"]["repo_source"]) == (VHS, "node-map")
    assert (nodes["NoPackHasThisClass"]["repo"], nodes["NoPackHasThisClass"]["status"]) == (None, "unknown")
    assert all("repo" in n and "repo_source" in n for n in nodes.values())


def test_the_configs_own_node_is_chosen_over_the_maps_favourite(tmp_path, capsys):
    """issue 22 #2: a bundle the config installs provides the classes it claims (repo_source config)."""
    swwan = "https://github.com/aining2022/ComfyUI_Swwan.git"
    config = write_config(tmp_path, nodes=[{"url": swwan}])
    found = checked_repos([PACKS / "kjnodes_hunyuan_i2v.json"], config, capsys)
    nodes = {n["class_type"]: n for n in found["kjnodes_hunyuan_i2v.json"]}
    assert (nodes["ImageResizeKJ"]["repo"], nodes["ImageResizeKJ"]["repo_source"]) == (swwan, "config")
    assert nodes["ImageResizeKJ"]["status"] == "provided"
    assert (nodes["LeapfusionHunyuanI2VPatcher"]["repo"], nodes["LeapfusionHunyuanI2VPatcher"]["status"]) == (
        KJ,
        "missing",
    )


def test_an_api_format_workflow_names_its_packs_from_the_node_map(tmp_path, capsys):
    """issue 22 #1: an API-format custom class was 'unknown'; the map names its pack."""
    api = PACKS / "vhs_api.json"
    code, out, err = run([api, "--config", write_config(tmp_path), "--suggest"], capsys)
    assert code == 1
    assert f"custom node class from {VHS}, which {tmp_path / 'config.yml'} does not install" in err
    assert [n.url for n in load_config_text(out, "suggestion").nodes] == [VHS]
    assert "node class VHS_VideoCombine from https://github.com/Kosinkadink/ComfyUI-VideoHelperSuite (node-map)" in err


def ui_workflow(*types: str) -> dict:
    nodes = [{"id": i + 1, "type": t, "mode": 0, "properties": {}, "widgets_values": []} for i, t in enumerate(types)]
    return {"last_node_id": len(nodes), "nodes": nodes, "links": []}


def test_frontend_only_nodes_of_packs_are_not_needed_on_the_server(tmp_path, capsys):
    """issue 22 #3: KJNodes' SetNode/GetNode and rgthree's UI nodes never reach /prompt: they were
    'unknown' problems; now frontend_only, named with the pack that draws them, and no problem."""
    path = tmp_path / "ui.json"
    types = ["SetNode", "GetNode", "Fast Groups Bypasser (rgthree)", "Label (rgthree)", "Note", "EmptyImage"]
    path.write_text(json.dumps(ui_workflow(*types)))
    code, out, _ = run([path, "--config", write_config(tmp_path), "--json"], capsys)
    report = json.loads(out)
    assert (code, report["problems"]) == (0, [])
    nodes = {n["class_type"]: n for n in report["workflows"][0]["nodes"]}
    assert nodes["SetNode"]["status"] == "frontend_only"
    assert (nodes["GetNode"]["repo"], nodes["GetNode"]["repo_source"]) == (KJ, "frontend-only")
    assert nodes["Fast Groups Bypasser (rgthree)"]["repo"] == "https://github.com/rgthree/rgthree-comfy"
    assert "never sent to the server" in nodes["Label (rgthree)"]["detail"]
    assert "Note" not in nodes and nodes["EmptyImage"]["status"] == "core"


def test_impact_pack_components_are_the_impact_packs(tmp_path, capsys):
    """issue 22 #4: a component ('## sd15-basic-pipe [7f3a1c]') was an unknown class; it needs the Impact Pack."""
    wf = PACKS / "impact_regions.json"
    code, out, _ = run([wf, "--config", write_config(tmp_path), "--json", "--offline"], capsys)
    nodes = {n["class_type"]: n for n in json.loads(out)["workflows"][0]["nodes"]}
    component = nodes["## sd15-basic-pipe [7f3a1c]"]
    assert (component["status"], component["repo"], component["repo_source"]) == ("missing", IMPACT, "component")
    assert component["detail"].startswith("an Impact Pack component (defined outside the workflow) from")
    config = write_config(tmp_path, nodes=[{"url": IMPACT + ".git"}], name="impact.yml")
    code, out, _ = run([wf, "--config", config, "--json", "--offline"], capsys)
    nodes = {n["class_type"]: n for n in json.loads(out)["workflows"][0]["nodes"]}
    assert nodes["## sd15-basic-pipe [7f3a1c]"]["status"] == "provided"


def test_the_live_comfyuis_folder_decides_before_the_node_map(comfyui, tmp_path, capsys, monkeypatch):
    """issue 22 #2: --comfy-host names the custom_nodes folder a class was loaded from; that pack wins
    over the map's most starred candidate."""
    bundle, own = "https://github.com/famous/bundle", "https://github.com/someone/comfy_worker_test_nodes"
    node_map = {bundle: [["WorkerTestSteps"], {"title_aux": "bundle"}], own: [["WorkerTestSteps"], {"title_aux": "x"}]}
    stats = {bundle: {"stars": 9000, "author_account_age_days": 4000}, own: {"stars": 1}}
    server = NodeDataServer(
        files={
            "/extension-node-map.json": json.dumps(node_map).encode(),
            "/github-stats.json": json.dumps(stats).encode(),
        },
        registry={},
    )
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        path = tmp_path / "api.json"
        path.write_text(json.dumps({"1": {"class_type": "WorkerTestSteps", "inputs": {}}}))
        config = write_config(tmp_path)
        code, out, _ = run([path, "--config", config, "--json"], capsys)
        assert json.loads(out)["workflows"][0]["nodes"][0]["repo"] == bundle
        code, out, _ = run([path, "--config", config, "--json", "--comfy-host", comfyui.host], capsys)
        node = json.loads(out)["workflows"][0]["nodes"][0]
        assert (node["repo"], node["repo_source"], node["status"]) == (own, "comfy-host", "not_in_config")
    finally:
        server.close()


def test_suggest_writes_one_node_entry_per_pack_that_install_nodes_accepts(tmp_path):
    """issue 22 #7: --suggest was empty for workflows of custom nodes; now one nodes: entry per
    pack (a commit the workflow saved becomes its version), unresolved classes named in comments."""
    wf = json.loads((PACKS / "kjnodes_hunyuan_i2v.json").read_text())
    wf["nodes"] += ui_workflow("NoPackHasThisClass")["nodes"]
    wf["nodes"][-1]["id"] = 999
    commit = "5dcda71011870278c35d92ff77a677ed2e538f2d"
    vhs = next(n for n in wf["nodes"] if n["type"] == "VHS_VideoCombine")
    vhs["properties"].update({"aux_id": "Kosinkadink/ComfyUI-VideoHelperSuite", "ver": commit})
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    result = run_cli(path, "--config", write_config(tmp_path), "--suggest")
    assert result.returncode == 1, result.stderr
    suggestion = tmp_path / "extra.yml"
    suggestion.write_text(result.stdout)
    assert yaml.safe_load(result.stdout)["nodes"] == [
        {"url": KJ},
        {"url": VHS, "version": commit},
    ]
    assert (
        "# provides GetLatentRangeFromBatch, ImageNoiseAugmentation, ImageResizeKJ, LeapfusionHunyuanI2VPatcher "
        "(from node-map)" in result.stdout  # its PathchSageAttentionKJ is bypassed
    )
    assert "# not suggested: NoPackHasThisClass: no node pack known" in result.stdout
    check = subprocess.run(
        [sys.executable, str(ROOT / "install_nodes.py"), "--validate-only", "--config", str(suggestion)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr


# --- models of custom loaders (issue 22 #5) ---------------------------------------------------------
# The folder each model file of the pack workflows is read from (by the loaders' sources).
PACK_MODEL_FOLDERS = {
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": "clip_vision",
    "SDXL/rundiffusionXL_beta.safetensors": "checkpoints",
    "SDXL/sd_xl_refiner_1.0_0.9vae.safetensors": "checkpoints",
    "SD1.5/epicrealism_naturalSinRC1VAE.safetensors": "checkpoints",  # inside an Impact Pack component
    "bbox/face_yolov8m.pt": "ultralytics",
    "clip_l.safetensors": "text_encoders",
    "hyvid\\hunyuan_video_vae_bf16.safetensors": "vae",
    "hyvid\\musubi-tuner\\img2vid544p.safetensors": "loras",
    "hyvideo\\hunyuan_video_720_fp8_e4m3fn.safetensors": "diffusion_models",
    "ip-adapter-plus_sd15.safetensors": "ipadapter",
    "llava_llama3_fp16.safetensors": "text_encoders",
    "sam_vit_b_01ec64.pth": "sams",
    "sd15/realisticVisionV51_v51VAE.safetensors": "checkpoints",
    "anima-lllite-any-test-like-v2.safetensors": "model_patches",
    "anima-base-v1.0.safetensors": "diffusion_models",
}


def test_model_files_of_real_workflows_get_their_folder_and_the_model_lists_url(tmp_path, capsys):
    """issue 22 #5: custom loaders' files were not listed without a live ComfyUI; now >= 90% get the
    right folder, and every file model-list.json has gets its URL from there."""
    listed = {e["filename"]: e["url"] for e in json.loads((PACKS / "model-list.json").read_text())["models"]}
    paths = [PACKS / name for name in PACK_WORKFLOWS]
    code, out, _ = run([*paths, "--config", write_config(tmp_path), "--json", "--include-bypassed"], capsys)
    models = [m for w in json.loads(out)["workflows"] for m in w["models"] if m["name"] in PACK_MODEL_FOLDERS]
    assert {m["name"] for m in models} == set(PACK_MODEL_FOLDERS)
    right = [m for m in models if m["folder"] == PACK_MODEL_FOLDERS[m["name"]]]
    assert len(right) / len(models) >= 0.9, [m for m in models if m not in right]
    for m in models:
        base = m["name"].replace("\\", "/").rsplit("/", 1)[-1]
        if base in listed:
            assert (m["url_source"], m["url"]) == ("model-list", listed[base]), m
    ipadapter = next(m for m in models if m["name"] == "ip-adapter-plus_sd15.safetensors")
    assert (ipadapter["class_type"], ipadapter["input"], ipadapter["folder_source"]) == (
        "IPAdapterModelLoader",
        "ipadapter_file",
        "model-list",
    )


def test_suggest_places_a_custom_loaders_file_by_the_model_lists_save_path(tmp_path, capsys):
    """issue 22 #5: UltralyticsDetectorProvider's 'bbox/face_yolov8m.pt' -> models/ultralytics/bbox
    with model-list.json's URL; the entry validates and the config then provides it."""
    wf = PACKS / "impact_face_detailer_sdxl.json"
    code, out, _ = run([wf, "--config", write_config(tmp_path), "--suggest"], capsys)
    entries = {(m.url, m.destination) for m in load_config_text(out, "suggestion").models}
    assert ("https://huggingface.co/Bingsu/adetailer/resolve/main/face_yolov8m.pt", "ultralytics/bbox") in entries
    assert ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth", "sams") in entries
    config = write_config(
        tmp_path,
        [
            {
                "url": "https://huggingface.co/Bingsu/adetailer/resolve/main/face_yolov8m.pt",
                "destination": "ultralytics/bbox",
            }
        ],
        name="u.yml",
    )
    code, out, _ = run([wf, "--config", config, "--json"], capsys)
    face = next(m for w in json.loads(out)["workflows"] for m in w["models"] if m["name"] == "bbox/face_yolov8m.pt")
    assert face["status"] == "provided"


def test_a_custom_loader_the_model_list_lacks_is_placed_by_the_packs_loader_table(tmp_path, capsys):
    """issue 22 #5: the AnimateDiff motion model was not listed; offline and without a cache the
    popular packs' loader table still names its folder; an unknown input's file is no problem."""
    api = {
        "1": {"class_type": "ADE_LoadAnimateDiffModel", "inputs": {"model_name": "my_motion_model.ckpt"}},
        "2": {"class_type": "SomeCustomNode", "inputs": {"weights": "private_weights.safetensors", "n": 3}},
    }
    path = tmp_path / "api.json"
    path.write_text(json.dumps(api))
    code, out, _ = run([path, "--config", write_config(tmp_path), "--json", "--offline"], capsys)
    models = {m["name"]: m for m in json.loads(out)["workflows"][0]["models"]}
    motion = models["my_motion_model.ckpt"]
    assert (motion["folder"], motion["folder_source"], motion["status"]) == (
        "animatediff_models",
        "pack-loader",
        "missing",
    )
    weights = models["private_weights.safetensors"]
    assert (weights["input"], weights["folder"], weights["status"]) == ("weights", None, "folder_unknown")
    assert not any("private_weights" in p for p in json.loads(out)["problems"])


def test_old_style_group_nodes_are_expanded_like_subgraphs(tmp_path, capsys):
    """issue 22 #4: a 'workflow>Name' node (extra.groupNodes) was an unknown class; its nodes count."""
    wf = ui_workflow("workflow>Face fix", "EmptyImage")
    wf["extra"] = {
        "groupNodes": {
            "Face fix": {
                "nodes": [
                    {"type": "SAMLoader", "index": 0, "widgets_values": ["sam_vit_b_01ec64.pth", "AUTO"]},
                    {"type": "FaceDetailer", "index": 1, "widgets_values": []},
                ],
                "links": [],
                "external": [],
            }
        }
    }
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(wf))
    code, out, _ = run([path, "--config", write_config(tmp_path), "--json"], capsys)
    report = json.loads(out)["workflows"][0]
    nodes = {n["class_type"]: n for n in report["nodes"]}
    assert "workflow>Face fix" not in nodes
    assert (nodes["FaceDetailer"]["node_id"], nodes["FaceDetailer"]["repo"]) == ("1:1", IMPACT)
    sam = next(m for m in report["models"] if m["class_type"] == "SAMLoader")
    assert (sam["name"], sam["folder"], sam["status"]) == ("sam_vit_b_01ec64.pth", "sams", "missing")


# --- workflows newer than the configured ComfyUI (issue 22 #8) -------------------------------------
def template(name: str) -> dict:
    return json.loads(next(p for p in TEMPLATES if p.name == name).read_text())


def saved_with(ui: dict, ver: str, new_class: str | None = None) -> dict:
    """``ui`` as a newer ComfyUI saves it: every comfy-core node's ``ver`` set, and (``new_class``) one
    more core node of a class ComfyUI v0.3.75 does not have."""
    ui = json.loads(json.dumps(ui))
    for node in ui["nodes"]:
        if (node.get("properties") or {}).get("cnr_id") == "comfy-core":
            node["properties"]["ver"] = ver
    if new_class:
        props = {"cnr_id": "comfy-core", "ver": ver, "Node name for S&R": new_class}
        ui["nodes"].append({"id": 999, "type": new_class, "mode": 0, "properties": props, "widgets_values": []})
    return ui


def default_config(tmp_path: Path, **comfyui) -> Path:
    """A config that provides default.json's one checkpoint (its embedded URL)."""
    (url, directory, name) = next(iter(embedded_models(template("default.json"))))
    path = write_config(tmp_path, [{"url": url, "destination": directory, "filename": name}])
    if comfyui:
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "comfyui": comfyui}))
    return path


def test_the_comfyui_version_a_workflow_was_saved_with_is_named(tmp_path, capsys):
    """ComfyUI's default template was saved with 0.3.65 (its comfy-core nodes' ver): named in the text
    report and --json; older than the configured v0.3.75, so nothing about ComfyUI is suggested."""
    path = next(p for p in TEMPLATES if p.name == "default.json")
    config = default_config(tmp_path)
    code, out, _ = run([path, "--config", config], capsys)
    assert code == 0, out
    assert "  saved with ComfyUI 0.3.65; comfyui.ref is v0.3.75" in out.splitlines()
    code, out, _ = run([path, "--config", config, "--json", "--suggest"], capsys)
    report = json.loads(out)
    assert report["workflows"][0]["comfyui_version"] == "0.3.65"
    assert report["comfyui"] == {"ref": "v0.3.75", "saved_with": "0.3.65"}
    assert report["suggestion"]["comfyui"] is None and "comfyui:" not in report["suggestion_yaml"]


def test_core_classes_newer_than_the_configured_comfyui_suggest_the_version_it_was_saved_with(tmp_path, capsys):
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(saved_with(template("default.json"), "0.3.81", "TextEncodeZImageOmni")))
    code, out, err = run([path, "--config", default_config(tmp_path), "--suggest"], capsys)
    assert code == 1
    assert (
        "  saved with ComfyUI 0.3.81, newer than v0.3.75 (comfyui.ref): --suggest proposes a newer comfyui.ref"
        in err.splitlines()
    )
    assert "node 999 (TextEncodeZImageOmni): a core class of ComfyUI 0.3.81 that ComfyUI v0.3.75" in err
    suggested = load_config_text(out, "suggestion")  # what the config loader accepts
    assert suggested.comfyui.ref == "v0.3.81" and not suggested.models and not suggested.nodes
    comfyui_part = out.split("comfyui:\n", 1)[1].split("# Add these entries", 1)[0]
    assert comfyui_part == (
        "  # core class(es) that ComfyUI v0.3.75 (comfyui.ref) does not have: TextEncodeZImageOmni\n"
        "  # the workflow was saved with ComfyUI 0.3.81, newer than v0.3.75\n"
        "  # v0.3.81 or any newer release; 'latest' takes the newest at provisioning\n"
        "  ref: v0.3.81\n"
    )
    code, out, _ = run([path, "--config", default_config(tmp_path), "--json"], capsys)
    assert json.loads(out)["suggestion"]["comfyui"] == {"ref": "v0.3.81"}


def test_a_saved_version_newer_than_an_older_configured_ref_is_suggested_without_failing(tmp_path, capsys):
    path = next(p for p in TEMPLATES if p.name == "default.json")
    config = default_config(tmp_path, ref="v0.3.60")
    code, out, err = run([path, "--config", config, "--suggest"], capsys)
    assert code == 0, err  # every class and model is there: a hint, not a problem
    assert "saved with ComfyUI 0.3.65, newer than v0.3.60 (comfyui.ref)" in err
    assert load_config_text(out, "suggestion").comfyui.ref == "v0.3.65"
    assert "  # the workflow was saved with ComfyUI 0.3.65, newer than v0.3.60\n" in out


def test_newer_core_classes_without_a_saved_version_suggest_latest(tmp_path, capsys):
    """An API-format workflow names no version: comfyui.ref latest (the newest release) is proposed."""
    ui = saved_with(template("default.json"), "0.3.81", "TextEncodeZImageOmni")
    ui["nodes"] = [{**n, "properties": {k: v for k, v in n["properties"].items() if k != "ver"}} for n in ui["nodes"]]
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(ui))
    code, out, err = run([path, "--config", default_config(tmp_path), "--suggest"], capsys)
    assert code == 1 and "saved with ComfyUI" not in err
    assert load_config_text(out, "suggestion").comfyui.ref == "latest"
    assert "# the workflow names no newer release: 'latest' takes the newest at provisioning" in out


# --- looked up only when needed; an unreachable network said once -----------------------------------
def test_a_core_workflow_whose_models_the_config_provides_asks_no_node_data(tmp_path, capsys, node_data):
    node_data.requests.clear()
    ui = next(p for p in TEMPLATES if p.name == "default.json")
    sdxl = [{"url": f"{HF}/sd_xl_turbo_1.0_fp16.safetensors", "destination": "checkpoints"}]
    assert run([ui, "--config", default_config(tmp_path)], capsys)[0] == 0  # UI format, the URL embedded
    assert (
        run([DATA / "workflow_sdxl_turbo.json", "--config", write_config(tmp_path, sdxl, name="s.yml")], capsys)[0] == 0
    )
    assert node_data.requests == []
    # a model the config lacks and the workflow does not embed: now the model list is asked for its URL
    code, out, _ = run([DATA / "workflow_sdxl_turbo.json", "--config", write_config(tmp_path), "--json"], capsys)
    assert code == 1 and "/model-list.json" in [p for p, _ in node_data.requests]


def test_no_network_and_no_cache_is_said_once_with_the_way_out(tmp_path, capsys, node_data):
    node_data.down = True
    path = tmp_path / "api.json"
    api = {"1": {"class_type": "WorkerFilmGrain", "inputs": {"strength": 0.1}}}
    api["2"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_turbo_1.0_fp16.safetensors"}}
    path.write_text(json.dumps(api))
    code, out, _ = run([path, "--config", write_config(tmp_path)], capsys)
    assert code == 1
    notes = [line for line in out.splitlines() if line.startswith("not looked up:")]
    assert len(notes) == 1, out
    assert (
        f"could not reach the node map (extension-node-map.json) at {node_data.url}/extension-node-map.json" in notes[0]
    )
    assert f"the model list (model-list.json) at {node_data.url}/model-list.json (HTTP 503)" in notes[0]
    assert "run once with network access, after which --offline uses the cache" in notes[0]
