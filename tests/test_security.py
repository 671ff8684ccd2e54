"""Security properties of the code (docs/security.md lists them with the code that holds them).

Static checks read our packages' source with ``ast``; the others load hostile files (a pickle
whose unpickling creates a marker folder, a model folder with its own Python code) or talk to a
real ``aligndistil serve`` process, and check that nothing ran and the right error came back.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from aligndistil.cli import main, parse_command
from live_server import start_server, stop_server
from tiny_models import save_model_dir, save_teacher_pair

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("aligndistil", "storage", "causal_lm", "teacher_service", "student_trainer")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve",
                  "joblib", "pickletools", "copyreg"}


def _package_sources() -> list[tuple[Path, ast.Module]]:
    files = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
    assert len(files) > 30, files  # the walk really sees the code
    return [(f, ast.parse(f.read_text(encoding="utf-8"), filename=str(f))) for f in files]


def _calls(tree: ast.AST, attr: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == attr:
            yield node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


class MkdirOnUnpickle:
    """Unpickling this runs ``os.mkdir(path)``: proof that code ran, with no other harm."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


# ---------------------------------------------------------------------------- static checks
def test_no_module_of_ours_imports_a_pickle_library():
    found = []
    for path, tree in _package_sources():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] in PICKLE_MODULES]
            if isinstance(node, ast.Call):
                if _is_true(_keyword(node, "allow_pickle")):
                    found.append(f"{path}:{node.lineno} allow_pickle=True")
                if isinstance(node.func, ast.Attribute) and node.func.attr == "read_pickle":
                    found.append(f"{path}:{node.lineno} read_pickle")
    assert not found, found


def test_every_torch_load_passes_weights_only_true():
    loads = [(path, call) for path, tree in _package_sources() for call in _calls(tree, "load")
             if isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"]
    assert loads, "expected torch.load in student_trainer/checkpoint.py"
    bad = [f"{p}:{c.lineno}" for p, c in loads if not _is_true(_keyword(c, "weights_only"))]
    assert not bad, bad


def test_model_loading_is_local_safetensors_and_remote_code_is_opt_in():
    calls = [(p, c) for p, tree in _package_sources() for c in _calls(tree, "from_pretrained")]
    # model + tokenizer, written once in causal_lm.loading for the student and the teachers
    assert len(calls) >= 2, calls
    for path, call in calls:
        where = f"{path}:{call.lineno}"
        assert _is_true(_keyword(call, "local_files_only")), where
        remote = _keyword(call, "trust_remote_code")
        assert remote is not None and not isinstance(remote, ast.Constant), where  # the flag
        receiver = call.func.value
        if isinstance(receiver, ast.Name) and receiver.id.startswith("AutoModel"):
            assert _is_true(_keyword(call, "use_safetensors")), where
    # Every trust_remote_code parameter, config field and flag defaults to off.
    defaults = []
    for path, tree in _package_sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                for arg, default in zip(args.kwonlyargs, args.kw_defaults):
                    if arg.arg == "trust_remote_code":
                        defaults.append((f"{path}:{node.lineno}", default))
                pos = args.posonlyargs + args.args
                for arg, default in zip(pos[len(pos) - len(args.defaults):], args.defaults):
                    if arg.arg == "trust_remote_code":
                        defaults.append((f"{path}:{node.lineno}", default))
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.target.id == "trust_remote_code":
                defaults.append((f"{path}:{node.lineno}", node.value))
    assert len(defaults) >= 5, defaults
    bad = [w for w, d in defaults if not (isinstance(d, ast.Constant) and d.value is False)]
    assert not bad, bad


def test_the_api_key_is_compared_in_constant_time():
    tree = ast.parse((REPO / "teacher_service" / "server.py").read_text(encoding="utf-8"))
    (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
             and n.name == "require_key"]
    digests = [c for c in _calls(fn, "compare_digest")
               if isinstance(c.func.value, ast.Name) and c.func.value.id == "hmac"]
    assert digests, "require_key must use hmac.compare_digest"
    secret_names = {"token", "key", "api_key", "header"}
    for node in ast.walk(fn):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq))
                                                 for op in node.ops):
            sides = [node.left, *node.comparators]
            named = {s.id for s in sides if isinstance(s, ast.Name)} | \
                    {s.attr for s in sides if isinstance(s, ast.Attribute)}
            assert not named & secret_names, ast.unparse(node)


