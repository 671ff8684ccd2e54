"""Property-based fuzzing of ``POST /v1/score`` against ONE real server process on loopback.

Hypothesis generates bad input of every kind the REST contract (DESIGN §4) must survive:
malformed bytes, wrong types in every field, out-of-range numbers, raw ``NaN``/``Infinity``,
non-UTF-8 bodies, lone surrogates, unknown fields, wrong Content-Type/Accept headers, bodies
over the size limit and absurdly nested ones. The property, for every example:

- the answer is a 4xx from the documented set, carrying exactly
  ``{"error": {"type": str, "message": str}}`` as JSON, and where the input's fault is known,
  the message names the field or the limit;
- never a 5xx, never a dropped connection (each example uses a fresh connection, so a crash
  or a reset shows up as a transport error here);
- where a generated body happens to be valid, a 200 whose results answer THAT body.

After every test the server must still answer a valid request with exactly the bytes it gave
for the same request before any fuzzing (a server that survives but is left broken fails).

The server starts once for the module (starting one per example would cost seconds each).
Failures print the offending input; Hypothesis shrinks it and prints a reproduction blob.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from live_server import start_server, stop_server
from storage import wire


TOP_K = 16
MAX_SEQ_LEN = 64
MAX_BODY = 200_000
MAX_REQUEST_TOKENS = 2_000
MAX_SEQUENCES = 256  # the server's default (ServerSettings.max_sequences)
ERROR_STATUSES = {400, 413, 415, 422}  # what bad input may get (DESIGN §4, plus 415)

_BASE = settings(
    deadline=None,  # each example is a real HTTP round trip on a shared, loaded machine
    database=None,  # do not write .hypothesis/ into the shared tree
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)


def fuzz(max_examples: int) -> settings:
    """Bounded example counts keep the module at about a minute of wall time."""
    return settings(_BASE, max_examples=max_examples)


# A valid body of each shape; the fuzzers break one thing at a time in copies of these.
TOKENS_BODY = {"sequences": [{"input_ids": [5, 17, 42, 9, 30], "prompt_len": 2}], "top_k": 4}
MESSAGES_BODY = {"sequences": [{"messages": [{"role": "user", "content": "sort 3 1 2"}],
                                "response": "1 2 3"}]}
PROMPT_BODY = {"sequences": [{"prompt": "sort 3 1 2", "response": "1 2 3"}]}
REFERENCE_BODY = {"sequences": [{"input_ids": [5, 17, 42, 9, 30, 7, 8], "prompt_len": 3},
                                {"input_ids": [11, 12, 13, 14], "prompt_len": 1}]}


# ---------------------------------------------------------------------------- the live server
class Live:
    """The module's server: a client without keep-alive, so every example gets a fresh
    connection and a crash or reset cannot hide behind the client's transparent reconnect."""

    def __init__(self, client: httpx.Client, vocab_size: int, reference: bytes, log):
        self.client, self.vocab_size, self.reference, self.log = client, vocab_size, reference, log

    def post(self, body: Any, *, headers: dict[str, str] | None = None,
             what: str | None = None) -> httpx.Response:
        """POST raw bytes (or an iterator of chunks); a transport error fails the test."""
        if headers is None:
            headers = {"Content-Type": "application/json"}
        try:
            return self.client.post("/v1/score", content=body, headers=headers)
        except httpx.TransportError as exc:
            pytest.fail(f"connection dropped ({type(exc).__name__}: {exc}) for input "
                        f"{what or show(body)} with headers {headers}; server log tail: "
                        f"{self.log.read_text()[-2000:]}")

    def assert_still_serving(self) -> None:
        after = self.client.post("/v1/score", json=REFERENCE_BODY)
        assert after.status_code == 200, f"after fuzzing, a valid request got {after.text[:500]}"
        assert after.content == self.reference, (
            "after fuzzing, the server's answer to the reference request changed: "
            f"{after.content[:300]!r} vs {self.reference[:300]!r}")


