"""Build a toy world offline: tokenizer + tiny model folder, noisy demonstrations, prompts.

Two worlds (``--world``): ``sort`` (the demo's: sort a short list of numbers, a 28-token
vocabulary, one right answer) and ``grammar`` (the fidelity world: 16-word chains in a synthetic
grammar of 2,000 words, 50 right words per position; :mod:`.grammar`).

The tokenizer is word-level (``tokenizers`` WordLevel, whitespace split) with a chat template,
wrapped as a ``PreTrainedTokenizerFast``; the model is a randomly initialised Llama-architecture
causal LM (head dim 32, so vLLM's CPU backend could load it too). Both are saved as an ordinary
Hugging Face folder (safetensors), loaded back by every subcommand exactly like a real model.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from storage.errors import ConfigError
from storage.outputs import clear_folder, refuse_used_folder

from .grammar import GrammarTask
from .task import SortTask

#: World name -> its task (the task's gold reward is registered under the same name).
WORLDS = {"sort": SortTask(), "grammar": GrammarTask()}

#: Where ``aligndistil toyworld`` saves its resolved config inside --out.
SAVED_CONFIG = "toyworld_config.yaml"

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]

#: Each turn is ``<|role|> content``; an assistant turn ends with ``<eos>``; the generation
#: prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|> ' }}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ ' <eos>' }}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


@dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """``aligndistil toyworld``: the files of the toy world."""
    out: Annotated[str, "the world's folder"]
    world: Annotated[Literal["sort", "grammar"], "sort: short lists of numbers (the demo's); "
                     "grammar: 16-word chains over 2,000 words (the fidelity world)"] = "sort"
    seed: Annotated[int, "seed of everything the world draws"] = 0
    hidden_size: Annotated[int, "the tiny model's hidden size", ">=1"] = 128
    layers: Annotated[int, "the tiny model's layers", ">=1"] = 2
    head_dim: Annotated[int, "attention head size (vLLM's CPU backend needs >= 32)", ">=1"] = 32
    demos: Annotated[int, "noisy SFT demonstrations", ">=1"] = 4000
    noise: Annotated[float, "probability that a demonstration's answer token is wrong (sort: "
                     "a random number; grammar: a word of the decoy class)", "[0,1]"] = 0.2
    train_prompts: Annotated[int, "prompts for preference pairs and on-policy training",
                             ">=1"] = 512
    eval_prompts: Annotated[int, "held-out prompts for evaluation", ">=1"] = 128
    overwrite: Annotated[bool, "replace what another run left in --out"] = False

    @property
    def task(self):
        return WORLDS[self.world]

    def validate(self) -> None:
        wanted, distinct = self.train_prompts + self.eval_prompts, self.task.prompt_count
        if wanted > distinct:
            raise ConfigError(f"--train-prompts {self.train_prompts} + --eval-prompts "
                              f"{self.eval_prompts} exceed the {distinct} distinct prompts of "
                              f"--world {self.world}")
        refuse_used_folder(self.out, own=(SAVED_CONFIG,), overwrite=self.overwrite)


def build_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>", additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, *, seed: int, hidden_size: int, layers: int, head_dim: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if hidden_size % head_dim:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of head_dim {head_dim}")
    heads = hidden_size // head_dim
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=head_dim, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index("<bos>"), eos_token_id=SPECIAL_TOKENS.index("<eos>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def build_world(config: WorldConfig) -> dict:
    """Write ``init/`` (model + tokenizer), ``sft_demos.jsonl``, ``prompts_train.jsonl`` and
    ``prompts_eval.jsonl`` into ``config.out``; returns their paths. Seeded: same files every run.
    Evaluation prompts are disjoint from the training prompts and demonstrations."""
    out = Path(config.out)
    if config.overwrite:
        clear_folder(out, keep=(SAVED_CONFIG,))
    out.mkdir(parents=True, exist_ok=True)
    task, rng = config.task, random.Random(config.seed)
    tokenizer = build_tokenizer(task.words)
    model = build_model(len(tokenizer), seed=config.seed, hidden_size=config.hidden_size,
                        layers=config.layers, head_dim=config.head_dim)
    init = out / "init"
    model.save_pretrained(init, safe_serialization=True)
    tokenizer.save_pretrained(init)

    seen: set = set()

    def fresh(n: int) -> list:
        found = []
        while len(found) < n:
            key = task.sample_key(rng)
            if key not in seen:
                seen.add(key)
                found.append(key)
        return found

    evals = fresh(config.eval_prompts)  # drawn first, so every other split avoids them
    train = fresh(config.train_prompts)
    demo_rows = []
    for _ in range(config.demos):
        key = task.sample_key(rng)
        if key in seen:
            continue
        demo_rows.append({"messages": [
            {"role": "user", "content": task.prompt(key)},
            {"role": "assistant", "content": task.demonstration(key, config.noise, rng)}]})
    paths = {"model": init, "demos": out / "sft_demos.jsonl",
             "prompts_train": out / "prompts_train.jsonl",
             "prompts_eval": out / "prompts_eval.jsonl"}
    _write_jsonl(paths["demos"], demo_rows)
    _write_jsonl(paths["prompts_train"], [{"prompt": task.prompt(k)} for k in train])
    _write_jsonl(paths["prompts_eval"], [{"prompt": task.prompt(k),
                                          "reference": task.reference(k)} for k in evals])
    return {k: str(v) for k, v in paths.items()}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
