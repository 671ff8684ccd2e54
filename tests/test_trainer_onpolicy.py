"""On-policy AlignDistil against a live ``aligndistil serve`` process on loopback (real HTTP,
real uvicorn, Arrow IPC), sampling from the student with Hugging Face generate."""

from __future__ import annotations

import json
import math
import re

import httpx
import pytest
import torch

from aligndistil.cli import main
from live_server import start_server, stop_server
from tiny_models import save_model_dir, save_teacher_pair
from trainer_support import ON_POLICY_PROMPTS, on_policy_world
from student_trainer.sources.on_policy import OnPolicySource
from student_trainer.metrics import read_jsonl
from student_trainer.modeling import load_student
from student_trainer.prompts import load_prompts
from student_trainer.rollout.hf_generate import RolloutConfig, generate_responses

STEPS = 3
PROMPTS = ON_POLICY_PROMPTS


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_pair):
    with on_policy_world(tmp_path_factory.mktemp("onpolicy"), teacher_pair) as w:
        yield w


def _args(world, out, *extra):
    return ["train", "--mode", "on-policy", "--teacher-url", world["url"], "--prompts",
            str(world["prompts"]), "--model", str(world["student"]), "--out", str(out),
            "--global-batch-size", "4", "--epochs", "2", "--max-steps", str(STEPS), "--max-new-tokens", "6",
            "--lr", "3e-3", "--save-every", "0", "--no-progress", "--report-to", "none",
            "--device", "cpu", "--log-level", "warning", *extra]


