"""``--rollout-backend vllm``: vLLM samples from the student's distribution, follows the weights
``sync_weights`` gives it (never a stale prefix cache), and drives a real on-policy run.

Opt-in (engine start-up takes up to a minute on a CPU): ``pytest -m vllm
tests/test_rollout_vllm.py`` in an environment with the ``vllm`` extra (see pyproject.toml). One
engine serves the whole module; the training runs are separate processes, as a user runs them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from live_server import REPO, start_server, stop_server
from tiny_models import save_model_dir, save_teacher_pair
from student_trainer.rollout.hf_generate import RolloutConfig

pytestmark = pytest.mark.vllm

#: vLLM's CPU backend in a small, shared machine: no thread pinning, 1 GiB of KV cache.
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
PROMPTS = ["sort 3 1 2", "copy 5 6", "reverse the list 7 8 9", "hello how are you ?",
           "what is 4 and 5 ?", "sort 9 8", "copy the numbers 1 2 3", "answer yes or no"]
#: float32 in both: the same weights give log-probs equal to ~1e-5 (kernel rounding); a wrong
#: weight, position or stale KV block moves them by > 1e-2 (checked by the controls below).
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        for key, value in CPU_ENV.items():
            os.environ.setdefault(key, value)
    from student_trainer.modeling import load_student
    from student_trainer.rollout.vllm_engine import VLLMRollouts

    root = tmp_path_factory.mktemp("vllm")
    student_dir = save_model_dir(root / "student", seed=7)
    model, tokenizer = load_student(student_dir, device=torch.device("cpu"))
    model.eval()
    engine = VLLMRollouts(student_dir, tokenizer, RolloutConfig(max_new_tokens=8))
    try:
        yield {"root": root, "student": student_dir, "model": model, "tokenizer": tokenizer,
               "engine": engine}
    finally:
        engine.close()


def _prompt_ids(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _hf_logprobs(model, sequences) -> list[list[float]]:
    """The model's log-probability of each response token, teacher-forced."""
    out = []
    with torch.no_grad():
        for ids, prompt_len in sequences:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            out.append([logp[j - 1, ids[j]].item() for j in range(prompt_len, len(ids))])
    return out


def _max_diff(a, b) -> float:
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson goodness of fit, bins with an expected count < 5 pooled; the p-value by the
    Wilson-Hilferty approximation of the chi-square tail (good to ~1e-3 relative here)."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


