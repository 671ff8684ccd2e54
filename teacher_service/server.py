"""The live teacher: a FastAPI app over the one engine (DESIGN §4).

Endpoints: ``POST /v1/score`` (token ids or text; JSON, or an Arrow IPC stream when the client
sends ``Accept: application/vnd.apache.arrow.stream``), ``GET /v1/info``, ``/healthz``,
``/readyz``, ``/metrics``. Every error is ``{"error": {"type", "message"}}`` with a 4xx status
for anything the client sent; a 5xx only ever means the server itself failed.

The body is read by hand (bounded, before any parsing) rather than by FastAPI's body parameter,
so that size limits, malformed JSON, NaN/Infinity and absurd nesting all get precise 4xx answers.
The body must be UTF-8 JSON: a Content-Type other than JSON gets 415 (none at all is read as
JSON), other encodings and strings holding lone surrogates (``"\\ud800"``) get 400 / 422.
"""


import asyncio
import hmac
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Callable, Union

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictInt,
                      StrictStr, Tag, ValidationError)
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from storage import wire
from storage.datasets import Example
from storage.errors import UserError
from storage.tokenization import TokenizationError, tokenize_example
from teacher_service.batcher import MicroBatcher, QueueFull
from teacher_service import vllm_protocol as vp
from teacher_service.engine import (InvalidSequenceError, ScoreRequest, SequenceTooLongError,
                                    TeacherEngine)
from teacher_service.vllm_protocol import DEFAULT_MODEL_ID, CompletionRequest, ProtocolError

log = logging.getLogger(__name__)

API_KEY_ENV = "ALIGNDISTIL_API_KEY"


