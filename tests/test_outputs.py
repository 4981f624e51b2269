"""outputs.py: collecting every output of a prompt, reading it (disk or /view), size guard, clean-up."""

from __future__ import annotations

import asyncio
import base64
import shutil
import uuid

import pytest

from comfy_worker import comfy_client, outputs
from comfy_worker.comfy_client import ComfyClient
from comfy_worker.job_errors import JobError

# /history outputs as ComfyUI 0.3.75 reports them (SaveImage, SaveVideo, SaveAudio, PreviewAny, PreviewImage)
HISTORY_OUTPUTS = {
    "9": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]},
    "3": {"images": [{"filename": "x_00001_.mp4", "subfolder": "vid", "type": "output"}], "animated": [True]},
    "12": {"audio": [{"filename": "a_00001_.flac", "subfolder": "audio", "type": "output"}]},
    "4": {"text": ["hello", "world"]},
    "5": {"images": [{"filename": "ComfyUI_temp_abc_00001_.png", "subfolder": "", "type": "temp"}]},
    "7": {"3d": [{"filename": "mesh.glb", "subfolder": "3d", "type": "output"}], "other": [1, 2]},
}


def test_collect_finds_every_file_under_any_key_and_the_text():
    files, texts = outputs.collect(HISTORY_OUTPUTS)
    assert [(f.node_id, f.subfolder, f.filename, f.type) for f in files] == [
        ("9", "", "ComfyUI_00001_.png", "output"),
        ("3", "vid", "x_00001_.mp4", "output"),
        ("12", "audio", "a_00001_.flac", "output"),
        ("5", "", "ComfyUI_temp_abc_00001_.png", "temp"),
        ("7", "3d", "mesh.glb", "output"),
    ]
    assert texts == [{"node_id": "4", "text": "hello"}, {"node_id": "4", "text": "world"}]


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("a.png", "image/png"),
        ("a.WEBP", "image/webp"),
        ("a.gif", "image/gif"),
        ("a.mp4", "video/mp4"),
        ("a.webm", "video/webm"),
        ("a.flac", "audio/flac"),
        ("a.glb", "model/gltf-binary"),
        ("a.latent", "application/octet-stream"),
    ],
)
def test_content_types(name, content_type):
    assert outputs.content_type_of(name) == content_type


def test_local_path_never_leaves_the_folder(tmp_path):
    ok = outputs.OutputFile("1", "a.png", "sub", "output")
    assert ok.local_path(tmp_path) == (tmp_path / "output" / "sub" / "a.png").resolve()
    assert outputs.OutputFile("1", "a.png", "../../etc", "output").local_path(tmp_path) is None
    assert outputs.OutputFile("1", "../x.png", "", "output").local_path(tmp_path) is None
    assert outputs.OutputFile("1", "a.png", "", "weird").local_path(tmp_path) is None


def test_cleanup_removes_only_the_jobs_files(tmp_path):
    for rel in (
        "output/mine.png",
        "output/vid/mine.mp4",
        "output/other.png",
        "temp/prev.png",
        "input/in-x.png",
        "input/keep.png",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    files = [
        outputs.OutputFile("1", "mine.png", "", "output"),
        outputs.OutputFile("2", "mine.mp4", "vid", "output"),
        outputs.OutputFile("3", "prev.png", "", "temp"),
        outputs.OutputFile("4", "gone.png", "", "output"),  # already missing: no error
    ]
    outputs.cleanup(files, tmp_path, ["in-x.png"])
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["input/keep.png", "output/other.png"]


def deliver(files, comfyui, comfyui_path, max_mb=18.0, host=None):
    async def go():
        try:
            client = ComfyClient(host or comfyui.host, comfyui.pid_file, comfyui.log_path)
            return await outputs.deliver(
                files, client=client, comfyui_path=comfyui_path, job_id="j", s3=None, max_response_mb=max_mb
            )
        finally:
            await comfy_client.close_shared_session()

    return asyncio.run(go())


@pytest.fixture
def saved_png(comfyui):
    """A PNG placed in the real ComfyUI's output folder (removed afterwards)."""
    sub = f"outputs-test-{uuid.uuid4().hex[:8]}"
    folder = comfyui.path / "output" / sub
    folder.mkdir(parents=True)
    data = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
    )
    (folder / "one.png").write_bytes(data)
    yield outputs.OutputFile("9", "one.png", sub, "output"), data
    shutil.rmtree(folder)


