"""One ``train_step`` under torchrun with ranks that hold unequal shares of the step, for
tests/test_trainer_ddp.py: ``torchrun --nproc-per-node 2 tests/dist_train_step.py STORE MODEL
OUT``.

The step's records are the store's first ``N``: rank 0 takes ``share`` of them in several small
micro-batches, rank 1 the rest in one, so the ranks run unequal micro-batch counts (FSDP pads
the shorter rank with weight-0 passes); with ``share = N`` rank 1 has none and runs a filler
record with weight 0. For each (strategy, objective) the weights after one
SGD step (initial minus LR times the gradient) go to
``OUT/<strategy>-<objective>.safetensors``; the test compares them with one process taking the
whole step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from causal_lm.loading import load_model_and_tokenizer
from storage.store import TargetStore
from student_trainer import fsdp
from student_trainer.collate import micro_batches
from student_trainer.distributed import init_distributed, shutdown
from student_trainer.modeling import StudentForward
from student_trainer.recipes.configs import TrainConfig
from student_trainer.recipes.train import train_step

N = 10  # the step's sequences
LR = 1e4
#: (strategy, objective, rank 0's share of the N)
CASES = [("fsdp", "reinforce-sentence", 7), ("fsdp", "reinforce-token", 7),
         ("ddp", "reinforce-token", 7), ("fsdp", "aligndistil", 7), ("ddp", "aligndistil", 7),
         ("fsdp", "reinforce-token", N), ("ddp", "aligndistil", N)]


def step_batches(store: str, rank: int, world_size: int, share: int):
    """This rank's micro-batches of the step, and whether they are a weight-0 filler."""
    records = [TargetStore.open(store)[i] for i in range(N)]
    if world_size == 1:
        return micro_batches(records, max_tokens=64, pad_id=0), False
    mine = records[:share] if rank == 0 else records[share:]
    if not mine:
        return micro_batches(records[:1], max_tokens=4096, pad_id=0), True
    return micro_batches(mine, max_tokens=24 if rank == 0 else 4096, pad_id=0), False


def one_step(model_dir: str, store: str, strategy: str, objective: str, share: int, env,
             device) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = TrainConfig(mode="on-policy", model=model_dir, out="/unused",
                         teacher_url="http://unused", prompts="/unused", objective=objective,
                         max_grad_norm=0.0)
    if strategy == "fsdp":
        model, tok, full = fsdp.load_for_sharding(model_dir, rank=env.rank)
        module = fsdp.shard(StudentForward(model, len(tok)), model, device=device, bf16=False)
        fsdp.broadcast_weights(model, full, device)
    else:
        model, tok = load_model_and_tokenizer(model_dir, device=device, train=True)
        module = StudentForward(model, len(tok))
        if env.enabled:
            module = torch.nn.parallel.DistributedDataParallel(module)
    # plain SGD: the weights move by LR times the step's gradient (Adam's first step would
    # turn rounding noise on near-zero gradients into full-size updates); a large LR keeps the
    # move well above the weights' float32 rounding
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batches, filler = step_batches(store, env.rank, env.world_size, share)
    stats = train_step(module, batches, optimizer=optimizer, scheduler=scheduler,
                       params=list(model.parameters()), config=config, step_sequences=N,
                       env=env, device=device, amp=False, filler=filler)
    assert stats["sequences"] == N, stats
    state = fsdp.full_model_state(model) if strategy == "fsdp" else model.state_dict()
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def main(store: str, model_dir: str, out: str) -> None:
    device = torch.device("cpu")
    env = init_distributed(device)
    try:
        # one process: each objective once, the reference for both strategies and shares
        cases = CASES if env.enabled else \
            [("ddp", o, N) for o in dict.fromkeys(o for _, o, _ in CASES)]
        for strategy, objective, share in cases:
            weights = one_step(model_dir, store, strategy, objective, share, env, device)
            if env.is_main:
                name = f"{strategy}-{objective}-{share}" if env.enabled else f"one-{objective}"
                save_file(weights, str(Path(out) / f"{name}.safetensors"))
    finally:
        shutdown(env)


if __name__ == "__main__":
    main(*sys.argv[1:4])
