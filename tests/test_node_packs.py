"""comfy_worker/node_packs.py: ComfyUI-Manager's node map, stats and model list and the Comfy Registry,
fetched from a loopback server (the project's own small files in the real formats, tests/data/packs),
cached, revalidated, and the pack chosen when several claim a class."""

from __future__ import annotations

import json

import pytest
from support.node_data import PACKS, NodeDataServer

from comfy_worker import node_packs
from comfy_worker.node_packs import DataCache, NodePacks

KJ = "https://github.com/kijai/ComfyUI-KJNodes"
SWWAN = "https://github.com/aining2022/ComfyUI_Swwan"
VHS = "https://github.com/Kosinkadink/ComfyUI-VideoHelperSuite"
S3IO = "https://github.com/olduvai-jp/ComfyUI-S3-IO"
RGTHREE = "https://github.com/rgthree/rgthree-comfy"
CN_AUX = "https://github.com/Fannovel16/comfyui_controlnet_aux"
GGUF = "https://github.com/city96/ComfyUI-GGUF"


@pytest.fixture
def server():
    srv = NodeDataServer()
    yield srv
    srv.close()


def sample_packs(stats: bool = True) -> NodePacks:
    load = lambda name: json.loads((PACKS / name).read_text())  # noqa: E731
    return NodePacks(
        load("extension-node-map.json"), load("github-stats.json") if stats else {}, load("model-list.json")
    )


def urls(server: NodeDataServer) -> dict[str, str]:
    env = server.env()
    return {
        "node_map": env["COMFY_NODE_MAP_URL"],
        "stats": env["COMFY_NODE_STATS_URL"],
        "model_list": env["COMFY_MODEL_LIST_URL"],
        "registry": env["COMFY_REGISTRY_URL"],
    }


# --- fetching and caching ----------------------------------------------------------------------
def test_a_fresh_cache_answers_without_asking_and_an_old_one_is_revalidated_with_its_etag(server, tmp_path):
    """issue 22 #1: cached under the cache dir, fresh for the TTL, then a conditional GET (304)."""
    path = "/extension-node-map.json"
    first = DataCache(tmp_path, ttl=3600).get(server.url + path, "the node map")
    assert first[KJ][1]["title_aux"] == "ComfyUI-KJNodes"
    assert server.codes(path) == ["200"]
    assert DataCache(tmp_path, ttl=3600).get(server.url + path, "the node map") == first
    assert server.codes(path) == ["200"]  # fresh: not asked again
    stale = DataCache(tmp_path, ttl=0)
    assert stale.get(server.url + path, "the node map") == first
    assert server.codes(path) == ["200", "304"]
    assert stale.sources["the node map"] == "cache (revalidated)"
    assert not list(tmp_path.glob(".*.tmp"))  # written through temporary files, none left


def test_an_unreachable_source_falls_back_to_the_stale_cache_and_offline_never_asks(server, tmp_path):
    """issue 22 #1: network down -> the cached copy; --offline -> the cache alone, no request."""
    url = server.url + "/github-stats.json"
    assert DataCache(tmp_path).get(url, "stats")[KJ]["stars"] == 3000
    server.down = True
    cache = DataCache(tmp_path, ttl=0)
    assert cache.get(url, "stats")[KJ]["stars"] == 3000
    assert cache.sources["stats"] == "stale cache" and cache.problems == []
    before = len(server.requests)
    offline = DataCache(tmp_path, offline=True, ttl=0)
    assert offline.get(url, "stats")[KJ]["stars"] == 3000
    assert len(server.requests) == before


def test_neither_network_nor_cache_gives_no_answer_and_says_why(server, tmp_path):
    """issue 22 #1: packs cannot be looked up; the problem names the source, not a traceback."""
    server.down = True
    cache = DataCache(tmp_path / "empty")
    packs = NodePacks.load(urls(server), cache)
    assert not packs.available and packs.choose("VHS_VideoCombine", set()).repo is None
    assert any("the node map (extension-node-map.json)" in p and "HTTP 503" in p for p in cache.problems)
    offline = DataCache(tmp_path / "empty", offline=True)
    assert NodePacks.load(urls(server), offline).available is False
    assert "--offline fetches nothing" in offline.problems[0]


def test_a_damaged_cache_file_is_not_taken_for_an_answer(server, tmp_path):
    """issue 22 #1: a half-written body is refetched, never read as the map."""
    url = server.url + "/extension-node-map.json"
    DataCache(tmp_path).get(url, "the node map")
    body = next(p for p in tmp_path.iterdir() if not p.name.endswith(".meta.json"))
    body.write_text('{"https://github.com/kijai/ComfyUI-KJNodes": [[')
    assert DataCache(tmp_path, offline=True).get(url, "the node map") is None
    assert KJ in DataCache(tmp_path).get(url, "the node map")


