"""vLLM's scoring protocol on ``aligndistil serve``: ``POST /v1/completions`` with
``prompt_logprobs``, ``GET /v1/models``, ``GET /health``, and ``/v1/score``'s ``extra_ids``,
against a real uvicorn server on loopback over the tiny teacher pair, checked against the
float64 dense reference of pi* (tests/reference.py, which shares no code with the server).

The layout is vLLM 0.32's, read in its source (teacher_service/vllm_protocol.py says where):
entry i of ``prompt_logprobs`` is the distribution of prompt token i given tokens before it,
the first entry null, the actual token first with its 1-based rank over the vocabulary, then
the top K. An off-by-one position or a rank counted from 0 fails these tests.

The peers' own clients: the ``openai`` client, and TRL 1.16's ``VLLMClient`` (its import guard,
which wants vLLM installed although the client only speaks HTTP, is patched here; the test
under ``-m trl`` with ``ServerDistillationTrainer`` is in test_trl_teacher_server.py).
"""

from __future__ import annotations

import base64
import io
import math

import httpx
import numpy as np
import pytest

from reference import dense_targets, full_logits
from tiny_models import load
from trainer_support import ThreadedServer, teacher_app

TOP_K = 8


@pytest.fixture(scope="module")
def server(teacher_pair):
    with ThreadedServer(teacher_app(*teacher_pair, top_k=TOP_K, max_seq_len=48)) as srv:
        yield srv


@pytest.fixture(scope="module")
def models(teacher_pair):
    tok, dpo = load(teacher_pair[0])
    _, rev = load(teacher_pair[1])
    return tok, dpo, rev


def _log_pi(models, ids: list[int]) -> np.ndarray:
    """Dense float64 log pi* ``[len(ids) - 1, V]``: row t is the distribution of ids[t + 1]."""
    _, dpo, rev = models
    n = len(ids)
    return dense_targets(full_logits(dpo, ids)[:n - 1], full_logits(rev, ids)[:n - 1], ids[1:],
                         top_k=TOP_K)["log_pi"]


def _post(server, body: dict, **kw) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60, **kw)


PROMPT = [5, 17, 23, 9, 41, 3, 77, 12]


