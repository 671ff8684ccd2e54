"""Tiny real Hugging Face models and tokenizers, built offline for the tests.

A word-level tokenizer (``tokenizers`` library) with a chat template, wrapped as a
``PreTrainedTokenizerFast`` and saved beside a randomly initialised Llama-architecture causal LM
(head dim 32), so tests load both back through ``AutoTokenizer`` / ``AutoModelForCausalLM``
exactly as a user's real model folder would be loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from aligndistil.worlds.toy.build import build_tokenizer as build_word_tokenizer

WORDS = (
    [str(i) for i in range(100)]
    + "sort copy reverse the list numbers please answer done , . : ? ! a an and or is of to in"
      " hello world how are you fine thanks what which yes no".split()
)


def build_tokenizer(extra_words: int = 0) -> PreTrainedTokenizerFast:
    """The toy world's word-level tokenizer and chat template over :data:`WORDS`;
    ``extra_words`` pads the vocabulary with dummy words."""
    return build_word_tokenizer(WORDS + [f"w{i}" for i in range(extra_words)])


def build_model(vocab_size: int, *, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                heads: int = 2, max_positions: int = 256, tie: bool = False):
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hidden_size // heads, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init is near-uniform; scale the head up so the teachers disagree visibly.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def save_model_dir(path: Path, *, seed: int = 0, extra_words: int = 0, **model_kwargs) -> Path:
    """Build a tokenizer + model and save both (safetensors) into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(extra_words)
    model = build_model(len(tokenizer), seed=seed, **model_kwargs)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_teacher_pair(root: Path, *, seeds=(1, 2), **kwargs) -> tuple[Path, Path]:
    """Two models sharing one tokenizer: (dpo_dir, reverse_dir)."""
    root = Path(root)
    return (save_model_dir(root / "dpo", seed=seeds[0], **kwargs),
            save_model_dir(root / "reverse", seed=seeds[1], **kwargs))


def load(path: Path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return tokenizer, model
