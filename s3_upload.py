"""Upload job outputs to any S3-compatible store (AWS, R2, MinIO, B2) with boto3 (docs/api.md, "Configuration").

Key: ``<BUCKET_PREFIX><job_id>/<filename>``. The returned URL is a presigned GET URL when
``S3_URL_EXPIRES`` > 0, else the plain object URL. Large files go up in parts (boto3's transfer
manager); files on disk are streamed, never read whole into memory.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from urllib.parse import quote, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from comfy_worker.settings import Settings

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 64 * 1024 * 1024  # docs/api.md: files over 64 MB go up in parts
TRANSFER = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=16 * 1024 * 1024)
MAX_UPLOADERS = 8  # clients kept for distinct buckets/keys (each job's own s3Config may add one); oldest dropped
_uploaders: dict[Settings, S3Uploader] = {}  # least recently used first


def _is_aws(endpoint: str) -> bool:
    return (urlsplit(endpoint).hostname or "").endswith("amazonaws.com")


class S3Uploader:
    """One boto3 client for the configured bucket. Use ``S3Uploader.from_settings`` (None when S3 is off)."""

    def __init__(self, settings: Settings):
        if not settings.bucket_endpoint_url:
            raise ValueError("BUCKET_ENDPOINT_URL is not set: S3 upload is disabled")
        self.endpoint = settings.bucket_endpoint_url.rstrip("/")
        self.bucket = settings.bucket_name
        self.prefix = settings.bucket_prefix
        self.expires = settings.s3_url_expires
        self.path_style = not _is_aws(self.endpoint)
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=settings.bucket_access_key_id,
            aws_secret_access_key=settings.bucket_secret_access_key,
            region_name=settings.bucket_region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path" if self.path_style else "virtual"},
                retries={"max_attempts": 5, "mode": "standard"},
            ),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Uploader | None:
        """The uploader for ``settings`` (one per distinct settings, so boto3's client and its connection
        pool are reused by every job), or None when S3 is off. At most ``MAX_UPLOADERS`` are kept, so jobs
        with ever new credentials neither grow the process nor keep their keys in it."""
        if not settings.bucket_endpoint_url:
            return None
        uploader = _uploaders.pop(settings, None) or cls(settings)
        _uploaders[settings] = uploader  # now the most recently used
        while len(_uploaders) > MAX_UPLOADERS:
            del _uploaders[next(iter(_uploaders))]
        return uploader

    def key_for(self, job_id: str, filename: str) -> str:
        return f"{self.prefix}{job_id}/{filename}"

    def upload(self, job_id: str, filename: str, content_type: str, *, path: Path | None = None, data=None) -> str:
        """Upload one file (from ``path`` or bytes ``data``) and return its URL. Blocking: run it in a thread."""
        key = self.key_for(job_id, filename)
        extra = {"ContentType": content_type}
        if path is not None:
            self.client.upload_file(str(path), self.bucket, key, ExtraArgs=extra, Config=TRANSFER)
        else:
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, key, ExtraArgs=extra, Config=TRANSFER)
        log.info("Uploaded %s to s3://%s/%s", filename, self.bucket, key)
        return self.url_for(key)

    def url_for(self, key: str) -> str:
        if self.expires > 0:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expires
            )
        if self.path_style:
            return f"{self.endpoint}/{self.bucket}/{quote(key, safe='/')}"
        parts = urlsplit(self.endpoint)
        return f"{parts.scheme}://{self.bucket}.{parts.netloc}/{quote(key, safe='/')}"