@pytest.fixture(scope="module")
def live(tmp_path_factory, teacher_pair):
    """One server for the whole module, plus its answer to REFERENCE_BODY before any fuzzing."""
    pair = teacher_pair
    log = tmp_path_factory.mktemp("log") / "server.log"
    proc, url = start_server(*pair, "--top-k", str(TOP_K), "--max-seq-len", str(MAX_SEQ_LEN),
                             "--max-body-bytes", str(MAX_BODY),
                             "--max-request-tokens", str(MAX_REQUEST_TOKENS),
                             env={"OMP_NUM_THREADS": "1"},  # see test_server_load.SERVER_ENV
                             log_path=log)
    client = httpx.Client(base_url=url, timeout=60,
                          limits=httpx.Limits(max_keepalive_connections=0))
    try:
        vocab_size = client.get("/v1/info").json()["vocab_size"]
        before = client.post("/v1/score", json=REFERENCE_BODY)
        assert before.status_code == 200, before.text
        yield Live(client, vocab_size, before.content, log)
    finally:
        client.close()
        code = stop_server(proc)
        assert code == 0, f"server exited with {code}; log tail: {log.read_text()[-3000:]}"


@pytest.fixture(autouse=True)
def _server_survives(request):
    """After every test in this module: the server still gives the reference answer."""
    yield
    if "live" in request.fixturenames:
        request.getfixturevalue("live").assert_still_serving()


def show(body: Any, limit: int = 300) -> str:
    if not isinstance(body, (bytes, str)):
        return f"<streamed body {type(body).__name__}>"
    text = repr(body)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(body)} bytes)"


def dumps(obj: Any) -> bytes:
    # ensure_ascii: lone surrogates become \udXXX escapes, exactly what a hostile client sends.
    return json.dumps(obj).encode("ascii")


# ---------------------------------------------------------------------------- the oracles
def assert_error(resp: httpx.Response, what: str, *, status: int | set[int] | None = None,
                 needle: str | None = None) -> dict:
    """A documented 4xx with exactly the JSON error shape; ``needle`` in its message."""
    allowed = {status} if isinstance(status, int) else (status or ERROR_STATUSES)
    assert resp.status_code in allowed, (
        f"input {what} got {resp.status_code} (expected one of {sorted(allowed)}): "
        f"{resp.text[:500]}")
    assert resp.headers.get("content-type", "").startswith("application/json"), (
        f"input {what}: error answer has content-type {resp.headers.get('content-type')!r}")
    try:
        doc = resp.json()
    except ValueError:
        pytest.fail(f"input {what}: error answer is not JSON: {resp.text[:300]!r}")
    assert isinstance(doc, dict) and set(doc) == {"error"}, f"input {what}: body {doc!r:.300}"
    err = doc["error"]
    assert isinstance(err, dict) and set(err) == {"type", "message"}, (
        f"input {what}: error object {err!r:.300}")
    assert isinstance(err["type"], str) and err["type"], f"input {what}: error type {err!r:.300}"
    assert isinstance(err["message"], str) and err["message"], f"input {what}: {err!r:.300}"
    if needle is not None:
        assert needle.lower() in err["message"].lower(), (
            f"input {what}: error message does not name {needle!r}: {err['message'][:500]!r}")
    return err


def assert_answers(resp: httpx.Response, body: dict, what: str) -> None:
    """A 200 that answers ``body``: one result per sequence, token sequences echoed back."""
    assert resp.status_code == 200, f"input {what}: {resp.status_code} {resp.text[:500]}"
    if wire.ARROW_STREAM_MEDIA_TYPE in resp.headers.get("content-type", ""):
        records = wire.decode_arrow(resp.content)
    else:
        records = wire.decode_json(resp.content)
    assert len(records) == len(body["sequences"]), f"input {what}: {len(records)} results"
    for rec, seq in zip(records, body["sequences"]):
        assert 1 <= rec.prompt_len < len(rec.input_ids), f"input {what}: {rec.prompt_len}"
        assert rec.alpha.shape == (len(rec.input_ids) - rec.prompt_len,), f"input {what}"
        if "input_ids" in seq:
            assert rec.input_ids.tolist() == seq["input_ids"], f"input {what}: other ids"
            assert rec.prompt_len == seq["prompt_len"], f"input {what}: other prompt_len"


