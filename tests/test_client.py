"""The teacher HTTP client against the real teacher app on loopback (uvicorn, real sockets)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from live_server import free_port
from tiny_models import build_tokenizer
from trainer_support import FailureInjector, ThreadedServer, random_sequences, teacher_app
from storage.tokenization import tokenizer_sha256
from student_trainer.client import (
    RetryPolicy, TeacherClient, TeacherMismatch, TeacherRequestError, TeacherUnavailable)


@pytest.fixture(scope="module")
def pair_dirs(teacher_pair):
    return teacher_pair


@pytest.fixture(scope="module")
def injector():
    return FailureInjector([])


@pytest.fixture(scope="module")
def server(pair_dirs, injector):
    with ThreadedServer(teacher_app(*pair_dirs, top_k=8, middleware=injector)) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(pair_dirs):
    from teacher_service.engine import TeacherEngine
    from teacher_service.models import load_teacher_pair
    from teacher_service.targets import TargetConfig

    return TeacherEngine(load_teacher_pair(*pair_dirs, device="cpu"), TargetConfig(top_k=8))


def _client(server, sleeps=None, **kw):
    return TeacherClient(server.url if hasattr(server, "url") else server,
                         sleep=(sleeps.append if sleeps is not None else lambda s: None),
                         seed=0, **kw)


def test_score_over_arrow_matches_the_engine(server, engine):
    from teacher_service.engine import ScoreRequest

    tok = build_tokenizer()
    seqs = random_sequences(len(tok), 7, seed=3)
    # max_request_sequences=3 forces three requests; the order must survive the split.
    with _client(server, max_request_sequences=3) as client:
        got = client.score(seqs)
        truncated = client.score(seqs[:2], top_k=4)
    want = engine.score([ScoreRequest(ids, p) for ids, p in seqs])
    assert len(got) == 7
    for g, w in zip(got, want):  # the server batches differently: equal up to float noise
        assert g.input_ids.tolist() == w.input_ids.tolist() and g.prompt_len == w.prompt_len
        assert g.topk_logprobs.dtype == np.float16 and g.topk_ids.shape == w.topk_ids.shape
        for name in ("alpha", "tail_logmass", "dpo_logprobs", "reverse_logprobs"):
            np.testing.assert_allclose(getattr(g, name), getattr(w, name), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g.topk_logprobs.astype(np.float32),
                                   w.topk_logprobs.astype(np.float32), atol=2e-3)
    assert [r.top_k for r in truncated] == [4, 4]


def test_check_compatible_accepts_the_same_tokenizer_and_refuses_another(server):
    same, other = build_tokenizer(), build_tokenizer(extra_words=3)
    with _client(server) as client:
        info = client.check_compatible(tokenizer_sha256=tokenizer_sha256(same),
                                       vocab_size=len(same))
        assert info["top_k"] == 8
        with pytest.raises(TeacherMismatch, match="different tokenizer"):
            client.check_compatible(tokenizer_sha256=tokenizer_sha256(other),
                                    vocab_size=len(other))


def test_retries_injected_429_and_503_honouring_retry_after(server, injector):
    injector.plan[:] = [(429, 3), (503, 1), (503, None)]
    injector.seen = 0
    sleeps: list[float] = []
    seqs = random_sequences(len(build_tokenizer()), 2, seed=4)
    with _client(server, sleeps, retry=RetryPolicy(max_retries=5, base_delay=0.01)) as client:
        records = client.score(seqs)
        assert client.retries_done == 3
    assert len(records) == 2 and injector.seen == 4
    assert sleeps[0] >= 3 and sleeps[1] >= 1  # Retry-After is a floor on the wait
    assert sleeps[2] <= 0.04                   # no header: jittered backoff, base * 2**2


def test_stops_with_teacher_unavailable_after_repeated_503(server, injector):
    injector.plan[:] = [(503, 0)] * 10
    injector.seen = 0
    sleeps: list[float] = []
    with _client(server, sleeps, retry=RetryPolicy(max_retries=3, base_delay=0.01)) as client:
        with pytest.raises(TeacherUnavailable, match=r"failed 4 times; last error: 503"):
            client.score(random_sequences(len(build_tokenizer()), 1, seed=5))
    assert injector.seen == 4 and len(sleeps) == 3
    injector.plan.clear()


def test_client_errors_are_not_retried(server, injector):
    injector.seen = 0
    with _client(server) as client:
        with pytest.raises(TeacherRequestError) as err:
            client.score([([10, 11, 12], 3)])  # prompt_len == len: no response
    assert err.value.status == 422 and "prompt_len" in err.value.server_message
    assert injector.seen == 1


def test_connection_refused_is_retried_then_reported():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sleeps: list[float] = []
    with _client(url, sleeps, retry=RetryPolicy(max_retries=2, base_delay=0.01),
                 connect_timeout=2.0) as client:
        with pytest.raises(TeacherUnavailable, match="ConnectError"):
            client.info()
    assert len(sleeps) == 2


def test_backoff_is_exponential_jittered_and_capped():
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0)
    rng = random.Random(0)
    for attempt in range(6):
        bound = min(5.0, 2.0 ** attempt)
        waits = [policy.delay(attempt, None, rng) for _ in range(200)]
        assert 0 <= min(waits) and max(waits) <= bound
        assert max(waits) > 0.7 * bound  # jitter spans the range
    assert policy.delay(0, 100.0, rng) == 5.0  # Retry-After is capped too
