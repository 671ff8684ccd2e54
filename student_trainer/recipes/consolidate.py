"""``aligndistil consolidate``: the full weights of a sharded checkpoint as a Hugging Face folder.

One process, no torchrun: the architecture comes from the checkpoint's ``config.json``, the
weights from its ``distributed/`` shards (any number of ranks wrote them), and the tokenizer
from the checkpoint. It needs memory for the whole model in float32.
"""

from __future__ import annotations

from pathlib import Path

from student_trainer.recipes.configs import ConsolidateConfig


def run_consolidate(config: ConsolidateConfig) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from causal_lm.loading import load_tokenizer
    from student_trainer.fsdp import consolidate

    config.validate()
    checkpoint, out = Path(config.checkpoint), Path(config.out)
    arch = AutoConfig.from_pretrained(checkpoint, local_files_only=True,
                                      trust_remote_code=config.trust_remote_code)
    model = AutoModelForCausalLM.from_config(arch, trust_remote_code=config.trust_remote_code)
    weights = consolidate(checkpoint, model)
    model.load_state_dict(weights)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(checkpoint, trust_remote_code=config.trust_remote_code,
                   flag="--checkpoint").save_pretrained(out)
    return {"out": str(out), "parameters": sum(p.numel() for p in model.parameters())}