def assert_4xx_or_valid_answer(raw: bytes, resp: httpx.Response) -> None:
    """For generated bytes of unknown validity: a documented 4xx, or a 200 that answers them
    (only possible if the bytes really are a valid body, which ``json.loads`` here tells)."""
    if resp.status_code == 200:
        body = json.loads(raw.decode("utf-8"))  # raises (fails the test) if it was not JSON
        assert_answers(resp, body, show(raw))
    else:
        assert_error(resp, show(raw))


# ---------------------------------------------------------------------------- strategies
json_scalars = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def nonempty_list_of(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) > 0 and all(pred(x) for x in v)


def is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def is_str(v: Any) -> bool:
    return isinstance(v, str)


#: (slot, template body, path into it, "could be the right type" predicate, needle). The
#: fuzzer puts a value for which the predicate is False at the path: always a bad body.
SLOTS = [
    ("body", TOKENS_BODY, (), is_dict, "body"),
    ("sequences", TOKENS_BODY, ("sequences",), nonempty_list_of(is_dict), "sequences"),
    ("sequences[0]", TOKENS_BODY, ("sequences", 0), is_dict, "sequences"),
    ("input_ids", TOKENS_BODY, ("sequences", 0, "input_ids"), nonempty_list_of(is_int),
     "input_ids"),
    ("input_ids[1]", TOKENS_BODY, ("sequences", 0, "input_ids", 1), is_int, "input_ids"),
    ("prompt_len", TOKENS_BODY, ("sequences", 0, "prompt_len"), is_int, "prompt_len"),
    ("top_k", TOKENS_BODY, ("top_k",), lambda v: v is None or is_int(v), "top_k"),
    ("messages", MESSAGES_BODY, ("sequences", 0, "messages"), nonempty_list_of(is_dict),
     "messages"),
    ("messages[0]", MESSAGES_BODY, ("sequences", 0, "messages", 0), is_dict, "messages"),
    ("role", MESSAGES_BODY, ("sequences", 0, "messages", 0, "role"), is_str, "role"),
    ("content", MESSAGES_BODY, ("sequences", 0, "messages", 0, "content"), is_str, "content"),
    ("prompt", PROMPT_BODY, ("sequences", 0, "prompt"), is_str, "prompt"),
    ("response", PROMPT_BODY, ("sequences", 0, "response"), is_str, "response"),
]


