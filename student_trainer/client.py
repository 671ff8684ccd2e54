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

Several servers (``TeacherClient(["http://a:8000", "http://b:8000"])``, or one comma-separated
string): ``check_compatible`` refuses a set whose ``/v1/info`` differ in anything that shapes
the targets (:data:`TARGET_FIELDS`). ``score`` splits a batch into at least one request per
server and sends them at once; each request goes to the live server with the fewest requests
outstanding. A server that fails, times out or sheds (429/503) is taken out of rotation and the
request moves to another at once; a server out of rotation is asked ``/readyz`` (and
``/v1/info``, which must still match) before it gets requests again, after the retry policy's
backoff. Only when every server is out does the client wait, and after ``max_retries`` such
rounds it raises :class:`TeacherUnavailable`. Each sequence's targets come from exactly one
answered request.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import httpx

from storage.errors import UserError
from storage.record import TargetRecord
from storage.wire import ARROW_STREAM_MEDIA_TYPE, WireError, decode_arrow
from student_trainer.errors import check_same_tokenizer

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})

#: ``/v1/info`` fields that shape the targets: every server of a set must agree on them.
TARGET_FIELDS = ("models", "tokenizer_sha256", "vocab_size", "top_k", "r", "eps", "tvd_norm",
                 "mode", "beta0", "beta", "dpo_top")


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """``"http://a,http://b"`` or a list of them -> distinct base URLs, in order."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for url in str(item).split(","):
            url = url.strip().rstrip("/")
            if url and url not in out:
                out.append(url)
    if not out:
        raise TeacherError("no teacher server URL given")
    return out


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


@dataclass(eq=False)
class _Server:
    """One teacher server and what the client knows about its health."""

    url: str
    http: httpx.Client
    outstanding: int = 0      #: requests sent and not yet answered
    down: bool = False        #: out of rotation
    retry_at: float = 0.0     #: when to ask /readyz again (monotonic seconds)
    failures: int = 0         #: consecutive failures (sets the backoff)
    last_problem: str = ""
    info: dict[str, Any] | None = field(default=None, repr=False)


class TeacherClient:
    """A synchronous client for one teacher server or several. Thread-safe."""

    def __init__(self, base_url: str | Sequence[str], *, api_key: str | None = None,
                 timeout: float = 120.0, connect_timeout: float = 10.0,
                 retry: RetryPolicy | None = None, max_request_sequences: int = 128,
                 max_request_tokens: int = 32768, sleep: Callable[[float], None] = time.sleep,
                 seed: int | None = None, transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic):
        urls = split_urls(base_url)
        self.base_url = ",".join(urls)
        self._vocab_size: int | None = None  # set by check_compatible
        self.retry = retry or RetryPolicy()
        self.max_request_sequences = max_request_sequences
        self.max_request_tokens = max_request_tokens
        self._sleep = sleep
        self._clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._servers = [
            _Server(url, httpx.Client(base_url=url, headers=headers, transport=transport,
                                      timeout=httpx.Timeout(timeout, connect=connect_timeout)))
            for url in urls]
        self._pool = ThreadPoolExecutor(max_workers=len(urls), thread_name_prefix="teacher") \
            if len(urls) > 1 else None
        self._reference: dict[str, Any] | None = None  # the set's target settings
        self.retries_done = 0  #: requests sent again after a failure (for metrics and tests)
        self.moved = 0         #: of those, sent to another server at once

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for server in self._servers:
            server.http.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ API
    def info(self) -> dict[str, Any]:
        """``GET /v1/info`` of a live server: the models, ``vocab_size``, ``tokenizer_sha256``,
        ``top_k``, ..."""
        return self._request("GET", "/v1/info").json()

    def check_compatible(self, *, tokenizer_sha256: str, vocab_size: int,
                         student: str = "--model") -> dict[str, Any]:
        """Refuse a server whose tokenizer is not the student's, or a set of servers whose
        target settings differ; returns the (first) server's info."""
        infos = []
        for server in self._servers:
            info = self._request("GET", "/v1/info", only=server).json()
            check_same_tokenizer(f"the teacher server at {server.url}",
                                 theirs_sha256=info.get("tokenizer_sha256"),
                                 theirs_vocab=info.get("vocab_size"),
                                 student_sha256=tokenizer_sha256, student_vocab=vocab_size,
                                 student=student, error=TeacherMismatch)
            server.info = info
            infos.append(info)
        first = self._servers[0]
        for server in self._servers[1:]:
            diffs = _differences(first.info, server.info)
            if diffs:
                raise TeacherMismatch(
                    f"the teacher servers disagree on what shapes the targets: {first.url} vs "
                    f"{server.url}: {'; '.join(diffs)}. Start every server with the same "
                    f"teachers and settings")
        self._reference = {k: first.info.get(k) for k in TARGET_FIELDS}
        self._vocab_size = vocab_size  # from now on, every served top-k id is checked against it
        return infos[0]

    def score(self, sequences: Sequence[tuple[Sequence[int], int]], *, top_k: int | None = None
              ) -> list[TargetRecord]:
        """Teacher targets for ``(input_ids, prompt_len)`` pairs, in order, over Arrow IPC;
        with several servers, the requests go out at once."""
        chunks = list(self._chunks(sequences))
        if self._pool is None or len(chunks) == 1:
            results = [self._score_chunk(c, top_k) for c in chunks]
        else:
            results = list(self._pool.map(lambda c: self._score_chunk(c, top_k), chunks))
        return [record for got in results for record in got]

    # ------------------------------------------------------------------ internals
    def _score_chunk(self, chunk, top_k: int | None) -> list[TargetRecord]:
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
            got = decode_arrow(response.content, vocab_size=self._vocab_size)
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
        return got

    def _chunks(self, sequences):
        # With several servers, at least one request per server, so all of them work.
        per_request = self.max_request_sequences
        if len(self._servers) > 1 and sequences:
            per_request = min(per_request, math.ceil(len(sequences) / len(self._servers)))
        chunk, tokens = [], 0
        for ids, p in sequences:
            n = len(ids)
            if chunk and (len(chunk) >= per_request or tokens + n > self.max_request_tokens):
                yield chunk
                chunk, tokens = [], 0
            chunk.append((ids, p))
            tokens += n
        if chunk:
            yield chunk

    def _pick(self) -> _Server | None:
        """The live server with the fewest outstanding requests (counted as sent), or None."""
        with self._lock:
            live = [s for s in self._servers if not s.down]
            if not live:
                return None
            server = min(live, key=lambda s: s.outstanding)
            server.outstanding += 1
            return server

    def _revive(self) -> bool:
        """Ask the servers out of rotation whose wait is over ``/readyz``; bring back those
        that are ready and still serve the same targets. Returns whether any came back."""
        now = self._clock()
        back = False
        for server in self._servers:
            with self._lock:
                due = server.down and server.retry_at <= now
            if not due:
                continue
            problem = self._probe(server)
            with self._lock:
                if problem is None:
                    server.down, server.failures = False, 0
                    back = True
                else:
                    server.last_problem = problem
                    server.retry_at = self._clock() + self.retry.delay(
                        min(server.failures, 10), None, self._rng)
                    server.failures += 1
            if problem is None:
                log.warning("teacher server %s is back", server.url)
        return back

    def _probe(self, server: _Server) -> str | None:
        try:
            ready = server.http.get("/readyz")
            if ready.status_code != 200:
                return f"/readyz answered {ready.status_code}"
            if self._reference is not None:
                info = server.http.get("/v1/info").json()
                diffs = _differences(self._reference, info)
                if diffs:
                    return f"its targets changed ({'; '.join(diffs)})"
        except (httpx.TransportError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _take_out(self, server: _Server, problem: str, retry_after: float | None) -> None:
        with self._lock:
            server.down = True
            server.last_problem = problem
            server.retry_at = self._clock() + self.retry.delay(min(server.failures, 10),
                                                                retry_after, self._rng)
            server.failures += 1
        if len(self._servers) > 1:
            log.warning("teacher server %s out of rotation (%s)", server.url, problem)

    def _request(self, method: str, path: str, *, only: _Server | None = None,
                 **kwargs) -> httpx.Response:
        waits = 0
        while True:
            server = only if only is not None else self._pick()
            if only is not None:
                with self._lock:
                    only.outstanding += 1
            if server is not None:
                problem, retry_after = None, None
                try:
                    response = server.http.request(method, path, **kwargs)
                except httpx.TransportError as exc:  # connect errors, timeouts, resets
                    problem = f"{type(exc).__name__}: {exc}"
                else:
                    if response.status_code < 400:
                        with self._lock:
                            server.failures = 0
                        return response
                    error_type, message = _error_of(response)
                    if response.status_code not in RETRY_STATUSES:
                        raise TeacherRequestError(response.status_code, error_type, message)
                    problem = f"{response.status_code} {error_type}: {message}"
                    retry_after = _retry_after(response)
                finally:
                    with self._lock:
                        server.outstanding -= 1
                if only is None and len(self._servers) > 1:
                    self._take_out(server, problem, retry_after)
                    if any(not s.down for s in self._servers):
                        self.retries_done += 1
                        self.moved += 1
                        continue  # another server takes it at once
                else:
                    with self._lock:
                        server.last_problem = problem
                    if waits >= self.retry.max_retries:
                        raise TeacherUnavailable(
                            f"teacher server at {server.url} unavailable: {method} {path} failed "
                            f"{waits + 1} times; last error: {problem}")
                    wait = self.retry.delay(waits, retry_after, self._rng)
                    log.warning("teacher %s %s failed (%s); retry %d/%d in %.1fs", method, path,
                                problem, waits + 1, self.retry.max_retries, wait)
                    self._sleep(wait)
                    waits += 1
                    self.retries_done += 1
                    continue
            # every server is out of rotation: wait for the first one due, then ask them
            if self._revive():
                continue
            if waits >= self.retry.max_retries:
                raise TeacherUnavailable(
                    f"teacher servers unavailable: {method} {path} found none of "
                    f"{len(self._servers)} live through {waits + 1} rounds; last errors: "
                    + "; ".join(f"{s.url}: {s.last_problem}" for s in self._servers))
            with self._lock:
                due = min(s.retry_at for s in self._servers)
            wait = max(0.0, due - self._clock())
            log.warning("every teacher server is out of rotation; round %d/%d, asking again "
                        "in %.1fs", waits + 1, self.retry.max_retries, wait)
            self._sleep(wait)
            waits += 1
            self.retries_done += 1


def _differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[str]:
    a, b = a or {}, b or {}
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in TARGET_FIELDS if a.get(k) != b.get(k)]


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
