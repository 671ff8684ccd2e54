"""vLLM's OpenAI-compatible completions protocol over the composite teacher pi* (DESIGN §4).

Trainers that distil from a teacher server (TRL's ``VLLMClient.get_sequence_logprobs``, scripts
on the ``openai`` client, verl, slime) send ``POST /v1/completions`` with token-id prompts and
``prompt_logprobs: K``. This module is that protocol's pure part: the request and its checks,
sampling a completion from pi*, and the response in vLLM 0.32's layout. The routes are in
:mod:`teacher_service.server`, over the same engine, batcher, limits and key as ``/v1/score``.

What vLLM 0.32 does, and what this does the same way (read in vLLM's source: the completions
protocol and serving, ``SamplingParams``, the v1 sampler's ``gather_logprobs``):

- ``prompt_logprobs`` is one entry per prompt token, the first ``null``; entry ``i`` maps
  token ids (JSON keys are strings) to ``{"logprob", "rank", "decoded_token"}`` for the actual
  token ``prompt[i]`` (first) and the top ``K`` of log pi* at position ``i - 1``. ``rank`` is
  1-based over the whole vocabulary: the actual token's is how many ids have log pi* >= its own;
  a top-K entry's is its place in the top K. So an entry holds K or K + 1 ids. ``K = 0``: the
  actual token only. ``K = -1``: the whole vocabulary. A K above the cap (``serve --top-k``,
  vLLM's ``--max-logprobs``) is refused. ``-inf`` is sent as ``-9999.0``.
- Temperature does not touch prompt log-probs: vLLM computes them from the raw logits (its
  default ``logprobs_mode`` is ``raw_logprobs``, and prompt tokens skip the sampling processors).
  ``temperature``, ``top_p`` and ``top_k`` shape the sampled completion only, and a completion's
  own ``logprobs`` are raw log pi* too. A client that wants log pi* at another temperature
  rescales it itself (TRL passes its temperature, which vLLM, and so this server, ignores for
  ``prompt_logprobs``).
- ``max_tokens`` defaults to 16, must be at least 1, and is cut to the room left under the
  server's ``--max-seq-len``; the completion is sampled from pi* and stops at EOS unless
  ``ignore_eos``, or at a ``stop_token_ids`` id.
- Errors are ``{"error": {"message", "type", "param", "code"}}``: 400 ``BadRequestError`` for a
  bad request, 404 ``NotFoundError`` for another model's name.

Extensions (vLLM has no equivalent on ``/v1/completions``):

- ``prompt_logprob_token_ids`` ``[rows, ids]`` with ``prompt_logprob_start`` (vLLM's
  ``SamplingParams`` fields, which vLLM 0.32 serves on ``/inference/v1/generate`` only): row
  ``r`` scores its ids as predictions of prompt token ``start + r + 1``; ``-1`` pads a row and
  scores ``-inf``. The answer is ``prompt_token_id_logprobs``, base64 of a float32 ``.npy``
  ``[rows, ids]``, as vLLM encodes it there.
- ``prompt_logprobs_alpha: true`` adds ``prompt_logprobs_alpha`` and ``prompt_logprobs_beta``:
  AlignDistil's alpha_t and beta_t = beta0 / alpha_t at every position (``null`` first), so a
  client can weight its loss as AlignDistil does.

Every field vLLM accepts and this server cannot honour is refused with a 400 that names it,
unless it holds vLLM's neutral default (:data:`REFUSED`); fields that cannot change what is
scored or sampled are accepted and ignored (:data:`IGNORED`).
"""

from __future__ import annotations

import base64
import io
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError,
                      create_model)

#: The model id ``/v1/models`` lists by default (``serve --served-model-name``).
DEFAULT_MODEL_ID = "aligndistil-pi-star"
#: vLLM's default ``max_tokens`` for ``/v1/completions``.
DEFAULT_MAX_TOKENS = 16
#: vLLM sends ``-inf`` log-probs as this (JSON has no infinities).
NEG_INF_JSON = -9999.0
#: vLLM raises a temperature in (0, 0.01) to this (lower ones overflow to NaN).
MIN_TEMPERATURE = 1e-2