def replace_at(body: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    body = json.loads(json.dumps(body))  # deep copy
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


@st.composite
def wrong_type_bodies(draw):
    name, template, path, could_be_right, needle = draw(st.sampled_from(SLOTS))
    value = draw(json_values.filter(lambda v: not could_be_right(v)))
    return name, replace_at(template, path, value), needle


@st.composite
def out_of_range_bodies(draw, vocab_size: int):
    """(kind, body, expected status, needle in the message)."""
    ids = draw(st.lists(st.integers(0, vocab_size - 1), min_size=2, max_size=20))
    prompt_len = draw(st.integers(1, len(ids) - 1))
    kind = draw(st.sampled_from(["token_id", "prompt_len", "top_k", "too_long", "too_short",
                                 "no_sequences", "too_many_sequences", "too_many_tokens"]))
    seq = {"input_ids": ids, "prompt_len": prompt_len}
    if kind == "token_id":
        bad = draw(st.integers(max_value=-1) | st.integers(min_value=vocab_size)
                   | st.sampled_from([-1, vocab_size, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 300]))
        ids[draw(st.integers(0, len(ids) - 1))] = bad
        return kind, {"sequences": [seq]}, 422, "outside the vocabulary"
    if kind == "prompt_len":
        seq["prompt_len"] = draw(st.integers(max_value=0) | st.integers(min_value=len(ids))
                                 | st.sampled_from([-(2 ** 63), 2 ** 63, 10 ** 300]))
        return kind, {"sequences": [seq]}, 422, "prompt_len"
    if kind == "top_k":
        top_k = draw(st.integers(max_value=0) | st.integers(min_value=TOP_K + 1)
                     | st.sampled_from([10 ** 300, -(10 ** 300)]))
        return kind, {"sequences": [seq], "top_k": top_k}, 422, "top_k"
    if kind == "too_long":  # up to ~120 kB of ids: a huge sequence inside the body limit
        n = draw(st.integers(MAX_SEQ_LEN + 1, 40_000))
        return kind, {"sequences": [{"input_ids": [7] * n, "prompt_len": 1}]}, 413, "max_seq_len"
    if kind == "too_short":
        short = ids[:draw(st.integers(0, 1))]
        return kind, {"sequences": [{"input_ids": short, "prompt_len": 1}]}, 422, "input_ids"
    if kind == "no_sequences":
        return kind, {"sequences": []}, 422, "sequences"
    if kind == "too_many_sequences":
        n = draw(st.integers(MAX_SEQUENCES + 1, MAX_SEQUENCES + 400))
        return kind, {"sequences": [{"input_ids": [1, 2], "prompt_len": 1}] * n}, 413, "limit"
    n = draw(st.integers(MAX_REQUEST_TOKENS // MAX_SEQ_LEN + 1, MAX_SEQUENCES))  # too many tokens
    return (kind, {"sequences": [{"input_ids": [3] * MAX_SEQ_LEN, "prompt_len": 1}] * n},
            413, "tokens")


SENTINEL = 987654321  # a number no body uses, replaced in the JSON text by a raw token
#: Raw number-ish tokens: (text, expected status, needle or None for "names the field").
#: Not JSON numbers -> 400; JSON values that are not integers (1e400 is inf) -> 422.
RAW_NUMBERS = [
    ("NaN", 400, "NaN"), ("Infinity", 400, "Infinity"), ("-Infinity", 400, "Infinity"),
    ("-NaN", 400, "JSON"), ("nan", 400, "JSON"), ("inf", 400, "JSON"), ("+1", 400, "JSON"),
    ("01", 400, "JSON"), (".5", 400, "JSON"), ("1.", 400, "JSON"), ("0x10", 400, "JSON"),
    ("1e400", 422, None), ("-1e400", 422, None), ("1.0", 422, None), ("-0.0", 422, None),
    ("1e2", 422, None), ("2.5", 422, None), ("1E+2", 422, None), ("true", 422, None),
    ('"3"', 422, None),
]
NUMBER_SLOTS = [("input_ids", ("sequences", 0, "input_ids", 1)),
                ("prompt_len", ("sequences", 0, "prompt_len")), ("top_k", ("top_k",))]

KNOWN_KEYS = {"sequences", "top_k", "input_ids", "prompt_len", "messages", "prompt", "response",
              "role", "content"}
INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf",
                b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80",
                b"\xe2\x82", b"\xf0\x9f\x98", b"\xc3"]

#: Printable-ASCII header values (what an HTTP client can send at all).
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                      max_size=60).map(str.strip)
JSON_TYPES = ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
              "application/problem+json", "application/json ; charset=UTF-8"]
OTHER_TYPES = ["text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
               "multipart/form-data; boundary=x", wire.ARROW_STREAM_MEDIA_TYPE,
               "application/octet-stream", "text/json", "application/jsonx", "json", "", "*/*",
               "application/xml", "text/html"]
ACCEPTS = ["application/json", wire.ARROW_STREAM_MEDIA_TYPE, "*/*", "text/html", "image/png",
           "application/xml;q=0.9, */*;q=0.1", f"{wire.ARROW_STREAM_MEDIA_TYPE};q=0.5", "",
           "application/json, " + wire.ARROW_STREAM_MEDIA_TYPE, "garbage/////"]