# ---------------------------------------------------------------------------- request models
def _valid_unicode(value: str) -> str:
    """JSON may spell a lone UTF-16 surrogate (``"\\ud800"``); no tokenizer can encode one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains the lone surrogate {value[exc.start]!a} at index "
                         f"{exc.start}; strings must be valid Unicode") from None
    return value


#: A JSON string that is valid Unicode (no lone surrogates).
Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Text
    content: Text


class TokenSequence(BaseModel):
    """A pre-tokenised sequence: prompt + response ids and where the response starts; with
    ``extra_ids``, the ids whose log pi* to return at each response position as well (one list
    per position, any length up to the server's top_k; the result's ``extra_logprobs``)."""
    model_config = ConfigDict(extra="forbid")
    input_ids: list[StrictInt] = Field(min_length=2)
    #: the engine also needs prompt_len < len(input_ids), which a JSON Schema cannot state
    prompt_len: StrictInt = Field(ge=1)
    extra_ids: list[list[StrictInt]] | None = None


class TextSequence(BaseModel):
    """A text sequence the server tokenises with the teachers' chat template: the prompt as
    ``messages`` or as one user turn ``prompt`` (exactly one of them), and the ``response``."""
    #: the schema states "exactly one of messages and prompt" (checked in _to_request)
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}}]})
    messages: list[Message] | None = Field(default=None, min_length=1)
    prompt: Text | None = None
    response: Annotated[Text, Field(min_length=1)]


def _sequence_kind(value: Any) -> str | None:
    """Pick the one model a sequence object is meant as, so that errors name its real fields
    (rather than listing why it fails BOTH models)."""
    if isinstance(value, dict):
        return "tokens" if "input_ids" in value or "prompt_len" in value else "text"
    if isinstance(value, TokenSequence):
        return "tokens"
    if isinstance(value, TextSequence):
        return "text"
    return None


#: One entry of ``sequences``: token ids (``input_ids`` + ``prompt_len``) or text.
SequenceItem = Annotated[
    Union[Annotated[TokenSequence, Tag("tokens")], Annotated[TextSequence, Tag("text")]],
    Discriminator(_sequence_kind, custom_error_type="invalid_sequence",
                  custom_error_message="a sequence must be an object with input_ids and "
                                       "prompt_len, or with messages or prompt, and response")]


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sequences: list[SequenceItem] = Field(min_length=1)
    top_k: StrictInt | None = Field(default=None, ge=1)


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


def error_response(status: int, type_: str, message: str, headers: dict | None = None
                   ) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status,
                        headers=headers)


# ---------------------------------------------------------------------------- settings, state
@dataclass
class ServerSettings:
    max_body_bytes: int = 8 << 20
    max_sequences: int = 256
    max_request_tokens: int = 65536
    max_batch_tokens: int = 8192
    batch_wait_s: float = 0.005
    max_queue_requests: int = 256
    max_queue_tokens: int | None = None
    max_bodies: int = 64
    api_key: str | None = None
    served_model_name: str = DEFAULT_MODEL_ID


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("aligndistil_requests_total", "HTTP requests by path and status",
                                ["path", "status"], registry=self.registry)
        self.latency = Histogram("aligndistil_score_latency_seconds", "POST /v1/score latency",
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.tokens = Counter("aligndistil_scored_tokens_total", "tokens scored (prompt + response)",
                              registry=self.registry)
        self.batches = Histogram("aligndistil_engine_batch_sequences", "sequences per engine pass",
                                 registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.engine_seconds = Counter("aligndistil_engine_seconds_total", "time inside the engine",
                                      registry=self.registry)
        self.rejected = Counter("aligndistil_rejected_total", "requests shed with 429",
                                registry=self.registry)
        self.queue_depth = Gauge("aligndistil_queue_requests", "requests waiting for the engine",
                                 registry=self.registry)

    def on_batch(self, sequences: int, tokens: int, seconds: float) -> None:
        self.batches.observe(sequences)
        self.tokens.inc(tokens)
        self.engine_seconds.inc(seconds)


class ServerState:
    """Holds the engine once it is loaded; loading runs in a thread so /healthz answers at once."""

    def __init__(self, engine_factory: Callable[[], TeacherEngine], settings: ServerSettings):
        self.engine_factory = engine_factory
        self.settings = settings
        self.engine: TeacherEngine | None = None
        self.batcher: MicroBatcher | None = None
        self.load_error: str | None = None
        #: called when the teachers cannot be loaded (``serve`` stops the process: a server
        #: that can never serve must not look like one that is still loading)
        self.on_load_failure: Callable[[], None] | None = None
        self.metrics = Metrics()
        self.started = time.time()  #: when the server came up (``/v1/models``' ``created``)
        self._loaded = threading.Event()
        #: bodies being read at once (each up to max_body_bytes); created in the server's loop
        self.body_slots: asyncio.Semaphore | None = None

    async def load(self) -> None:
        try:
            engine = await asyncio.to_thread(self.engine_factory)
        except Exception as exc:
            if isinstance(exc, UserError):
                log.error("loading the teachers failed: %s", exc)
                self.load_error = str(exc)
            else:
                log.exception("loading the teachers failed")
                self.load_error = f"{type(exc).__name__}: {exc}"
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        s = self.settings
        self.batcher = MicroBatcher(engine, max_batch_tokens=s.max_batch_tokens,
                                    max_wait_s=s.batch_wait_s,
                                    max_queue_requests=s.max_queue_requests,
                                    max_queue_tokens=s.max_queue_tokens,
                                    on_batch=self.metrics.on_batch)
        self.batcher.start()
        self.engine = engine
        log.info("teachers loaded; ready")


# ---------------------------------------------------------------------------- response models
class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {"type", "message"}}``."""
    error: ErrorBody


class Status(BaseModel):
    status: str


class VLLMErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class VLLMErrorResponse(BaseModel):
    """The error body of the vLLM-compatible endpoints (vLLM's own shape)."""
    error: VLLMErrorInfo


class TeacherInfo(BaseModel):
    """``GET /v1/info``: the models, the vocabulary and tokenizer, and every target setting."""
    models: dict[str, dict[str, str]]
    vocab_size: int
    model_vocab_size: int
    tokenizer_sha256: str
    device: str
    dtype: str
    top_k: int
    r: float
    eps: float
    tvd_norm: str
    mode: str
    beta0: float
    beta: float
    dpo_top: int  #: 0: the kept ids are pi*'s top-k; N: they include the dpo model's top N
    #: 0: every position keeps top_k ids; EPS > 0: the fewest whose pi* mass reaches 1 - EPS
    #: (at least min_k, at most top_k), so the topk lists of a result are ragged
    tail_budget: float = 0.0
    min_k: int = 1
    max_seq_len: int
    #: the vLLM-compatible endpoints: the model id they answer as, and the largest
    #: ``prompt_logprobs`` / ``logprobs`` K (vLLM's --max-logprobs; the server's top_k)
    served_model_name: str
    max_logprobs: int


