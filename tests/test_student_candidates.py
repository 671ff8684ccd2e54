"""merge_candidates against the dense teacher: the union of the kept ids and the student's
named ones carries each id's log pi*, and the tail is pi*'s mass outside the union."""

from __future__ import annotations

import numpy as np
import torch

from storage.record import TargetRecord
from student_trainer import losses
from student_trainer.candidates import merge_candidates


def _record(log_pi: torch.Tensor, counts: np.ndarray, width: int) -> TargetRecord:
    """A ragged record of ``log_pi``'s best ``counts[t]`` ids per position, padded to ``width``
    by repeating column 0 (the store's form)."""
    values, ids = torch.topk(log_pi, width, dim=-1)
    pad = torch.arange(width)[None, :] >= torch.as_tensor(counts)[:, None]
    values = torch.where(pad, values[:, :1], values)
    ids = torch.where(pad, ids[:, :1], ids)
    outside = log_pi.clone()
    for t, c in enumerate(counts):
        outside[t, ids[t, :c]] = -torch.inf
    T = log_pi.shape[0]
    return TargetRecord(
        example_index=0, input_ids=np.arange(T + 1, dtype=np.int32), prompt_len=1,
        alpha=np.full(T, 2.0, np.float32), topk_ids=ids.numpy().astype(np.int32),
        topk_logprobs=values.numpy().astype(np.float16),
        tail_logmass=torch.logsumexp(outside, -1).numpy().astype(np.float32),
        dpo_logprobs=np.full(T, -1.0, np.float32), reverse_logprobs=np.full(T, -2.0, np.float32),
        topk_count=counts.astype(np.int32))


def test_the_union_holds_each_ids_log_pi_and_the_tail_is_the_mass_outside_it():
    g = torch.Generator().manual_seed(0)
    T, V, width = 6, 50, 5
    log_pi = torch.log_softmax(torch.randn(T, V, generator=g, dtype=torch.float64) * 2, -1)
    counts = np.array([5, 1, 3, 5, 2, 4])
    record = _record(log_pi, counts, width)
    student = torch.randn(T, V, generator=g, dtype=torch.float64)
    named = torch.topk(student, 4, dim=-1).indices
    named[0, 0] = record.topk_ids[0, 0]   # already kept
    named[1, 2] = named[1, 1]             # named twice
    named[2, 3] = -1                      # no id
    named_lp = log_pi.gather(-1, named.clamp_min(0)).masked_fill(named < 0, -torch.inf)
    merged = merge_candidates(record, named.numpy(), named_lp.numpy())

    for t in range(T):
        kept = set(record.topk_ids[t, :counts[t]].tolist())
        union = kept | {i for i in named[t].tolist() if i >= 0}
        c = int(merged.topk_count[t])
        ids = merged.topk_ids[t, :c].tolist()
        assert len(ids) == c == len(union) and set(ids) == union
        lps = merged.topk_logprobs[t, :c].astype(np.float64)
        np.testing.assert_allclose(lps, log_pi[t, ids].numpy(), atol=4e-3)  # float16
        assert np.all(np.diff(lps) <= 0)  # sorted by log pi*
        # padding repeats column 0
        assert np.all(merged.topk_ids[t, c:] == merged.topk_ids[t, 0])
        outside = log_pi[t].clone()
        outside[ids] = -torch.inf
        assert abs(float(merged.tail_logmass[t]) - torch.logsumexp(outside, -1).item()) < 1e-5


def test_the_bucket_loss_on_the_union_is_the_kl_over_its_categories():
    """The loss the trainer runs on a merged record: the KL between the student and pi* over
    the union's ids plus one tail category, computed here from the dense teacher (the union
    taken from the inputs, log pi* and the tail from log_pi)."""
    g = torch.Generator().manual_seed(1)
    T, V, width = 5, 40, 4
    log_pi = torch.log_softmax(torch.randn(T, V, generator=g, dtype=torch.float64) * 2, -1)
    record = _record(log_pi, np.array([4, 2, 3, 1, 4]), width)
    logits = torch.randn(T, V, generator=g, dtype=torch.float64)
    named = torch.topk(logits, 3, dim=-1).indices
    merged = merge_candidates(record, named.numpy(), log_pi.gather(-1, named).numpy())
    kl = losses.sparse_reverse_kl(
        logits, torch.from_numpy(merged.topk_ids).long(),
        torch.from_numpy(merged.topk_logprobs.astype(np.float64)),
        torch.from_numpy(merged.tail_logmass.astype(np.float64)), tail="bucket",
        topk_count=torch.from_numpy(merged.topk_count).long())
    logp = torch.log_softmax(logits, -1)
    for t in range(T):
        kept = set(record.topk_ids[t, :record.topk_count[t]].tolist())
        union = sorted(kept | set(named[t].tolist()))
        q = log_pi[t, union]                       # the dense teacher, not the record
        outside = log_pi[t].clone()
        outside[union] = -torch.inf
        q_out = torch.logsumexp(outside, -1)
        p = logp[t, union]
        p_out = 1 - p.exp().sum()
        want = float((p.exp() * (p - q)).sum() + p_out * (torch.log(p_out) - q_out))
        assert abs(float(kl[t]) - want) < 2e-3     # the record's log pi* are float16