# ---------------------------------------------------------------------------- sampling
def test_samples_are_well_formed_seeded_and_leave_the_global_rng_alone(world):
    engine, tok = world["engine"], world["tokenizer"]
    prompts = _prompt_ids(tok, PROMPTS)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = engine.generate(prompts, seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # the trainer's RNG stream is untouched
    assert engine.generate(prompts, seed=5) == first
    assert engine.generate(prompts, seed=6) != first
    eos = tok.eos_token_id
    for (ids, prompt_len), prompt in zip(first, prompts):
        assert prompt_len == len(prompt) and ids[:prompt_len] == prompt
        response = ids[prompt_len:]
        assert 1 <= len(response) <= 8
        assert eos not in response[:-1]
        assert len(response) == 8 or response[-1] == eos  # stops at EOS, which is kept
    # generate_with_logprobs makes the same draws as generate
    with_lp = engine.generate_with_logprobs(prompts, seed=5)
    assert [(ids, n) for ids, n, _ in with_lp] == first


def test_vllm_logprobs_equal_the_students(world):
    engine, model, tok = world["engine"], world["model"], world["tokenizer"]
    samples = engine.generate_with_logprobs(_prompt_ids(tok, PROMPTS * 2), seed=17)
    vllm_lp = [lp for _, _, lp in samples]
    hf_lp = _hf_logprobs(model, [(ids, n) for ids, n, _ in samples])
    assert sum(map(len, vllm_lp)) >= 16 * 4
    assert _max_diff(vllm_lp, hf_lp) < LOGPROB_TOL


def test_the_rollouts_top_ids_are_the_students_own_candidates(world):
    """--student-top's candidates from vLLM's logprobs: the same draws as ``generate``, and at
    every response position the student's n likeliest ids (HF, teacher-forced), in order."""
    engine, model, tok = world["engine"], world["model"], world["tokenizer"]
    prompts = _prompt_ids(tok, PROMPTS)
    sequences, top = engine.generate_with_top_ids(prompts, seed=5, n=4)
    assert sequences == engine.generate(prompts, seed=5)
    with torch.no_grad():
        for (ids, p), ranked in zip(sequences, top):
            logits = model(torch.tensor([ids])).logits[0, p - 1:len(ids) - 1].float()
            assert ranked.shape == (len(ids) - p, 4)
            expected = torch.topk(logits, 4, dim=-1)
            for t in range(len(ids) - p):
                # equal, except where two logits tie within kernel rounding
                got = logits[t, torch.from_numpy(ranked[t])]
                assert torch.allclose(got, expected.values[t], atol=1e-4), (t, ranked[t])


def test_first_tokens_follow_the_students_next_token_distribution(world):
    """4,000 first response tokens for one prompt against the student's softmax at the prompt's
    last position, EOS included (a response may be just an EOS: sampling follows the student's
    own distribution, docs/training.md, "Sampling"). A correct sampler passes
    the chi-square test at p > 1e-3 (a fixed seed makes the outcome deterministic); the same
    samples are also checked against another model's distribution, which must be rejected, so
    the test has the power to see a wrong distribution."""
    engine, model, tok = world["engine"], world["model"], world["tokenizer"]
    prompt = _prompt_ids(tok, ["sort 3 1 2"])[0]
    n = 4000
    saved = engine.config
    engine.config = dataclasses.replace(saved, max_new_tokens=1)
    try:
        samples = engine.generate([prompt] * n, seed=2024)
    finally:
        engine.config = saved
    first = np.array([ids[len(prompt)] for ids, _ in samples])
    vocab = model.config.vocab_size
    counts = np.bincount(first, minlength=vocab).astype(float)

    def next_token_probs(m) -> np.ndarray:
        with torch.no_grad():
            logits = m(torch.tensor([prompt])).logits[0, -1].double()
        return torch.softmax(logits, -1).numpy()

    probs = next_token_probs(model)
    tvd = 0.5 * np.abs(counts / n - probs).sum()
    # E[TVD] of n draws from the right distribution: ~ sum_i sqrt(p_i (1 - p_i) / (2 pi n)).
    expected_tvd = float(np.sqrt(probs * (1 - probs) / (2 * math.pi * n)).sum())
    assert tvd < 1.5 * expected_tvd, (tvd, expected_tvd)
    assert _chi_square_p(counts, probs) > 1e-3

    other = save_model_dir(world["root"] / "other", seed=8)
    from transformers import AutoModelForCausalLM

    wrong = next_token_probs(AutoModelForCausalLM.from_pretrained(other).eval())
    assert _chi_square_p(counts, wrong) < 1e-6


# ---------------------------------------------------------------------------- weight sync
class _Wrapped(torch.nn.Module):
    """Parameter names as a DDP wrapper has them (``module.`` + the model's)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_sync_weights_switches_the_policy_and_never_reuses_stale_kv(world, monkeypatch):
    engine, model, tok = world["engine"], world["model"], world["tokenizer"]
    perturbed = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            scale = p.std() if p.numel() > 1 and p.std() > 0 else p.abs().mean()
            p.add_(0.3 * scale * torch.randn(p.shape, generator=gen))
    # 150 tokens: longer than a KV block (128 on CPU), so its first block is prefix-cached.
    long_prompt = _prompt_ids(tok, [" ".join(str(i % 97) for i in range(150))])[0]
    prompts = [long_prompt] + _prompt_ids(tok, PROMPTS[:3])

    def check(policy, *, other=None):
        samples = engine.generate_with_logprobs(prompts, seed=11)
        seqs = [(ids, n) for ids, n, _ in samples]
        vllm_lp = [lp for _, _, lp in samples]
        diff = _max_diff(vllm_lp, _hf_logprobs(policy, seqs))
        if other is not None:
            assert _max_diff(vllm_lp, _hf_logprobs(other, seqs)) > 0.1
        return seqs, diff

    engine.sync_weights(model)
    before, diff = check(model)
    assert diff < LOGPROB_TOL

    engine.sync_weights(_Wrapped(perturbed))  # DDP-style names
    after, diff = check(perturbed, other=model)
    assert diff < LOGPROB_TOL  # the new weights, not the old
    assert after != before

    # Control: without the prefix-cache reset, the long prompt's cached block (computed with
    # the perturbed weights) would be reused under the restored weights: the log-probs show it.
    with monkeypatch.context() as m:
        m.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: True)
        engine.sync_weights(model)
        _, stale = check(model)
    assert stale > 1e-2
    engine.llm.reset_prefix_cache()
    _, diff = check(model)
    assert diff < LOGPROB_TOL

    engine.sync_weights(model)  # back to the start: the same seed draws the same samples
    restored, diff = check(model)
    assert diff < LOGPROB_TOL and restored == before


def test_a_missing_vllm_is_a_clear_config_error(monkeypatch):
    from student_trainer.errors import ConfigError
    from student_trainer.rollout.vllm_engine import require_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[vllm\]'"):
        require_vllm()


# ---------------------------------------------------------------------------- training
STEPS = 3


@pytest.fixture(scope="module")
def server(world):
    root = world["root"]
    dpo_dir, rev_dir = save_teacher_pair(root / "pair")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    proc, url = start_server(dpo_dir, rev_dir, "--top-k", "8", "--max-seq-len", "64",
                             log_path=root / "server.log")
    try:
        yield {"url": url, "prompts": prompts}
    finally:
        stop_server(proc)


def _score_requests(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(r'aligndistil_requests_total\{path="/v1/score",status="200"\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def _train(world, server, out, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "aligndistil.cli", "train", "--mode", "on-policy",
           "--rollout-backend", "vllm", "--teacher-url", server["url"],
           "--prompts", str(server["prompts"]), "--model", str(world["student"]),
           "--out", str(out), "--global-batch-size", "4", "--epochs", "2",
           "--max-steps", str(STEPS), "--max-new-tokens", "6", "--lr", "3e-3",
           "--save-every", "0", "--no-progress", "--report-to", "none", "--device", "cpu",
           "--log-level", "warning", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=540,
                          env={**os.environ, **({} if torch.cuda.is_available() else CPU_ENV)})


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_on_policy_training_with_vllm_rollouts(world, server, mode):
    from student_trainer.sources.on_policy import OnPolicySource
    from student_trainer.metrics import read_jsonl
    from student_trainer.prompts import load_prompts

    before = _score_requests(server["url"])
    out = world["root"] / f"run-{mode}"
    proc = _train(world, server, out, *(["--async-rollouts"] if mode == "async" else []))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"done: {STEPS} steps" in proc.stdout
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["sequences"] == 4 and r["rollout_s"] > 0 and r["score_s"] > 0
        assert r["loss"] > 0 and r["kl"] > 0 and math.isfinite(r["loss"])
    assert _score_requests(server["url"]) - before == STEPS
    assert (out / "final" / "model.safetensors").is_file()

    # Step 1 sampled the initial student with vLLM, seeded as documented: replay it.
    engine, model, tok = world["engine"], world["model"], world["tokenizer"]
    engine.sync_weights(model)
    source = OnPolicySource(load_prompts(server["prompts"], tok, max_prompt_len=63),
                            model=model, rollouts=None, scorer=None, seed=42)
    _, first, _, _ = source.prompts_for(0, 4)
    saved = engine.config
    engine.config = dataclasses.replace(saved, max_new_tokens=6)
    try:
        replay = engine.generate(first, seed=42 * 1_000_003)
    finally:
        engine.config = saved
    assert rows[0]["response_tokens"] == sum(len(ids) - n for ids, n in replay)


def test_with_max_staleness_the_engine_samples_from_the_queued_snapshot(world, server):
    """S = 2 through the vLLM engine: a fake training loop gives the student version t + 1
    after step t; each step's samples must be the engine's samples from version max(t - 2, 0)
    with the step's seed (the snapshot it was queued with, synced in the background thread),
    and a control shows another version samples otherwise."""
    from student_trainer.client import TeacherClient
    from student_trainer.prompts import load_prompts
    from student_trainer.sources.on_policy import OnPolicySource
    from trainer_support import set_weight_version

    engine, tok = world["engine"], world["tokenizer"]
    model = copy.deepcopy(world["model"])

    saved = engine.config
    engine.config = dataclasses.replace(saved, max_new_tokens=6)
    source = OnPolicySource(load_prompts(server["prompts"], tok, max_prompt_len=63),
                            model=model, rollouts=engine, scorer=TeacherClient(server["url"]),
                            seed=5, max_staleness=2, eos_ids={tok.eos_token_id})
    try:  # not source.close(): the module's engine outlives this source
        set_weight_version(model, 0)
        seen = []
        for data in source.iterate(0, 5, 2):
            seen.append((data.step, data.staleness, data.rollout.sequences))
            set_weight_version(model, data.step + 1)
        source._pool.shutdown(wait=True)
        reference = copy.deepcopy(world["model"])
        for t, stale, sequences in seen:
            assert stale == min(t, 2)
            set_weight_version(reference, t - stale)
            engine.sync_weights(reference)
            expected = engine.generate(source.prompts_for(t, 2)[1], seed=5 * 1_000_003 + t)
            assert sequences == expected, f"step {t}: not sampled from version {t - stale}"
        # the control: step 3 from another version samples otherwise
        set_weight_version(reference, 3)
        engine.sync_weights(reference)
        assert engine.generate(source.prompts_for(3, 2)[1], seed=5 * 1_000_003 + 3) != seen[3][2]
    finally:
        engine.config = saved
        engine.sync_weights(world["model"])
        source.scorer.close()
