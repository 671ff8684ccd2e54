"""Tokenisation of examples, with the prompt/response boundary computed exactly.

The targets are defined per response token (DESIGN §2), so ``prompt_len`` must be exactly the
number of tokens the model sees before the response starts. Through the tokenizer's chat
template:

- prompt ids = template(prompt messages, ``add_generation_prompt=True``),
- full ids   = template(prompt messages + [assistant response]),
- the full ids must START WITH the prompt ids, else :class:`TokenizationError` (a template
  that renders the earlier turns differently once an answer follows, or a tokenizer that
  merges tokens across the boundary, has no exact boundary to offer);
- ``prompt_len = len(prompt ids)``; the response part (the answer plus whatever the template
  closes the turn with, e.g. an end-of-turn token) must be non-empty.

Templates are rendered to text and encoded with ``add_special_tokens=False``, as
``apply_chat_template(tokenize=True)`` does: the template itself places BOS and the like.

Tokenizers without a chat template are refused unless ``plain_fallback=True``; then the prompt
is the turns' contents joined by blank lines, encoded WITH the tokenizer's special tokens
(e.g. BOS), and the response is the answer encoded without them plus the EOS token when the
tokenizer has one. The boundary is exact by construction there.

``max_seq_len``: a longer sequence is an error naming the example and the limit
(``truncation="error"``, the default), or, with ``truncation="response"``, is cut from the
END of the response as long as at least one response token remains (a prompt of
``max_seq_len`` tokens or more is still an error). Callers that want to skip such examples
catch :class:`TokenizationError`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Literal

from storage.datasets import Example
from storage.errors import UserError


class TokenizationError(UserError, ValueError):
    """An example that cannot be tokenised as asked; the message names the example."""


def tokenize_example(tokenizer: Any, example: Example, max_seq_len: int | None = None, *,
                     truncation: Literal["error", "response", "response-keep-eos"] = "error",
                     plain_fallback: bool = False,
                     on_truncate: Callable[[int], None] | None = None) -> tuple[list[int], int]:
    """``(input_ids, prompt_len)`` for ``example`` (see the module docstring for the rules).

    Past ``max_seq_len``: ``"error"`` refuses; ``"response"`` cuts the response's end;
    ``"response-keep-eos"`` cuts the response but keeps its ending from the tokenizer's EOS on
    (the EOS and whatever the chat template puts after it), as the released AlignDistil/DPO code
    does, so a cut response still ends as a finished turn. ``on_truncate(original_length)`` is
    called for every cut sequence (to count them). A prompt that leaves no room for one response
    token is an error in every mode.
    """
    if truncation not in ("error", "response", "response-keep-eos"):
        raise ValueError(f"truncation must be 'error', 'response' or 'response-keep-eos', got "
                         f"{truncation!r}")
    name = _describe(example)
    if example.is_pretokenized:
        ids, prompt_len = _check_pretokenized(tokenizer, example, name)
    else:
        if not example.prompt_messages or example.response is None:
            raise TokenizationError(f"{name}: needs prompt messages and a response, or "
                                    "input_ids and prompt_len")
        if getattr(tokenizer, "chat_template", None):
            ids, prompt_len = _via_template(tokenizer, example, name)
        elif plain_fallback:
            ids, prompt_len = _via_plain(tokenizer, example)
        else:
            raise TokenizationError(
                f"{name}: the tokenizer has no chat template; give it one (tokenizer."
                "chat_template), pre-tokenise the data, or allow the documented plain "
                "concatenation fallback (plain_fallback=True)")
        if prompt_len >= len(ids):
            raise TokenizationError(f"{name}: the response adds no tokens after the prompt")
    if max_seq_len is not None and len(ids) > max_seq_len:
        ending = _eos_ending(tokenizer, ids, prompt_len) if truncation == "response-keep-eos" \
            else []
        if truncation != "error" and prompt_len + 1 + len(ending) <= max_seq_len:
            original = len(ids)
            ids = list(ids[:max_seq_len - len(ending)]) + ending
            if on_truncate is not None:
                on_truncate(original)
        else:
            detail = (f"the prompt alone has {prompt_len}" if prompt_len >= max_seq_len
                      else f"prompt {prompt_len} + response {len(ids) - prompt_len}")
            raise TokenizationError(f"{name}: {len(ids)} tokens exceed max_seq_len "
                                    f"{max_seq_len} ({detail} tokens)")
    return ids, prompt_len


def _eos_ending(tokenizer: Any, ids: list[int], prompt_len: int) -> list[int]:
    """The response's tokens from its last EOS on (empty when the response has no EOS)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    for i in range(len(ids) - 1, prompt_len - 1, -1):
        if ids[i] == eos:
            return list(ids[i:])
    return []