class ScoreResult(BaseModel):
    """One sequence's sparse targets (the store's record fields, DESIGN §4)."""
    input_ids: list[int]
    prompt_len: int
    alpha: list[float]
    #: one list per response position: top_k entries, or k_t of them with a tail budget
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    tail_logmass: list[float | None]  #: null: no mass outside the top-k (-inf)
    dpo_logprobs: list[float]
    reverse_logprobs: list[float]


class ScoreResponse(BaseModel):
    results: list[ScoreResult]


_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 415, 422, 429, 503)}


# ---------------------------------------------------------------------------- OpenAPI
_COMPONENTS = "#/components/schemas/{model}"
#: JSON schemas of the bodies read by hand (``json_body_openapi``) and of every model they
#: nest, by component name: :func:`_as_configured` puts them into components/schemas.
_BODY_SCHEMAS: dict[str, dict] = {}


def json_body_openapi(model: type[BaseModel]) -> dict:
    """``openapi_extra`` for a route that reads its JSON body by hand (as ``/v1/score`` does, for
    the size and encoding checks) instead of through a FastAPI body parameter: the request body
    is ``model``, by reference, and ``model`` with the models it nests go into
    components/schemas, so every reference in the document resolves."""
    refs, defs = models_json_schema([(model, "validation")], ref_template=_COMPONENTS)
    for name, schema in defs.get("$defs", {}).items():
        if _BODY_SCHEMAS.setdefault(name, schema) != schema:
            raise ValueError(f"two different request models are both named {name!r}")
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": refs[(model, "validation")]}}}}


_ERROR_SCHEMAS = models_json_schema([(ErrorResponse, "serialization")],
                                    ref_template=_COMPONENTS)[1]["$defs"]


def _add_components(schemas: dict, new: dict) -> None:
    for name, schema in new.items():
        if schemas.setdefault(name, schema) != schema:
            raise ValueError(f"two different models are both named {name!r} in the OpenAPI "
                             f"document; rename one")


def _as_configured(doc: dict, settings: ServerSettings) -> dict:
    """FastAPI's document, completed: the hand-read bodies' schemas in components, our error
    body for 422s, and security only where the server has a key (DESIGN §4)."""
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    _add_components(schemas, _BODY_SCHEMAS)
    ops = [op for item in doc.get("paths", {}).values() for op in item.values()
           if isinstance(op, dict) and "responses" in op]
    # A route with FastAPI-validated parameters documents FastAPI's 422 body ({"detail": ..});
    # the server answers those with ErrorResponse (_validation_error), so document that.
    fastapi_422 = {"$ref": _COMPONENTS.format(model="HTTPValidationError")}
    for op in ops:
        content = op["responses"].get("422", {}).get("content", {}).get("application/json", {})
        if content.get("schema") == fastapi_422:
            content["schema"] = {"$ref": _COMPONENTS.format(model="ErrorResponse")}
            _add_components(schemas, _ERROR_SCHEMAS)
    if fastapi_422["$ref"] not in json.dumps(doc):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
    if not settings.api_key:
        # No key: nothing is checked, so nothing is declared (nor a 401 that is never sent).
        components.pop("securitySchemes", None)
        for op in ops:
            if op.pop("security", None) is not None:
                op["responses"].pop("401", None)
    return doc


# ---------------------------------------------------------------------------- dependencies
def get_state(request: Request) -> ServerState:
    return request.app.state.server


#: ``Authorization: Bearer KEY``; declared so OpenAPI shows the scheme. ``auto_error=False``:
#: a missing or malformed header reaches :func:`require_key`, which answers our own 401 body.
bearer_scheme = HTTPBearer(auto_error=False, description="the server's --api-key")


def require_key(state: Annotated[ServerState, Depends(get_state)],
                credentials: Annotated[HTTPAuthorizationCredentials | None,
                                       Security(bearer_scheme)]) -> None:
    key = state.settings.api_key
    if not key:
        return
    token = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token",
                       {"WWW-Authenticate": "Bearer"})


def require_ready(state: Annotated[ServerState, Depends(get_state)]) -> TeacherEngine:
    if state.engine is None:
        detail = state.load_error or "the teachers are still loading"
        raise ApiError(503, "not_ready", detail, {"Retry-After": "5"})
    return state.engine


