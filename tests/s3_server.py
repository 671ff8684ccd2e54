"""A real S3-compatible server on loopback for the object-storage tests: moto's standalone
server (``moto_server``, from the ``dev`` extra) in its own process. (``gcs_server.py`` and
``azure_server.py`` are its GCS and Azure counterparts, with the same methods.)

``S3Server.env`` is what a user sets for any S3 tool: ``AWS_ENDPOINT_URL``, the access keys,
``AWS_DEFAULT_REGION`` (and ``AWS_ALLOW_HTTP`` for a plain-http endpoint).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    scheme = "s3"

    def __init__(self, log_dir: Path):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or \
            shutil.which("moto_server")
        assert exe, "moto_server not found: pip install 'moto[server]' (the dev extra)"
        self.log = open(Path(log_dir) / "moto.log", "w")
        self.process = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, f"moto_server exited: see {self.log.name}"
            try:
                httpx.get(f"{self.endpoint}/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "moto_server did not start within 60 s"
                time.sleep(0.2)
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ALLOW_HTTP": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    # the same small interface as gcs_server.GCSServer and azure_server.AzureServer
    def objects(self, bucket: str, prefix: str) -> dict[str, int]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def read(self, bucket: str, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when there is none."""
        client = self.client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"{bucket}/{key}") from None

    def write(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def delete(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def environment(server: S3Server) -> dict[str, str]:
    return {**os.environ, **server.env}
