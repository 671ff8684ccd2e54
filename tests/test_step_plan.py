"""Which records each step trains on, for any number of ranks (student_trainer/sources/plan.py).

Step ``s`` must be the same records on 1, 2 or 3 ranks (the ranks' blocks of it, together),
over several steps per epoch and several epochs, with every record of an epoch used once; a rank
whose block is empty gets a filler of that step; resuming at step ``s`` gives what an
uninterrupted run gives there. The same holds for the on-policy prompts. The end-to-end
equalities (losses, weights, resume on another number of ranks) are in test_trainer_ddp.py.
"""

from __future__ import annotations

import pytest

from student_trainer.sources.on_policy import OnPolicySource
from student_trainer.sources.plan import rank_block, step_range
from student_trainer.sources.store import StoreSource
from tiny_models import build_tokenizer
from trainer_support import dense_records, random_sequences, write_store

RECORDS, BATCH = 41, 8  # 6 steps per epoch; the last one holds a single record


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher_pair):
    tok = build_tokenizer()
    records, _ = dense_records(*teacher_pair, random_sequences(len(tok), RECORDS, seed=4))
    return write_store(tmp_path_factory.mktemp("plan") / "store", records, tok,
                       shard_tokens=40)


def _steps(store, world_size: int, start: int, total: int) -> dict[int, list]:
    """Each step's records over all ranks, rank by rank: {step: [(rank, ids, fillers)]}."""
    out: dict[int, list] = {}
    for rank in range(world_size):
        source = StoreSource(str(store), seed=3, rank=rank, world_size=world_size)
        for data in source.iterate(start, total, BATCH):
            assert data.step_sequences == min(BATCH, RECORDS - (data.step % 6) * BATCH)
            out.setdefault(data.step, []).append(
                ([r.example_index for r in data.records],
                 data.filler.example_index if data.filler is not None else None))
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_step_is_the_same_records_on_any_number_of_ranks(store, world_size):
    one = _steps(store, 1, 0, 18)  # three epochs of six steps
    many = _steps(store, world_size, 0, 18)
    assert sorted(one) == sorted(many) == list(range(18))
    for step in range(18):
        (alone, _), = one[step]
        together = [i for ids, _ in many[step] for i in ids]
        assert together == alone, f"step {step}: {many[step]} vs {alone}"
        sizes = [len(ids) for ids, _ in many[step]]
        assert max(sizes) - min(sizes) <= 1
        # a rank with nothing in the step runs a record of the step with weight 0
        for ids, filler in many[step]:
            assert (filler is None) == bool(ids)
            assert filler is None or filler == alone[0]
    for epoch in range(3):
        used = [i for s in range(6 * epoch, 6 * epoch + 6) for i in one[s][0][0]]
        assert sorted(used) == list(range(RECORDS))  # every record once per epoch
    assert [one[s][0][0] for s in range(6)] != [one[s][0][0] for s in range(6, 12)]


def test_a_resumed_plan_continues_where_the_uninterrupted_one_is(store):
    whole = _steps(store, 2, 0, 12)
    resumed = _steps(store, 3, 5, 12)  # resumed mid-epoch, on another number of ranks
    for step in range(5, 12):
        assert [i for ids, _ in resumed[step] for i in ids] == \
            [i for ids, _ in whole[step] for i in ids]


def test_the_on_policy_prompts_of_a_step_are_the_same_on_any_number_of_ranks():
    prompts = [[100 + i] for i in range(13)]

    def step_prompts(world_size: int, step: int) -> list[int]:
        got = []
        for rank in range(world_size):
            source = OnPolicySource(prompts, model=None, rollouts=None, scorer=None, seed=1,
                                    rank=rank, world_size=world_size)
            _, mine, size, filler = source.prompts_for(step, 4)
            assert size == min(4, 13 - (step % 4) * 4)
            got += [] if filler else [p[0] for p in mine]
        return got

    for step in range(8):
        assert step_prompts(1, step) == step_prompts(2, step) == step_prompts(3, step)


def test_rank_blocks_cover_a_step_in_order():
    for n in range(0, 10):
        for world in (1, 2, 3, 4):
            blocks = [rank_block(5, 5 + n, r, world) for r in range(world)]
            assert blocks[0][0] == 5 and blocks[-1][1] == 5 + n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert step_range(7, 41, 8) == (1, 8, 16)
    assert step_range(5, 41, 8) == (0, 40, 41)