def test_cli_defaults_are_the_safe_ones():
    serve = parse_command(["serve", "--dpo-model", "d", "--reverse-model", "r"])
    assert serve.host == "127.0.0.1"
    assert serve.api_key is None and not serve.trust_remote_code
    assert serve.max_body_bytes == 8 << 20 and serve.max_request_tokens == 65536
    assert serve.max_seq_len is None  # -> the models' max_position_embeddings (else 4096)
    assert serve.max_queue == 256 and serve.max_batch_tokens == 8192
    pre = parse_command(["precompute", "--dpo-model", "d", "--reverse-model", "r",
                             "--data", "x", "--out", "y"])
    train = parse_command(["train", "--mode", "off-policy", "--model", "m", "--out", "o"])
    dpo = parse_command(["dpo", "--model", "m", "--data", "d", "--out", "o"])
    assert not (pre.trust_remote_code or train.trust_remote_code or dpo.trust_remote_code)


# ---------------------------------------------------------------------------- hostile files
@pytest.fixture()
def evil_pickle(tmp_path):
    """(a .pt/.bin file whose unpickling runs code, the folder that code creates)."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "step": 1, "x": MkdirOnUnpickle(marker)}, path)
    # The payload is live: an unsafe load does run it.
    torch.load(path, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()
    return path, marker


def test_a_hostile_trainer_state_is_refused_without_running_code(evil_pickle, tmp_path, capsys):
    evil, marker = evil_pickle
    ckpt = save_model_dir(tmp_path / "out" / "checkpoint-00000001", hidden_size=32, heads=1)
    (ckpt / "trainer_state.pt").write_bytes(evil.read_bytes())
    base = ["train", "--mode", "off-policy", "--store", str(tmp_path / "no_store"),
            "--model", str(ckpt), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--no-progress", "--log-level", "warning"]
    for resume in (["--resume", str(ckpt)], ["--resume"]):  # named folder, and "latest"
        assert main(base + resume) == 2
        err = capsys.readouterr().err
        assert "trainer_state.pt: cannot be read" in err and "UnpicklingError" in err, err
        assert not marker.exists()


def test_pickle_weights_are_refused_and_never_unpickled(evil_pickle, tmp_path, capsys):
    from causal_lm.loading import ModelLoadError, load_causal_lm
    from student_trainer.modeling import load_student

    evil, marker = evil_pickle
    cpu = torch.device("cpu")
    # 1. Only a (real, pickled) pytorch_model.bin: refused by the student and teacher loaders.
    only_bin = save_model_dir(tmp_path / "only_bin", hidden_size=32, heads=1)
    torch.save(load_file(only_bin / "model.safetensors"), only_bin / "pytorch_model.bin")
    (only_bin / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_student(only_bin, device=cpu)
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_causal_lm(only_bin, device=cpu, dtype=torch.float32)
    assert main(["train", "--mode", "off-policy", "--store", str(tmp_path / "no_store"),
                 "--model", str(only_bin), "--out", str(tmp_path / "run"), "--device", "cpu",
                 "--no-progress", "--log-level", "warning"]) == 2
    assert "only safetensors are loaded" in capsys.readouterr().err
    # 2. A hostile pytorch_model.bin beside the safetensors is never opened.
    both = save_model_dir(tmp_path / "both", hidden_size=32, heads=1)
    (both / "pytorch_model.bin").write_bytes(evil.read_bytes())
    model, _ = load_student(both, device=cpu)
    teacher = load_causal_lm(both, device=cpu, dtype=torch.float32)
    want = load_file(both / "model.safetensors")
    for m in (model, teacher):
        assert torch.equal(m.state_dict()["lm_head.weight"], want["lm_head.weight"])
    assert not marker.exists()


def test_model_code_in_a_model_folder_does_not_run_by_default(tmp_path):
    from student_trainer.modeling import load_student
    from teacher_service.models import load_teacher_pair

    marker = tmp_path / "code_ran"
    folder = save_model_dir(tmp_path / "m", hidden_size=32, heads=1)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"import os\nos.mkdir({str(marker)!r})\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class Config(LlamaConfig):\n    pass\n"
        "class Model(LlamaForCausalLM):\n    pass\n")
    model, _ = load_student(folder, device=torch.device("cpu"))
    pair = load_teacher_pair(folder, folder, device="cpu")
    assert type(model).__name__ == type(pair.dpo).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


def test_the_arrow_wire_never_unpickles(tmp_path):
    """pyarrow < 14.0.1 unpickled 'arrow.py_extension_type' metadata of any IPC stream it read
    (CVE-2023-47248); pyproject requires pyarrow >= 15. A stream carrying such a column is
    refused by the trainer's decoder and its payload does not run."""
    from storage.wire import WIRE_VERSION, WIRE_VERSION_KEY, WireError, decode_arrow

    major, minor, patch = (int(x) for x in pa.__version__.split(".")[:3])
    assert (major, minor, patch) >= (14, 0, 1)
    marker = tmp_path / "code_ran"
    payload = pickle.dumps(MkdirOnUnpickle(marker))
    field = pa.field("alpha", pa.binary(), metadata={
        b"ARROW:extension:name": b"arrow.py_extension_type",
        b"ARROW:extension:metadata": payload})
    schema = pa.schema([field], metadata={WIRE_VERSION_KEY: str(WIRE_VERSION).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array([b"x"])], schema=schema))
    with pytest.raises(WireError):
        decode_arrow(sink.getvalue().to_pybytes())
    assert not marker.exists()


