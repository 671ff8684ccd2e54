"""The teacher server's OpenAPI document, as clients and client generators see it (DESIGN §4).

- The document is valid OpenAPI (``openapi-spec-validator``) and every ``$ref`` in it resolves
  inside it: no operation carries its own ``$defs`` pointing at components that do not exist.
- It describes the server as configured: the bearer scheme and the per-operation security
  requirement (and the 401 answers) only when an API key is set.
- 405 answers carry ``Allow`` (RFC 9110), listing every method the path takes.
- A schema-based fuzzer (schemathesis, every phase and every check, over every operation in the
  document, so routes added later are covered without touching this file) finds nothing against
  a real server on loopback, with and without a key. Bounded: a fixed number of examples per
  operation and a fixed seed; the longer run is behind ``-m slow``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate as validate_openapi
from jsonschema import Draft202012Validator
from pydantic import BaseModel, ConfigDict, ValidationError

from live_server import start_server, stop_server
from teacher_service import server as srv


API_KEY = "test-openapi-key"
TOP_K = 16
MAX_SEQ_LEN = 64


def _never_loaded():
    raise AssertionError("the document must not need the engine")


def make_app(api_key: str | None, monkeypatch) -> srv.FastAPI:
    monkeypatch.delenv(srv.API_KEY_ENV, raising=False)
    return srv.create_app(_never_loaded, srv.ServerSettings(api_key=api_key))


def unresolved_refs(doc: dict) -> list[str]:
    """Every ``$ref`` in ``doc`` that does not point at something inside ``doc``."""
    bad: list[str] = []

    def resolves(ref: str) -> bool:
        if not ref.startswith("#/"):
            return False
        node = doc
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and not resolves(ref):
                bad.append(f"{where}: {ref}")
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(doc, "#")
    return bad


def nested_defs(doc: dict) -> list[str]:
    """Where a schema carries its own ``$defs`` (components/schemas is the one place for them)."""
    found: list[str] = []

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            if "$defs" in node:
                found.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(doc, "#")
    return found


def operations(doc: dict):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in {"get", "put", "post", "delete", "options", "head", "patch", "trace"}:
                yield path, method, op


# ---------------------------------------------------------------------------- the document
@pytest.mark.parametrize("api_key", [None, API_KEY], ids=["no_key", "key"])
def test_the_document_is_valid_and_every_reference_resolves(api_key, monkeypatch):
    doc = make_app(api_key, monkeypatch).openapi()
    assert unresolved_refs(doc) == [], "references that resolve nowhere"
    assert nested_defs(doc) == [], "schemas with their own $defs instead of components"
    validate_openapi(doc)  # raises OpenAPIValidationError (fails the test) when invalid
    body = doc["paths"]["/v1/score"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ScoreBody"}
    json.dumps(doc)  # what /openapi.json serves


def server_takes(body) -> bool:
    """Whether the request models take ``body`` (with the one rule left to ``_to_request``:
    exactly one of messages and prompt)."""
    try:
        parsed = srv.ScoreBody.model_validate(body)
    except ValidationError:
        return False
    return all((seq.messages is None) != (seq.prompt is None)
               for seq in parsed.sequences if isinstance(seq, srv.TextSequence))


def test_the_score_body_schema_states_what_the_server_enforces(monkeypatch):
    schemas = make_app(None, monkeypatch).openapi()["components"]["schemas"]
    tokens = schemas["TokenSequence"]["properties"]
    assert tokens["prompt_len"]["type"] == "integer" and tokens["prompt_len"]["minimum"] == 1
    assert tokens["input_ids"]["minItems"] == 2
    assert schemas["TextSequence"]["properties"]["response"]["minLength"] == 1
    assert schemas["ScoreBody"]["additionalProperties"] is False
    assert schemas["Message"]["required"] == ["role", "content"]
    # the schema and the server's own model agree on what a body may be
    validator = Draft202012Validator({"$ref": "#/components/schemas/ScoreBody",
                                      "components": {"schemas": schemas}})
    msgs = [{"role": "user", "content": "hi"}]
    for seq, ok in [({"input_ids": [1, 2], "prompt_len": 1}, True),
                    ({"input_ids": [1, 2], "prompt_len": 0}, False),
                    ({"input_ids": [1], "prompt_len": 1}, False),
                    ({"prompt": "hi", "response": "yes"}, True),
                    ({"messages": msgs, "response": "yes"}, True),
                    ({"messages": msgs, "prompt": None, "response": "yes"}, True),
                    ({"messages": msgs, "prompt": "hi", "response": "yes"}, False),
                    ({"messages": None, "prompt": None, "response": "yes"}, False),
                    ({"response": "yes"}, False),
                    ({"prompt": "hi", "response": ""}, False),
                    ({"input_ids": [1, 2], "prompt_len": 1, "response": "x"}, False)]:
        body = {"sequences": [seq]}
        assert validator.is_valid(body) is ok, f"the schema on {body}"
        assert server_takes(body) is ok, f"the server on {body}"


def test_security_is_declared_only_when_a_key_is_set(monkeypatch):
    bare = make_app(None, monkeypatch).openapi()
    assert "securitySchemes" not in bare.get("components", {})
    for path, method, op in operations(bare):
        assert "security" not in op, f"{method.upper()} {path} declares security without a key"
        assert "401" not in op["responses"], f"{method.upper()} {path}: a 401 it never sends"

    keyed = make_app(API_KEY, monkeypatch).openapi()
    assert keyed["components"]["securitySchemes"] == {
        "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "the server's --api-key"}}
    protected = {(path, method) for path, method, op in operations(keyed) if "security" in op}
    assert protected >= {("/v1/score", "post"), ("/v1/info", "get")}
    for path, method in protected:
        op = keyed["paths"][path][method]
        assert op["security"] == [{"HTTPBearer": []}]
        assert "401" in op["responses"]
    for path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapes stay open
        assert "security" not in keyed["paths"][path]["get"]


def test_a_route_added_later_with_a_hand_read_body_gets_a_valid_schema(monkeypatch):
    """What a new endpoint (say ``/v1/completions``) does: document its hand-read body with
    :func:`json_body_openapi`; the nested models land in components/schemas."""

    class Part(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: str

    class LaterBody(BaseModel):
        parts: list[Part]
        message: srv.Message  # shares a component with the score body

    app = make_app(API_KEY, monkeypatch)

    @app.post("/v1/later", dependencies=[srv.Depends(srv.require_key)],
              openapi_extra=srv.json_body_openapi(LaterBody))
    async def later(n: int = 1):  # a FastAPI-validated query parameter: 422 is ours
        return {}

    doc = app.openapi()
    assert unresolved_refs(doc) == [] and nested_defs(doc) == []
    validate_openapi(doc)
    schemas = doc["components"]["schemas"]
    assert {"LaterBody", "Part", "Message", "ScoreBody"} <= set(schemas)
    assert "HTTPValidationError" not in schemas  # FastAPI's {"detail": ..} is never sent
    op = doc["paths"]["/v1/later"]["post"]
    assert op["security"] == [{"HTTPBearer": []}]
    assert op["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"}
    resp = TestClient(app).post("/v1/later?n=x", headers={"Authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 422 and set(resp.json()["error"]) == {"type", "message"}


# ---------------------------------------------------------------------------- 405 and Allow
def test_405_answers_carry_allow_listing_every_method_of_the_path(monkeypatch):
    app = make_app(None, monkeypatch)

    @app.get("/v1/score")  # a second route on the same path: Allow lists both
    async def score_help():
        return {}

    client = TestClient(app)  # no lifespan: routing and errors need no engine
    for method, path, allow in [("PUT", "/healthz", "GET"), ("POST", "/metrics", "GET"),
                                ("TRACE", "/readyz", "GET"), ("HEAD", "/v1/info", "GET"),
                                ("DELETE", "/v1/score", "GET, POST"), ("GET", "/nowhere", None)]:
        resp = client.request(method, path)
        if allow is None:  # no route on the path: 404, not 405
            assert resp.status_code == 404 and "allow" not in resp.headers
            continue
        assert resp.status_code == 405, f"{method} {path}: {resp.status_code}"
        assert resp.headers.get("allow") == allow, f"{method} {path}: {resp.headers}"
        if method != "HEAD":
            assert resp.json() == {"error": {"type": "method_not_allowed",
                                             "message": "Method Not Allowed"}}


# ---------------------------------------------------------------------------- the fuzzer, live
#: Every check, in every phase; per operation, the checks that cannot hold for a reason the
#: schema cannot express (a config file: ``--checks`` on the command line would override it).
#: positive_data_acceptance on POST /v1/score: a body valid under the schema may still be refused
#: with a 4xx, by rules JSON Schema cannot state: prompt_len < len(input_ids), token ids inside
#: the loaded vocabulary, max_seq_len and the token limits, the chat template's roles. Those
#: refusals are the contract (4xx naming the field; tests/test_server_fuzz.py checks each).
#: The same on POST /v1/completions: ids inside the vocabulary, the cap on prompt_logprobs, the
#: fields vLLM accepts that this server refuses unless neutral (`suffix`, `stop`, ...).
SCHEMATHESIS_CONFIG = """\
[checks]
enabled = true

