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
string), as users deploy them: on several hosts, started and stopped on their own.

- What must agree (:func:`pool_differences`) is what decides the targets
  (:func:`target_differences`: each teacher's fingerprint, and Hub revision where both servers
  name one, the tokenizer and every target setting) and ``max_seq_len`` (so the limit a run
  cuts prompts to does not depend on which servers happened to be up). Paths may differ: two
  hosts keep the same weights in different folders.
- ``check_compatible`` starts on the servers that answer ``/v1/info``; the others are out of
  rotation, with a warning, and are probed in the background until they join. It refuses only
  when no server answers (after the retry policy's rounds) or when servers that answer
  disagree; a server that joins later and disagrees stays out.
- ``score`` splits a batch into at least one request per live server and sends them at once;
  each request goes to the live server with the fewest requests outstanding. A server that
  fails, times out or sheds (429/503) is taken out of rotation and the request moves to
  another at once. A background thread asks each server out of rotation ``/readyz`` and
  ``/v1/info`` (which must still agree) when its backoff is over, whether or not the others
  are up, so a server that hiccuped once comes back and the run keeps its capacity. The
  backoff is reset only by an answered request: a server that passes its probes but keeps
  failing requests is tried less and less often.
- Only when every server is out does a request wait; it gives up with
  :class:`TeacherUnavailable` once every server has failed more than ``max_retries`` times in a
  row. Each sequence's targets come from exactly one answered request.
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
import numpy as np

from storage.errors import UserError
from storage.record import TargetRecord
from storage.wire import ARROW_STREAM_MEDIA_TYPE, WireError, decode_arrow, decode_arrow_named
from student_trainer.errors import check_same_tokenizer

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})

#: ``/v1/info`` settings that shape the targets: every server of a set must agree on them
#: (the teachers themselves are compared by :func:`target_differences`).
TARGET_FIELDS = ("tokenizer_sha256", "vocab_size", "top_k", "r", "eps", "tvd_norm", "mode",
                 "beta0", "beta", "dpo_top", "tail_budget", "min_k")
#: What a server that predates a setting means by its absence.
TARGET_DEFAULTS = {"tail_budget": 0.0, "min_k": 1}


def teacher_models(info: dict[str, Any] | None) -> dict[str, dict[str, str]]:
    """``/v1/info``'s ``models`` without what only says where a host keeps them: role ->
    ``{"fingerprint", "revision"?}``."""
    models = (info or {}).get("models") or {}
    return {role: {k: v for k, v in ident.items() if k in ("fingerprint", "revision")}
            for role, ident in sorted(models.items()) if isinstance(ident, dict)}


def target_differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[str]:
    """What differs between two ``/v1/info`` answers (or records of one) in what decides the
    targets: the teachers by fingerprint, and by Hub revision when both name one (paths may
    differ), and every setting of :data:`TARGET_FIELDS`."""
    a, b = a or {}, b or {}
    diffs = []
    ma, mb = teacher_models(a), teacher_models(b)
    if sorted(ma) != sorted(mb):
        diffs.append(f"teachers: {sorted(ma)} vs {sorted(mb)}")
    for role in sorted(set(ma) & set(mb)):
        x, y = ma[role], mb[role]
        for key in ("fingerprint", "revision"):
            if key in x and key in y and x[key] != y[key]:
                diffs.append(f"{role} {key}: {x[key]!r} vs {y[key]!r}")
        if "fingerprint" not in x or "fingerprint" not in y:
            diffs.append(f"{role}: no fingerprint to compare")
    def get(info: dict[str, Any], key: str) -> Any:
        return info.get(key, TARGET_DEFAULTS.get(key))
    diffs += [f"{k}: {get(a, k)!r} vs {get(b, k)!r}" for k in TARGET_FIELDS
              if get(a, k) != get(b, k)]
    return diffs


