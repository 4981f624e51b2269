"""model_sources: which resolver takes a URL, what it returns, and which host gets which token."""

from __future__ import annotations

import pytest
from support.origins import FaultyOrigin, fake_civitai, fake_huggingface, random_file

from comfy_worker.http_download import Downloader, DownloadError, MiB
from comfy_worker.model_sources import CIVITAI, HTTP, HUGGINGFACE, HfFile, ModelSource, Sources, TokenPolicy
from comfy_worker.settings import Settings


def settings(**env) -> Settings:
    base = {"HF_ENDPOINT": "http://127.0.0.1:9", "CIVITAI_BASE_URL": "http://127.0.0.1:10"}
    return Settings.from_env({**base, **env})


def test_resolvers_are_tried_in_order_with_plain_http_last():
    s = Sources(settings(), Downloader())
    assert s.kind_of("https://huggingface.co/org/repo/resolve/main/a.safetensors") == HUGGINGFACE
    assert s.kind_of("https://hf.co/datasets/org/d/blob/v1/x/y.bin") == HUGGINGFACE
    assert s.kind_of("https://huggingface.co/org/repo") == HTTP  # not a file URL
    assert s.kind_of("https://civitai.com/models/5?modelVersionId=9") == CIVITAI
    assert s.kind_of("http://127.0.0.1:10/api/download/models/9") == CIVITAI  # CIVITAI_BASE_URL
    assert s.kind_of("https://example.org/m.safetensors") == HTTP
    assert s.offline_name("https://huggingface.co/org/repo/resolve/main/unet/a%20b.safetensors") == "a b.safetensors"
    assert s.offline_name("https://example.org/m.safetensors") is None  # the server may name it


def test_tokens_go_only_to_their_own_hosts():
    t = TokenPolicy(settings(HF_TOKEN="hf_tok", CIVITAI_TOKEN="civ_tok"))
    assert t.headers_for("https://huggingface.co/x") == {"Authorization": "Bearer hf_tok"}
    assert t.headers_for("http://127.0.0.1:9/org/repo/resolve/main/a") == {"Authorization": "Bearer hf_tok"}
    assert t.headers_for("https://civitai.com/api/download/models/1") == {"Authorization": "Bearer civ_tok"}
    assert t.headers_for("https://cdn-lfs.hf.co/repos/x?sig=1") == {}
    assert t.headers_for("http://127.0.0.1:11/x") == {}  # same host, another port


def test_hugging_face_resolves_to_a_typed_record_pinned_to_the_commit(tmp_path):
    path = tmp_path / "m.safetensors"
    sha = random_file(path, MiB, seed=2)
    with FaultyOrigin() as hub, FaultyOrigin() as cdn:
        commit = fake_huggingface(hub, cdn, "org/repo", {"unet/m.safetensors": path})
        s = Sources(settings(HF_ENDPOINT=hub.url), Downloader(backoff=0.01))
        src = s.resolve("https://huggingface.co/org/repo/resolve/main/unet/m.safetensors")
    assert src == ModelSource(
        kind=HUGGINGFACE,
        url=f"{hub.url}/org/repo/resolve/{commit}/unet/m.safetensors",
        name="m.safetensors",
        size=MiB,
        sha256=sha,
        hf=HfFile("org/repo", "model", commit, "unet/m.safetensors"),
    )
    with pytest.raises(AttributeError):
        src.url = "x"  # frozen


def test_civitai_model_page_resolves_to_the_newest_versions_primary_file(tmp_path):
    path = tmp_path / "m.safetensors"
    sha = random_file(path, 1000, seed=3)
    with FaultyOrigin() as api, FaultyOrigin() as cdn:
        fake_civitai(api, cdn, 77, [(1002, "new.safetensors", path), (1001, "old.safetensors", path)])
        s = Sources(settings(CIVITAI_BASE_URL=api.url), Downloader(backoff=0.01))
        src = s.resolve("https://civitai.com/models/77/some-name")
        pinned = s.resolve("https://civitai.com/models/77?modelVersionId=1001")
    assert (src.kind, src.url, src.name, src.sha256, src.civitai_version) == (
        CIVITAI,
        f"{api.url}/api/download/models/1002",
        "new.safetensors",
        sha,
        "1002",
    )
    assert pinned == ModelSource(CIVITAI, f"{api.url}/api/download/models/1001", civitai_version="1001")
    assert Sources(settings(), Downloader()).resolve("https://example.org/a.bin") == ModelSource(
        HTTP, "https://example.org/a.bin"
    )


def test_a_hugging_face_failure_names_the_file_once_in_retries_and_in_the_error(caplog):
    # nothing listens at HF_ENDPOINT: every attempt is a connection error, retried, then given up
    s = Sources(settings(), Downloader(backoff=0.01, retries=3))
    with pytest.raises(DownloadError) as err:
        s.resolve("https://huggingface.co/org/repo/resolve/main/unet/m.safetensors")
    label = "Hugging Face org/repo/unet/m.safetensors@main"
    message = str(err.value)
    assert message.startswith(f"{label}: gave up after 3 attempts: ") and message.count(label) == 1, message
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and all(m.startswith(f"{label}: ") and m.count(label) == 1 for m in retries), retries