def test_prompt_logprobs_follow_vllms_layout_and_equal_pi_star(server, models):
    r = _post(server, {"model": "aligndistil-pi-star", "prompt": PROMPT, "max_tokens": 1,
                       "prompt_logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(PROMPT) and entries[0] is None
    log_pi = _log_pi(models, PROMPT)
    tok = models[0]
    for i in range(1, len(PROMPT)):
        entry, row, actual = entries[i], log_pi[i - 1], PROMPT[i]
        keys = list(entry)
        assert keys[0] == str(actual)  # the actual token first, as vLLM inserts it
        top = np.argsort(-row, kind="stable")[:3]
        assert set(keys) == {str(actual), *map(str, top.tolist())}
        for rank, tid in enumerate(top.tolist(), start=1):
            assert entry[str(tid)]["rank"] == rank
            assert entry[str(tid)]["logprob"] == pytest.approx(row[tid], abs=2e-5, rel=1e-5)
            assert entry[str(tid)]["decoded_token"] == tok.convert_ids_to_tokens(tid)
        a = entry[str(actual)]
        assert a["logprob"] == pytest.approx(row[actual], abs=2e-5, rel=1e-5)
        assert a["rank"] == int((row >= row[actual] - 1e-9).sum())  # 1-based, ties included
        assert a["rank"] >= 1
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == len(PROMPT) and usage["completion_tokens"] == 1
    assert usage["total_tokens"] == len(PROMPT) + 1


def test_k_zero_gives_the_actual_token_only_and_k_minus_one_needs_the_vocabulary(server):
    entries = _post(server, {"prompt": PROMPT, "max_tokens": 1,
                             "prompt_logprobs": 0}).json()["choices"][0]["prompt_logprobs"]
    assert [list(e) for e in entries[1:]] == [[str(t)] for t in PROMPT[1:]]
    r = _post(server, {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": -1})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt_logprobs"
    assert "greater than max allowed: 8" in r.json()["error"]["message"]


def test_k_minus_one_is_the_whole_vocabulary_when_top_k_is(teacher_pair, models):
    vocab = len(models[0])
    with ThreadedServer(teacher_app(*teacher_pair, top_k=vocab)) as srv:
        entries = _post(srv, {"prompt": PROMPT[:4], "max_tokens": 1, "prompt_logprobs": -1}
                        ).json()["choices"][0]["prompt_logprobs"]
    log_pi = _log_pi(models, PROMPT[:4])
    for i in range(1, 4):
        assert len(entries[i]) == vocab
        probs = [math.exp(e["logprob"]) for e in entries[i].values()]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        best = int(np.argmax(log_pi[i - 1]))
        assert entries[i][str(best)]["rank"] == 1


def test_text_and_several_prompts_are_scored_as_their_tokens(server, models):
    tok = models[0]
    text = "sort 3 1 2 please"
    ids = tok(text)["input_ids"]
    by_text = _post(server, {"prompt": text, "max_tokens": 1, "prompt_logprobs": 2}).json()
    by_ids = _post(server, {"prompt": [ids, PROMPT], "max_tokens": 1,
                            "prompt_logprobs": 2}).json()
    assert len(by_ids["choices"]) == 2 and [c["index"] for c in by_ids["choices"]] == [0, 1]
    a, b = by_text["choices"][0]["prompt_logprobs"], by_ids["choices"][0]["prompt_logprobs"]
    assert len(a) == len(b) == len(ids) and a[0] is b[0] is None
    for x, y in zip(a[1:], b[1:]):  # the same entries (batched with another prompt: rounding)
        assert list(x) == list(y) and [v["rank"] for v in x.values()] == \
            [v["rank"] for v in y.values()]
        for key in x:
            assert x[key]["logprob"] == pytest.approx(y[key]["logprob"], abs=1e-4)
    assert len(by_ids["choices"][1]["prompt_logprobs"]) == len(PROMPT)


def test_a_greedy_completion_is_pi_stars_argmax_token_by_token(server, models):
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 2,
            "ignore_eos": True, "return_token_ids": True}
    choice = _post(server, body).json()["choices"][0]
    tokens = choice["token_ids"]
    assert len(tokens) == 3 and choice["finish_reason"] == "length"
    seq = list(PROMPT)
    for t, tok_id in enumerate(tokens):
        row = _log_pi(models, [*seq, 0])[-1]  # the distribution after seq
        assert tok_id == int(np.argmax(row))
        assert choice["logprobs"]["token_logprobs"][t] == pytest.approx(row[tok_id], abs=2e-5)
        seq.append(tok_id)
    assert choice["prompt_token_ids"] == PROMPT
    assert choice["text"] == models[0].decode(tokens)


def test_sampling_is_seeded(server):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 1.0, "seed": 7,
            "ignore_eos": True, "return_token_ids": True}
    a = _post(server, body).json()["choices"][0]["token_ids"]
    b = _post(server, body).json()["choices"][0]["token_ids"]
    assert a == b and len(a) == 4


def _first_tokens(server, **sampling) -> np.ndarray:
    """The first completion token of 256 copies of PROMPT (one draw each)."""
    body = {"prompt": [PROMPT] * 256, "max_tokens": 1, "seed": 3, "ignore_eos": True,
            "return_token_ids": True, **sampling}
    r = _post(server, body)
    assert r.status_code == 200, r.text
    return np.array([c["token_ids"][0] for c in r.json()["choices"]])


@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 0.7},
                                      {"temperature": 1.3, "top_k": 3},
                                      {"temperature": 1.0, "top_p": 0.6}])
