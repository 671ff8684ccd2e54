"""Shared pieces for the student-trainer tests: a real teacher app served by uvicorn in a thread
(with optional failure injection in front of it), and small stores built from dense references.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from live_server import free_port

#: the on-policy tests' prompts (tiny models' vocabulary)
ON_POLICY_PROMPTS = ["sort 3 1 2", "copy 5 6", "reverse the list 7 8 9", "hello how are you ?",
                     "what is 4 and 5 ?", "sort 9 8", "copy the numbers 1 2 3",
                     "answer yes or no"]


def set_weight_version(model, j: int) -> None:
    """Give ``model`` the weights "after j updates": its first weights (kept on each parameter
    at the first call) moved by j times a fixed random delta, large enough that every version
    samples other responses. For checking which weights a rollout sampled from."""
    import torch

    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            g = torch.Generator().manual_seed(1000 + i)
            if not hasattr(p, "_initial"):
                p._initial = p.detach().clone()
            p.copy_(p._initial + 0.3 * j * torch.randn(p.shape, generator=g))


@contextlib.contextmanager
def on_policy_world(root: Path, teacher_pair):
    """A student, a prompt file and a live ``aligndistil serve`` (top-k 8, max_seq_len 64) over
    ``teacher_pair``, for on-policy runs: ``{root, student, prompts, url, pair}``."""
    from live_server import start_server, stop_server
    from tiny_models import save_model_dir

    dpo_dir, rev_dir = teacher_pair
    student = save_model_dir(root / "student", seed=7)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ON_POLICY_PROMPTS))
    proc, url = start_server(dpo_dir, rev_dir, "--top-k", "8", "--max-seq-len", "64",
                             log_path=root / "server.log")
    try:
        yield {"root": root, "student": student, "prompts": prompts, "url": url,
               "pair": (dpo_dir, rev_dir)}
    finally:
        stop_server(proc)


def teacher_app(dpo_dir, reverse_dir, *, top_k: int = 8, middleware=None,
                max_seq_len: int | None = None, **target):
    """The real FastAPI teacher app (``teacher_service.server.create_app``) over tiny models;
    ``target``: more :class:`TargetConfig` settings (e.g. ``r``)."""
    from teacher_service.engine import TeacherEngine
    from teacher_service.models import load_teacher_pair
    from teacher_service.server import create_app
    from teacher_service.targets import TargetConfig

    def factory():
        pair = load_teacher_pair(dpo_dir, reverse_dir, device="cpu")
        return TeacherEngine(pair, TargetConfig(top_k=top_k, **target), max_seq_len=max_seq_len)

    app = create_app(factory)
    if middleware is not None:
        app.middleware("http")(middleware)
    return app


class ThreadedServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a daemon thread (real sockets)."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("the threaded teacher server did not become ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class FailureInjector:
    """An HTTP middleware that answers the first requests to ``path`` with canned errors.

    ``plan`` is a list of ``(status, retry_after or None)``, used after the first ``after``
    requests; once it is used up, requests pass through to the real app. ``seen`` counts the
    requests to ``path``.
    """

    def __init__(self, plan, path: str = "/v1/score", after: int = 0):
        self.plan = list(plan)
        self.path = path
        self.after = after  #: let this many requests through before the plan starts
        self.seen = 0

    async def __call__(self, request, call_next):
        from fastapi.responses import JSONResponse

        if request.url.path != self.path:
            return await call_next(request)
        self.seen += 1
        if self.plan and self.seen > self.after:
            status, retry_after = self.plan.pop(0)
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
            return JSONResponse({"error": {"type": "injected", "message": f"injected {status}"}},
                                status_code=status, headers=headers)
        return await call_next(request)


def random_sequences(vocab_size: int, n: int, *, seed: int, min_len: int = 6,
                     max_len: int = 20) -> list[tuple[list[int], int]]:
    """``n`` random ``(input_ids, prompt_len)`` pairs with at least 2 response tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(7, vocab_size, size=length).tolist()  # no special tokens
        out.append((ids, int(rng.integers(2, length - 1))))
    return out


def dense_records(dpo_dir, reverse_dir, sequences, *, top_k: int = 8, r: float = 20.0):
    """Records for ``sequences`` from the float64 dense reference (tests/reference.py) on the
    teacher pair's full logits, plus each record's dense ``log pi*`` ``[T, V]``."""
    from reference import dense_targets, full_logits
    from storage.record import TargetRecord
    from tiny_models import load

    _, dpo = load(dpo_dir)
    _, rev = load(reverse_dir)
    records, log_pis = [], []
    for i, (ids, p) in enumerate(sequences):
        n = len(ids)
        ref = dense_targets(full_logits(dpo, ids)[p - 1:n - 1], full_logits(rev, ids)[p - 1:n - 1],
                            ids[p:], top_k=top_k, r=r)
        records.append(TargetRecord.create(
            example_index=i, input_ids=ids, prompt_len=p, alpha=ref["alpha"],
            topk_ids=ref["topk_ids"], topk_logprobs=ref["topk_logprobs"],
            tail_logmass=ref["tail_logmass"], dpo_logprobs=ref["dpo_logprobs"],
            reverse_logprobs=ref["reverse_logprobs"]))
        log_pis.append(ref["log_pi"])
    return records, log_pis


def write_store(path, records, tokenizer, *, top_k: int = 8, r: float = 20.0,
                shard_tokens: int = 64) -> Path:
    """A real Zarr target store holding ``records`` (several shards), made with ``tokenizer``."""
    from storage.store.metadata import StoreMetadata
    from storage.store.writer import TargetStoreWriter
    from storage.tokenization import tokenizer_sha256

    meta = StoreMetadata(teachers={"dpo": "tiny-dpo", "reverse": "tiny-reverse"},
                         tokenizer_sha256=tokenizer_sha256(tokenizer),
                         vocab_size=len(tokenizer), top_k=top_k, r=r, eps=1e-3,
                         tvd_norm="half-l1", mode="adaptive", source_fingerprint="test")
    with TargetStoreWriter(path, meta, shard_tokens=shard_tokens, durable=False) as writer:
        writer.write_many(records)
    return Path(path)