async def read_score_body(request: Request,
                          state: Annotated[ServerState, Depends(get_state)]) -> ScoreBody:
    """The body, read by hand: bounded, strictly UTF-8 JSON, no NaN/Infinity, then validated."""
    data = await _read_json_body(request, state)
    try:
        return ScoreBody.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", _format_errors(exc.errors())) from None
    except RecursionError:
        raise ApiError(400, "malformed_json", "JSON nested too deeply") from None


async def read_completion_body(request: Request,
                               state: Annotated[ServerState, Depends(get_state)]
                               ) -> CompletionRequest:
    """``POST /v1/completions``' body, read as ``/v1/score``'s is; refused in vLLM's shape."""
    try:
        data = await _read_json_body(request, state)
    except ApiError as exc:
        if exc.status in (429, 413):
            raise
        raise ProtocolError(exc.message, None, 415 if exc.status == 415 else 400) from None
    return vp.parse_request(data)


async def _read_json_body(request: Request, state: ServerState) -> Any:
    """A request body, read by hand: bounded, strictly UTF-8 JSON, no NaN/Infinity."""
    _require_json_content_type(request)
    if state.body_slots is None:
        state.body_slots = asyncio.Semaphore(state.settings.max_bodies)
    if state.body_slots.locked():  # shed before reading: a flood of bodies cannot grow memory
        state.metrics.rejected.inc()
        raise ApiError(429, "overloaded", f"{state.settings.max_bodies} request bodies are "
                       f"being read already; retry later", {"Retry-After": "1"})
    async with state.body_slots:  # held while the body and its parsed form are in memory
        raw = await _read_bounded(request, state.settings.max_body_bytes)
        return _parse_json(raw)


def _parse_json(raw: bytes) -> Any:
    try:
        # Strictly UTF-8 (RFC 8259 §8.1): json.loads(bytes) would also guess UTF-16/32.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "malformed_json",
                       f"body is not UTF-8 (invalid byte at offset {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "malformed_json", "JSON nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, "malformed_json", f"body is not valid JSON: {exc}") from None
    return data


# ---------------------------------------------------------------------------- routes
router = APIRouter()


@router.get("/healthz", response_model=Status)
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorResponse}})
async def readyz(state: Annotated[ServerState, Depends(get_state)]):
    if state.engine is None:
        return error_response(503, "not_ready", state.load_error or "the teachers are still loading")
    return {"status": "ready"}


@router.get("/metrics", response_class=Response)
async def metrics(state: Annotated[ServerState, Depends(get_state)]):
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.queued_requests)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", response_model=TeacherInfo, dependencies=[Depends(require_key)],
            responses={401: _ERRORS[401], 503: _ERRORS[503]})
async def v1_info(state: Annotated[ServerState, Depends(get_state)],
                  engine: Annotated[TeacherEngine, Depends(require_ready)]):
    return {**engine.info(), "served_model_name": state.settings.served_model_name,
            "max_logprobs": engine.config.top_k}


@router.post("/v1/score", dependencies=[Depends(require_key)],
             responses={200: {"model": ScoreResponse, "content": {
                 wire.ARROW_STREAM_MEDIA_TYPE: {}}}, **_ERRORS},
             openapi_extra=json_body_openapi(ScoreBody))