def test_zarr_has_no_pickle_codec_to_decode_a_store_with():
    import zarr.registry

    for name in ("numcodecs.pickle", "pickle"):
        with pytest.raises(KeyError):
            zarr.registry.get_codec_class(name)


# ---------------------------------------------------------------------------- the server
def _listening_addresses(port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp{,6})."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.append(addr)
    return found


def test_serve_binds_loopback_requires_the_key_and_enforces_limits(tmp_path):
    key = "k3y-Secret-0123456789"
    dpo_dir, rev_dir = save_teacher_pair(tmp_path / "pair", hidden_size=32, heads=1)
    proc, url = start_server(dpo_dir, rev_dir, "--top-k", "4", "--api-key", key,
                             "--max-seq-len", "32", "--max-body-bytes", "4096",
                             "--max-request-tokens", "40", log_path=tmp_path / "server.log")
    try:
        if os.path.exists("/proc/net/tcp"):
            port = int(url.rsplit(":", 1)[1])
            assert _listening_addresses(port) == ["0100007F"]  # 127.0.0.1 only, no --host given

        ok = {"Authorization": f"Bearer {key}"}
        body = {"sequences": [{"input_ids": [7, 8, 9, 10], "prompt_len": 2}]}

        def score(headers=None, **kw):
            return httpx.post(url + "/v1/score", headers=headers, timeout=60,
                              **({"json": body} | kw))

        for headers in (None, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Bearer {key[:-1]}"},
                        {"Authorization": f"Bearer {key}x"},
                        {"Authorization": f"Basic {key}"}, {"Authorization": key}):
            resp = score(headers)
            assert resp.status_code == 401 and resp.json()["error"]["type"] == "unauthorized"
        assert httpx.get(url + "/v1/info").status_code == 401
        assert score(ok).status_code == 200
        assert httpx.get(url + "/v1/info", headers=ok).status_code == 200
        # Not protected by the key: liveness, readiness and the Prometheus counters.
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(url + path).status_code == 200, path

        # Limits (with the key): body bytes, declared or streamed; tokens per sequence/request.
        big = b'{"sequences": [' + b" " * 5000 + b"]}"
        raw = {**ok, "content-type": "application/json"}
        resp = score(raw, content=big, json=None)
        assert resp.status_code == 413 and resp.json()["error"]["type"] == "body_too_large"
        resp = score(raw, content=iter([big[:3000], big[3000:]]), json=None)  # chunked
        assert resp.status_code == 413 and resp.json()["error"]["type"] == "body_too_large"
        resp = score(ok, json={"sequences": [{"input_ids": list(range(7, 40)), "prompt_len": 2}]})
        assert resp.status_code == 413 and "max_seq_len" in resp.json()["error"]["message"]
        two = {"input_ids": list(range(7, 28)), "prompt_len": 2}  # 21 tokens each, 42 in all
        resp = score(ok, json={"sequences": [two, two]})
        assert resp.status_code == 413 and resp.json()["error"]["type"] == "too_many_tokens"
        assert score(ok).status_code == 200  # still serving
    finally:
        assert stop_server(proc) == 0, (tmp_path / "server.log").read_text()[-2000:]
