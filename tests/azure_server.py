"""Azurite, Microsoft's Azure Storage emulator (npm package ``azurite``), on loopback for the
object-storage tests: its blob service only, in memory, in its own process.

``AzureServer.env`` is what a user sets for an Azure storage account reached at its own
endpoint: ``AZURE_STORAGE_ACCOUNT_NAME``, ``AZURE_STORAGE_ACCOUNT_KEY``,
``AZURE_STORAGE_ENDPOINT`` (and ``AZURE_ALLOW_HTTP=true`` for a plain-http endpoint). The
account is Azurite's built-in development account.

Where the executable comes from: ``$AZURITE_BLOB``, else ``.venv/node/node_modules/.bin`` (where
``npm install --prefix .venv/node azurite`` puts it), else ``PATH``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from email.utils import formatdate
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import httpx

from live_server import REPO
from s3_server import _free_port

#: Azurite's well-known development account (public, documented with the emulator).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
API_VERSION = "2021-08-06"


def azurite_binary() -> str:
    local = Path(REPO) / ".venv" / "node" / "node_modules" / ".bin" / "azurite-blob"
    exe = os.environ.get("AZURITE_BLOB") or (
        str(local) if local.exists() else shutil.which("azurite-blob"))
    assert exe and Path(exe).exists(), (
        f"azurite-blob not found{f' at {exe}' if exe else ''}: npm install --prefix "
        f".venv/node azurite (Node.js 20+), or set AZURITE_BLOB to its path")
    return exe


class AzureServer:
    scheme = "az"

    def __init__(self, log_dir: Path):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        self.log = open(Path(log_dir) / "azurite.log", "w")
        # --skipApiVersionCheck: obstore may speak a newer API version than this Azurite knows
        self.process = subprocess.Popen(
            [azurite_binary(), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
             "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry", "--silent"],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise
        self.env = {"AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": KEY,
                    "AZURE_STORAGE_ENDPOINT": self.endpoint, "AZURE_ALLOW_HTTP": "true"}

    def _wait(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, f"azurite exited: see {self.log.name}"
            try:
                httpx.get(f"{self.endpoint}?comp=list", timeout=1)
                return
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "azurite did not start within 60 s"
                time.sleep(0.2)

    # an independent client (Blob REST with Shared Key), for the tests to look behind the store
    def _request(self, method: str, path: str, params: dict | None = None,
                 data: bytes = b"", headers: dict | None = None) -> httpx.Response:
        url = f"{self.endpoint}/{quote(path)}"
        headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": API_VERSION,
                   **(headers or {})}
        request = httpx.Request(method, url, params=params, content=data, headers=headers)
        request.headers["Authorization"] = f"SharedKey {ACCOUNT}:{_sign(request)}"
        with httpx.Client() as client:
            response = client.send(request)
        if response.status_code == 404 and method == "GET":
            raise FileNotFoundError(path)
        response.raise_for_status()
        return response

    def make_bucket(self, name: str) -> str:
        self._request("PUT", name, {"restype": "container"})
        return name

    def objects(self, bucket: str, prefix: str) -> dict[str, int]:
        out, marker = {}, None
        while True:
            params = {"restype": "container", "comp": "list", "prefix": prefix,
                      **({"marker": marker} if marker else {})}
            root = ET.fromstring(self._request("GET", bucket, params).content)
            for blob in root.iter("Blob"):
                out[blob.findtext("Name")] = int(blob.findtext("Properties/Content-Length"))
            marker = root.findtext("NextMarker")
            if not marker:
                return out

    def read(self, bucket: str, key: str) -> bytes:
        return self._request("GET", f"{bucket}/{key}").content

    def write(self, bucket: str, key: str, data: bytes) -> None:
        self._request("PUT", f"{bucket}/{key}", data=data,
                      headers={"x-ms-blob-type": "BlockBlob"})

    def delete(self, bucket: str, key: str) -> None:
        self._request("DELETE", f"{bucket}/{key}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _sign(request: httpx.Request) -> str:
    """The Shared Key signature of a Blob service request (the storage services' documented
    string-to-sign)."""
    h = request.headers
    length = h.get("content-length", "")
    ms = sorted((k.lower(), v.strip()) for k, v in h.items() if k.lower().startswith("x-ms-"))
    url = urlsplit(str(request.url))
    resource = f"/{ACCOUNT}{url.path}"
    query = sorted(parse_qsl(url.query))
    string = "\n".join([
        request.method, h.get("content-encoding", ""), h.get("content-language", ""),
        "" if length == "0" else length, h.get("content-md5", ""), h.get("content-type", ""),
        "", h.get("if-modified-since", ""), h.get("if-match", ""), h.get("if-none-match", ""),
        h.get("if-unmodified-since", ""), h.get("range", ""),
        *(f"{k}:{v}" for k, v in ms),
        resource + "".join(f"\n{k.lower()}:{v}" for k, v in query)])
    digest = hmac.new(base64.b64decode(KEY), string.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()