async def v1_score(request: Request, state: Annotated[ServerState, Depends(get_state)],
                   engine: Annotated[TeacherEngine, Depends(require_ready)],
                   body: Annotated[ScoreBody, Depends(read_score_body)]):
    """Sparse teacher targets for every sequence, in order: JSON (:class:`ScoreResponse`),
    or an Arrow IPC stream of the same fields for ``Accept: application/vnd.apache.arrow.stream``
    (the body is encoded directly from the records, never through the models above)."""
    settings = state.settings
    started = time.perf_counter()
    if len(body.sequences) > settings.max_sequences:
        raise ApiError(413, "too_many_sequences",
                       f"{len(body.sequences)} sequences; the limit is {settings.max_sequences}")
    top_k = body.top_k
    if top_k is not None and top_k > engine.config.top_k:
        raise ApiError(422, "invalid_request",
                       f"top_k {top_k} exceeds the server's top_k {engine.config.top_k}")
    requests = [_to_request(engine, i, seq) for i, seq in enumerate(body.sequences)]
    total = sum(len(r.input_ids) for r in requests)
    if total > settings.max_request_tokens:
        raise ApiError(413, "too_many_tokens", f"{total} tokens in one request; the limit is "
                                               f"{settings.max_request_tokens}")
    named = any(r.extra_ids is not None for r in requests)
    results = await _submit(state, requests, top_k, detailed=named)
    state.metrics.latency.observe(time.perf_counter() - started)
    records = [r for r, _ in results] if named else results
    extra = [_named_logprobs(req, detail) for req, (_, detail) in zip(requests, results)] \
        if named else None
    if wire.ARROW_STREAM_MEDIA_TYPE in request.headers.get("accept", ""):
        return Response(wire.encode_arrow(records, extra_logprobs=extra),
                        media_type=wire.ARROW_STREAM_MEDIA_TYPE)
    return Response(wire.encode_json(records, extra_logprobs=extra),
                    media_type="application/json")


async def _submit(state: ServerState, requests: list[ScoreRequest], top_k: int | None, *,
                  detailed: bool = False) -> list:
    try:
        return await state.batcher.submit(requests, top_k, detailed=detailed)
    except QueueFull as exc:
        state.metrics.rejected.inc()
        raise ApiError(429, "overloaded", str(exc),
                       {"Retry-After": str(int(exc.retry_after_s + 0.999))}) from None


def _named_logprobs(req: ScoreRequest, detail) -> np.ndarray:
    """log pi* at a sequence's named ids, ``[T, m]`` (``[T, 0]`` when it named none)."""
    if req.extra_ids is None:
        return np.zeros((len(req.input_ids) - req.prompt_len, 0), dtype=np.float32)
    return detail.extra_logprobs


# ---------------------------------------------------------------------------- vLLM's protocol
@router.get("/health", response_class=Response,
            responses={200: {"description": "the teachers are loaded (an empty body, as vLLM's)",
                             "content": {}},
                       503: {"model": ErrorResponse}})
async def health(state: Annotated[ServerState, Depends(get_state)]):
    """vLLM's health check (TRL's client waits for its 200): 200 once the teachers are loaded,
    503 while they load."""
    if state.engine is None:
        return error_response(503, "not_ready", state.load_error or "the teachers are still loading")
    return Response(status_code=200)


@router.get("/v1/models", dependencies=[Depends(require_key)],
            responses={401: _ERRORS[401], 503: _ERRORS[503]})
async def v1_models(state: Annotated[ServerState, Depends(get_state)],
                    engine: Annotated[TeacherEngine, Depends(require_ready)]):
    """vLLM's model list: the one model id this server scores as (``--served-model-name``)."""
    return vp.models_list(state.settings.served_model_name, engine.max_seq_len,
                          int(state.started))


@router.post("/v1/completions", dependencies=[Depends(require_key)],
             responses={200: {"description": "vLLM's CompletionResponse: per prompt a choice with "
                                             "its text, finish_reason, prompt_logprobs and "
                                             "logprobs; usage (teacher_service/vllm_protocol.py)",
                              "content": {"application/json": {}}},
                        400: {"model": VLLMErrorResponse}, 404: {"model": VLLMErrorResponse},
                        **{s: _ERRORS[s] for s in (401, 413, 415, 429, 503)}},
             openapi_extra=json_body_openapi(CompletionRequest))
