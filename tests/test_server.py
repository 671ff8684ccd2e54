"""The REST server as a real process on loopback: answers, errors, concurrency, auth, shedding."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import numpy as np
import pytest

from live_server import start_server, stop_server
from reference import dense_targets, full_logits
from tiny_models import load
from storage import wire
from storage.datasets import Example
from storage.tokenization import tokenize_example
from teacher_service.engine import ScoreRequest, TeacherEngine
from teacher_service.models import load_teacher_pair
from teacher_service.targets import TargetConfig, default_r

TOP_K = 16


@pytest.fixture(scope="module")
def pair_dirs(teacher_pair):
    return teacher_pair


@pytest.fixture(scope="module")
def server(pair_dirs, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    proc, url = start_server(*pair_dirs, "--top-k", str(TOP_K), "--max-seq-len", "64",
                             "--max-body-bytes", "200000", log_path=log)
    yield url
    assert stop_server(proc) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def engine(pair_dirs):
    """The same engine the server runs (on-policy default r), in this process."""
    pair = load_teacher_pair(*pair_dirs, device="cpu")
    return TeacherEngine(pair, TargetConfig(top_k=TOP_K, r=default_r("half-l1", "on")),
                         max_seq_len=64)


def _sequences(n, seed=0, vocab=140):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(3, 30))
        out.append({"input_ids": rng.integers(0, vocab, size=length).tolist(),
                    "prompt_len": int(rng.integers(1, length))})
    return out


def _post(url, body, **kw):
    return httpx.post(url + "/v1/score", json=body, timeout=60, **kw)


def test_served_targets_equal_engine_and_reference(server, engine, pair_dirs):
    seqs = _sequences(5)
    json_resp = _post(server, {"sequences": seqs})
    assert json_resp.status_code == 200, json_resp.text
    assert set(json_resp.json()["results"][0]) == set(wire.WIRE_FIELDS)
    arrow_resp = _post(server, {"sequences": seqs},
                       headers={"Accept": wire.ARROW_STREAM_MEDIA_TYPE})
    assert arrow_resp.headers["content-type"] == wire.ARROW_STREAM_MEDIA_TYPE
    served_json = wire.decode_json(json_resp.content)
    served_arrow = wire.decode_arrow(arrow_resp.content)
    local = engine.score([ScoreRequest(s["input_ids"], s["prompt_len"]) for s in seqs])
    _, dpo = load(pair_dirs[0])
    _, rev = load(pair_dirs[1])
    for s, a, b, c in zip(seqs, served_json, served_arrow, local):
        assert a.equals(b), "JSON and Arrow answers differ"
        # Same engine and batch-of-one vs micro-batch layouts: equal up to float16 rounding.
        np.testing.assert_allclose(a.alpha, c.alpha, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.topk_logprobs.astype(np.float32),
                                   c.topk_logprobs.astype(np.float32), rtol=2e-3, atol=1e-3)
        P, L = s["prompt_len"], len(s["input_ids"])
        ref = dense_targets(full_logits(dpo, s["input_ids"])[P - 1:L - 1],
                            full_logits(rev, s["input_ids"])[P - 1:L - 1],
                            s["input_ids"][P:], top_k=TOP_K, r=30.0)
        np.testing.assert_allclose(a.alpha, ref["alpha"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.topk_logprobs, ref["topk_logprobs"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(a.tail_logmass, ref["tail_logmass"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a.dpo_logprobs, ref["dpo_logprobs"], atol=1e-4)


def test_text_and_token_inputs_agree(server, engine):
    messages = [{"role": "user", "content": "sort 3 1 2"}]
    response = "1 2 3"
    ids, prompt_len = tokenize_example(
        engine.pair.tokenizer, Example(index=0, source="test", prompt_messages=messages,
                                       response=response))
    text = _post(server, {"sequences": [{"messages": messages, "response": response},
                                        {"prompt": "sort 3 1 2", "response": response}]})
    tokens = _post(server, {"sequences": [{"input_ids": ids, "prompt_len": prompt_len}]})
    assert text.status_code == 200 and tokens.status_code == 200, text.text
    t0, t1 = wire.decode_json(text.content)
    (k0,) = wire.decode_json(tokens.content)
    assert t0.input_ids.tolist() == ids and t0.prompt_len == prompt_len
    assert t0.equals(k0) or np.allclose(t0.alpha, k0.alpha, rtol=1e-5)
    assert t1.input_ids.tolist() == ids  # a bare prompt is a one-turn user message


def test_requested_top_k(server):
    seqs = _sequences(2, seed=3)
    small = _post(server, {"sequences": seqs, "top_k": 4})
    assert small.status_code == 200
    assert all(len(r["topk_ids"][0]) == 4 for r in small.json()["results"])
    big = _post(server, {"sequences": seqs, "top_k": TOP_K + 1})
    assert big.status_code == 422 and "top_k" in big.json()["error"]["message"]


BAD_BODIES = [
    ({"sequences": [{"input_ids": [1, 2, 500], "prompt_len": 1}]}, 422, "outside the vocabulary"),
    ({"sequences": [{"input_ids": [1, -2, 5], "prompt_len": 1}]}, 422, "outside the vocabulary"),
    ({"sequences": [{"input_ids": [1, 2, 5], "prompt_len": 0}]}, 422, "prompt_len"),
    ({"sequences": [{"input_ids": [1, 2, 5], "prompt_len": 3}]}, 422, "prompt_len"),
    ({"sequences": [{"input_ids": [1], "prompt_len": 1}]}, 422, "input_ids"),
    ({"sequences": [{"input_ids": [], "prompt_len": 1}]}, 422, "input_ids"),
    ({"sequences": []}, 422, "sequences"),
    ({"sequences": [{"input_ids": list(range(5, 70)), "prompt_len": 3}]}, 413, "max_seq_len"),
    ({"sequences": [{"input_ids": ["a", "b"], "prompt_len": 1}]}, 422, "input_ids"),
    ({"sequences": [{"input_ids": [1.5, 2], "prompt_len": 1}]}, 422, "input_ids"),
    ({"sequences": [{"input_ids": [1, 2], "prompt_len": "1"}]}, 422, "prompt_len"),
    ({"sequences": "nope"}, 422, "sequences"),
    ({"sequences": [{"input_ids": [1, 2], "prompt_len": 1}], "top_k": 0}, 422, "top_k"),
    ({"sequences": [{"input_ids": [1, 2], "prompt_len": 1}], "extra": 1}, 422, "extra"),
    ({"sequences": [{"prompt": "hi", "response": ""}]}, 422, "response"),
    ({"sequences": [{"messages": [{"role": "user", "content": "x"}], "prompt": "y",
                     "response": "z"}]}, 422, "exactly one"),
    ([1, 2, 3], 422, "body"),
]


@pytest.mark.parametrize("body,status,needle", BAD_BODIES)
def test_bad_input_gets_its_4xx(server, body, status, needle):
    resp = _post(server, body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"type", "message"} and needle in err["message"]


@pytest.mark.parametrize("raw,status", [
    (b'{"sequences": [', 400),
    (b'{"sequences": [{"input_ids": [1, NaN], "prompt_len": 1}]}', 400),
    (b'{"sequences": [{"input_ids": [1, Infinity], "prompt_len": 1}]}', 400),
    (b"\xff\xfe\x00garbage", 400),
    (b"[" * 100_000 + b"]" * 100_000, 400),
    (b"x" * 300_000, 413),
])
def test_malformed_bodies_get_4xx_and_server_keeps_serving(server, raw, status):
    resp = httpx.post(server + "/v1/score", content=raw, timeout=60,
                      headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    assert "error" in resp.json()
    ok = _post(server, {"sequences": _sequences(1)})
    assert ok.status_code == 200


def test_concurrent_clients_get_their_own_answers(server, engine):
    bodies = [{"sequences": _sequences(int(1 + i % 3), seed=100 + i)} for i in range(24)]
    with cf.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda b: _post(server, b), bodies))
    for body, resp in zip(bodies, responses):
        assert resp.status_code == 200, resp.text
        got = wire.decode_json(resp.content)
        assert [r.input_ids.tolist() for r in got] == [s["input_ids"] for s in body["sequences"]]
        want = engine.score([ScoreRequest(s["input_ids"], s["prompt_len"])
                             for s in body["sequences"]])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.alpha, w.alpha, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(g.dpo_logprobs, w.dpo_logprobs, atol=1e-4)


def test_info_health_and_metrics(server, engine):
    info = httpx.get(server + "/v1/info").json()
    for key in ("models", "vocab_size", "tokenizer_sha256", "top_k", "r", "eps", "tvd_norm",
                "mode", "max_seq_len"):
        assert key in info
    assert info["tokenizer_sha256"] == engine.pair.tokenizer_sha256
    assert info["r"] == 30.0 and info["top_k"] == TOP_K and info["mode"] == "adaptive"
    assert httpx.get(server + "/healthz").json() == {"status": "ok"}
    metrics = httpx.get(server + "/metrics").text
    assert "aligndistil_requests_total" in metrics and "aligndistil_scored_tokens_total" in metrics
    assert httpx.get(server + "/nope").status_code == 404


def test_api_key(pair_dirs, tmp_path):
    proc, url = start_server(*pair_dirs, "--top-k", "4", env={"ALIGNDISTIL_API_KEY": "s3cret"},
                             log_path=tmp_path / "log")
    try:
        body = {"sequences": _sequences(1)}
        assert _post(url, body).status_code == 401
        wrong = _post(url, body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert _post(url, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/v1/info").status_code == 401
        assert httpx.get(url + "/healthz").status_code == 200
    finally:
        assert stop_server(proc) == 0


def test_full_queue_sheds_with_429(pair_dirs, tmp_path):
    proc, url = start_server(*pair_dirs, "--top-k", "4", "--max-queue", "1",
                             "--batch-wait-ms", "300", log_path=tmp_path / "log")
    try:
        body = {"sequences": _sequences(1)}
        with cf.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: _post(url, body), range(6)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes, codes
        shed = next(r for r in responses if r.status_code == 429)
        assert int(shed.headers["retry-after"]) >= 1
        assert shed.json()["error"]["type"] == "overloaded"
        assert _post(url, body).status_code == 200
    finally:
        assert stop_server(proc) == 0


def test_sigterm_finishes_in_flight_requests(pair_dirs, tmp_path):
    import signal
    import threading
    import time

    proc, url = start_server(*pair_dirs, "--top-k", "4", "--batch-wait-ms", "500",
                             log_path=tmp_path / "log")
    body = {"sequences": _sequences(8, seed=7)}
    result = {}
    sender = threading.Thread(target=lambda: result.setdefault("resp", _post(url, body)))
    sender.start()
    time.sleep(0.2)  # the request is queued in the 500 ms batching window
    proc.send_signal(signal.SIGTERM)
    sender.join(60)
    assert proc.wait(60) == 0, (tmp_path / "log").read_text()[-2000:]
    resp = result["resp"]
    assert resp.status_code == 200
    assert len(resp.json()["results"]) == 8


def test_openapi_shows_the_response_models_and_no_scheme_without_a_key(server):
    """The schema a client generator reads: no bearer scheme (this server has no --api-key;
    the keyed case is in test_openapi.py), ScoreResponse (with every record field) for
    /v1/score's 200 and TeacherInfo for /v1/info; and what /v1/info serves really has
    TeacherInfo's fields."""
    doc = httpx.get(server + "/openapi.json", timeout=30).json()
    assert "securitySchemes" not in doc["components"]  # no --api-key: nothing declared
    for path, method in (("/v1/score", "post"), ("/v1/info", "get")):
        assert "security" not in doc["paths"][path][method], path
    ok = doc["paths"]["/v1/score"]["post"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ScoreResponse")
    assert wire.ARROW_STREAM_MEDIA_TYPE in ok
    result = doc["components"]["schemas"]["ScoreResult"]["properties"]
    assert set(result) == set(wire.WIRE_FIELDS)
    for status in ("413", "422", "429", "503"):
        assert status in doc["paths"]["/v1/score"]["post"]["responses"]
    info_schema = doc["paths"]["/v1/info"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert info_schema == "TeacherInfo"
    info = httpx.get(server + "/v1/info", timeout=30).json()
    assert set(info) == set(doc["components"]["schemas"]["TeacherInfo"]["properties"])
    assert info["top_k"] == TOP_K and len(info["tokenizer_sha256"]) == 64