def test_deliver_reads_from_disk_and_falls_back_to_view(comfyui, saved_png, tmp_path):
    ref, data = saved_png
    from support.comfy_process import free_port

    local = deliver([ref], comfyui, comfyui.path, host=f"127.0.0.1:{free_port()}")  # no ComfyUI: from disk
    remote = deliver([ref], comfyui, tmp_path)  # not on this disk: fetched with /view
    for images, files, errors in (local, remote):
        assert images == [
            {
                "filename": "one.png",
                "type": "base64",
                "data": base64.b64encode(data).decode(),
                "node_id": "9",
                "content_type": "image/png",
            }
        ]
        assert files == [] and errors == []


def test_one_missing_file_is_a_non_fatal_error(comfyui, saved_png):
    ref, _ = saved_png
    missing = outputs.OutputFile("10", "missing.png", ref.subfolder, "output")
    images, _, errors = deliver([ref, missing], comfyui, comfyui.path)
    assert len(images) == 1 and len(errors) == 1 and "'missing.png' of node 10" in errors[0]
    with pytest.raises(JobError, match="None of the 1 output file"):
        deliver([missing], comfyui, comfyui.path)


def test_size_guard_applies_to_disk_and_view(comfyui, saved_png, tmp_path):
    ref, _ = saved_png
    for path in (comfyui.path, tmp_path):
        with pytest.raises(JobError, match="MAX_RESPONSE_MB") as info:
            deliver([ref], comfyui, path, max_mb=0.00001)
        assert "configure S3" in info.value.message


def test_temp_files_are_not_delivered(comfyui, tmp_path):
    assert deliver([outputs.OutputFile("5", "p.png", "", "temp")], comfyui, tmp_path) == ([], [], [])


def test_s3_delivery_in_parallel_with_distinct_keys_and_non_fatal_errors(tmp_path):
    from support.comfy_process import free_port
    from support.moto_s3 import moto_s3

    from comfy_worker.settings import Settings
    from s3_upload import S3Uploader

    with moto_s3("outputs-test-parallel") as store:
        uploader = S3Uploader(Settings.from_env(store.env("outputs-test-parallel")))
        for sub in ("a", "b"):
            (tmp_path / "output" / sub).mkdir(parents=True)
            (tmp_path / "output" / sub / "same.png").write_bytes(sub.encode())
        files = [
            outputs.OutputFile("1", "same.png", "a", "output"),
            outputs.OutputFile("2", "same.png", "b", "output"),
            outputs.OutputFile("3", "gone.mp4", "", "output"),  # not on disk, /view unreachable
        ]

        async def go():
            try:
                client = ComfyClient(f"127.0.0.1:{free_port()}", tmp_path / "no.pid", tmp_path / "no.log")
                return await outputs.deliver(
                    files, client=client, comfyui_path=tmp_path, job_id="job", s3=uploader, max_response_mb=0.000001
                )
            finally:
                await comfy_client.close_shared_session()

        images, delivered_files, errors = asyncio.run(go())
        keys = sorted(o["Key"] for o in uploader.client.list_objects_v2(Bucket="outputs-test-parallel")["Contents"])
        assert keys == ["job/b/same.png", "job/same.png"]  # no size limit with S3
        assert [(e["node_id"], e["type"]) for e in images] == [("1", "s3_url"), ("2", "s3_url")]
        assert delivered_files == [] and len(errors) == 1 and "'gone.mp4' of node 3" in errors[0]


def test_s3_names_are_distinct_and_never_have_an_empty_path_part():
    files = [
        outputs.OutputFile("1", "same.png", "a", "output"),
        outputs.OutputFile("2", "same.png", "", "output"),
        outputs.OutputFile("3", "same.png", "b/c", "output"),
        outputs.OutputFile("4", "other.png", "", "output"),
    ]
    names = outputs.s3_names(files)
    assert len(set(names)) == 4 and names[0] == "same.png" and names[3] == "other.png"
    assert all("//" not in n and not n.startswith("/") for n in names), names