async def v1_completions(state: Annotated[ServerState, Depends(get_state)],
                         engine: Annotated[TeacherEngine, Depends(require_ready)],
                         body: Annotated[CompletionRequest, Depends(read_completion_body)]):
    """vLLM's ``/v1/completions`` over pi*: ``prompt_logprobs`` of every prompt and a completion
    sampled from pi* (:mod:`teacher_service.vllm_protocol` says what follows vLLM and how)."""
    settings, started = state.settings, time.perf_counter()
    if body.model is not None and body.model != settings.served_model_name:
        raise ProtocolError(f"The model `{body.model}` does not exist.", "model", 404)
    tokenizer, vocab, cap = engine.pair.tokenizer, engine.pair.vocab_size, engine.config.top_k
    limit = engine.max_seq_len
    prompts = vp.prompts_of(body, tokenizer)
    k = vp.requested_k(body.prompt_logprobs, vocab, cap, "prompt_logprobs")
    sample_k = vp.requested_k(body.logprobs, vocab, cap, "logprobs")
    if len(prompts) > settings.max_sequences:
        raise ApiError(413, "too_many_sequences",
                       f"{len(prompts)} prompts; the limit is {settings.max_sequences}")
    for p in prompts:
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise ProtocolError(f"Token id {bad} is out of vocabulary (size {vocab})", "prompt")
        if len(p) > limit:
            raise ProtocolError(f"Input length ({len(p)}) exceeds model's maximum context "
                                f"length ({limit}).", "prompt")
        if len(p) == limit:
            raise ProtocolError("max_tokens must be at least 1, got 0: the prompt fills the "
                                f"maximum context length ({limit}).", "max_tokens")
    # as vLLM: each prompt's completion is cut to the room left under the context length
    max_new = [min(body.max_tokens or vp.DEFAULT_MAX_TOKENS, limit - len(p)) for p in prompts]
    total = sum(len(p) + n for p, n in zip(prompts, max_new))
    if total > settings.max_request_tokens:
        raise ApiError(413, "too_many_tokens", f"{total} prompt and completion tokens in one "
                                               f"request; the limit is "
                                               f"{settings.max_request_tokens}")
    # every prompt is scored with a placeholder after it: its positions give prompt_logprobs,
    # and the placeholder's row is the first completion token's distribution (one pass)
    requests = [ScoreRequest([*p, 0], 1, keep_last_row=True,
                             extra_ids=vp.named_rows(body, len(p), cap, vocab, len(p)))
                for p in prompts]
    for i, req in enumerate(requests):
        if req.extra_ids is not None:
            engine.validate_extra_ids(i, req)
    scored = await _submit(state, requests, max(k or 1, 1), detailed=True)
    completions = await _sample(state, engine, prompts, body, max_new, sample_k,
                                [detail.last_row for _, detail in scored])
    decode = _decoder(tokenizer)
    choices = []
    for i, (prompt, (record, detail), (drawn, finish, stop)) in enumerate(
            zip(prompts, scored, completions)):
        tokens = [d.token for d in drawn]
        choice: dict[str, Any] = {
            "index": i, "text": tokenizer.decode(tokens, skip_special_tokens=
                                                 body.skip_special_tokens),
            "logprobs": vp.completion_logprobs(drawn, decode,
                                               bool(body.return_tokens_as_token_ids))
            if sample_k is not None else None,
            "finish_reason": finish, "stop_reason": stop,
            "prompt_logprobs": None, "prompt_token_ids": None, "token_ids": None}
        if body.return_token_ids:
            choice.update(prompt_token_ids=list(prompt), token_ids=tokens)
        if k is not None:
            choice["prompt_logprobs"] = vp.prompt_logprobs_entries(prompt, detail, k, decode)
        if body.prompt_logprob_token_ids is not None:
            start = body.prompt_logprob_start or 0
            rows_named = detail.extra_logprobs[start:start + len(body.prompt_logprob_token_ids)]
            choice["prompt_token_id_logprobs"] = vp.npy_base64(rows_named.astype(np.float32))
        if body.prompt_logprobs_alpha:
            alpha = record.alpha[:len(prompt) - 1].tolist()  # the placeholder's is not one
            choice["prompt_logprobs_alpha"] = [None, *alpha]
            choice["prompt_logprobs_beta"] = [None, *(engine.config.beta0 / a for a in alpha)]
        choices.append(choice)
    state.metrics.latency.observe(time.perf_counter() - started)
    payload = vp.response(settings.served_model_name, choices, sum(len(p) for p in prompts),
                          sum(len(c[0]) for c in completions))
    # json.dumps directly: FastAPI's encoder walks every one of the (K + 1) x T entries
    return Response(json.dumps(payload, separators=(",", ":"), allow_nan=False),
                    media_type="application/json")


