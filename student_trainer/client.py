"""HTTP client for the teacher server (``aligndistil serve``), used by on-policy training.

- ``score`` sends token ids and asks for an Arrow IPC stream back (``Accept:
  application/vnd.apache.arrow.stream``): about 30x faster to decode than JSON and exact.
  Large batches are split into requests under the server's per-request limits.
- Transient failures are retried with exponential backoff and full jitter: connection errors,
  timeouts, 429 (overloaded) and 503 (still loading), honouring ``Retry-After``. After
  ``max_retries`` retries, :class:`TeacherUnavailable` stops the run with what went wrong.
- Other errors (400/401/413/422) are the caller's bug or setup and are never retried:
  :class:`TeacherRequestError` carries the server's ``{"error": {"type", "message"}}``.
- :meth:`TeacherClient.check_compatible` compares ``/v1/info`` with the student's tokenizer
  before the first step, so a mismatched vocabulary fails loudly instead of training on
  targets whose ids mean other tokens.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import httpx

from storage.errors import UserError
from storage.record import TargetRecord
from storage.wire import ARROW_STREAM_MEDIA_TYPE, WireError, decode_arrow
from student_trainer.errors import check_same_tokenizer

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})


class TeacherError(UserError, RuntimeError):
    """Base class of the client's errors."""


class TeacherUnavailable(TeacherError):
    """The server could not be reached or kept refusing (429/503) through every retry."""


class TeacherRequestError(TeacherError):
    """The server rejected the request (a 4xx other than 429); retrying cannot help."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(f"teacher server answered {status} {error_type}: {message}")
        self.status, self.error_type, self.server_message = status, error_type, message


class TeacherMismatch(TeacherError):
    """The server's teachers do not share the student's tokenizer."""


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` retries after the first attempt; the wait before retry ``n`` (0-based) is
    uniform in ``[0, min(max_delay, base_delay * 2**n)]`` (full jitter, so many clients that
    failed together do not retry together), or the server's ``Retry-After`` when it is longer
    (capped at ``max_delay``)."""

    max_retries: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        backoff = rng.uniform(0.0, min(self.max_delay, self.base_delay * (2 ** attempt)))
        if retry_after is not None:
            backoff = max(backoff, min(retry_after, self.max_delay))
        return backoff


class TeacherClient:
    """A synchronous client for one teacher server. Thread-safe (one ``httpx.Client``)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 120.0,
                 connect_timeout: float = 10.0, retry: RetryPolicy | None = None,
                 max_request_sequences: int = 128, max_request_tokens: int = 32768,
                 sleep: Callable[[float], None] = time.sleep, seed: int | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self._vocab_size: int | None = None  # set by check_compatible
        self.retry = retry or RetryPolicy()
        self.max_request_sequences = max_request_sequences
        self.max_request_tokens = max_request_tokens
        self._sleep = sleep
        self._rng = random.Random(seed)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, transport=transport,
            timeout=httpx.Timeout(timeout, connect=connect_timeout))
        self.retries_done = 0  #: total retries so far (for metrics and tests)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ API
    def info(self) -> dict[str, Any]:
        """``GET /v1/info``: the models, ``vocab_size``, ``tokenizer_sha256``, ``top_k``, ..."""
        return self._request("GET", "/v1/info").json()

    def check_compatible(self, *, tokenizer_sha256: str, vocab_size: int,
                         student: str = "--model") -> dict[str, Any]:
        """Refuse a server whose tokenizer is not the student's; returns its info."""
        info = self.info()
        check_same_tokenizer(f"the teacher server at {self.base_url}",
                             theirs_sha256=info.get("tokenizer_sha256"),
                             theirs_vocab=info.get("vocab_size"), student_sha256=tokenizer_sha256,
                             student_vocab=vocab_size, student=student, error=TeacherMismatch)
        self._vocab_size = vocab_size  # from now on, every served top-k id is checked against it
        return info

    def score(self, sequences: Sequence[tuple[Sequence[int], int]], *, top_k: int | None = None
              ) -> list[TargetRecord]:
        """Teacher targets for ``(input_ids, prompt_len)`` pairs, in order, over Arrow IPC."""
        records: list[TargetRecord] = []
        for chunk in self._chunks(sequences):
            body: dict[str, Any] = {"sequences": [
                {"input_ids": [int(t) for t in ids], "prompt_len": int(p)} for ids, p in chunk]}
            if top_k is not None:
                body["top_k"] = int(top_k)
            response = self._request("POST", "/v1/score", json=body,
                                     headers={"Accept": ARROW_STREAM_MEDIA_TYPE})
            kind = response.headers.get("content-type", "")
            if ARROW_STREAM_MEDIA_TYPE not in kind:
                raise TeacherError(f"teacher server answered content-type {kind!r}, expected "
                                   f"{ARROW_STREAM_MEDIA_TYPE}")
            try:
                got = decode_arrow(response.content,
                                   vocab_size=self._vocab_size)
            except WireError as exc:
                raise TeacherError(f"teacher server sent an unreadable Arrow stream: {exc}"
                                   ) from None
            if len(got) != len(chunk):
                raise TeacherError(f"teacher server returned {len(got)} results for "
                                   f"{len(chunk)} sequences")
            for record, (ids, p) in zip(got, chunk):
                if record.prompt_len != p or record.input_ids.tolist() != list(ids):
                    raise TeacherError("teacher server returned results out of order or for "
                                       "other sequences")
            records.extend(got)
        return records

    # ------------------------------------------------------------------ internals
    def _chunks(self, sequences):
        chunk, tokens = [], 0
        for ids, p in sequences:
            n = len(ids)
            if chunk and (len(chunk) >= self.max_request_sequences
                          or tokens + n > self.max_request_tokens):
                yield chunk
                chunk, tokens = [], 0
            chunk.append((ids, p))
            tokens += n
        if chunk:
            yield chunk

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        attempt = 0
        while True:
            problem, retry_after = None, None
            try:
                response = self._http.request(method, path, **kwargs)
            except (httpx.TransportError,) as exc:  # connect errors, timeouts, resets
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return response
                error_type, message = _error_of(response)
                if response.status_code not in RETRY_STATUSES:
                    raise TeacherRequestError(response.status_code, error_type, message)
                problem = f"{response.status_code} {error_type}: {message}"
                retry_after = _retry_after(response)
            if attempt >= self.retry.max_retries:
                raise TeacherUnavailable(
                    f"teacher server at {self.base_url} unavailable: {method} {path} failed "
                    f"{attempt + 1} times; last error: {problem}")
            wait = self.retry.delay(attempt, retry_after, self._rng)
            log.warning("teacher %s %s failed (%s); retry %d/%d in %.1fs", method, path,
                        problem, attempt + 1, self.retry.max_retries, wait)
            self._sleep(wait)
            attempt += 1
            self.retries_done += 1


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        err = response.json()["error"]
        return str(err.get("type", "error")), str(err.get("message", ""))
    except Exception:
        return "error", response.text[:200]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
