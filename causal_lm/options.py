"""Model-loading options that commands of both sides share, kept free of heavy imports (a
command's config is read before torch is)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated


@dataclass(kw_only=True)
class AttentionOptions:
    """``--attn-implementation``: the attention kernel of every model a command loads (a
    command's config inherits it)."""
    attn_implementation: Annotated[str | None, "the models' attention: sdpa, eager, "
                                   "flash_attention_2, flash_attention_3, flex_attention or "
                                   "another name transformers knows (none: transformers' "
                                   "default, sdpa); packed batches are laid out for it "
                                   "(docs/training.md, 'Packing')"] = None