def test_the_registry_turns_a_cnr_id_into_its_git_url(server, tmp_path):
    """issue 22 #1: GET /nodes/{id} -> repository; an unknown id is no answer, not an error."""
    cache = DataCache(tmp_path)
    packs = NodePacks.load(urls(server), cache)
    assert packs.registry_repo("comfyui-kjnodes") == KJ
    assert packs.registry_repo("no-such-pack") is None
    assert cache.problems == []


def test_the_cache_lives_under_xdg_cache_home():
    """issue 22 #1"""
    from pathlib import Path

    from comfy_worker.settings import Settings

    settings = Settings.from_env({"XDG_CACHE_HOME": "/tmp/xdg"})
    assert node_packs.cache_dir(settings.user_cache_dir) == Path("/tmp/xdg/comfy-worker/node-packs")
    assert Settings.from_env({}).node_map_url.endswith("/ComfyUI-Manager/main/extension-node-map.json")


# --- choosing among the packs that claim a class --------------------------------------------------
def test_the_original_pack_wins_over_bundles_that_copied_its_classes():
    """issue 22 #2: conflicts the real map has: VHS vs ComfyUI-S3-IO, KJNodes vs ComfyUI_Swwan."""
    packs = sample_packs()
    choice = packs.choose("VHS_VideoCombine", {"VHS_VideoCombine"})
    assert set(choice.candidates) == {VHS, S3IO} and choice.repo == VHS
    assert packs.choose("ImageResizeKJ", set()).repo == KJ
    assert packs.choose("DrawMaskOnImage", set()).repo == KJ


def test_a_nodename_pattern_claims_a_class_another_pack_copied():
    """issue 22 #2: 'Seed (rgthree)' is listed only by ComfyUI_Swwan; rgthree claims it by pattern."""
    packs = sample_packs()
    choice = packs.choose("Seed (rgthree)", set())
    assert set(choice.candidates) == {SWWAN, RGTHREE} and choice.repo == RGTHREE
    assert packs.choose("Power Lora Loader (rgthree)", set()).repo == RGTHREE


def test_preemptions_decide_before_stars():
    """issue 22 #2: a pack that preempts a class gets it, whatever the others' stars."""
    packs = sample_packs()
    assert packs.choose("DWPreprocessor", set()).repo == CN_AUX
    assert packs.choose("UnetLoaderGGUF", set()).repo == GGUF
    stats = dict(packs.stats)
    stats["https://github.com/ai-shizuka/ComfyUI-tbox"] = {"stars": 10**6, "author_account_age_days": 10**5}
    packs.stats = stats
    assert packs.choose("DWPreprocessor", set()).repo == CN_AUX


def test_without_stats_the_pack_covering_most_of_the_workflow_wins():
    """issue 22 #2: the last tie-break: how many of the workflow's classes a candidate has."""
    packs = sample_packs(stats=False)
    kj_workflow = {"GetLatentRangeFromBatch", "ImageNoiseAugmentation", "LeapfusionHunyuanI2VPatcher"}
    assert packs.choose("GetLatentRangeFromBatch", kj_workflow).repo == KJ
    swwan_workflow = {"GetLatentRangeFromBatch", "Seed (rgthree)", "ImageResizeKJ"}
    assert packs.choose("GetLatentRangeFromBatch", swwan_workflow).repo == SWWAN


def test_the_configs_own_node_wins_over_the_map():
    """issue 22 #2: a candidate the config installs is taken before the map's choice."""
    packs = sample_packs()
    choice = packs.choose("ImageResizeKJ", set(), prefer={node_packs.repo_key(SWWAN + ".git")})
    assert (choice.repo, choice.why) == (SWWAN, "config")


def test_core_classes_and_model_list_entries():
    """issue 22 #1: the map's ComfyUI entry is core; model-list.json answers by file name."""
    packs = sample_packs()
    assert packs.is_core("KSampler") and not packs.is_core("VHS_VideoCombine")
    entry = packs.model("SD1.5/sam_vit_b_01ec64.pth")
    assert entry["save_path"] == "sams" and entry["url"].endswith("sam_vit_b_01ec64.pth")


def test_repo_key_compares_spellings_of_one_repository():
    assert node_packs.repo_key("git@github.com:Kijai/ComfyUI-KJNodes.git") == node_packs.repo_key(KJ + "/")
    assert node_packs.repo_key("https://user@github.com/kijai/ComfyUI-KJNodes") == "github.com/kijai/comfyui-kjnodes"
