"""The trainer's components in isolation: schedule, checkpoints, metrics, batching/alignment,
rollouts. Everything runs on tiny real Hugging Face models, in seconds."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from tiny_models import build_model, build_tokenizer, save_model_dir
from trainer_support import dense_records, random_sequences
from student_trainer import checkpoint as ckpt
from storage.packing import pack_by_token_budget as split_by_token_budget
from student_trainer.collate import collate_records, micro_batches
from student_trainer.metrics import MetricsLogger, plot_curves, read_jsonl
from student_trainer.modeling import StudentForward, load_student
from student_trainer.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups
from student_trainer.rollout.hf_generate import RolloutConfig, cut_at_eos, generate_responses


# ---------------------------------------------------------------------------- optim
def test_lr_schedule_warms_up_then_decays_to_the_floor():
    kw = dict(warmup_steps=10, total_steps=110)
    warm = [lr_multiplier(s, **kw) for s in range(10)]
    assert warm == pytest.approx([(s + 1) / 10 for s in range(10)])
    for schedule in ("linear", "cosine"):
        tail = [lr_multiplier(s, schedule=schedule, min_lr_ratio=0.1, **kw) for s in range(10, 111)]
        assert tail[0] == pytest.approx(1.0) and tail[-1] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(tail, tail[1:]))
    assert lr_multiplier(60, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_multiplier(60, schedule="cosine", **kw) == pytest.approx(0.5)
    # a quarter into the decay: linear 0.75, cosine 0.5 * (1 + cos(pi / 4))
    assert lr_multiplier(35, schedule="linear", **kw) == pytest.approx(0.75)
    assert lr_multiplier(35, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))
    with pytest.raises(ValueError, match="schedule"):
        lr_multiplier(0, schedule="step", **kw)


def test_no_weight_decay_on_norms_and_biases():
    model = build_model(40, hidden_size=32, heads=1)
    groups = param_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name
    assert groups[1]["weight_decay"] == 0.0
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)  # first update: half-warm
    opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_restores_rng_and_is_weights_only(tmp_path):
    tok = build_tokenizer()
    model = build_model(len(tok), hidden_size=32, heads=1)
    opt = build_optimizer(model, lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    rng = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    dest = ckpt.save_checkpoint(tmp_path / ckpt.checkpoint_name(7), model=model, tokenizer=tok,
                                state={"step": 7, "optimizer": opt.state_dict(), "rng": [rng]})
    assert (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file()
    state = ckpt.load_state(dest)  # torch.load(weights_only=True) inside
    ckpt.restore_rng_state(state["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    fresh = build_optimizer(build_model(len(tok), hidden_size=32, heads=1), lr=1e-3)
    fresh.load_state_dict(state["optimizer"])
    assert ckpt.latest_checkpoint(tmp_path) == dest


def test_a_write_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    tok = build_tokenizer()
    model = build_model(len(tok), hidden_size=32, heads=1)
    good = ckpt.save_checkpoint(tmp_path / ckpt.checkpoint_name(1), model=model, tokenizer=tok,
                                state={"step": 1})

    def crash(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path / ckpt.checkpoint_name(2), model=model, tokenizer=tok,
                             state={"step": 2})
    monkeypatch.undo()
    assert not (tmp_path / ckpt.checkpoint_name(2)).exists()
    assert ckpt.latest_checkpoint(tmp_path) == good and ckpt.read_step(good) == 1
    # Overwriting an existing folder (final/) swaps it in whole.
    ckpt.save_checkpoint(tmp_path / "final", model=model, tokenizer=tok, state={"step": 3})
    ckpt.save_checkpoint(tmp_path / "final", model=model, tokenizer=tok, state={"step": 4})
    assert ckpt.read_step(tmp_path / "final") == 4
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "final"
    for step in (5, 6, 7):
        ckpt.save_checkpoint(tmp_path / ckpt.checkpoint_name(step), model=model, tokenizer=tok,
                             state={"step": step})
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        ckpt.checkpoint_name(6), ckpt.checkpoint_name(7)]
    assert not list(tmp_path.glob(".tmp-*"))


def test_load_state_refuses_a_plain_model_folder(tmp_path):
    folder = save_model_dir(tmp_path / "m")
    with pytest.raises(ckpt.CheckpointError, match="not a trainer checkpoint"):
        ckpt.load_state(folder)


# ---------------------------------------------------------------------------- metrics
def test_metrics_jsonl_tensorboard_png_and_resume_truncation(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 6):
        logger.log(step, {"loss": 1.0 / step, "kl": torch.tensor(0.5), "lr": 1e-3,
                          "bad": float("nan")})
    logger.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[1]["loss"] == 0.5 and rows[0]["kl"] == 0.5 and rows[0]["bad"] is None
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    resumed = MetricsLogger(tmp_path, resume_step=3)
    resumed.log(4, {"loss": 9.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 0.5), (3, 1 / 3), (4, 9.0)]
    png = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- data
def test_split_by_token_budget_respects_the_budget():
    lengths = [5, 17, 3, 17, 9, 30, 1]
    groups = split_by_token_budget(lengths, 34)
    assert sorted(i for g in groups for i in g) == list(range(7))
    for g in groups:
        assert len(g) == 1 or max(lengths[i] for i in g) * len(g) <= 34
    assert groups[0] == [5]  # 30 alone: a second sequence would make 60 padded tokens


@pytest.fixture(scope="module")
def pair_dirs(teacher_pair):
    return teacher_pair


def test_batches_align_targets_with_logit_rows_end_to_end(pair_dirs):
    """With the dpo teacher itself as the 'student', its log-prob of each target token at the
    gathered logit rows must equal the record's dpo_logprobs: rows P-1..L-2 meet targets 0..T-1."""
    tok = build_tokenizer()
    seqs = random_sequences(len(tok), 5, seed=11)
    records, _ = dense_records(*pair_dirs, seqs)
    model, _ = load_student(pair_dirs[0], device=torch.device("cpu"))
    forward = StudentForward(model, len(tok)).eval()
    batches = micro_batches(records, max_tokens=40, pad_id=0)
    assert len(batches) > 1
    seen = 0
    for batch in batches:
        with torch.no_grad():
            logp = forward(batch.input_ids, batch.attention_mask, batch.row_idx, batch.col_idx,
                           mode="logprobs", target_ids=batch.target_ids)
        np.testing.assert_allclose(logp.numpy(), batch.dpo_logprobs.numpy(), atol=1e-4)
        per_seq = batch.unflatten(batch.alpha)
        assert per_seq.shape == batch.response_mask.shape
        assert torch.equal(per_seq[batch.response_mask], batch.alpha)
        seen += batch.num_sequences
    assert seen == 5
    one = collate_records(records[:2], pad_id=0)
    r0 = records[0]
    t0 = r0.response_len
    assert one.col_idx[:t0].tolist() == list(range(r0.prompt_len - 1, r0.seq_len - 1))
    assert one.target_ids[:t0].tolist() == r0.input_ids[r0.prompt_len:].tolist()
    assert torch.equal(one.topk_ids[:t0], torch.from_numpy(r0.topk_ids).long())