#: Fields vLLM accepts that this server cannot honour, with the values that mean "off" (a
#: client library may send defaults explicitly): any other value is a 400 naming the field.
REFUSED: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "logit_bias": (None, {}), "stop": (None, [], ""),
    "use_beam_search": (False,), "min_p": (None, 0, 0.0), "watermarking": (None, False),
    "length_penalty": (1, 1.0), "min_tokens": (0,), "truncate_prompt_tokens": (None,),
    "truncation_side": (None,), "allowed_token_ids": (None,), "logprob_token_ids": (None,),
    "bad_words": (None, []), "prompt_embeds": (None,), "response_format": (None,),
    "structured_outputs": (None,), "priority": (0,), "kv_transfer_params": (None,),
    "ec_transfer_params": (None,), "vllm_xargs": (None,), "repetition_detection": (None,),
    "thinking_token_budget": (None, -1), "stream_options": (None,),
}
#: Fields vLLM accepts that cannot change what is scored or sampled: accepted, ignored.
IGNORED = ("user", "request_id", "session_id", "cache_salt", "include_stop_str_in_output",
           "return_token_offsets", "return_mm_kwargs", "routed_experts_prompt_start",
           "stream_interval")


class ProtocolError(ValueError):
    """A request this server refuses: vLLM's error shape, with the field in ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status
        self.type = "NotFoundError" if status == 404 else "BadRequestError"


class _Honoured(BaseModel):
    """The fields of vLLM's ``CompletionRequest`` this server honours (and its extensions)."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: list[StrictInt] | list[list[StrictInt]] | str | list[str]
    max_tokens: StrictInt | None = DEFAULT_MAX_TOKENS
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    n: StrictInt = 1
    prompt_logprobs: StrictInt | None = None
    logprobs: StrictInt | None = None
    stream: StrictBool | None = False
    echo: StrictBool | None = False
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    add_special_tokens: StrictBool = True
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    return_token_ids: StrictBool | None = None
    return_tokens_as_token_ids: StrictBool | None = None
    #: extensions (see the module docstring)
    prompt_logprob_token_ids: list[list[StrictInt]] | None = None
    prompt_logprob_start: StrictInt | None = Field(default=None, ge=0)
    prompt_logprobs_alpha: StrictBool = False


#: The request as the OpenAPI document states it: the honoured fields, and every field vLLM
#: accepts beside them (any value; :func:`parse_request` refuses what it cannot honour).
CompletionRequest = create_model(
    "CompletionRequest", __base__=_Honoured,
    __doc__="vLLM's completion request: the fields this server honours, plus vLLM's others "
            "(refused unless neutral, or ignored where they cannot change the scores)",
    **{name: (Any, None) for name in (*REFUSED, *IGNORED)})


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    return any(value == ok and type(value) is type(ok) for ok in neutral if ok is not None) \
        or (value is None and None in neutral)


def parse_request(data: Any) -> "_Honoured":
    """The request, or :class:`ProtocolError` naming the first field that is wrong."""
    if not isinstance(data, dict):
        raise ProtocolError("the body must be a JSON object")
    try:
        request = CompletionRequest.model_validate(data)
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else None
        if err.get("type") == "extra_forbidden":
            raise ProtocolError(f"unknown field `{field}`", field) from None
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise ProtocolError(f"{where}: {err.get('msg', 'invalid')}", field) from None
    for name, neutral in REFUSED.items():
        if name in request.model_fields_set and not _neutral(getattr(request, name), neutral):
            raise ProtocolError(f"`{name}` is not supported by the AlignDistil teacher server "
                                f"(pi* is scored and sampled as it is)", name)
    if request.n != 1:
        raise ProtocolError(f"n must be 1 (one completion per prompt), got {request.n}", "n")
    if request.stream:
        raise ProtocolError("stream=true is not supported; send stream=false", "stream")
    if request.echo:
        raise ProtocolError("echo=true is not supported: prompt_logprobs gives the prompt's "
                            "log-probs", "echo")
    if request.max_tokens is not None and request.max_tokens < 1:
        raise ProtocolError(f"max_tokens must be at least 1, got {request.max_tokens}.",
                            "max_tokens")
    for name in ("prompt_logprobs", "logprobs"):
        value = getattr(request, name)
        if value is not None and value < 0 and value != -1:
            raise ProtocolError(f"`{name}` must be a positive value or -1.", name)
    if request.temperature is not None and request.temperature > 2.0:
        raise ProtocolError(f"temperature must be in [0, 2], got {request.temperature}.",
                            "temperature")
    if request.top_k is not None and request.top_k < -1:
        raise ProtocolError(f"top_k must be -1 (off) or at least 1, got {request.top_k}",
                            "top_k")
    if request.prompt_logprob_start is not None and request.prompt_logprob_token_ids is None:
        raise ProtocolError("prompt_logprob_start needs prompt_logprob_token_ids",
                            "prompt_logprob_start")
    return request