def pool_differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[str]:
    """:func:`target_differences`, and ``max_seq_len``: what every server of a pool (and a
    resumed run's servers) must share."""
    diffs = target_differences(a, b)
    x, y = (a or {}).get("max_seq_len"), (b or {}).get("max_seq_len")
    if x != y:
        diffs.append(f"max_seq_len: {x!r} vs {y!r}")
    return diffs


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
    retry_at: float = 0.0     #: when to probe it again (monotonic seconds)
    failures: int = 0         #: consecutive failures, requests and probes (sets the backoff)
    last_problem: str = ""
    info: dict[str, Any] | None = field(default=None, repr=False)


class TeacherClient:
    """A synchronous client for one teacher server or several. Thread-safe."""

    def __init__(self, base_url: str | Sequence[str], *, api_key: str | None = None,
                 timeout: float = 120.0, connect_timeout: float = 10.0,
                 retry: RetryPolicy | None = None, max_request_sequences: int = 128,
                 max_request_tokens: int = 32768, sleep: Callable[[float], None] = time.sleep,
                 seed: int | None = None, transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic, probe_timeout: float = 10.0):
        urls = split_urls(base_url)
        self.base_url = ",".join(urls)
        self._vocab_size: int | None = None  # set by check_compatible
        self.retry = retry or RetryPolicy()
        self.max_request_sequences = max_request_sequences
        self.max_request_tokens = max_request_tokens
        self._sleep = sleep
        self._clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Condition()  # guards the servers' state; notified on changes
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._servers = [
            _Server(url, httpx.Client(base_url=url, headers=headers, transport=transport,
                                      timeout=httpx.Timeout(timeout, connect=connect_timeout)))
            for url in urls]
        self._probe_timeout = httpx.Timeout(min(timeout, probe_timeout),
                                            connect=min(connect_timeout, probe_timeout))
        self._pool = ThreadPoolExecutor(max_workers=len(urls), thread_name_prefix="teacher") \
            if len(urls) > 1 else None
        self._reference: dict[str, Any] | None = None  # the set's /v1/info (what must agree)
        self._prober: threading.Thread | None = None
        self._closed = False
        self.retries_done = 0  #: requests sent again after a failure (for metrics and tests)
        self.moved = 0         #: of those, sent to another server at once
        self.rejoined = 0      #: servers brought back into rotation by the prober

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    @property
    def live_urls(self) -> list[str]:
        with self._lock:
            return [s.url for s in self._servers if not s.down]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._prober is not None:  # at most one probe (two requests) from noticing
            self._prober.join(timeout=2 * self._probe_timeout.read + 1)
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
        """Refuse a server whose tokenizer is not the student's, or servers whose targets would
        differ; start on those that answer (see the module docstring). Returns the first
        answering server's info."""
        if len(self._servers) == 1:
            server = self._servers[0]
            answered = {server.url: self._request("GET", "/v1/info", only=server).json()}
            silent: dict[str, tuple[str, float | None]] = {}
        else:
            answered, silent = self._first_answers()
        for server in self._servers:
            info = answered.get(server.url)
            if info is None:
                continue
            check_same_tokenizer(f"the teacher server at {server.url}",
                                 theirs_sha256=info.get("tokenizer_sha256"),
                                 theirs_vocab=info.get("vocab_size"),
                                 student_sha256=tokenizer_sha256, student_vocab=vocab_size,
                                 student=student, error=TeacherMismatch)
            server.info = info
        live = [s for s in self._servers if s.info is not None]
        first = live[0]
        for server in live[1:]:
            diffs = pool_differences(first.info, server.info)
            if diffs:
                raise TeacherMismatch(
                    f"the teacher servers disagree on what shapes the targets or their limits: "
                    f"{first.url} vs {server.url}: {'; '.join(diffs)}. Start every server "
                    f"with the same teachers and settings")
        self._reference = dict(first.info)
        self._vocab_size = vocab_size  # from now on, every served top-k id is checked against it
        for server in self._servers:  # now that the prober knows what they must agree with
            if server.url in silent:
                self._take_out(server, *silent[server.url])
        if silent:
            log.warning("starting on %d of %d teacher servers; %s join when they answer and "
                        "agree", len(live), len(self._servers), ", ".join(silent))
        return dict(first.info)

    def score(self, sequences: Sequence[tuple[Sequence[int], int]], *, top_k: int | None = None
              ) -> list[TargetRecord]:
        """Teacher targets for ``(input_ids, prompt_len)`` pairs, in order, over Arrow IPC;
        with several servers, the requests go out at once."""
        return [record for record, _ in self._score_all(list(sequences), top_k)]

    def score_named(self, sequences: Sequence[tuple[Sequence[int], int, Sequence[Sequence[int]]]],
                    *, top_k: int | None = None) -> list[tuple[TargetRecord, np.ndarray]]:
        """As :meth:`score`, for ``(input_ids, prompt_len, extra_ids)``: ``extra_ids`` names, per
        response position, ids whose log pi* comes back too (``/v1/score``'s ``extra_ids``):
        ``(record, [T, m] float32 log pi*, -inf where a row was shorter)`` per sequence."""
        return self._score_all(list(sequences), top_k)

    def _score_all(self, sequences: list, top_k: int | None) -> list:
        chunks = list(self._chunks(sequences))
        if self._pool is None or len(chunks) == 1:
            results = [self._score_chunk(c, top_k) for c in chunks]
        else:
            results = list(self._pool.map(lambda c: self._score_chunk(c, top_k), chunks))
        return [item for got in results for item in got]

    # ------------------------------------------------------------------ start-up
    def _first_answers(self) -> tuple[dict[str, dict], dict[str, tuple[str, float | None]]]:
        """``/v1/info`` of every server that answers, asked together, in rounds with backoff
        until at least one does; and ``(problem, retry_after)`` of each that did not."""
        assert self._pool is not None
        for attempt in range(self.retry.max_retries + 1):
            outcomes = list(self._pool.map(self._ask_info, self._servers))
            answered = {s.url: info for s, (info, _, _) in zip(self._servers, outcomes)
                        if info is not None}
            if answered:
                return answered, {s.url: (problem, retry_after) for s, (info, problem,
                                  retry_after) in zip(self._servers, outcomes) if info is None}
            if attempt == self.retry.max_retries:
                break
            retry_after = max((ra for _, _, ra in outcomes if ra is not None), default=None)
            wait = self.retry.delay(attempt, retry_after, self._rng)
            log.warning("no teacher server answers GET /v1/info yet; round %d/%d in %.1fs",
                        attempt + 1, self.retry.max_retries, wait)
            self._sleep(wait)
        raise TeacherUnavailable(
            f"no teacher server answers: GET /v1/info failed {self.retry.max_retries + 1} times "
            f"on each of {len(self._servers)}; last errors: "
            + "; ".join(f"{s.url}: {problem}" for s, (_, problem, _) in
                        zip(self._servers, outcomes)))

    def _ask_info(self, server: _Server) -> tuple[dict | None, str, float | None]:
        """One ``GET /v1/info``: ``(info, "", None)``, or ``(None, problem, retry_after)`` for
        a failure worth retrying; a refusal (401, ...) raises at once. A hung server costs the
        probe timeout, not a request's."""
        try:
            response = server.http.get("/v1/info", timeout=self._probe_timeout)
        except httpx.TransportError as exc:
            return None, f"{type(exc).__name__}: {exc}", None
        if response.status_code < 400:
            try:
                return response.json(), "", None
            except ValueError:
                return None, "/v1/info is not JSON", None
        error_type, message = _error_of(response)
        if response.status_code not in RETRY_STATUSES:
            raise TeacherRequestError(response.status_code, error_type,
                                      f"{message} (from {server.url})")
        return None, f"{response.status_code} {error_type}: {message}", _retry_after(response)

    # ------------------------------------------------------------------ internals
    def _score_chunk(self, chunk, top_k: int | None) -> list[tuple[TargetRecord, Any]]:
        named = len(chunk[0]) == 3
        body: dict[str, Any] = {"sequences": [
            {"input_ids": [int(t) for t in item[0]], "prompt_len": int(item[1]),
             **({"extra_ids": [[int(t) for t in row] for row in item[2]]} if named else {})}
            for item in chunk]}
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
            extra = decode_arrow_named(response.content) if named else [None] * len(got)
        except WireError as exc:
            raise TeacherError(f"teacher server sent an unreadable Arrow stream: {exc}"
                               ) from None
        if len(got) != len(chunk) or len(extra) != len(chunk):
            raise TeacherError(f"teacher server returned {len(got)} results for "
                               f"{len(chunk)} sequences")
        for record, item in zip(got, chunk):
            if record.prompt_len != item[1] or record.input_ids.tolist() != list(item[0]):
                raise TeacherError("teacher server returned results out of order or for "
                                   "other sequences")
        return list(zip(got, extra))

    def _chunks(self, sequences):
        # With several live servers, at least one request per server, so all of them work.
        per_request = self.max_request_sequences
        live = len(self.live_urls)
        if live > 1 and sequences:
            per_request = min(per_request, math.ceil(len(sequences) / live))
        chunk, tokens = [], 0
        for item in sequences:
            # a named id weighs about a token in the JSON body (the server's body limit)
            n = len(item[0]) + (sum(len(row) for row in item[2]) if len(item) == 3 else 0)
            if chunk and (len(chunk) >= per_request or tokens + n > self.max_request_tokens):
                yield chunk
                chunk, tokens = [], 0
            chunk.append(item)
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

    # ------------------------------------------------------------------ servers out of rotation
    def _take_out(self, server: _Server, problem: str, retry_after: float | None) -> None:
        with self._lock:
            server.down = True
            server.last_problem = problem
            server.retry_at = self._clock() + self.retry.delay(min(server.failures, 10),
                                                                retry_after, self._rng)
            server.failures += 1
            if self._prober is None and not self._closed:
                self._prober = threading.Thread(target=self._probe_loop, daemon=True,
                                                name="teacher-prober")
                self._prober.start()
            self._lock.notify_all()
        log.warning("teacher server %s out of rotation (%s)", server.url, problem)

    def _probe_loop(self) -> None:
        """The background prober: whenever a server out of rotation is due, ask it
        :meth:`_probe`; bring it back, or wait longer (the retry policy's backoff)."""
        while True:
            with self._lock:
                if self._closed:
                    return
                down = [s for s in self._servers if s.down]
                now = self._clock()
                due = [s for s in down if s.retry_at <= now]
                if not due:
                    wait = min((s.retry_at for s in down), default=now + 3600) - now
                    self._lock.wait(timeout=min(max(wait, 0.0), 3600))
                    continue
            for server in due:
                if self._closed:
                    return
                try:
                    problem = self._probe(server)
                except Exception as exc:  # noqa: BLE001 - the prober must outlive any answer
                    problem = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    if problem is None:
                        # back in rotation; its failure count (the backoff) is cleared only by
                        # a request it answers, so a server that passes probes but fails
                        # requests is tried less and less often
                        server.down = False
                        self.rejoined += 1
                    else:
                        server.last_problem = problem
                        server.retry_at = self._clock() + self.retry.delay(
                            min(server.failures, 10), None, self._rng)
                        server.failures += 1
                    self._lock.notify_all()
                if problem is None:
                    log.warning("teacher server %s is back in rotation", server.url)

    def _probe(self, server: _Server) -> str | None:
        """None when ``server`` is ready and serves the pool's targets, else what is wrong."""
        try:
            ready = server.http.get("/readyz", timeout=self._probe_timeout)
            if ready.status_code != 200:
                return f"/readyz answered {ready.status_code}"
            if self._reference is None:
                return None
            response = server.http.get("/v1/info", timeout=self._probe_timeout)
            if response.status_code != 200:
                return f"/v1/info answered {response.status_code}"
            info = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        if not isinstance(info, dict):
            return "/v1/info is not a JSON object"
        diffs = pool_differences(self._reference, info)
        if not diffs:
            server.info = info
            return None
        problem = f"it differs from the pool ({'; '.join(diffs)})"
        if problem != server.last_problem:
            log.warning("teacher server %s answers but stays out of rotation: %s", server.url,
                        problem)
        return problem

    # ------------------------------------------------------------------ one request
    def _request(self, method: str, path: str, *, only: _Server | None = None,
                 **kwargs) -> httpx.Response:
        if only is not None or len(self._servers) == 1:
            return self._request_one(only or self._servers[0], method, path, **kwargs)
        attempts = 0
        while True:
            server = self._pick()
            if server is None:
                self._wait_for_a_server(method, path)
                continue
            response, problem, retry_after = self._send(server, method, path, **kwargs)
            if response is not None:
                return response
            self._take_out(server, problem, retry_after)
            attempts += 1
            # A request that fails on every server, again and again, while the servers keep
            # passing their probes (e.g. each request times out): stop rather than loop.
            if attempts > (self.retry.max_retries + 1) * len(self._servers):
                raise TeacherUnavailable(
                    f"teacher servers unavailable: {method} {path} failed {attempts} times "
                    f"over {len(self._servers)} servers; last errors: " + self._problems())
            self.retries_done += 1
            self.moved += 1

    def _wait_for_a_server(self, method: str, path: str) -> None:
        """Every server is out of rotation: wait for the prober to bring one back, or give up
        once each has failed more than ``max_retries`` times in a row."""
        with self._lock:
            while not self._closed and all(s.down for s in self._servers):
                if min(s.failures for s in self._servers) > self.retry.max_retries:
                    raise TeacherUnavailable(
                        f"teacher servers unavailable: {method} {path} found none of "
                        f"{len(self._servers)} live, each failed over "
                        f"{self.retry.max_retries} times in a row; last errors: "
                        + self._problems())
                due = min(s.retry_at for s in self._servers)
                log.warning("every teacher server is out of rotation; the next is asked in "
                            "%.1fs", max(0.0, due - self._clock()))
                self._lock.wait(timeout=max(0.05, due - self._clock()) + 1.0)
            if self._closed:
                raise TeacherUnavailable("the teacher client was closed")

    def _problems(self) -> str:
        return "; ".join(f"{s.url}: {s.last_problem}" for s in self._servers)

    def _send(self, server: _Server, method: str, path: str, **kwargs
              ) -> tuple[httpx.Response | None, str, float | None]:
        """One attempt (``server.outstanding`` already counts it): the response, or what went
        wrong and the server's ``Retry-After``. Refusals that retrying cannot fix raise."""
        try:
            response = server.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:  # connect errors, timeouts, resets
            return None, f"{type(exc).__name__}: {exc}", None
        finally:
            with self._lock:
                server.outstanding -= 1
        if response.status_code < 400:
            with self._lock:
                server.failures = 0
            return response, "", None
        error_type, message = _error_of(response)
        if response.status_code not in RETRY_STATUSES:
            raise TeacherRequestError(response.status_code, error_type, message)
        return None, f"{response.status_code} {error_type}: {message}", _retry_after(response)

    def _request_one(self, server: _Server, method: str, path: str, **kwargs
                     ) -> httpx.Response:
        """One server, retried in place with backoff (a single-server client, or a request
        meant for this server alone)."""
        for waits in range(self.retry.max_retries + 1):
            with self._lock:
                server.outstanding += 1
            response, problem, retry_after = self._send(server, method, path, **kwargs)
            if response is not None:
                return response
            with self._lock:
                server.last_problem = problem
            if waits == self.retry.max_retries:
                break
            wait = self.retry.delay(waits, retry_after, self._rng)
            log.warning("teacher %s %s failed (%s); retry %d/%d in %.1fs", method, path,
                        problem, waits + 1, self.retry.max_retries, wait)
            self._sleep(wait)
            self.retries_done += 1
        raise TeacherUnavailable(
            f"teacher server at {server.url} unavailable: {method} {path} failed "
            f"{self.retry.max_retries + 1} times; last error: {server.last_problem}")


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
