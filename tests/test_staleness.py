"""``--max-staleness S``: the rollouts and scoring of steps t+1..t+S overlap training of step t,
and step t samples from the weights of step max(t - S, 0), exactly; a checkpoint keeps the
samples in flight, so a resumed run trains what the uninterrupted one does. Against a live
``aligndistil serve`` on loopback, sampling with Hugging Face generate (the vLLM backend runs
the same pipeline: tests/test_rollout_vllm.py, opt-in)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from aligndistil.cli import main
from trainer_support import on_policy_world, set_weight_version
from student_trainer.client import TeacherClient
from student_trainer.metrics import read_jsonl
from student_trainer.modeling import load_student
from student_trainer.prompts import load_prompts
from student_trainer.rollout.hf_generate import HFRollouts, RolloutConfig, generate_responses
from student_trainer.sources.on_policy import OnPolicySource

CONFIG = RolloutConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_pair):
    with on_policy_world(tmp_path_factory.mktemp("staleness"), teacher_pair) as w:
        yield w


@pytest.mark.parametrize("staleness", [0, 2])
def test_step_t_samples_from_the_weights_of_step_t_minus_s(world, staleness):
    """The source drives a fake training loop that sets the weights to version t + 1 after
    step t; each step's samples must equal a fresh sampling from version max(t - S, 0) with the
    step's seed, and the step must report that staleness."""
    model, tok = load_student(world["student"], device=torch.device("cpu"))
    prompts = load_prompts(world["prompts"], tok, max_prompt_len=32)
    rollouts = HFRollouts(CONFIG, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          max_seq_len=64)
    source = OnPolicySource(prompts, model=model, rollouts=rollouts,
                            scorer=TeacherClient(world["url"]), seed=5,
                            max_staleness=staleness, eos_ids={tok.eos_token_id})
    steps, batch = 5, 2
    set_weight_version(model, 0)
    seen = []
    try:
        for data in source.iterate(0, steps, batch):
            seen.append((data.step, data.staleness, data.rollout.sequences,
                         len(data.records)))
            # "train" step t: now the weights after t + 1
            set_weight_version(model, data.step + 1)
    finally:
        source.close()
    reference = load_student(world["student"], device=torch.device("cpu"))[0]
    for t, stale, sequences, records in seen:
        assert stale == min(t, staleness)
        set_weight_version(reference, t - stale)
        _, chosen, _, _ = source.prompts_for(t, batch)
        expected = generate_responses(reference, chosen, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id, config=CONFIG,
                                      seed=5 * 1_000_003 + t, max_seq_len=64)
        assert sequences == expected, f"step {t}: not sampled from version {t - stale}"
        assert records == batch
    # the versions differ enough that the check above can fail (a control)
    set_weight_version(reference, 3)
    other = generate_responses(reference, source.prompts_for(3, batch)[1],
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               config=CONFIG, seed=5 * 1_000_003 + 3, max_seq_len=64)
    assert other != seen[3][2] if staleness else other == seen[3][2]


def _args(world, out, *extra):
    return ["train", "--mode", "on-policy", "--teacher-url", world["url"], "--prompts",
            str(world["prompts"]), "--model", str(world["student"]), "--out", str(out),
            "--global-batch-size", "2", "--epochs", "2", "--max-steps", "6",
            "--max-new-tokens", "6",
            "--lr", "3e-3", "--save-every", "3", "--no-progress", "--report-to", "none",
            "--device", "cpu", "--log-level", "warning", "--save-samples", *extra]


def _samples(out) -> dict[tuple[int, int], list[int]]:
    """(step, index) -> ids, the last line of each winning (after a resume)."""
    found = {}
    for line in (out / "samples" / "rank-0.jsonl").read_text().splitlines():
        row = json.loads(line)
        found[row["step"], row["index"]] = row["ids"]
    return found