def is_json_media(value: str | None) -> bool:
    """The server's rule: no Content-Type, application/json or application/*+json."""
    if value is None:
        return True
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                          and media.endswith("+json"))


def is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


# ---------------------------------------------------------------------------- the fuzz tests
@fuzz(150)
@given(raw=st.binary(max_size=2048) | st.text(max_size=300).map(lambda t: t.encode("utf-8")),
       content_type=st.sampled_from([None, *JSON_TYPES[:2]]))
@example(raw=b"", content_type="application/json")
@example(raw=b"null", content_type="application/json")
@example(raw=b'{"sequences": [', content_type=None)
@example(raw=b"\xff\xfe\x00garbage", content_type="application/json")
def test_arbitrary_bytes_get_4xx(live, raw, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    assert_4xx_or_valid_answer(raw, live.post(raw, headers=headers))


@fuzz(150)
@given(raw=st.sampled_from([dumps(TOKENS_BODY), dumps(PROMPT_BODY), dumps(MESSAGES_BODY)]),
       edits=st.lists(st.tuples(st.sampled_from(["insert", "delete", "replace"]),
                                st.floats(0, 1, exclude_max=True),
                                st.binary(min_size=1, max_size=3)),
                      min_size=1, max_size=4))
def test_mutated_valid_bodies_get_4xx_or_their_own_answer(live, raw, edits):
    """Byte-level mutations of valid bodies: some stay valid (then the 200 must answer the
    mutated body, not the original), the rest must get documented 4xx answers."""
    data = bytearray(raw)
    for op, where, chunk in edits:
        i = int(where * len(data))
        if op == "insert":
            data[i:i] = chunk
        elif op == "delete":
            del data[i:i + len(chunk)]
        else:
            data[i:i + len(chunk)] = chunk
    raw = bytes(data)
    assert_4xx_or_valid_answer(raw, live.post(raw))


@fuzz(200)
@given(case=wrong_type_bodies())
def test_wrong_type_in_every_field_gets_422_naming_it(live, case):
    name, body, needle = case
    what = f"{name} = {show(dumps(body))}"
    err = assert_error(live.post(dumps(body), what=what), what, status=422, needle=needle)
    assert err["type"] == "invalid_request", f"input {what}: {err}"


@fuzz(150)
@given(data=st.data())
def test_out_of_range_values_get_their_4xx(live, data):
    """Out-of-range and negative ids, prompt_len outside [1, len), top_k outside [1, k], too
    long / too short / empty sequences, too many sequences or tokens: each its status and a
    message naming the field or the limit."""
    kind, body, status, needle = data.draw(out_of_range_bodies(live.vocab_size), label="case")
    raw = dumps(body)
    what = f"[{kind}] {show(raw)}"
    assert_error(live.post(raw, what=what), what, status=status, needle=needle)


@fuzz(80)
@given(slot=st.sampled_from(NUMBER_SLOTS), token=st.sampled_from(RAW_NUMBERS),
       spacing=st.sampled_from(["", " ", "\n\t "]))
def test_nan_infinity_and_non_integers_where_numbers_go(live, slot, token, spacing):
    name, path = slot
    text, status, needle = token
    raw = dumps(replace_at(TOKENS_BODY, path, SENTINEL)).replace(
        str(SENTINEL).encode(), f"{spacing}{text}{spacing}".encode())
    assert_error(live.post(raw), f"{name} = {text}: {show(raw)}", status=status,
                 needle=needle or name)


@fuzz(80)
@given(level=st.sampled_from(["top", "sequence", "message"]),
       key=st.text(min_size=1, max_size=100).filter(lambda k: k not in KNOWN_KEYS),
       value=json_values)
@example(level="sequence", key="\ud800", value=1)  # a lone surrogate as a key
@example(level="top", key="k" * 5000, value=None)  # echoed in the message only clipped
def test_unknown_fields_get_422(live, level, key, value):
    body = json.loads(json.dumps(MESSAGES_BODY if level == "message" else TOKENS_BODY))
    target = {"top": body, "sequence": body["sequences"][0],
              "message": body["sequences"][0].get("messages", [{}])[0]}[level]
    target[key] = value
    raw = dumps(body)
    # A key holding a lone surrogate is refused as a string before it counts as unknown.
    needle = ("unicode" if has_surrogate(json.loads(json.dumps(key)))  # unpaired, as parsed
              else "extra inputs are not permitted")
    err = assert_error(live.post(raw), show(raw), status=422, needle=needle)
    assert len(err["message"]) < 2000, f"unknown key echoed unclipped: {len(err['message'])}"


surrogates = st.integers(0xD800, 0xDFFF).map(chr)
fuzz_text = st.text(st.characters(exclude_categories=["Cs"]) | surrogates, max_size=80)


@fuzz(100)
@given(messages=st.none() | st.lists(st.fixed_dictionaries({
           "role": st.sampled_from(["user", "assistant", "system", ""]) | fuzz_text,
           "content": fuzz_text}), min_size=1, max_size=3),
       prompt=fuzz_text, response=fuzz_text.filter(bool))
@example(messages=None, prompt="\ud800", response="x")  # was a 500 before the fix
@example(messages=[{"role": "\udc00", "content": "a"}], prompt="", response="x")  # ditto
@example(messages=None, prompt="", response="\ud800\udc00")  # a pair: valid, U+10000
def test_text_sequences_get_answers_or_4xx(live, messages, prompt, response):
    """Arbitrary text (control characters, any script, lone surrogates spelled as JSON
    escapes): tokenised and answered, or a 4xx. Lone surrogates: 422 naming them."""
    seq = {"response": response, **({"messages": messages} if messages else {"prompt": prompt})}
    body = {"sequences": [seq]}
    raw = dumps(body)
    resp = live.post(raw)
    # As the server reads them: JSON pairs a high and a low surrogate escape into one
    # character, so only UNPAIRED surrogates remain after parsing.
    parsed = json.loads(raw)["sequences"][0]
    strings = [parsed["response"]] + ([s for m in parsed["messages"]
                                       for s in (m["role"], m["content"])]
                                      if messages else [parsed["prompt"]])
    if any(has_surrogate(s) for s in strings):
        assert_error(resp, show(raw), status=422, needle="surrogate")
    elif resp.status_code != 200:
        assert_error(resp, show(raw), status={413, 422})  # too long; no token boundary
    else:
        assert_answers(resp, body, show(raw))


@fuzz(100)
@given(content_type=st.sampled_from([None, *JSON_TYPES, *OTHER_TYPES]) | header_text,
       accept=st.sampled_from([None, *ACCEPTS]) | header_text,
       valid=st.booleans())
def test_content_type_and_accept_headers(live, content_type, accept, valid):
    """JSON Content-Type (or none) is read; any other type gets 415. Any Accept is answered:
    Arrow when it names the Arrow stream type, JSON otherwise; errors are always JSON."""
    body = REFERENCE_BODY if valid else replace_at(TOKENS_BODY, ("sequences", 0, "prompt_len"), 0)
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if accept is not None:
        headers["Accept"] = accept
    what = f"Content-Type {content_type!r}, Accept {accept!r}, valid body {valid}"
    resp = live.post(dumps(body), headers=headers, what=what)
    if not is_json_media(content_type):
        assert_error(resp, what, status=415, needle="content-type")
    elif not valid:
        assert_error(resp, what, status=422, needle="prompt_len")
    elif wire.ARROW_STREAM_MEDIA_TYPE in (accept or ""):
        assert resp.status_code == 200, f"{what}: {resp.text[:300]}"
        assert resp.headers["content-type"] == wire.ARROW_STREAM_MEDIA_TYPE, what
        got, want = wire.decode_arrow(resp.content), wire.decode_json(live.reference)
        assert len(got) == len(want) and all(a.equals(b) for a, b in zip(got, want)), what
    else:
        assert resp.status_code == 200, f"{what}: {resp.text[:300]}"
        assert resp.headers["content-type"].startswith("application/json"), what
        assert resp.content == live.reference, f"{what}: a different answer"


@fuzz(60)
@given(bad=st.sampled_from(INVALID_UTF8)
       | st.binary(min_size=1, max_size=8).filter(lambda b: not is_utf8(b)),
       where=st.sampled_from(["prompt", "response", "key", "outside"]))
def test_non_utf8_bodies_get_400(live, bad, where):
    """Invalid UTF-8 anywhere in an otherwise valid body: 400, naming UTF-8."""
    marker = "MARKERX"
    seq = {"prompt": "sort 3 1", "response": "1 3"}
    if where in ("prompt", "response"):
        seq[where] = f"sort {marker} 1"
    elif where == "key":
        seq[marker] = 1
    raw = dumps({"sequences": [seq]})
    if where == "outside":
        raw = raw[:-1] + b" " + marker.encode() + b"}"
    raw = raw.replace(marker.encode(), bad)
    assert_error(live.post(raw), show(raw), status=400, needle="UTF-8")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"])
def test_valid_json_in_other_encodings_gets_400(live, encoding):
    raw = json.dumps({"sequences": [{"prompt": "sort é 1 2", "response": "1 2"}]},
                     ensure_ascii=False).encode(encoding)
    assert_error(live.post(raw), f"{encoding} body {show(raw)}", status=400, needle="UTF-8")


def _nested(kind: str, depth: int) -> bytes:
    if kind == "lists":
        return b"[" * depth + b"]" * depth
    if kind == "dicts":
        return b'{"a":' * depth + b"0" + b"}" * depth
    return b'[{"a":' * depth + b"0" + b"}]" * depth  # mixed


NEST_SITES = {
    "body": (b"", b""),
    "sequences": (b'{"sequences": ', b"}"),
    "input_ids": (b'{"sequences": [{"input_ids": ', b', "prompt_len": 1}]}'),
    "prompt_len": (b'{"sequences": [{"input_ids": [1, 2], "prompt_len": ', b"}]}"),
    "unknown_field": (b'{"sequences": [{"input_ids": [1, 2], "prompt_len": 1}], "x": ', b"}"),
}


@fuzz(50)
@given(kind=st.sampled_from(["lists", "dicts", "mixed"]),
       depth=st.integers(2, 300) | st.integers(1_000, 100_000),
       where=st.sampled_from(sorted(NEST_SITES)))
@example(kind="lists", depth=100_000, where="body")  # 200 kB: just inside the body limit
@example(kind="dicts", depth=39_000, where="sequences")
def test_deeply_nested_bodies_get_4xx(live, kind, depth, where):
    """Nesting deep enough to exhaust the JSON parser's recursion: 400 'nested too deeply'
    (a RecursionError escaping would be a 500); over the body limit: 413; shallow: 422."""
    prefix, suffix = NEST_SITES[where]
    raw = prefix + _nested(kind, depth) + suffix
    what = f"{kind} nested {depth} deep in {where} ({len(raw)} bytes)"
    resp = live.post(raw, what=what)
    if len(raw) > MAX_BODY:
        assert_error(resp, what, status=413, needle="limit")
    elif depth >= 1_000:
        assert_error(resp, what, status=400, needle="nested too deeply")
    else:
        assert_error(resp, what, status=422)


@fuzz(12)
@given(size=st.integers(MAX_BODY + 1, 8_000_000), chunked=st.booleans(),
       filler=st.sampled_from([b"x", b"[", b"1,", b'{"sequences": [']))
@example(size=MAX_BODY + 1, chunked=False, filler=b"x")
@example(size=MAX_BODY + 1, chunked=True, filler=b"[")
@example(size=50_000_000, chunked=False, filler=b"x")  # announced 50 MB: refused unread
def test_bodies_over_the_limit_get_413(live, size, chunked, filler):
    """Over ``--max-body-bytes``: 413 whether the size is announced (Content-Length, refused
    before reading) or streamed (chunked, cut off at the limit); never a reset connection."""
    raw = (filler * (size // len(filler) + 1))[:size]
    what = f"{size} bytes of {filler!r} ({'chunked' if chunked else 'Content-Length'})"
    body: Any = (raw[i:i + 65536] for i in range(0, len(raw), 65536)) if chunked else raw
    assert_error(live.post(body, what=what), what, status=413, needle="limit")


# ---------------------------------------------------------------------------- vLLM's protocol
def _ids(lo: int = -3, hi: int = 200):
    return st.lists(st.integers(lo, hi), max_size=12)


COMPLETION_FIELDS = {
    "model": st.sampled_from(["aligndistil-pi-star", "other", ""]) | st.none() | st.integers(),
    "max_tokens": st.integers(-2, 6) | st.none() | st.text(max_size=3),
    "prompt_logprobs": st.integers(-3, 40) | st.none() | st.booleans() | st.text(max_size=3),
    "logprobs": st.integers(-3, 40) | st.none(),
    "temperature": st.floats(-1, 3, allow_nan=False) | st.none() | st.sampled_from([1e-45, 0]),
    "top_p": st.floats(-0.5, 1.5, allow_nan=False) | st.none(),
    "top_k": st.integers(-3, 300) | st.none(),
    "seed": st.integers(-2 ** 70, 2 ** 70) | st.none(),
    "n": st.integers(0, 3),
    "stream": st.booleans(),
    "echo": st.booleans(),
    "ignore_eos": st.booleans(),
    "stop_token_ids": _ids(-2, 10 ** 6),
    "prompt_logprob_token_ids": st.lists(_ids(-3, 2 ** 70), max_size=5),
    "prompt_logprob_start": st.integers(-2, 12),
    "prompt_logprobs_alpha": st.booleans() | st.integers(),
    "frequency_penalty": st.floats(-1, 1, allow_nan=False),
    "stop": st.lists(st.text(max_size=3), max_size=2),
    "user": st.text(max_size=5),
    "bogus": st.integers(),
}


@fuzz(120)
@given(prompt=_ids(-3, 200) | st.lists(_ids(0, 150), max_size=3) | st.text(max_size=30)
       | st.integers(),
       extra=st.dictionaries(st.sampled_from(sorted(COMPLETION_FIELDS)), st.none(), max_size=6)
       .flatmap(lambda keys: st.fixed_dictionaries({k: COMPLETION_FIELDS[k] for k in keys})))
def test_completions_answer_or_refuse_in_vllms_error_shape(live, prompt, extra):
    """``POST /v1/completions`` with arbitrary mixes of vLLM's fields: 200, or a 4xx in vLLM's
    shape (``{"error": {"message", "type", "param", "code"}}``), never a 5xx or a drop."""
    body = {"prompt": prompt, **extra}
    what = show(json.dumps(body))
    try:
        resp = live.client.post("/v1/completions", json=body)
    except httpx.TransportError as exc:
        pytest.fail(f"connection dropped ({exc}) for {what}")
    assert resp.status_code < 500, f"{what} got {resp.status_code}: {resp.text[:500]}"
    doc = resp.json()
    if resp.status_code == 200:
        assert len(doc["choices"]) >= 1 and doc["usage"]["total_tokens"] >= 1, what
        return
    assert resp.status_code in {400, 404, 413}, f"{what}: {resp.status_code} {resp.text[:300]}"
    err = doc["error"]
    if resp.status_code in (400, 404):  # vLLM's shape (413: the server's limits' shape)
        assert set(err) == {"message", "type", "param", "code"}, f"{what}: {err}"
        assert err["code"] == resp.status_code and err["message"], what
