"""s3_upload.py against moto's S3 server (the real boto3 client over HTTP) (docs/api.md)."""

from __future__ import annotations

import json
import urllib.request

import pytest
from boto3.s3.transfer import TransferConfig
from support.moto_s3 import MotoS3
from support.moto_s3 import moto_s3 as moto_s3_server

import s3_upload
from comfy_worker.settings import Settings

BUCKET = "comfyui-outputs"


@pytest.fixture
def moto_s3():
    with moto_s3_server(BUCKET) as store:
        yield store


def settings_for(store: MotoS3, **env) -> Settings:
    return Settings.from_env(store.env(BUCKET, **env))


def fetch(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read(), r.headers.get("Content-Type")


def test_disabled_without_endpoint():
    assert s3_upload.S3Uploader.from_settings(Settings.from_env({})) is None


def test_upload_bytes_sets_key_content_type_and_presigned_url(moto_s3):
    client = moto_s3.client
    uploader = s3_upload.S3Uploader(settings_for(moto_s3, BUCKET_PREFIX="outputs/", S3_URL_EXPIRES="600"))
    url = uploader.upload("job-1", "ComfyUI_00001_.png", "image/png", data=b"\x89PNG fake")
    head = client.head_object(Bucket=BUCKET, Key="outputs/job-1/ComfyUI_00001_.png")
    assert head["ContentType"] == "image/png"
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url
    body, content_type = fetch(url)  # plain HTTP, no credentials
    assert body == b"\x89PNG fake" and content_type == "image/png"


def test_zero_expiry_gives_the_plain_object_url(moto_s3):
    endpoint, client = moto_s3.endpoint, moto_s3.client
    # plain URLs are for public buckets: make this one publicly readable
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/*"}
        ],
    }
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(policy))
    uploader = s3_upload.S3Uploader(settings_for(moto_s3, S3_URL_EXPIRES="0"))
    url = uploader.upload("job 2", "clip 1.mp4", "video/mp4", data=b"video")
    assert url == f"{endpoint}/{BUCKET}/job%202/clip%201.mp4"
    assert fetch(url) == (b"video", "video/mp4")


def test_aws_endpoint_uses_virtual_host_urls():
    uploader = s3_upload.S3Uploader(
        Settings.from_env({"BUCKET_ENDPOINT_URL": "https://s3.eu-west-1.amazonaws.com", "S3_URL_EXPIRES": "0"})
    )
    assert uploader.url_for("job/a.png") == f"https://{BUCKET}.s3.eu-west-1.amazonaws.com/job/a.png"


def test_large_file_from_disk_goes_up_in_parts(moto_s3, tmp_path, monkeypatch):
    client = moto_s3.client
    monkeypatch.setattr(
        s3_upload, "TRANSFER", TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    )
    path = tmp_path / "big.bin"
    data = bytes(range(256)) * (6 * 4096)  # 6 MiB
    path.write_bytes(data)
    uploader = s3_upload.S3Uploader(settings_for(moto_s3))
    url = uploader.upload("job-3", "big.bin", "application/octet-stream", path=path)
    head = client.head_object(Bucket=BUCKET, Key="job-3/big.bin")
    assert head["ETag"].strip('"').endswith("-2")  # a multipart upload of two parts
    assert fetch(url)[0] == data


def test_missing_bucket_raises_a_clear_client_error(moto_s3):
    uploader = s3_upload.S3Uploader(settings_for(moto_s3, BUCKET_NAME="no-such-bucket"))
    with pytest.raises(Exception, match="NoSuchBucket"):
        uploader.upload("job", "a.png", "image/png", data=b"x")


def test_the_64_mb_multipart_threshold(moto_s3, tmp_path):
    """docs/api.md: files over 64 MB go up in parts (the real TransferConfig, no patched threshold)."""
    client = moto_s3.client
    assert s3_upload.MULTIPART_THRESHOLD == 64 * 1024 * 1024
    uploader = s3_upload.S3Uploader(settings_for(moto_s3))
    for name, size in (("under.bin", s3_upload.MULTIPART_THRESHOLD - 1), ("at.bin", s3_upload.MULTIPART_THRESHOLD)):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)
        uploader.upload("job-64", name, "application/octet-stream", path=path)
        path.unlink()
    under = client.head_object(Bucket=BUCKET, Key="job-64/under.bin")
    at = client.head_object(Bucket=BUCKET, Key="job-64/at.bin")
    assert under["ContentLength"] == s3_upload.MULTIPART_THRESHOLD - 1 and "-" not in under["ETag"]  # one PUT
    assert at["ContentLength"] == s3_upload.MULTIPART_THRESHOLD and at["ETag"].strip('"').endswith("-4")  # 4 x 16 MB


def test_one_uploader_per_settings():
    settings = Settings.from_env({"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9", "BUCKET_NAME": "a"})
    first = s3_upload.S3Uploader.from_settings(settings)
    assert (
        s3_upload.S3Uploader.from_settings(
            Settings.from_env({"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9", "BUCKET_NAME": "a"})
        )
        is first
    )
    assert (
        s3_upload.S3Uploader.from_settings(
            Settings.from_env({"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9", "BUCKET_NAME": "b"})
        )
        is not first
    )


def test_uploaders_kept_are_bounded_and_the_least_recently_used_goes_first():
    # every job with its own s3Config may bring new keys: the process keeps only MAX_UPLOADERS clients
    def settings(n: int) -> Settings:
        keys = {"BUCKET_ACCESS_KEY_ID": f"id-{n}", "BUCKET_SECRET_ACCESS_KEY": f"key-{n}"}
        return Settings.from_env({"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9", "BUCKET_NAME": "b", **keys})

    first = s3_upload.S3Uploader.from_settings(settings(0))
    second = s3_upload.S3Uploader.from_settings(settings(1))
    for n in range(2, s3_upload.MAX_UPLOADERS + 1):
        assert s3_upload.S3Uploader.from_settings(settings(0)) is first  # used again: kept
        s3_upload.S3Uploader.from_settings(settings(n))
    assert len(s3_upload._uploaders) == s3_upload.MAX_UPLOADERS
    assert s3_upload.S3Uploader.from_settings(settings(0)) is first
    assert s3_upload.S3Uploader.from_settings(settings(1)) is not second  # the oldest unused one was dropped