def _step_loss_and_grads(model, forward, batches, n_sequences):
    """The train step's loss (sum over micro-batches of loss x its share) and gradients."""
    from student_trainer import losses

    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        kl = forward(batch.input_ids, batch.attention_mask, batch.row_idx, batch.col_idx,
                     topk_ids=batch.topk_ids, topk_logprobs=batch.topk_logprobs,
                     tail_logmass=batch.tail_logmass, position_ids=batch.position_ids)
        loss = losses.aligndistil_loss(batch.unflatten(kl), batch.unflatten(batch.alpha, 1.0),
                                       batch.response_mask)
        (loss * (batch.num_sequences / n_sequences)).backward()
        total += float(loss.detach()) * batch.num_sequences / n_sequences
    return total, {n: p.grad.clone() for n, p in model.named_parameters()
                   if p.grad is not None}


def test_packed_micro_batches_give_the_padded_loss_and_gradients(pair_dirs):
    """Packed rows (several sequences back to back, positions restarting) are the same step as
    padded micro-batches: the same sequences, loss and gradients within float32 rounding, and
    no more computed places under the same budget."""
    tok = build_tokenizer()
    seqs = random_sequences(len(tok), 12, seed=7, min_len=4, max_len=24)
    records, _ = dense_records(*pair_dirs, seqs)
    model, _ = load_student(pair_dirs[0], device=torch.device("cpu"))
    forward = StudentForward(model, len(tok))
    padded = micro_batches(records, max_tokens=72, pad_id=0)
    packed = micro_batches(records, max_tokens=72, pad_id=0, packing=True)
    assert sum(b.num_sequences for b in packed) == 12
    assert sum(b.num_response_tokens for b in packed) == sum(r.response_len for r in records)
    assert any(b.position_ids is not None and b.input_ids.shape[0] < b.num_sequences
               for b in packed)  # at least one row holds two sequences
    assert sum(b.input_ids.numel() for b in packed) <= sum(b.input_ids.numel() for b in padded)
    loss_a, grads_a = _step_loss_and_grads(model, forward, padded, 12)
    loss_b, grads_b = _step_loss_and_grads(model, forward, packed, 12)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