def test_resume_with_steps_in_flight_trains_what_the_uninterrupted_run_does(world, tmp_path):
    """S = 2: the checkpoint at step 3 is taken while steps 3 and 4 are sampled (from the
    weights of steps 1 and 2, which a resume no longer has). The resumed run must train on
    those very samples and end with the uninterrupted run's weights. (Before the checkpoint
    kept them, ``--async-rollouts`` resampled them from the resumed weights.)"""
    full = tmp_path / "full"
    assert main(_args(world, full, "--max-staleness", "2")) == 0
    rows = read_jsonl(full / "metrics.jsonl")
    assert [r["staleness"] for r in rows] == [0, 1, 2, 2, 2, 2]
    for r in rows:
        for key in ("rollout_s", "weight_sync_s", "score_s", "train_s", "data_wait_s"):
            assert r[key] >= 0, key
    assert all(r["weight_sync_s"] > 0 for r in rows[2:])  # a snapshot copied per queued step

    # The run as it stood at its checkpoint 3 (its later files gone), then resumed.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "final")
    for name in ("metrics.jsonl", "samples/rank-0.jsonl"):
        lines = (part / name).read_text().splitlines()
        keep = [x for x in lines if json.loads(x)["step"] < (4 if name == "metrics.jsonl"
                                                              else 3)]
        (part / name).write_text("".join(x + "\n" for x in keep))
    assert main(_args(world, part, "--max-staleness", "2", "--resume")) == 0
    assert _samples(part) == _samples(full)
    resumed = [r for r in read_jsonl(part / "metrics.jsonl") if r["step"] > 3]
    assert [r["staleness"] for r in resumed] == [2, 2, 2]
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(part / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_samples_in_flight_split_again_on_another_number_of_ranks():
    """A checkpoint from 2 ranks resumed on 1 to 4: each rank takes its block of the step's
    sequences, in the step's prompt order; a rank with no prompt takes the step's first."""
    prompts = [[i + 1] for i in range(7)]
    batch = 4  # steps 0 (4 prompts) and 1 (3 prompts, the epoch's last)

    def source(rank=0, world=1):
        return OnPolicySource(prompts, model=None, rollouts=None, scorer=None, seed=0,
                              rank=rank, world_size=world)

    saved = [{}, {}]
    for r in range(2):
        for step in (0, 1):
            _, mine, _, filler = source(r, 2).prompts_for(step, batch)
            saved[r][step] = {"sequences": [[p + [9], 1] for p in mine], "candidates": None,
                              "filler": filler, "staleness": 1}
    for world in (1, 2, 3, 4):
        for r in range(world):
            src = source(r, world)
            src.restore_in_flight(saved, batch)
            for step in (0, 1):
                _, mine, _, filler = src.prompts_for(step, batch)
                # a filler too (its step's first prompt, weight 0): under FSDP a rank that
                # sampled instead would gather weights for a snapshot the others never join
                got = [ids for ids, _ in src._restored[step].sequences]
                assert got == [p + [9] for p in mine], (world, r, step)
                assert src._restored[step].filler == filler
    assert any(source(r, 4).prompts_for(1, batch)[3] for r in range(4))  # 4 ranks: a filler


def test_staleness_flags_are_checked(world, tmp_path, capsys):
    assert main(_args(world, tmp_path / "a", "--async-rollouts", "--max-staleness", "2")) == 2
    assert "contradicts --max-staleness 2" in capsys.readouterr().err
    assert main(_args(world, tmp_path / "b", "--max-staleness", "-1")) == 2
    assert main(_args(world, tmp_path / "c", "--max-staleness", "1", "--strategy", "fsdp")) == 2
    assert "use --rollout-backend vllm" in capsys.readouterr().err


def test_vllm_flags_are_checked(world, tmp_path, capsys):
    assert main(_args(world, tmp_path / "a", "--vllm-sleep")) == 2
    assert "apply to --rollout-backend vllm" in capsys.readouterr().err
    assert main(_args(world, tmp_path / "b", "--rollout-backend", "vllm", "--vllm-sleep",
                      "--max-staleness", "1")) == 2
    assert "engine samples while training runs" in capsys.readouterr().err
    assert main(_args(world, tmp_path / "c", "--rollout-backend", "vllm",
                      "--vllm-gpu-memory", "1.5")) == 2


def test_a_sleeping_engine_wakes_before_each_weight_sync_and_sleeps_after_each_rollout():
    """--vllm-sleep's call order. vLLM's sleep mode exists on GPUs only, so the engine here is
    a stand-in recording calls (a mock: the real one cannot run on this machine)."""
    from student_trainer.rollout.vllm_engine import VLLMRollouts

    calls = []

    class Recorder:
        def sleep(self, level):
            calls.append(f"sleep{level}")

        def wake_up(self):
            calls.append("wake")

        def collective_rpc(self, name, kwargs):
            list(kwargs["weights_iterator"])
            calls.append(name)

        def reset_prefix_cache(self):
            return True

        def generate(self, prompts, params, use_tqdm):
            calls.append("generate")
            return []

    engine = object.__new__(VLLMRollouts)
    engine.llm, engine.sleep, engine.sleeping = Recorder(), True, False
    engine.config, engine.max_seq_len = CONFIG, 64
    engine._vllm, engine.eos_ids = None, set()
    engine._sampling_params = lambda *a: None
    for _ in range(2):
        engine.sync_weights({"w": torch.zeros(1)})
        engine.generate([[1, 2]], seed=0)
    assert calls == ["reload_weights", "generate", "sleep1",
                     "wake", "reload_weights", "generate", "sleep1"]