async def _sample(state: ServerState, engine: TeacherEngine, prompts: list[list[int]],
                  body: CompletionRequest, max_new: list[int], keep_k: int | None,
                  first_rows: list[torch.Tensor]):
    """A completion of each prompt sampled from pi*: the first token from the scoring pass's
    rows, each later one from an engine pass over the prompts still going (on the engine's
    thread; the draws in a worker thread, off the event loop). Each position keeps only what
    ``logprobs`` needs. ``[(drawn, finish_reason, stop_reason)]``."""
    sampling = vp.Sampling.of(body)
    eos = set() if body.ignore_eos else _eos_ids(engine.pair.tokenizer)
    stops = set(body.stop_token_ids or ())
    drawn: list[list[vp.Drawn]] = [[] for _ in prompts]
    ends: list[tuple[str, int | None]] = [("length", None)] * len(prompts)
    going = list(range(len(prompts)))
    rows = torch.stack(first_rows)
    while going:
        new = await asyncio.to_thread(vp.draw_tokens, rows, sampling, keep_k)
        still = []
        for i, d in zip(going, new):
            drawn[i].append(d)
            if d.token in stops or d.token in eos:
                ends[i] = ("stop", d.token if d.token in stops else None)
            elif len(drawn[i]) < max_new[i]:
                still.append(i)
        going = still
        if going:
            rows = await state.batcher.call(
                engine.next_token_logprobs,
                [prompts[i] + [d.token for d in drawn[i]] for i in going])
    return [(d, finish, stop) for d, (finish, stop) in zip(drawn, ends)]


def _eos_ids(tokenizer) -> set[int]:
    eos = tokenizer.eos_token_id
    return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))


def _decoder(tokenizer):
    """A token id as vLLM's ``decoded_token`` shows it (:func:`vllm_protocol.token_strings`),
    from a table built once per tokenizer."""
    table = getattr(tokenizer, "_aligndistil_tokens", None)
    if table is None:
        table = vp.token_strings(tokenizer)
        tokenizer._aligndistil_tokens = table
    return table.__getitem__


# ---------------------------------------------------------------------------- errors
async def _api_error(request: Request, exc: ApiError):
    return error_response(exc.status, exc.type, exc.message, exc.headers)


async def _protocol_error(request: Request, exc: ProtocolError):
    return JSONResponse({"error": {"message": exc.message, "type": exc.type,
                                   "param": exc.param, "code": exc.status}},
                        status_code=exc.status)


async def _validation_error(request: Request, exc: RequestValidationError):
    return error_response(422, "invalid_request", _format_errors(exc.errors()))


async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # RFC 9110 §15.5.6: Allow lists what the path does take
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return error_response(exc.status_code, kind, str(exc.detail), headers or None)