[[operations]]
include-path = "/v1/score"
include-method = "POST"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path = "/v1/completions"
include-method = "POST"
checks.positive_data_acceptance.enabled = false
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory, teacher_pair):
    """Two real servers, one without a key and one with: started together, stopped at the end."""
    root = tmp_path_factory.mktemp("openapi_servers")
    started, logs = {}, {}
    try:
        for name, extra in (("no_key", ()), ("key", ("--api-key", API_KEY))):
            logs[name] = root / f"{name}.log"
            started[name] = start_server(*teacher_pair, "--top-k", str(TOP_K),
                                         "--max-seq-len", str(MAX_SEQ_LEN), *extra,
                                         env={"OMP_NUM_THREADS": "1"}, log_path=logs[name])
        yield {name: url for name, (_, url) in started.items()}, logs
    finally:
        codes = {name: stop_server(proc) for name, (proc, _) in started.items()}
        for name, code in codes.items():
            assert code == 0, f"{name} server exited with {code}: {logs[name].read_text()[-3000:]}"


def run_schemathesis(url: str, workdir: Path, *, max_examples: int, seed: int,
                     headers: dict[str, str]) -> tuple[int, str, dict[str, str]]:
    """Run the schemathesis CLI; ``(exit code, output, {operation: junit outcome})``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    junit = workdir / "junit.xml"
    cmd = [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(config),
           "run", f"{url}/openapi.json", "--phases", "examples,coverage,fuzzing,stateful",
           "--max-examples", str(max_examples), "--seed", str(seed), "--workers", "1",
           "--generation-database", "none", "--request-timeout", "30",
           "--suppress-health-check", "too_slow",
           "--report", "junit", "--report-junit-path", str(junit)]
    for name, value in headers.items():
        cmd += ["--header", f"{name}: {value}"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    outcomes = {}
    if junit.exists():
        for case in ET.parse(junit).iter("testcase"):
            outcomes[case.get("name")] = ",".join(child.tag for child in case) or "passed"
    return proc.returncode, proc.stdout + proc.stderr, outcomes


def _fuzz(servers, tmp_path, config: str, max_examples: int, seed: int) -> None:
    urls, logs = servers
    headers = {"Authorization": f"Bearer {API_KEY}"} if config == "key" else {}
    started = time.monotonic()
    code, output, outcomes = run_schemathesis(urls[config], tmp_path / "st", headers=headers,
                                              max_examples=max_examples, seed=seed)
    print(f"schemathesis ({config}, {max_examples} examples per operation, seed {seed}): "
          f"{time.monotonic() - started:.1f} s; {outcomes}")
    assert code == 0, (f"schemathesis found failures (exit {code}):\n{output[-12000:]}\n"
                       f"server log tail: {logs[config].read_text()[-2000:]}")
    assert "Unresolvable references" not in output, output[-4000:]
    doc = httpx.get(f"{urls[config]}/openapi.json").json()
    expected = {f"{method.upper()} {path}" for path, method, _ in operations(doc)}
    assert outcomes == {op: "passed" for op in expected}, "not every operation was tested"


@pytest.mark.parametrize("config", ["no_key", "key"])
def test_schemathesis_finds_nothing(servers, tmp_path, config):
    _fuzz(servers, tmp_path, config, max_examples=100, seed=20240611)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["no_key", "key"])
def test_schemathesis_finds_nothing_long(servers, tmp_path, config):
    _fuzz(servers, tmp_path, config, max_examples=2000, seed=7)


def test_the_served_document_matches_the_configuration(servers):
    urls, _ = servers
    bare = httpx.get(f"{urls['no_key']}/openapi.json").json()
    keyed = httpx.get(f"{urls['key']}/openapi.json").json()
    validate_openapi(bare)
    validate_openapi(keyed)
    assert "securitySchemes" not in bare["components"]
    assert "HTTPBearer" in keyed["components"]["securitySchemes"]
    # the engine refuses prompt_len 0 with a 422 naming it, as the schema's minimum says
    resp = httpx.post(f"{urls['no_key']}/v1/score",
                      json={"sequences": [{"input_ids": [5, 6, 7], "prompt_len": 0}]})
    assert resp.status_code == 422 and "prompt_len" in resp.json()["error"]["message"]
    assert httpx.get(f"{urls['key']}/v1/info").status_code == 401
    assert httpx.get(f"{urls['key']}/v1/info",
                     headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
