"""The REINFORCE baselines of Figure 2 (student_trainer/reinforce.py): the credit each token gets,
the step's baselines, and the surrogate's gradient against the exact policy gradient of a small
tabular policy, enumerated over every response."""

from __future__ import annotations

import itertools

import pytest
import torch

from student_trainer import reinforce
from student_trainer.collate import micro_batches
from student_trainer.distributed import DistEnv
from student_trainer.modeling import StudentForward
from student_trainer.recipes.configs import TrainConfig
from student_trainer.recipes.train import train_step
from tiny_models import build_model, build_tokenizer
from trainer_support import dense_records, random_sequences


def test_token_rewards_are_the_contrastive_reward_minus_the_kl_penalty_to_pi_dpo():
    logp, dpo = torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -3.0])
    rev = torch.tensor([-1.5, -1.0])
    r = reinforce.token_rewards(logp, dpo, rev, beta0=0.1, beta=0.08)
    assert r.tolist() == pytest.approx([0.1 * 1.0 - 0.08 * -0.5, 0.1 * -2.0 - 0.08 * 1.0])
    with pytest.raises(ValueError, match="dpo_logprobs shape"):
        reinforce.token_rewards(logp, dpo[:1], rev, beta0=0.1, beta=0.08)


def test_returns_credit_the_response_total_or_the_reward_to_go_and_nothing_on_padding():
    rewards = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert reinforce.returns(rewards, mask, "sentence").tolist() == [[7, 7, 7], [24, 24, 0]]
    assert reinforce.returns(rewards, mask, "token").tolist() == [[7, 6, 4], [24, 16, 0]]
    with pytest.raises(ValueError, match="level"):
        reinforce.returns(rewards, mask, "episode")


def test_baselines_are_step_means_whatever_the_micro_batch_split():
    torch.manual_seed(0)
    lengths = [3, 1, 4, 2, 4]
    rewards = torch.randn(5, 4, dtype=torch.float64)
    mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    for level in ("sentence", "token"):
        whole = reinforce.returns(rewards, mask, level)
        one = reinforce.baseline([whole], [mask], level)
        # Two micro-batches of different widths, as the token budget cuts them.
        parts = [(rewards[:2, :3], mask[:2, :3]), (rewards[2:], mask[2:])]
        split = reinforce.baseline([reinforce.returns(r, m, level) for r, m in parts],
                                   [m for _, m in parts], level)
        assert torch.allclose(one, split)
        if level == "sentence":
            assert float(one) == pytest.approx(float((rewards * mask).sum(1).mean()))
        else:  # position 3 is reached by the two 4-token responses only
            assert float(one[3]) == pytest.approx(float((rewards[2, 3] + rewards[4, 3]) / 2))
        adv = reinforce.advantages(whole, mask, one)
        assert adv[~mask].abs().sum() == 0


@pytest.mark.parametrize("level", ["sentence", "token"])
def test_the_surrogate_gradient_is_the_exact_policy_gradient(level):
    """A tabular policy over 3 tokens and 2 steps; J(theta) = E_y[sum_t r_t] enumerated over
    all 9 responses. The surrogate, weighted by each response's probability and without a
    baseline, must give exactly -grad J (the KL penalty's own dependence on theta included)."""
    torch.manual_seed(1)
    V = 3
    theta0 = torch.randn(V, dtype=torch.float64, requires_grad=True)
    theta1 = torch.randn(V, V, dtype=torch.float64, requires_grad=True)
    dpo0, rev0 = torch.randn(V).log_softmax(-1).double(), torch.randn(V).log_softmax(-1).double()
    dpo1 = torch.randn(V, V).log_softmax(-1).double()
    rev1 = torch.randn(V, V).log_softmax(-1).double()
    beta0, beta = 0.1, 0.08

    def logps(y):
        return torch.stack([theta0.log_softmax(-1)[y[0]], theta1[y[0]].log_softmax(-1)[y[1]]])

    def teacher(y):
        return (torch.stack([dpo0[y[0]], dpo1[y[0], y[1]]]),
                torch.stack([rev0[y[0]], rev1[y[0], y[1]]]))

    objective = torch.zeros((), dtype=torch.float64)
    surrogate = torch.zeros((), dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for y in itertools.product(range(V), repeat=2):
        logp = logps(y)
        dpo, rev = teacher(y)
        prob = logp.sum().exp()
        objective = objective + prob * reinforce.token_rewards(logp, dpo, rev, beta0=beta0,
                                                               beta=beta).sum()
        r = reinforce.token_rewards(logp.detach(), dpo, rev, beta0=beta0, beta=beta)
        credit = reinforce.returns(r[None], mask, level)
        surrogate = surrogate + prob.detach() * reinforce.policy_gradient_loss(logp[None], credit,
                                                                               mask)
    exact = torch.autograd.grad(objective, (theta0, theta1), retain_graph=True)
    estimate = torch.autograd.grad(surrogate, (theta0, theta1))
    for e, g in zip(exact, estimate):
        assert torch.allclose(-g, e, atol=1e-12)


@pytest.fixture(scope="module")
def step_inputs(teacher_pair):
    tok = build_tokenizer()
    records, _ = dense_records(*teacher_pair, random_sequences(len(tok), 6, seed=3), top_k=8)
    return tok, records


def _one_step(tok, records, objective, max_tokens):
    model = build_model(len(tok), seed=11)
    forward = StudentForward(model, len(tok))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    config = TrainConfig(mode="on-policy", model="-", out="-", objective=objective,
                         max_grad_norm=0.0)
    batches = micro_batches(records, max_tokens=max_tokens, pad_id=tok.pad_token_id)
    stats = train_step(forward, batches, optimizer=optimizer, scheduler=scheduler,
                       params=list(model.parameters()), config=config,
                       step_sequences=len(records), env=DistEnv(), device=torch.device("cpu"),
                       amp=False)
    return stats, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("objective", ["reinforce-sentence", "reinforce-token"])
def test_a_reinforce_step_does_not_depend_on_the_micro_batch_split(step_inputs, objective):
    tok, records = step_inputs
    whole, after_whole = _one_step(tok, records, objective, max_tokens=10_000)
    split, after_split = _one_step(tok, records, objective, max_tokens=48)
    assert whole["micro_batches"] == 1 and split["micro_batches"] > 1
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5, abs=1e-7)
    assert split["kl"] == pytest.approx(whole["kl"], rel=1e-5)
    before = [p.detach() for p in build_model(len(tok), seed=11).parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after_whole, before))  # it learned
    for a, b in zip(after_whole, after_split):
        assert torch.allclose(a, b, atol=1e-6)
    # kl is the sampled estimate of KL(pi_theta || pi_dpo): log pi_theta - log pi_dpo.
    reward = sum(float((0.1 * (r.dpo_logprobs - r.reverse_logprobs)).sum()) for r in records)
    assert whole["reward_token_mean"] == pytest.approx(reward / whole["response_tokens"],
                                                       rel=1e-5)