def _allowed_methods(request: Request) -> str:
    """Every method of every route on the request's path (Starlette's own 405 names only the
    first route that matched the path)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


async def _count_requests(request: Request, call_next):
    response = await call_next(request)
    request.app.state.server.metrics.requests.labels(
        request.url.path if request.url.path in _PATHS else "other",
        str(response.status_code)).inc()
    return response


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.server
    loader = asyncio.create_task(state.load())
    yield
    await loader
    if state.batcher is not None:
        await state.batcher.stop()  # finish what is queued and in flight


# ---------------------------------------------------------------------------- the app
def create_app(engine_factory: Callable[[], TeacherEngine],
               settings: ServerSettings | None = None) -> FastAPI:
    """The app; the engine is built by ``engine_factory`` in a thread once the app starts."""
    settings = settings or ServerSettings()
    if settings.api_key is None:
        settings.api_key = os.environ.get(API_KEY_ENV) or None
    app = FastAPI(title="aligndistil teacher", version="1", lifespan=_lifespan)
    app.state.server = ServerState(engine_factory, settings)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ProtocolError, _protocol_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.middleware("http")(_count_requests)
    app.include_router(router)

    def openapi() -> dict:
        """The document of this server as configured (DESIGN §4), built once."""
        if app.openapi_schema is None:
            doc = FastAPI.openapi(app)
            app.openapi_schema = None  # cached only once completed
            app.openapi_schema = _as_configured(doc, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


_PATHS = {"/v1/score", "/v1/info", "/healthz", "/readyz", "/metrics", "/health", "/v1/models",
          "/v1/completions"}


def _to_request(engine: TeacherEngine, index: int, seq: TokenSequence | TextSequence
                ) -> ScoreRequest:
    if isinstance(seq, TokenSequence):
        ids, prompt_len = seq.input_ids, seq.prompt_len
    else:
        if (seq.messages is None) == (seq.prompt is None):
            raise ApiError(422, "invalid_request",
                           f"sequences[{index}]: give exactly one of 'messages' or 'prompt'")
        example = Example(
            index=index, source="request",
            prompt_messages=([m.model_dump() for m in seq.messages] if seq.messages
                             else [{"role": "user", "content": seq.prompt}]),
            response=seq.response)
        try:
            ids, prompt_len = tokenize_example(engine.pair.tokenizer, example)
        except TokenizationError as exc:
            raise ApiError(422, "invalid_request", f"sequences[{index}]: {exc}") from None
    named = _extra_ids(engine, index, seq.extra_ids) \
        if isinstance(seq, TokenSequence) and seq.extra_ids is not None else None
    request = ScoreRequest(list(ids), int(prompt_len), extra_ids=named)
    try:
        engine.validate(index, ids, prompt_len)
        if named is not None:
            engine.validate_extra_ids(index, request)
    except SequenceTooLongError as exc:
        raise ApiError(413, "invalid_sequence", str(exc)) from None
    except InvalidSequenceError as exc:
        raise ApiError(422, "invalid_sequence", str(exc)) from None
    return request


def _extra_ids(engine: TeacherEngine, index: int, rows: list[list[int]]) -> np.ndarray:
    """A sequence's ``extra_ids`` (one list per response position, of any lengths up to the
    server's top_k) as a ``[T, m]`` array padded with -1."""
    width = max((len(r) for r in rows), default=0)
    if width > engine.config.top_k:
        raise ApiError(422, "invalid_sequence", f"sequences[{index}].extra_ids: {width} ids at "
                       f"one position; the limit is the server's top_k {engine.config.top_k}")
    vocab = engine.pair.vocab_size
    bad = next((t for r in rows for t in r if not 0 <= t < vocab), None)
    if bad is not None:  # before any array: a huge int would overflow it
        raise ApiError(422, "invalid_sequence", f"sequences[{index}].extra_ids: token id "
                       f"{bad} outside the vocabulary [0, {vocab})")
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for t, row in enumerate(rows):
        out[t, :len(row)] = row
    return out


def _require_json_content_type(request: Request) -> None:
    """JSON bodies only. A missing Content-Type is read as JSON (as FastAPI does); any other
    type is refused, which also keeps browsers' form posts (text/plain, form-urlencoded: no CORS
    preflight) from reaching the scorer cross-site."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media = declared.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {_clip(media)!r} is not supported; send application/json")


async def _read_bounded(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, "body_too_large", f"body of {declared} bytes; the limit is {limit}")
        except ValueError:
            raise ApiError(400, "bad_request", "invalid Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _format_errors(errors: list[dict]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(_clip(str(p)) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _clip(text: str, limit: int = 64) -> str:
    """Client-chosen names (unknown keys, media types) are echoed in messages only this long."""
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------- the process
def run_serve(config) -> int:
    """``aligndistil serve``: uvicorn over :func:`create_app` until SIGTERM/SIGINT.

    ``config`` is a :class:`~teacher_service.config.ServeConfig`."""
    import signal
    import sys

    import uvicorn

    from teacher_service.engine import build_engine
    from teacher_service.models import TeacherLoadError

    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config.validate()  # a missing teacher flag fails before the port is bound
    config.resolved_r()
    settings = ServerSettings(
        max_body_bytes=config.max_body_bytes, max_request_tokens=config.max_request_tokens,
        max_batch_tokens=config.max_batch_tokens, batch_wait_s=config.batch_wait_ms / 1000,
        max_queue_requests=config.max_queue, max_bodies=config.max_bodies,
        served_model_name=config.served_model_name,
        api_key=config.api_key or os.environ.get(API_KEY_ENV) or None)
    app = create_app(partial(build_engine, config), settings)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                           log_level=config.log_level,
                                           limit_concurrency=config.max_connections,
                                           timeout_graceful_shutdown=30))
    state: ServerState = app.state.server
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    # uvicorn finishes in-flight requests on SIGTERM, then re-raises the signal to whatever
    # handler was there before: make that a clean exit, since the shutdown was graceful.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
    if state.load_error is not None:
        raise TeacherLoadError(f"the teachers could not be loaded, so the server stopped: "
                               f"{state.load_error}")
    return 0