def test_samples_follow_pi_star_at_the_requested_temperature_top_k_and_top_p(server, models,
                                                                            sampling):
    """Counts of the first sampled token against the target distribution: pi* after PROMPT
    at the temperature, cut to the top-k or the top-p nucleus (ids outside never drawn; each
    kept id within 4.5 binomial standard deviations)."""
    row = _log_pi(models, [*PROMPT, 0])[-1] / sampling["temperature"]
    probs = np.exp(row - row.max())
    order = np.argsort(-probs, kind="stable")
    keep = np.ones_like(probs, dtype=bool)
    if "top_k" in sampling:
        keep[order[sampling["top_k"]:]] = False
    if "top_p" in sampling:
        sorted_p = probs[order] / probs.sum()
        outside = np.cumsum(sorted_p) - sorted_p > sampling["top_p"]
        keep[order[outside]] = False
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    drawn = _first_tokens(server, **sampling)
    assert keep[drawn].all(), "a token outside the top-k / top-p was drawn"
    n = len(drawn)
    for tid in order[:6]:
        count, p = (drawn == tid).sum(), probs[tid]
        assert abs(count - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1, (tid, count, n * p)


def test_temperature_zero_and_tiny_are_greedy_and_over_two_is_refused(server, models):
    best = int(np.argmax(_log_pi(models, [*PROMPT, 0])[-1]))
    assert (_first_tokens(server, temperature=0) == best).all()
    assert (_first_tokens(server, temperature=1e-45) == best).all()  # raised to 0.01, as vLLM
    r = _post(server, {"prompt": PROMPT, "temperature": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_prompt_logprobs_are_pi_stars_own_top_k_on_a_dpo_top_server(teacher_pair, models):
    """--dpo-top keeps the dpo model's favourites among the store's ids; the protocol's top K
    is still pi*'s own."""
    with ThreadedServer(teacher_app(*teacher_pair, top_k=6, dpo_top=4)) as srv:
        entries = _post(srv, {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 5}
                        ).json()["choices"][0]["prompt_logprobs"]
    log_pi = _log_pi(models, PROMPT)
    for i in range(1, len(PROMPT)):
        top = np.argsort(-log_pi[i - 1], kind="stable")[:5]
        ranked = {int(t): v["rank"] for t, v in entries[i].items()}
        assert [t for t, r in sorted(ranked.items(), key=lambda x: x[1])][:5] == top.tolist()


def test_named_ids_per_prompt_row_as_vllms_prompt_logprob_token_ids(server, models):
    rows = [[4, 9, -1], [30, 31, 32]]
    choice = _post(server, {"prompt": PROMPT, "max_tokens": 1, "prompt_logprob_start": 2,
                            "prompt_logprob_token_ids": rows}).json()["choices"][0]
    got = np.load(io.BytesIO(base64.b64decode(choice["prompt_token_id_logprobs"])))
    assert got.shape == (2, 3) and got.dtype == np.float32
    log_pi = _log_pi(models, PROMPT)
    assert got[0, 2] == -np.inf  # padding
    np.testing.assert_allclose(got[0, :2], log_pi[2, [4, 9]], atol=2e-5)
    np.testing.assert_allclose(got[1], log_pi[3, [30, 31, 32]], atol=2e-5)


def test_alpha_and_beta_per_position_on_request(server, teacher_pair):
    choice = _post(server, {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 1,
                            "prompt_logprobs_alpha": True}).json()["choices"][0]
    scored = httpx.post(server.url + "/v1/score", json={"sequences": [
        {"input_ids": PROMPT, "prompt_len": 1}]}).json()["results"][0]
    assert choice["prompt_logprobs_alpha"][0] is None
    np.testing.assert_allclose(choice["prompt_logprobs_alpha"][1:], scored["alpha"], rtol=1e-6)
    np.testing.assert_allclose(choice["prompt_logprobs_beta"][1:],
                               [0.1 / a for a in scored["alpha"]], rtol=1e-6)


def test_score_extra_ids_in_json_and_arrow(server, models):
    from storage import wire

    ids, p = PROMPT, 3
    named = [[4, 9], [], [30, 31, 32], [1], [2, 3]]
    body = {"sequences": [{"input_ids": ids, "prompt_len": p, "extra_ids": named},
                          {"input_ids": ids[:5], "prompt_len": 2}]}
    as_json = httpx.post(server.url + "/v1/score", json=body).json()["results"]
    arrow = httpx.post(server.url + "/v1/score", json=body,
                       headers={"Accept": wire.ARROW_STREAM_MEDIA_TYPE}).content
    from_arrow = wire.decode_arrow_named(arrow)
    log_pi = _log_pi(models, ids)
    for t, row in enumerate(named):
        want = log_pi[p - 1 + t, row] if row else np.zeros(0)
        got_json = as_json[0]["extra_logprobs"][t]
        assert len(got_json) == 3  # the widest row; shorter ones padded at their end
        np.testing.assert_allclose(got_json[:len(row)], want, atol=2e-5)
        assert all(v is None for v in got_json[len(row):])
        np.testing.assert_allclose(from_arrow[0][t, :len(row)], want, atol=2e-5)
        assert np.isneginf(from_arrow[0][t, len(row):]).all()  # padding
    assert from_arrow[1].shape == (3, 0) and as_json[1]["extra_logprobs"] == [[], [], []]
    assert len(wire.decode_arrow(arrow)) == 2  # the records decode as before


@pytest.mark.parametrize("body,status,param", [
    ({"model": "gpt-4", "prompt": [1, 2]}, 404, "model"),
    ({"prompt": [1, 2], "prompt_logprobs": 9}, 400, "prompt_logprobs"),
    ({"prompt": [1, 2], "prompt_logprobs": -2}, 400, "prompt_logprobs"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [1, 10 ** 6]}, 400, "prompt"),
    ({"prompt": list(range(5, 55))}, 400, "prompt"),   # over --max-seq-len 48
    ({"prompt": list(range(5, 53))}, 400, "max_tokens"),  # no room for one token
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": [1, 2], "n": 2}, 400, "n"),
    ({"prompt": [1, 2], "stream": True}, 400, "stream"),
    ({"prompt": [1, 2], "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"prompt": [1, 2], "stop": ["x"]}, 400, "stop"),
    ({"prompt": [1, 2], "no_such_field": 1}, 400, "no_such_field"),
    ({"prompt": [5, 6, 7], "prompt_logprob_token_ids": [[1], [10 ** 6]]}, 400,
     "prompt_logprob_token_ids"),
    ({"prompt": [5, 6, 7], "prompt_logprob_token_ids": [[2 ** 70]]}, 400,
     "prompt_logprob_token_ids"),
])
def test_bad_requests_get_4xx_in_vllms_error_shape(server, body, status, param):
    r = _post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert err["param"] == param and err["type"] in ("BadRequestError", "NotFoundError")


def test_score_extra_ids_outside_the_vocabulary_get_422(server):
    for bad in (10 ** 6, 2 ** 70, -1):
        r = httpx.post(server.url + "/v1/score", json={"sequences": [
            {"input_ids": PROMPT, "prompt_len": 6, "extra_ids": [[1], [bad]]}]})
        assert r.status_code == 422 and "extra_ids" in r.json()["error"]["message"], r.text


def test_each_prompts_completion_is_cut_to_its_own_room(server):
    """max_seq_len 48: a 46-token prompt gets 2 tokens, a 3-token one the 16 it asked for."""
    r = _post(server, {"prompt": [list(range(5, 51)), [5, 6, 7]], "max_tokens": 16,
                       "ignore_eos": True, "return_token_ids": True})
    assert [len(c["token_ids"]) for c in r.json()["choices"]] == [2, 16]


def test_fields_that_cannot_change_the_scores_are_accepted(server):
    r = _post(server, {"prompt": [1, 2, 3], "max_tokens": 1, "user": "me", "request_id": "x",
                       "frequency_penalty": 0.0, "stop": [], "priority": 0})
    assert r.status_code == 200, r.text


def test_models_health_and_info_describe_the_endpoints(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "aligndistil-pi-star"
    assert models["data"][0]["max_model_len"] == 48
    assert httpx.get(server.url + "/health").status_code == 200
    info = httpx.get(server.url + "/v1/info").json()
    assert info["served_model_name"] == "aligndistil-pi-star" and info["max_logprobs"] == TOP_K
    doc = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/models", "/health"} <= set(doc["paths"])


def test_the_openai_client_reads_prompt_logprobs(server, models):
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    out = client.completions.create(model="aligndistil-pi-star", prompt=PROMPT, max_tokens=1,
                                    extra_body={"prompt_logprobs": 2})
    entries = out.choices[0].model_extra["prompt_logprobs"]
    log_pi = _log_pi(models, PROMPT)
    assert entries[0] is None and len(entries) == len(PROMPT)
    for i in range(1, len(PROMPT)):
        assert entries[i][str(PROMPT[i])]["logprob"] == pytest.approx(log_pi[i - 1, PROMPT[i]],
                                                                      abs=2e-5)
    assert out.usage.prompt_tokens == len(PROMPT)


def test_trls_vllm_client_gets_pi_stars_sequence_logprobs(server, models, monkeypatch):
    """TRL's own client, as ServerDistillationTrainer calls it: top-K ids and log-probs and the
    actual tokens' log-probs of the completion region equal the float64 reference."""
    from trl.generation import vllm_client
    # VLLMClient refuses to start unless vLLM is importable, though it only speaks HTTP
    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *a, **k: True)
    client = vllm_client.VLLMClient(base_url=server.url, connection_timeout=30)
    assert client.model == "aligndistil-pi-star"
    sequences, prompt_lengths = [PROMPT, PROMPT[:6]], [3, 2]
    out = client.get_sequence_logprobs(sequences, prompt_lengths, top_logprobs=4)
    for b, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        log_pi = _log_pi(models, seq)
        assert len(out["logprobs"][b]) == len(seq) - p  # the completion region only
        for j, pos in enumerate(range(p, len(seq))):
            row = log_pi[pos - 1]
            top = np.argsort(-row, kind="stable")[:4]
            assert out["logprob_token_ids"][b][j] == top.tolist()
            np.testing.assert_allclose(out["logprobs"][b][j], row[top], atol=2e-5)
            assert out["actual_token_ids"][b][j] == [seq[pos]]
            # vLLM (and so this server) always includes the actual token, in the top K or not
            assert out["actual_logprobs"][b][j][0] == pytest.approx(row[seq[pos]], abs=2e-5)


def test_aligndistils_client_scores_the_ids_it_names(server, models):
    from storage.tokenization import tokenizer_sha256
    from student_trainer.client import TeacherClient

    tok = models[0]
    named = [[4, 9], [30], [], [7, 8, 9], [2], [3, 4]]
    with TeacherClient(server.url) as client:
        client.check_compatible(tokenizer_sha256=tokenizer_sha256(tok), vocab_size=len(tok))
        (record, extra), = client.score_named([(PROMPT, 2, named)])
        plain = client.score([(PROMPT, 2)])[0]
    assert record.equals(plain)
    log_pi = _log_pi(models, PROMPT)
    for t, row in enumerate(named):
        np.testing.assert_allclose(extra[t, :len(row)], log_pi[1 + t, row], atol=2e-5)


def test_named_rows_beyond_the_prompt_are_refused(server):
    r = _post(server, {"prompt": [[5, 6, 7], [8]], "max_tokens": 1,
                       "prompt_logprob_token_ids": [[1], [2]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprob_token_ids"
    assert "but the prompt has 0 scored rows" in r.json()["error"]["message"]