# ---------------------------------------------------------------------------- rollouts
def test_rollouts_keep_the_prompt_stop_at_eos_and_are_seeded():
    tok = build_tokenizer()
    model = build_model(len(tok), hidden_size=32, heads=1)
    prompts = [[2, 10, 11], [2, 12], [2, 13, 14, 15, 16]]
    cfg = RolloutConfig(max_new_tokens=6, batch_size=2)
    state = torch.get_rng_state()
    a = generate_responses(model, prompts, pad_token_id=0, eos_token_id=3, config=cfg, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    b = generate_responses(model, prompts, pad_token_id=0, eos_token_id=3, config=cfg, seed=5)
    c = generate_responses(model, prompts, pad_token_id=0, eos_token_id=3, config=cfg, seed=6)
    assert a == b and a != c
    for (ids, p), prompt in zip(a, prompts):
        assert ids[:p] == prompt and p == len(prompt)
        response = ids[p:]
        assert 1 <= len(response) <= 6
        assert 3 not in response[:-1]  # only the last token may be EOS
    assert cut_at_eos([5, 3, 0, 0], {3}) == [5, 3]


def test_rollouts_sample_the_full_distribution_at_temperature_one():
    """Uniform logits: a top-k of 50 (generate's default) would show <= 50 distinct ids."""
    tok = build_tokenizer()
    model = build_model(len(tok), hidden_size=32, heads=1)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    prompts = [[2, 10 + i] for i in range(48)]
    out = generate_responses(model, prompts, pad_token_id=0, eos_token_id=None,
                             config=RolloutConfig(max_new_tokens=16, batch_size=48), seed=0)
    distinct = {t for ids, p in out for t in ids[p:]}
    assert len(distinct) > 100  # of len(tok) ~ 140 equally likely ids


def test_the_uniform_tail_warns_once_about_a_broad_teacher_tail(caplog):
    from student_trainer.recipes.configs import TrainConfig
    from student_trainer.recipes.train import warn_broad_tail

    def warned(tail: str, mass: float) -> bool:
        caplog.clear()
        config = TrainConfig(mode="off-policy", model="m", out="o", store="s", tail=tail)
        with caplog.at_level("WARNING", logger="student_trainer.recipes.train"):
            warn_broad_tail(mass, config)
        return any("--tail bucket" in r.getMessage() for r in caplog.records)

    assert warned("uniform", 0.13)
    assert not warned("uniform", 0.002)  # a real chat model's tail
    assert not warned("bucket", 0.13)


def test_a_run_recorded_before_dpo_top_existed_resumes_against_dpo_top_0(tmp_path):
    """teacher_info.json from before the server reported dpo_top: it ran with 0, so resuming
    against a dpo_top 0 server goes on, and against dpo_top 4 is refused."""
    import json
    from types import SimpleNamespace

    from student_trainer.checkpoint import CheckpointError
    from student_trainer.distributed import DistEnv
    from student_trainer.client import TARGET_FIELDS
    from student_trainer.recipes.train import TEACHER_INFO, _check_same_teacher

    info = {k: 1 for k in (*TARGET_FIELDS, "max_seq_len")} | {"dpo_top": 0, "models": {}}
    old = {k: v for k, v in info.items() if k != "dpo_top"}
    (tmp_path / TEACHER_INFO).write_text(json.dumps(old))
    _check_same_teacher(SimpleNamespace(teacher_info=info), tmp_path, resuming=True,
                        env=DistEnv())
    with pytest.raises(CheckpointError, match="dpo_top: 0 vs 4"):
        _check_same_teacher(SimpleNamespace(teacher_info=info | {"dpo_top": 4}), tmp_path,
                            resuming=True, env=DistEnv())


def test_one_visible_gpu_per_process_is_that_gpu_on_every_rank(monkeypatch):
    """SLURM and Kubernetes give each process one GPU: rank 1 (LOCAL_RANK 1) must use cuda:0,
    not cuda:1 ("invalid device ordinal"). No GPU here, so torch.cuda's and the process
    group's answers are faked: this checks which device is asked for, not a CUDA run."""
    import torch.distributed as dist

    from causal_lm.loading import resolve_device
    from student_trainer.distributed import init_distributed

    calls = []
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw["backend"]))
    device = resolve_device("auto")
    env = init_distributed(device)
    assert device == torch.device("cuda", 0)
    assert calls == [torch.device("cuda", 0), "nccl"]
    assert (env.rank, env.world_size, env.local_rank) == (1, 2, 1)
