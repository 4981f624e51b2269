"""hf_cache: a file in a Hugging Face hub cache laid out as RunPod's is found by huggingface_hub's
own lookup, checked and symlinked atomically."""

import hashlib
from pathlib import Path

import pytest
from support.hf_hub_cache import make_hf_cache

from comfy_worker import hf_cache
from comfy_worker.model_sources import HfFile, hf_file
from comfy_worker.settings import Settings


def test_the_file_a_hugging_face_url_names():
    f = hf_file("https://huggingface.co/org/name/resolve/main/sub/x.safetensors")
    assert f == HfFile("org/name", "model", "main", "sub/x.safetensors")
    d = hf_file("https://huggingface.co/datasets/org/d/blob/v1/a%20b.bin")
    assert d.repo_type == "dataset" and d.revision == "v1" and d.path == "a b.bin"
    assert hf_file("https://example.com/org/name/tree/main/x") is None


def test_find_check_and_link(tmp_path):
    data = b"weights" * 50
    cache = tmp_path / "hub"
    make_hf_cache(cache, "org/name", "sub/x.safetensors", data)
    f = HfFile("org/name", "model", "main", "sub/x.safetensors")
    found = hf_cache.find(f, [tmp_path / "absent", cache])
    assert found is not None and found.parent.name == "blobs"
    assert hf_cache.find(HfFile("org/name", "model", "main", "other.bin"), [cache]) is None
    target = tmp_path / "models" / "unet" / "x.safetensors"
    hf_cache.link_into(found, target, hashlib.sha256(data).hexdigest())
    assert target.is_symlink() and target.read_bytes() == data and hf_cache.is_linked_from(target, [cache])
    assert not list(target.parent.glob(".*.link"))
    with pytest.raises(hf_cache.CacheMismatch, match="not linked"):
        hf_cache.link_into(found, tmp_path / "models" / "y.safetensors", "0" * 64)
    assert not (tmp_path / "models" / "y.safetensors").exists()


def test_cache_dirs_setting():
    s = Settings.from_env({"HF_HUB_CACHE": "/c/hub"})
    assert s.hf_cache_dirs == (Path("/c/hub"), Path("/runpod-volume/huggingface-cache/hub"))


def test_runpod_volume_counts_only_when_it_is_the_users(tmp_path):
    from comfy_worker.settings import is_user_volume

    only_cache = tmp_path / "rv"
    (only_cache / "huggingface-cache").mkdir(parents=True)
    assert not is_user_volume(only_cache)
    (only_cache / "ComfyUI").mkdir()
    assert is_user_volume(only_cache)
    assert not is_user_volume(tmp_path / "absent")


def test_mode_and_restart_defaults():
    assert Settings.from_env({"RUNPOD_ENDPOINT_ID": "e"}).mode == "serverless"
    assert Settings.from_env({"RUNPOD_ENDPOINT_ID": "e"}).comfy_restart is False
    assert Settings.from_env({"RUNPOD_ENDPOINT_ID": "e"}).enable_jupyter is False
    assert Settings.from_env({"RUNPOD_POD_ID": "p"}).mode == "pod"
    assert Settings.from_env({}).mode == "local" and Settings.from_env({}).comfy_restart is True
    with pytest.raises(ValueError, match="MODE must be one of"):
        Settings.from_env({"MODE": "server"})