def test_classification_of_every_kind_real_comfyui_saves(comfyui):
    """One prompt on the real ComfyUI with every save/preview node the CPU fixture can run; its outputs,
    as ComfyUI reports them, are collected, delivered and sorted by content type."""
    import io
    import random
    import wave

    from support.aio import arun

    from comfy_worker.prompt_runner import PromptRunner

    wav = f"outputs-test-{uuid.uuid4().hex[:8]}.wav"
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x10" * 800)
    (comfyui.path / "input" / wav).write_bytes(buf.getvalue())
    color = random.randrange(1 << 24)
    image = ["1", 0]
    wf = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": color}},
        "2": {"class_type": "SaveImage", "inputs": {"images": image, "filename_prefix": "kinds/png"}},
        "3": {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {
                "images": image,
                "filename_prefix": "kinds/webp",
                "fps": 4.0,
                "lossless": True,
                "quality": 80,
                "method": "fastest",
            },
        },
        "4": {
            "class_type": "SaveAnimatedPNG",
            "inputs": {"images": image, "filename_prefix": "kinds/apng", "fps": 4.0, "compress_level": 1},
        },
        "5": {
            "class_type": "SaveWEBM",
            "inputs": {"images": image, "filename_prefix": "kinds/webm", "codec": "vp9", "fps": 4.0, "crf": 32.0},
        },
        "6": {"class_type": "CreateVideo", "inputs": {"images": image, "fps": 4.0}},
        "7": {
            "class_type": "SaveVideo",
            "inputs": {"video": ["6", 0], "filename_prefix": "kinds/mp4", "format": "auto", "codec": "auto"},
        },
        "8": {"class_type": "LoadAudio", "inputs": {"audio": wav}},
        "9": {"class_type": "SaveAudio", "inputs": {"audio": ["8", 0], "filename_prefix": "kinds/flac"}},
        "10": {
            "class_type": "SaveAudioMP3",
            "inputs": {"audio": ["8", 0], "filename_prefix": "kinds/mp3", "quality": "128k"},
        },
        "11": {
            "class_type": "SaveAudioOpus",
            "inputs": {"audio": ["8", 0], "filename_prefix": "kinds/opus", "quality": "64k"},
        },
        "12": {"class_type": "PreviewAny", "inputs": {"source": "some text"}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": image}},
    }
    client = ComfyClient(comfyui.host, comfyui.pid_file, comfyui.log_path)
    runner = PromptRunner(client, wf, timeout=60, ready_timeout=10)

    async def go():
        result = await runner.run()
        files, texts = outputs.collect(result.outputs)
        delivered = await outputs.deliver(
            files, client=client, comfyui_path=comfyui.path, job_id="j", s3=None, max_response_mb=50
        )
        return files, texts, delivered

    try:
        files, texts, (images, other, errors) = arun(go)
    finally:
        (comfyui.path / "input" / wav).unlink()
    try:
        assert errors == []
        kinds = {e["node_id"]: e["content_type"] for e in images + other}
        assert {e["node_id"] for e in images} == {"2", "3", "4"}  # image/* only
        assert {n: kinds[n] for n in ("2", "3", "5", "7", "9", "10", "11")} == {
            "2": "image/png",
            "3": "image/webp",
            "5": "video/webm",
            "7": "video/mp4",
            "9": "audio/flac",
            "10": "audio/mpeg",
            "11": "audio/ogg",
        }
        assert kinds["4"] == "image/png"  # an animated PNG is still a PNG
        assert texts == [{"node_id": "12", "text": "some text"}]
        assert "13" not in kinds and any(f.node_id == "13" and f.type == "temp" for f in files)  # previews
        assert {e["node_id"] for e in other} == {"5", "7", "9", "10", "11"}
    finally:
        outputs.cleanup(files, comfyui.path, [])
    assert not any(p.is_file() for p in (comfyui.path / "output" / "kinds").rglob("*"))
