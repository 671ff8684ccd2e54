"""Several teacher servers behind one client, as users deploy them, in process (real uvicorn
servers on loopback in threads; the process-level variants are in test_teacher_servers.py):

- servers on different hosts keep the same teachers at different paths: one pool;
- a server that is down at the start: the pool starts on the others and it joins later;
- no server answering: refused, naming every URL;
- a server taken out by one 429 comes back while the others serve;
- servers with different ``--max-seq-len`` are refused, and one that joins later with another
  limit stays out (the limit a run cuts prompts to must not depend on who was up);
- every server gone: a request gives up after the retry policy, naming each server;
- the prober outlives a server that answers garbage;
- an on-policy ``--resume`` against the same teachers at other paths goes on.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from live_server import free_port
from storage.tokenization import tokenizer_sha256
from student_trainer.client import (RetryPolicy, TeacherClient, TeacherMismatch,
                                    TeacherUnavailable, target_differences)
from tiny_models import build_tokenizer
from trainer_support import FailureInjector, ThreadedServer, random_sequences, teacher_app

FAST = RetryPolicy(max_retries=3, base_delay=0.05, max_delay=0.2)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, teacher_pair):
    """The same teacher pair copied to three "hosts": other folders, same bytes."""
    root = tmp_path_factory.mktemp("hosts")
    out = []
    for host in ("host-a", "host-b", "host-c"):
        pair = []
        for src in teacher_pair:
            dest = root / host / "models" / src.name
            shutil.copytree(src, dest)
            pair.append(dest)
        out.append(tuple(pair))
    return out


@pytest.fixture(scope="module")
def student_tokenizer():
    tok = build_tokenizer()
    return {"tokenizer_sha256": tokenizer_sha256(tok), "vocab_size": len(tok)}


def _client(urls, **kw) -> TeacherClient:
    return TeacherClient(urls, retry=FAST, seed=0, sleep=time.sleep, **kw)


def _until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_the_same_teachers_at_different_paths_are_one_pool(hosts, student_tokenizer):
    counters = [FailureInjector([]), FailureInjector([])]
    with ThreadedServer(teacher_app(*hosts[0], middleware=counters[0])) as a, \
            ThreadedServer(teacher_app(*hosts[1], middleware=counters[1])) as b, \
            _client([a.url, b.url]) as client:
        info = client.check_compatible(**student_tokenizer)
        assert info["models"]["dpo"]["path"] != \
            client._servers[1].info["models"]["dpo"]["path"]  # the paths do differ
        records = client.score(random_sequences(student_tokenizer["vocab_size"], 8, seed=0))
    assert len(records) == 8
    assert all(c.seen > 0 for c in counters), "both servers should take requests"


def test_a_server_down_at_the_start_joins_when_it_comes_up(hosts, student_tokenizer, caplog):
    dead_port = free_port()
    dead_url = f"http://127.0.0.1:{dead_port}"
    late = FailureInjector([])
    sequences = random_sequences(student_tokenizer["vocab_size"], 8, seed=1)
    with ThreadedServer(teacher_app(*hosts[0])) as a, _client([a.url, dead_url]) as client:
        client.check_compatible(**student_tokenizer)
        assert client.live_urls == [a.url]
        assert "starting on 1 of 2 teacher servers" in caplog.text
        assert len(client.score(sequences)) == 8  # the run goes on without it
        with ThreadedServer(teacher_app(*hosts[1], middleware=late), port=dead_port):
            assert _until(lambda: dead_url in client.live_urls), \
                "the server that came up never joined the pool"
            assert len(client.score(sequences)) == 8
            assert late.seen > 0, "the server that joined got no request"


def test_no_server_answering_is_refused_naming_each(student_tokenizer):
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    with _client(urls) as client, pytest.raises(TeacherUnavailable) as err:
        client.check_compatible(**student_tokenizer)
    assert "no teacher server answers" in str(err.value)
    assert all(url in str(err.value) for url in urls)


def test_one_429_does_not_drop_a_server_for_the_rest_of_the_run(hosts, student_tokenizer):
    flaky = FailureInjector([(429, 0)])
    sequences = random_sequences(student_tokenizer["vocab_size"], 8, seed=2)
    with ThreadedServer(teacher_app(*hosts[0], middleware=flaky)) as a, \
            ThreadedServer(teacher_app(*hosts[1])) as b, _client([a.url, b.url]) as client:
        client.check_compatible(**student_tokenizer)
        client.score(sequences)  # A sheds one request: it moves to B, A goes out
        assert client.moved >= 1
        assert _until(lambda: a.url in client.live_urls), "A never came back while B served"
        before = flaky.seen
        client.score(sequences)
        assert flaky.seen > before, "A is back in rotation but got no request"


def test_servers_with_different_max_seq_len_are_refused(hosts, student_tokenizer):
    with ThreadedServer(teacher_app(*hosts[0], max_seq_len=64)) as a, \
            ThreadedServer(teacher_app(*hosts[1], max_seq_len=48)) as b, \
            _client([a.url, b.url]) as client, pytest.raises(TeacherMismatch) as err:
        client.check_compatible(**student_tokenizer)
    assert "max_seq_len: 64 vs 48" in str(err.value)


def test_a_server_that_joins_with_another_limit_stays_out(hosts, student_tokenizer, caplog):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ThreadedServer(teacher_app(*hosts[0], max_seq_len=64)) as a, \
            _client([a.url, url]) as client:
        client.check_compatible(**student_tokenizer)
        with ThreadedServer(teacher_app(*hosts[1], max_seq_len=32), port=port):
            assert _until(lambda: "max_seq_len: 64 vs 32" in caplog.text)
            assert client.live_urls == [a.url]


def test_when_every_server_is_gone_a_request_gives_up_naming_each(hosts, student_tokenizer):
    sequences = random_sequences(student_tokenizer["vocab_size"], 4, seed=5)
    a, b = ThreadedServer(teacher_app(*hosts[0])), ThreadedServer(teacher_app(*hosts[1]))
    with a, b, _client([a.url, b.url]) as client:
        client.check_compatible(**student_tokenizer)
        client.score(sequences)
        a.__exit__()
        b.__exit__()
        started = time.monotonic()
        with pytest.raises(TeacherUnavailable) as err:
            client.score(sequences)
        assert time.monotonic() - started < 30
    assert a.url in str(err.value) and b.url in str(err.value)


def test_the_prober_outlives_a_server_that_answers_garbage(hosts, student_tokenizer):
    """A server whose /v1/info is not an object stays out; the prober keeps running and brings
    a good server back afterwards."""
    from fastapi import FastAPI

    junk = FastAPI()
    junk.get("/readyz")(lambda: {"status": "ready"})
    junk.get("/v1/info")(lambda: [1, 2, 3])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ThreadedServer(teacher_app(*hosts[0])) as a, _client([a.url, url]) as client:
        client.check_compatible(**student_tokenizer)
        with ThreadedServer(junk, port=port):
            assert _until(lambda: "not a JSON object" in client._servers[1].last_problem)
        assert client._prober.is_alive()
        with ThreadedServer(teacher_app(*hosts[1]), port=port):
            assert _until(lambda: url in client.live_urls), "the prober died"


def test_servers_with_other_teachers_are_refused_even_at_the_same_path(tmp_path, hosts,
                                                                       student_tokenizer):
    """The reverse: the comparison is by what the weights are, not where they are."""
    from tiny_models import save_model_dir

    other = save_model_dir(tmp_path / "dpo", seed=99)
    with ThreadedServer(teacher_app(*hosts[0])) as a, \
            ThreadedServer(teacher_app(other, hosts[0][1])) as b, \
            _client([a.url, b.url]) as client, pytest.raises(TeacherMismatch) as err:
        client.check_compatible(**student_tokenizer)
    assert "dpo fingerprint" in str(err.value) and a.url in str(err.value)


def test_target_differences_ignore_paths_and_compare_fingerprints_and_revisions():
    base = {"models": {"dpo": {"path": "/a/dpo", "fingerprint": "f1"},
                       "reverse": {"path": "/a/rev", "fingerprint": "f2",
                                   "revision": "o/rev@c1"}}, "r": 20.0}
    moved = json.loads(json.dumps(base))
    moved["models"]["dpo"]["path"] = "/elsewhere/dpo"
    moved["models"]["reverse"]["path"] = "/home/u/.cache/hub/x"
    assert target_differences(base, moved) == []
    changed = json.loads(json.dumps(moved))
    changed["models"]["reverse"]["revision"] = "o/rev@c2"
    assert target_differences(base, changed) == ["reverse revision: 'o/rev@c1' vs 'o/rev@c2'"]
    changed["models"]["dpo"]["fingerprint"] = "other"
    assert "dpo fingerprint: 'f1' vs 'other'" in target_differences(base, changed)


def test_an_on_policy_resume_against_the_same_teachers_at_other_paths_goes_on(tmp_path):
    from types import SimpleNamespace

    from student_trainer.checkpoint import CheckpointError
    from student_trainer.distributed import DistEnv
    from student_trainer.recipes.train import _check_same_teacher

    def info(path: str, fingerprint: str = "f1") -> dict:
        return {"models": {"dpo": {"path": f"{path}/dpo", "fingerprint": fingerprint},
                           "reverse": {"path": f"{path}/rev", "fingerprint": "f2"}},
                "tokenizer_sha256": "t", "vocab_size": 10, "top_k": 8, "r": 20.0,
                "eps": 1e-3, "tvd_norm": "half-l1", "mode": "adaptive", "beta0": 0.1,
                "beta": 1.0, "dpo_top": 0, "max_seq_len": 64}

    env = DistEnv()
    _check_same_teacher(SimpleNamespace(teacher_info=info("/host-a")), tmp_path,
                        resuming=False, env=env)
    _check_same_teacher(SimpleNamespace(teacher_info=info("/host-b")), tmp_path,
                        resuming=True, env=env)
    with pytest.raises(CheckpointError, match="dpo fingerprint"):
        _check_same_teacher(SimpleNamespace(teacher_info=info("/host-a", "f9")), tmp_path,
                            resuming=True, env=env)