def _score_requests(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(r'aligndistil_requests_total\{path="/v1/score",status="200"\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def _expected_first_step_response_tokens(world) -> int:
    """Replay step 0's rollouts with the initial student and the trainer's seeding."""
    model, tok = load_student(world["student"], device=torch.device("cpu"))
    prompts = load_prompts(world["prompts"], tok, max_prompt_len=63)
    source = OnPolicySource(prompts, model=model, rollouts=None, scorer=None, seed=42)
    _, first, _, _ = source.prompts_for(0, 4)
    seqs = generate_responses(model, first, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id,
                              config=RolloutConfig(max_new_tokens=6), seed=42 * 1_000_003,
                              max_seq_len=64)
    return sum(len(ids) - p for ids, p in seqs)


def test_on_policy_loop_against_a_live_server(world):
    before = _score_requests(world["url"])
    out = world["root"] / "sync"
    assert main(_args(world, out)) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["sequences"] == 4 and r["rollout_s"] > 0 and r["score_s"] > 0
        assert r["loss"] > 0 and r["kl"] > 0 and r["alpha_mean"] > 0
    assert _score_requests(world["url"]) - before == STEPS  # one Arrow request per step
    # Step 1 trained on the initial student's own samples, seeded as documented.
    assert rows[0]["response_tokens"] == _expected_first_step_response_tokens(world)
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "training_curves.png").is_file()
    world["sync_rows"] = rows


def _sync_rows(world) -> list[dict]:
    """The plain on-policy run's metrics (run here when that test was not)."""
    if "sync_rows" not in world:
        out = world["root"] / "sync"
        if not (out / "final").is_dir():
            assert main(_args(world, out, "--overwrite")) == 0
        world["sync_rows"] = read_jsonl(out / "metrics.jsonl")
    return world["sync_rows"]


def test_async_rollouts_overlap_with_one_step_of_staleness(world):
    out = world["root"] / "async"
    assert main(_args(world, out, "--async-rollouts")) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    sync_rows = _sync_rows(world)
    # Step 1 samples from the initial weights in both modes, with the same seed.
    assert rows[0]["response_tokens"] == sync_rows[0]["response_tokens"]
    assert rows[0]["loss"] == pytest.approx(sync_rows[0]["loss"], rel=1e-5)
    assert (out / "final" / "model.safetensors").is_file()


def test_reinforce_baselines_train_on_the_same_samples_and_rewards(world):
    """Figure 2's baselines run the same loop: step 1 samples the same responses from the
    initial student, so the logged contrastive reward per token is AlignDistil's step 1's."""
    sync_rows = _sync_rows(world)
    for objective in ("reinforce-sentence", "reinforce-token"):
        out = world["root"] / objective
        assert main(_args(world, out, "--objective", objective, "--top-k", "1")) == 0
        rows = read_jsonl(out / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert rows[0]["response_tokens"] == sync_rows[0]["response_tokens"]
        assert rows[0]["reward_token_mean"] == pytest.approx(sync_rows[0]["reward_token_mean"],
                                                             rel=1e-5)
        assert rows[0]["loss"] != pytest.approx(sync_rows[0]["loss"])
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in rows)
        assert (out / "final" / "model.safetensors").is_file()


def test_a_server_with_another_tokenizer_is_refused_before_the_first_step(world, tmp_path,
                                                                           capsys):
    other = save_model_dir(tmp_path / "other", extra_words=2)
    args = _args(world, tmp_path / "run")
    args[args.index("--model") + 1] = str(other)
    assert main(args) == 2
    assert "different tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_teacher_that_stays_down_stops_the_run_with_a_resumable_checkpoint(tmp_path, capsys):
    """Two steps succeed, then the server answers 503 for good: the run stops with a clear
    error after --max-retries, keeping the two finished steps as a checkpoint."""
    from trainer_support import FailureInjector, ThreadedServer, teacher_app

    dpo_dir, rev_dir = save_teacher_pair(tmp_path / "pair")
    student = save_model_dir(tmp_path / "student", seed=7)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    injector = FailureInjector([(503, 0)] * 100, after=2)
    out = tmp_path / "run"
    with ThreadedServer(teacher_app(dpo_dir, rev_dir, middleware=injector)) as server:
        world = {"url": server.url, "prompts": prompts, "student": student}
        args = _args(world, out, "--max-retries", "1")
        args[args.index("--max-steps") + 1] = "4"
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "unavailable" in err and "failed 2 times" in err and "503" in err
    assert injector.seen == 4  # two good requests, then one try + one retry
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    state = torch.load(out / "checkpoint-00000002" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    assert not (out / "final").exists()


def test_long_prompts_are_cut_and_counted_and_unfinished_responses_are_counted(world, tmp_path,
                                                                               capsys):
    """Prompts past --max-prompt-len keep their last tokens (counted, reported); responses
    that hit --max-new-tokens before an EOS are counted in every step's metrics."""
    from student_trainer.prompts import load_prompts

    _, tok = load_student(world["student"], device=torch.device("cpu"))
    lengths = [len(p) for p in load_prompts(world["prompts"], tok)]
    limit = sorted(lengths)[len(lengths) // 2]
    longer = sum(n > limit for n in lengths)
    assert 0 < longer < len(lengths)
    out = tmp_path / "cut"
    args = _args(world, out, "--max-prompt-len", str(limit))
    args[args.index("--max-steps") + 1] = "2"
    args[args.index("--max-new-tokens") + 1] = "2"
    assert main(args) == 0
    assert f"{longer} prompts cut to --max-prompt-len" in capsys.readouterr().out
    rows = read_jsonl(out / "metrics.jsonl")
    for r in rows:
        # 2 new tokens: most of the 4 responses end without an EOS, all are counted.
        assert 0 <= r["responses_without_eos"] <= r["sequences"]
        assert r["response_tokens"] <= 2 * r["sequences"]
    assert sum(r["responses_without_eos"] for r in rows) > 0


def test_resume_against_a_server_with_other_settings_is_refused(world, tmp_path, capsys):
    """The run records the server's /v1/info; --resume against teachers or target settings
    that changed since (here r) would change the loss mid-run, so it is refused."""
    out = tmp_path / "run"
    args = _args(world, out, "--save-every", "1")  # the later --save-every wins
    args[args.index("--max-steps") + 1] = "2"
    assert main(args) == 0
    info = json.loads((out / "teacher_info.json").read_text())
    assert info["r"] == 30.0 and info["top_k"] == 8
    proc, url = start_server(*world["pair"], "--top-k", "8", "--max-seq-len", "64", "--r", "10",
                             log_path=tmp_path / "other.log")
    try:
        resumed = list(args)
        resumed[resumed.index("--teacher-url") + 1] = url
        capsys.readouterr()
        assert main([*resumed, "--resume"]) == 2
        err = capsys.readouterr().err
        assert "the teacher server changed since this run started" in err
        assert "r: 30.0 vs 10.0" in err
    finally:
        stop_server(proc)


def _torchrun(args: list[str]) -> None:
    import os
    import subprocess
    import sys

    from live_server import REPO, free_port

    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         "-m", "aligndistil.cli", *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("objective,sampling", [("aligndistil", "per-layer"),
                                                ("aligndistil", "gathered"),
                                                ("reinforce-token", "per-layer")])
def test_fsdp_on_policy_samples_and_learns_what_ddp_does(world, objective, sampling):
    """--strategy fsdp on-policy, 2 ranks: generate runs on the sharded student (per-layer: the
    root's embeddings and head gathered around it, each layer gathered in each forward, every
    rank stepping until all are done; gathered: every unit gathered once for the call), so each
    rank samples what the DDP rank with the same seed samples; the losses and final weights
    are DDP's. The policy-gradient objective's extra no-gradient pass keeps the ranks in step."""
    from safetensors.torch import load_file

    def run(name: str, *extra: str):
        out = world["root"] / name
        if not (out / "final").is_dir():  # the DDP run is shared by both samplings
            _torchrun(_args(world, out, "--objective", objective, "--top-k", "8",
                            "--max-new-tokens", "10", *extra))
        return read_jsonl(out / "metrics.jsonl"), load_file(out / "final" / "model.safetensors")

    ddp_rows, ddp_w = run(f"ddp-{objective}", "--strategy", "ddp")
    fsdp_rows, fsdp_w = run(f"fsdp-{objective}-{sampling}", "--strategy", "fsdp",
                            "--fsdp-sampling", sampling)
    assert [r["step"] for r in fsdp_rows] == [1, 2, 3]
    # counted over both ranks (each rank samples 2 of a step's 4): above 2 only when summed
    assert max(r["responses_without_eos"] for r in ddp_rows) > 2
    for a, b in zip(fsdp_rows, ddp_rows):
        assert a["sequences"] == b["sequences"] == 4
        assert a["response_tokens"] == b["response_tokens"]  # the same samples
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    initial = load_file(world["student"] / "model.safetensors")
    assert any(not torch.equal(ddp_w[name], initial[name]) for name in ddp_w)
    for name in ddp_w:
        assert torch.allclose(fsdp_w[name], ddp_w[name], atol=1e-5, rtol=1e-4), name


def test_fsdp_per_layer_sampling_with_unequal_blocks_keeps_the_ranks_in_step(world):
    """3 prompts a step on 2 ranks, one prompt per generate call: rank 0 samples 1 prompt and
    rank 1 samples 2, yet every rank must run as many (collective) generate calls; the run
    completes and samples and learns what DDP does."""
    from safetensors.torch import load_file

    rows, weights = {}, {}
    for strategy in ("ddp", "fsdp"):
        out = world["root"] / f"unequal-{strategy}"
        _torchrun(_args(world, out, "--strategy", strategy, "--top-k", "8", "--global-batch-size",
                        "3", "--rollout-batch-size", "1", "--max-steps", "2"))
        rows[strategy] = read_jsonl(out / "metrics.jsonl")
        weights[strategy] = load_file(out / "final" / "model.safetensors")
    assert [r["sequences"] for r in rows["fsdp"]] == [3, 3]
    for a, b in zip(rows["fsdp"], rows["ddp"]):
        assert a["response_tokens"] == b["response_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    for name in weights["ddp"]:
        assert torch.allclose(weights["fsdp"][name], weights["ddp"][name], atol=1e-5,
                              rtol=1e-4), name
