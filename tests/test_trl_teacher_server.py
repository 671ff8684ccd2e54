"""TRL 1.16's ``ServerDistillationTrainer`` trains a tiny student against ``aligndistil serve``
(``teacher_model_server_url`` set to our server, on loopback): the loss falls and the weights
change. Opt-in (``-m trl``, the dev extra installs TRL): TRL's trainer takes about a minute to
set up on 2 cores. TRL's ``VLLMClient`` refuses to start unless vLLM is importable, although it
only speaks HTTP; its import guard is patched here (the fast check of the client itself is
tests/test_vllm_protocol.py::test_trls_vllm_client_gets_pi_stars_sequence_logprobs).
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import save_model_dir
from trainer_support import ThreadedServer, teacher_app

pytestmark = pytest.mark.trl

PROMPTS = ["sort 3 1 2", "copy 5 6", "reverse the list 7 8 9", "hello how are you ?",
           "what is 4 and 5 ?", "sort 9 8", "copy the numbers 1 2 3", "answer yes or no"]


def test_server_distillation_trainer_learns_from_aligndistils_teacher(teacher_pair, tmp_path,
                                                                      monkeypatch):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.server_distillation import (ServerDistillationConfig,
                                                      ServerDistillationTrainer)
    from trl.generation import vllm_client

    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *a, **k: True)
    student_dir = save_model_dir(tmp_path / "student", seed=7)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    with ThreadedServer(teacher_app(*teacher_pair, top_k=8)) as server:
        args = ServerDistillationConfig(
            output_dir=str(tmp_path / "out"), teacher_model_server_url=server.url,
            loss_top_k=1, beta=1.0, max_steps=24, per_device_train_batch_size=4,
            max_completion_length=6, learning_rate=1e-2, logging_steps=1, report_to=[],
            use_cpu=True, bf16=False, save_strategy="no", seed=0)
        trainer = ServerDistillationTrainer(model=model, args=args, train_dataset=data,
                                            processing_class=tokenizer)
        trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 24, trainer.state.log_history
    # on-policy: each step's samples differ, so compare thirds of the run, not single steps
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first, losses
    print("TRL ServerDistillationTrainer losses:", [round(x, 4) for x in losses])
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
