"""moto's S3 server on a free loopback port: the S3 store of the tests (s3_upload, outputs, handler, api).

``with moto_s3("bucket-a", "bucket-b") as store:`` starts it, empties moto's state (kept per process,
not per server), makes the buckets and yields a ``MotoS3``; ``enforce_auth=True`` also makes an IAM
user whose key is ``store.key_id``/``store.secret`` and has moto check every key and signature from then
on, as a real store does (a wrong key is refused)."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import moto.settings
from moto.server import ThreadedMotoServer

REGION = "us-east-1"


@dataclass
class MotoS3:
    endpoint: str
    key_id: str
    secret: str

    @property
    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            region_name=REGION,
        )

    def env(self, bucket: str, **extra: str) -> dict[str, str]:
        """The BUCKET_* variables that send outputs to ``bucket`` with this store's key."""
        return {
            "BUCKET_ENDPOINT_URL": self.endpoint,
            "BUCKET_ACCESS_KEY_ID": self.key_id,
            "BUCKET_SECRET_ACCESS_KEY": self.secret,
            "BUCKET_NAME": bucket,
            "BUCKET_REGION": REGION,
            **extra,
        }

    def keys(self, bucket: str) -> list[str]:
        return sorted(o["Key"] for o in self.client.list_objects_v2(Bucket=bucket).get("Contents", []))


@contextlib.contextmanager
def moto_s3(*buckets: str, enforce_auth: bool = False) -> Iterator[MotoS3]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    no_auth_count = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    try:
        host, port = server.get_host_and_port()
        store = MotoS3(f"http://{host}:{port}", "AKIAMOTOADMIN", "moto-admin-secret")
        reset = urllib.request.Request(f"{store.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset, timeout=10).close()
        for bucket in buckets:
            store.client.create_bucket(Bucket=bucket)
        if enforce_auth:
            admin = {"endpoint_url": store.endpoint, "region_name": REGION}
            iam = boto3.client("iam", aws_access_key_id=store.key_id, aws_secret_access_key=store.secret, **admin)
            iam.create_user(UserName="job")
            allow = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            iam.put_user_policy(UserName="job", PolicyName="s3", PolicyDocument=json.dumps(allow))
            key = iam.create_access_key(UserName="job")["AccessKey"]
            store = MotoS3(store.endpoint, key["AccessKeyId"], key["SecretAccessKey"])
            moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        yield store
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = no_auth_count
        server.stop()