def prompts_of(request: CompletionRequest, tokenizer) -> list[list[int]]:
    """The request's prompts as token ids (text tokenised as vLLM does: no chat template,
    special tokens as ``add_special_tokens`` says)."""
    prompt = request.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ProtocolError("prompt must not be empty", "prompt")
    if isinstance(prompt[0], str):
        out = [tokenizer(text, add_special_tokens=request.add_special_tokens)["input_ids"]
               for text in prompt]
    elif isinstance(prompt[0], int):
        out = [list(prompt)]
    else:
        out = [list(p) for p in prompt]
    if any(not p for p in out):
        raise ProtocolError("prompt must not be empty (a prompt with no token)", "prompt")
    return out


def requested_k(value: int | None, vocab_size: int, cap: int, param: str) -> int | None:
    """A ``prompt_logprobs`` or ``logprobs`` value as a number of ids (``-1``: the vocabulary);
    above the cap, vLLM's refusal."""
    if value is None:
        return None
    k = vocab_size if value == -1 else value
    if k > cap:
        kind = "prompt logprobs" if param == "prompt_logprobs" else "sample logprobs"
        raise ProtocolError(f"Requested {kind} of {k}, which is greater than max allowed: "
                            f"{cap}", param)
    return k


def named_rows(request: CompletionRequest, prompt_len: int, cap: int, vocab_size: int,
               rows_out: int | None = None) -> np.ndarray | None:
    """``prompt_logprob_token_ids`` as the engine's ``extra_ids`` for a prompt of
    ``prompt_len`` tokens: ``[rows_out or prompt_len - 1, m]``, its rows from
    ``prompt_logprob_start`` on, -1 elsewhere (and where a ragged row is short)."""
    rows = request.prompt_logprob_token_ids
    if rows is None:
        return None
    start = request.prompt_logprob_start or 0
    width = max((len(r) for r in rows), default=0)
    if not rows or width == 0:
        raise ProtocolError("prompt_logprob_token_ids must be a non-empty integer array of "
                            "shape [num_rows, num_ids].", "prompt_logprob_token_ids")
    if width > cap:
        raise ProtocolError(f"Requested {width} token ids per row in prompt_logprob_token_ids, "
                            f"which is greater than max allowed: {cap}.",
                            "prompt_logprob_token_ids")
    if start + len(rows) > prompt_len - 1:
        raise ProtocolError(f"prompt_logprob_token_ids has {len(rows)} rows from "
                            f"prompt_logprob_start {start}, but the prompt has "
                            f"{prompt_len - 1} scored rows", "prompt_logprob_token_ids")
    bad = next((i for row in rows for i in row if not -1 <= i < vocab_size), None)
    if bad is not None:
        raise ProtocolError(f"prompt_logprob_token_ids: token id {bad} is out of vocabulary "
                            f"(size {vocab_size}); pad a row with -1",
                            "prompt_logprob_token_ids")
    out = np.full((rows_out or prompt_len - 1, width), -1, dtype=np.int64)
    for r, ids in enumerate(rows):
        out[start + r, :len(ids)] = ids
    return out


# ---------------------------------------------------------------------------- the answer
def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else NEG_INF_JSON


def prompt_logprobs_entries(prompt: Sequence[int], detail, k: int, decode
                            ) -> list[dict[str, dict] | None]:
    """vLLM's ``prompt_logprobs`` for one prompt: ``None`` for the first token, then per token
    the actual token first and the top ``k`` (see the module docstring)."""
    out: list[dict[str, dict] | None] = [None]
    for t in range(len(prompt) - 1):
        actual = int(prompt[t + 1])
        entry = {str(actual): (float(detail.next_logprobs[t]), int(detail.next_ranks[t]))}
        for rank, (tid, lp) in enumerate(zip(detail.topk_ids[t, :k].tolist(),
                                             detail.topk_logprobs[t, :k].tolist()), start=1):
            entry[str(tid)] = (float(lp), rank)
        out.append({tid: {"logprob": _finite(lp), "rank": rank,
                          "decoded_token": decode(int(tid))}
                    for tid, (lp, rank) in entry.items()})
    return out


