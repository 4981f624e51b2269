"""comfy_worker.model_folders and comfy_worker.core_nodes against the real ComfyUI (CPU): the loader
table, the folder aliases and the core class list are what the live /object_info says, and the
sentence for a model file ComfyUI rejects names the folder its loader reads and where the file is."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from comfy_worker import model_folders
from comfy_worker.core_nodes import CORE_NODE_CLASSES

PROBE = "cw-probe-"


@contextlib.contextmanager
def probe_files(models: Path):
    """One probe file in every directory under models/ (and in every directory the table names), removed
    afterwards. Directories created for it are kept: ComfyUI's file-list cache checks the mtime of every
    directory it listed, and a removed one would break its next listing."""
    dirs = {p.name for p in models.iterdir() if p.is_dir()}
    dirs |= {d for ds in model_folders.FOLDER_DIRS.values() for d in ds}
    made = []
    try:
        for d in sorted(dirs):
            (models / d).mkdir(exist_ok=True)
            for ext in (".safetensors", ".yaml", ""):  # configs lists only .yaml, classifiers no extension
                path = models / d / f"{PROBE}{d}{ext}"
                path.write_bytes(b"0")
                made.append(path)
        yield sorted(dirs)
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def _probe_dir(name: str) -> str:
    return name[len(PROBE) :].rsplit(".", 1)[0]


def _options(spec) -> list:
    if isinstance(spec, list) and spec and isinstance(spec[0], list):
        return spec[0]
    if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1].get("options") or []
    return []


def test_the_loader_table_and_the_folders_match_the_live_comfyui(comfyui):
    models = comfyui.path / "models"
    with probe_files(models):
        object_info = comfyui.get_json("/object_info")
        live_folders = [f for f in comfyui.get_json("/models") if f != "custom_nodes"]
        folder_dirs = {}
        for folder in live_folders:
            files = comfyui.get_json(f"/models/{folder}")
            folder_dirs[folder] = {_probe_dir(f) for f in files if f.startswith(PROBE)}
    # which directories each core node input lists, as ComfyUI itself says
    live: dict[tuple[str, str], set[str]] = {}
    for class_type, info in object_info.items():
        if info["python_module"].startswith("custom_nodes"):
            continue
        for section in ("required", "optional"):
            for name, spec in (info["input"].get(section) or {}).items():
                hits = {_probe_dir(o) for o in _options(spec) if str(o).startswith(PROBE)}
                if hits:
                    live[(class_type, name)] = hits
    table = {
        (class_type, name): set(model_folders.dirs_read(folder))
        for class_type, loader in model_folders.LOADERS.items()
        for name, folder in loader.files.items()
    }
    assert table == live
    # every folder ComfyUI has, with the directories (aliases) it reads; "diffusers" lists model folders,
    # never files, so no probe file shows there
    assert folder_dirs.pop("diffusers") == set()
    assert {f: set(d) for f, d in model_folders.FOLDER_DIRS.items() if f != "diffusers"} == folder_dirs
    # the UI format's widget order of each loader
    for class_type, loader in model_folders.LOADERS.items():
        assert tuple(model_folders.widget_names(object_info[class_type])) == loader.widgets, class_type


def test_the_core_class_list_is_the_live_comfyuis(comfyui):
    object_info = comfyui.get_json("/object_info")
    live = {c for c, info in object_info.items() if not info["python_module"].startswith("custom_nodes")}
    assert not live - CORE_NODE_CLASSES, f"add to comfy_worker/core_nodes.py: {sorted(live - CORE_NODE_CLASSES)}"
    assert not CORE_NODE_CLASSES - live, f"remove from comfy_worker/core_nodes.py: {sorted(CORE_NODE_CLASSES - live)}"
    assert "WorkerTestSleep" in object_info  # the custom test nodes are there and were left out


@pytest.mark.parametrize(
    ("folder", "dirs"),
    [("unet", ("unet", "diffusion_models")), ("clip", ("text_encoders", "clip")), ("loras/wan", ("loras",))],
)
def test_aliases_and_nested_destinations(folder, dirs):
    assert model_folders.dirs_read(folder) == dirs
    assert model_folders.same_folder("unet", "diffusion_models") and not model_folders.same_folder("vae", "clip")


def _reject(comfyui, workflow: dict) -> dict:
    """POST /prompt to the real ComfyUI and return its node_errors (the prompt must be rejected)."""
    body = json.dumps({"prompt": workflow, "client_id": uuid.uuid4().hex}).encode()
    request = urllib.request.Request(f"{comfyui.url}/prompt", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    return json.loads(caught.value.read())["node_errors"]


def _sentences(comfyui, workflow: dict) -> list[str]:
    """describe_missing_model for each 'value not in list' error ComfyUI reports for ``workflow``."""
    out = []
    for entry in _reject(comfyui, workflow).values():
        for err in entry["errors"]:
            assert err["type"] == "value_not_in_list"
            info = err["extra_info"]
            out.append(
                model_folders.describe_missing_model(
                    entry["class_type"], info["input_name"], info["received_value"], comfyui.path
                )
            )
    return out


def _saved(loader: dict) -> dict:
    return {"1": loader, "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


def test_a_rejected_checkpoint_names_its_folder_and_where_the_file_really_is(comfyui):
    stray = comfyui.path / "models" / "diffusion_models" / "cw_misplaced_ckpt.safetensors"
    stray.write_bytes(b"0")
    try:
        wf = _saved({"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": stray.name}})
        (sentence,) = _sentences(comfyui, wf)
    finally:
        stray.unlink()
    assert sentence == (
        "CheckpointLoaderSimple reads models/checkpoints; a file of that name is in "
        "models/diffusion_models/cw_misplaced_ckpt.safetensors: move it, or set `destination: checkpoints` "
        "for it in config.yml"
    )


def test_a_rejected_text_encoder_names_both_directories_and_that_no_file_exists(comfyui):
    wf = _saved(
        {"class_type": "CLIPLoader", "inputs": {"clip_name": "cw_absent.safetensors", "type": "stable_diffusion"}}
    )
    (sentence,) = _sentences(comfyui, wf)
    assert sentence == (
        "CLIPLoader reads models/text_encoders (or models/clip); no file named 'cw_absent.safetensors' is under models/"
    )


def test_a_file_in_the_alias_directory_is_not_called_misplaced(comfyui, tmp_path):
    # models/clip is read by text-encoder loaders: a file there is in place
    (tmp_path / "models" / "clip").mkdir(parents=True)
    (tmp_path / "models" / "clip" / "t5.safetensors").write_bytes(b"0")
    sentence = model_folders.describe_missing_model("DualCLIPLoader", "clip_name1", "t5.safetensors", tmp_path)
    assert "move it" not in sentence and "models/clip/t5.safetensors exists" in sentence


def test_unknown_inputs_and_values_give_nothing_unless_the_file_exists(tmp_path):
    assert model_folders.describe_missing_model("KSampler", "sampler_name", "eulerx", tmp_path) is None
    assert model_folders.describe_missing_model("CheckpointLoaderSimple", "ckpt_name", 3, tmp_path) is None
    (tmp_path / "models" / "loras").mkdir(parents=True)
    (tmp_path / "models" / "loras" / "style.safetensors").write_bytes(b"0")
    assert (
        model_folders.describe_missing_model("SomeCustomLoader", "lora", "style.safetensors", tmp_path)
        == "a file of that name is in models/loras/style.safetensors"
    )


def test_a_windows_style_value_names_the_slash_form_also_when_the_file_is_absent(tmp_path):
    """issue 20 #10: a '\\' value ComfyUI does not offer in either form: the '/' form to write, then
    what is missing."""
    (tmp_path / "models" / "loras").mkdir(parents=True)
    assert model_folders.describe_missing_model("LoraLoader", "lora_name", "wan\\x.safetensors", tmp_path, []) == (
        "model paths use '/', not '\\' (a workflow saved on Windows): write 'wan/x.safetensors' instead of "
        "'wan\\\\x.safetensors'; LoraLoader reads models/loras; no file named 'x.safetensors' is under models/"
    )


def test_built_in_choices_of_a_loader_are_no_files():
    assert not model_folders.is_model_file("vae", "pixel_space") and not model_folders.is_model_file("loras", "[None]")
    assert model_folders.is_model_file("vae", "ae.SafeTensors") and model_folders.is_model_file("configs", "v1.yaml")
    assert not model_folders.is_model_file("configs", "v1.safetensors")
