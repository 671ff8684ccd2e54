"""``eval``'s ``kl_to_teacher``: KL(model || pi*) at every sampled position against the teacher's
records, with the uniform tail — the exact full-vocabulary KL when the records carry all V
entries (k = V), checked against the dense teacher computed independently from the two models'
logits."""

from __future__ import annotations

import random

import pytest
import torch

from causal_lm.loading import load_model_and_tokenizer
from student_trainer.losses import exact_reverse_kl
from student_trainer.recipes.evaluate import response_logprobs
from student_trainer.sampling import Sample
from teacher_service.engine import ScoreRequest, TeacherEngine
from teacher_service.models import load_teacher_pair
from teacher_service.targets import TargetConfig, teacher_logprobs


@pytest.fixture(scope="module")
def setup(teacher_pair):
    pair = load_teacher_pair(*teacher_pair, device="cpu")
    student, tokenizer = load_model_and_tokenizer(teacher_pair[0], device=torch.device("cpu"))
    V, rng = len(tokenizer), random.Random(0)
    samples = [Sample(i, "p", [rng.randrange(V) for _ in range(rng.randint(2, 5))],
                      [rng.randrange(V) for _ in range(rng.randint(1, 6))], "")
               for i in range(7)]
    # a student that is not the dpo teacher: perturbed weights
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return pair, student, samples, V


def dense_kl(pair, student, samples, V) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            rows = slice(len(s.prompt_ids) - 1, ids.shape[1] - 1)
            z_dpo = pair.dpo(ids).logits[0, rows, :V].float()
            z_rev = pair.other(ids).logits[0, rows, :V].float()
            log_star, _ = teacher_logprobs(z_dpo, z_rev, TargetConfig(top_k=V, r=20.0))
            out.append(exact_reverse_kl(student(ids).logits[0, rows, :V].float(), log_star))
    return out


def test_kl_to_teacher_is_exact_at_k_equal_to_v_and_approximate_below(setup):
    pair, student, samples, V = setup
    requests = [ScoreRequest(s.prompt_ids + s.response_ids, len(s.prompt_ids)) for s in samples]
    want = dense_kl(pair, student, samples, V)
    exact = TeacherEngine(pair, TargetConfig(top_k=V, r=20.0)).score(requests)
    _, got = response_logprobs(student, samples, 0, 3, V, exact)
    assert [len(g) for g in got] == [len(s.response_ids) for s in samples]
    for g, w in zip(got, want):
        # the records hold log pi* in float16: the KL agrees to that precision
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)
    assert min(float(w.min()) for w in want) > 0
    sparse = TeacherEngine(pair, TargetConfig(top_k=4, r=20.0)).score(requests)
    _, approx = response_logprobs(student, samples, 0, 3, V, sparse)
    diff = max(float((a - w).abs().max()) for a, w in zip(approx, want))
    assert diff > 1e-3, "k = 4 of a broad teacher cannot be exact: the test would notice"
    logprobs, none = response_logprobs(student, samples, 0, 3, V)
    assert none == [] and len(logprobs) == len(samples)