def npy_base64(array: np.ndarray) -> str:
    """An array as vLLM sends one: base64 of its ``.npy`` bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator

    @classmethod
    def of(cls, request: CompletionRequest) -> "Sampling":
        seed = request.seed if request.seed is not None else \
            int.from_bytes(uuid.uuid4().bytes[:8], "little") >> 1
        generator = torch.Generator().manual_seed(seed % (2 ** 63))
        temperature = 1.0 if request.temperature is None else float(request.temperature)
        if 0 < temperature < MIN_TEMPERATURE:  # as vLLM: lower ones overflow to NaN
            temperature = MIN_TEMPERATURE
        top_k = 0 if request.top_k in (None, -1, 0) else int(request.top_k)
        return cls(temperature, 1.0 if request.top_p is None else float(request.top_p),
                   top_k, generator)

    def draw(self, log_probs: torch.Tensor) -> torch.Tensor:
        """One id per row of ``log_probs`` ``[B, V]``: greedy at temperature 0, else a draw from
        the distribution at the temperature, cut to the top-k and the top-p nucleus."""
        if self.temperature == 0:
            return log_probs.argmax(dim=-1)
        logits = log_probs / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            outside = probs.cumsum(dim=-1) - probs > self.top_p  # keep the first past top_p
            sorted_logits = sorted_logits.masked_fill(outside, -math.inf)
            logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


@dataclass
class Drawn:
    """One sampled token, and what a completion's ``logprobs`` need of its position (kept
    instead of the whole ``[V]`` row)."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


def draw_tokens(rows: torch.Tensor, sampling: "Sampling", keep_k: int | None) -> list[Drawn]:
    """A token for each row of log pi* ``[B, V]``, with its raw log-prob and the top
    ``keep_k`` (none without ``logprobs``)."""
    tokens = sampling.draw(rows)
    picked = rows.gather(-1, tokens[:, None])[:, 0].tolist()
    tops: list[list] = [[] for _ in tokens]
    if keep_k:
        values, ids = torch.topk(rows, keep_k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [Drawn(int(t), lp, top) for t, lp, top in zip(tokens.tolist(), picked, tops)]


def completion_logprobs(drawn: list[Drawn], decode, as_ids: bool) -> dict[str, list]:
    """vLLM's ``logprobs`` of a completion: each sampled token's raw log pi*, with the top
    ``k`` at its position."""
    name = (lambda t: f"token_id:{t}") if as_ids else decode
    out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    offset = 0
    for d in drawn:
        text = name(d.token)
        out["text_offset"].append(offset)
        offset += len(text)
        out["tokens"].append(text)
        out["token_logprobs"].append(_finite(d.logprob))
        entry = {text: _finite(d.logprob)}
        for tid, lp in d.top:
            entry.setdefault(name(int(tid)), _finite(lp))
        out["top_logprobs"].append(entry)
    return out


def token_strings(tokenizer) -> list[str]:
    """Each id's ``decoded_token`` as vLLM 0.32 shows it: ``decode([id])``, with the leading
    spaces a SentencePiece (Metaspace) piece had and ``decode`` dropped put back."""
    ids = list(range(len(tokenizer)))
    raw = tokenizer.convert_ids_to_tokens(ids)
    out = []
    for i, piece in zip(ids, raw):
        text = tokenizer.decode([i]) or ""
        piece = str(piece)
        markers = len(piece) - len(piece.lstrip("\u2581"))
        missing = markers - (len(text) - len(text.lstrip(" ")))
        out.append(" " * missing + text if markers and missing > 0 else text)
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": None}


def response(model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int
             ) -> dict[str, Any]:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "service_tier": None, "system_fingerprint": None,
            "usage": usage(prompt_tokens, completion_tokens), "kv_transfer_params": None}


def models_list(model: str, max_model_len: int, created: int) -> dict[str, Any]:
    """``GET /v1/models``: the one model this server scores with."""
    return {"object": "list", "data": [{
        "id": model, "object": "model", "created": created, "owned_by": "aligndistil",
        "root": model, "parent": None, "max_model_len": max_model_len, "permission": []}]}