def tokenize_prompt(tokenizer: Any, messages: list[dict[str, str]], *, where: str = "prompt"
                    ) -> list[int]:
    """A prompt's ids with the assistant turn opened (generation prompt), rendered and encoded
    exactly as :func:`tokenize_example` renders the prompt part: sampling from these ids and
    scoring prompt + sample later gives the same boundary."""
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizationError(f"{where}: the tokenizer has no chat template; give it one or "
                                f"pre-tokenise the prompts (input_ids)")
    return _render(tokenizer, messages, add_generation_prompt=True, name=where)


def tokenizer_sha256(tokenizer: Any) -> str:
    """Hex sha256 identifying the tokenizer's vocabulary mapping.

    Covers exactly the (token string, id) pairs of ``tokenizer.get_vocab()``, which includes
    added and special tokens, sorted and serialised canonically, so it is equal for the same
    tokenizer loaded twice or saved and reloaded, and changes when any token or id changes.
    It does NOT cover the chat template, normalisation or pre-tokenisation rules, or which
    tokens are marked special: two tokenizers with one vocabulary may still split text
    differently. What it guards is that ids mean the same tokens to teacher and student.
    """
    pairs = sorted((str(tok), int(i)) for tok, i in tokenizer.get_vocab().items())
    blob = json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------- helpers
def _describe(example: Example) -> str:
    return f"example {example.index} ({example.source})"


def _check_pretokenized(tokenizer: Any, example: Example, name: str) -> tuple[list[int], int]:
    ids, prompt_len = list(example.input_ids or []), example.prompt_len
    if prompt_len is None or not 1 <= prompt_len < len(ids):
        raise TokenizationError(f"{name}: prompt_len must satisfy 1 <= prompt_len < "
                                f"len(input_ids) = {len(ids)}, got {prompt_len}")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise TokenizationError(f"{name}: input_ids must be integers")
    vocab_size = len(tokenizer)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise TokenizationError(f"{name}: input_ids hold id(s) outside the tokenizer's "
                                f"vocabulary of {vocab_size}: {bad[:5]}")
    return ids, int(prompt_len)


def _render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool,
            name: str) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja errors (e.g. raise_exception for role order) and kin
        raise TokenizationError(f"{name}: the chat template failed: {exc}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _via_template(tokenizer: Any, example: Example, name: str) -> tuple[list[int], int]:
    prompt_msgs = list(example.prompt_messages or [])
    prompt_ids = _render(tokenizer, prompt_msgs, add_generation_prompt=True, name=name)
    full_ids = _render(tokenizer, prompt_msgs + [{"role": "assistant",
                                                  "content": example.response or ""}],
                       add_generation_prompt=False, name=name)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        at = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b),
                  min(len(prompt_ids), len(full_ids)))
        raise TokenizationError(
            f"{name}: the chat template does not make the prompt a prefix of prompt + "
            f"response (they differ at token {at} of {len(prompt_ids)} prompt tokens), so "
            "the prompt/response boundary is not exact; fix the template or pre-tokenise")
    return full_ids, len(prompt_ids)


def _via_plain(tokenizer: Any, example: Example) -> tuple[list[int], int]:
    prompt_text = "\n\n".join(m["content"] for m in example.prompt_messages or [])
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=True)["input_ids"])
    response_ids = list(tokenizer(example.response or "", add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        response_ids.append(int(eos))
    return prompt_ids + response_ids, len(prompt_ids)
