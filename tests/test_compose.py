"""docker-compose.yml and .env.example: every service runs real ``aligndistil`` commands that
parse, wired together as the README says; no Docker engine needed.

Each service's command (the image's ENTRYPOINT ``aligndistil`` plus ``command``, or a ``sh -c``
script of several commands, some under ``torchrun`` or ``xargs``) is cut into the ``aligndistil``
invocations it runs; compose variables are substituted with their defaults or with the sample
values of .env.example, and each invocation goes through ``aligndistil.cli.parse_command()``.
The CPU services must run what ``aligndistil demo`` runs at its default size. When the
``docker-compose`` binary (or the ``docker compose`` plugin) is installed, the file is also
checked by Compose's own validator (CI installs it: see .ci/run).
"""

from __future__ import annotations

import http.server
import re
import shlex
import shutil
import subprocess
import threading
import tomllib
from argparse import Namespace
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from aligndistil.cli import parse_command
from aligndistil.demo import MODELS, SIZES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"

CPU_SERVICES = ("world", "teacher", "precompute", "trainer")
GPU_SERVICES = ("teachers-gpu", "teacher-gpu", "precompute-gpu", "trainer-gpu")

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR, and $$ (a literal $)
_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
                  r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


# ------------------------------------------------------------------------------ helpers
@lru_cache(maxsize=1)
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def env_example() -> dict[str, str]:
    env = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution over a parsed YAML value."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["bare"]
        op, arg = m["op"], m["arg"]
        have = env.get(name)
        unset = have is None or (have == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset else have
        if op in (":?", "?"):
            if unset:
                raise AssertionError(f"required variable {name} is missing: {arg}")
            return have
        return have or ""

    return _VAR.sub(sub, value)


def services(env: dict[str, str] | None = None) -> dict[str, dict]:
    return interpolate(raw_compose(), env or {})["services"]


def full_argv(service: dict) -> list[str]:
    """What the container runs: entrypoint (the image's is ``aligndistil``) + command."""
    def as_list(v):
        return shlex.split(v) if isinstance(v, str) else [str(x) for x in (v or [])]

    return as_list(service.get("entrypoint")) or ["aligndistil"], as_list(service.get("command"))


def _is_assignment(token: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", token) is not None


def script_lines(script: str) -> list[list[list[str]]]:
    """A ``sh -c`` script as lines of simple commands (token lists), split on && || ; & |."""
    lines = []
    for line in script.replace("\\\n", " ").splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        segments, current = [], []
        for token in lexer:
            if token in ("&&", "||", ";", "&", "|"):
                segments.append(current)
                current = []
            else:
                current.append(token)
        if current:
            segments.append(current)
        assert all(segments), f"empty command in script line: {line!r}"
        lines.append(segments)
    return lines


def invocations(service: dict) -> list[list[str]]:
    """Every ``aligndistil`` argument list (without ``aligndistil``) the service runs."""
    entrypoint, command = full_argv(service)
    argv = entrypoint + command
    if argv[:2] == ["sh", "-c"]:
        assert len(argv) == 3, f"sh -c takes one script, got {argv[2:]}"
        lines = script_lines(argv[2])
        assert lines and lines[0] == [["set", "-e"]], \
            "a sh -c script must start with 'set -e' so that a failing command fails the service"
        found = []
        for line in lines:
            for segment in line:
                found.extend(_segment(segment))
        return found
    return _segment(argv)


def _segment(tokens: list[str]) -> list[list[str]]:
    """The aligndistil invocation in one simple command, or [] for an allowed helper."""
    while tokens and _is_assignment(tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return []  # dpo=$! : an assignment
    head = tokens[0]
    if head == "aligndistil":
        # xargs -I{} puts the worker number where {} stands: parse with a sample one.
        return [[t.replace("{}", "0") for t in tokens[1:]]]
    if head == "torchrun":
        assert "-m" in tokens and tokens[tokens.index("-m") + 1] == "aligndistil.cli", tokens
        options = tokens[1:tokens.index("-m")]
        assert len(options) == 2 and options[0] == "--nproc-per-node" and \
            int(options[1]) >= 1, f"torchrun options: {options}"
        return _segment(["aligndistil", *tokens[tokens.index("-m") + 2:]])
    if head == "xargs":
        rest = tokens[1:]
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in ("-P", "-n") else rest[1:]
        return _segment(rest)
    if head == "env":
        return _segment(tokens[1:])
    if head == "set":
        assert tokens == ["set", "-e"], tokens
        return []
    if head == "test":
        assert len(tokens) == 3 and tokens[1] == "-f", tokens
        return []
    if head in ("wait", "seq"):
        return []
    raise AssertionError(f"not an aligndistil command nor an allowed helper: {tokens}")


def parse(argv: list[str]) -> Namespace:
    try:
        args = parse_command(argv)
    except SystemExit as exc:  # argparse's way of saying no
        raise AssertionError(f"aligndistil {shlex.join(argv)}: does not parse ({exc})") from None
    assert getattr(args, "command", None) is not None, f"no subcommand in {argv}"
    return args


def parsed(name: str, env: dict[str, str] | None = None) -> list[Namespace]:
    return [parse(argv) for argv in invocations(services(env)[name])]


def by_command(name: str, command: str) -> list[Namespace]:
    return [a for a in parsed(name) if a.command == command]


# ------------------------------------------------------------------------------ the commands
def test_service_set():
    assert set(raw_compose()["services"]) == set(CPU_SERVICES + GPU_SERVICES)


@pytest.mark.parametrize("name", CPU_SERVICES + GPU_SERVICES)
@pytest.mark.parametrize("values", ["defaults", ".env.example"])
def test_every_command_is_an_aligndistil_invocation_that_parses(name, values):
    env = env_example() if values == ".env.example" else {}
    found = parsed(name, env)
    assert found, f"{name} runs no aligndistil command"
    device = "cuda" if name.endswith("-gpu") else "cpu"
    for args in found:
        if hasattr(args, "device"):
            assert args.device == device, f"{name}: aligndistil {args.command} on {args.device}"


def test_pipeline_stages_are_where_the_readme_says():
    commands = {name: [a.command for a in parsed(name)] for name in CPU_SERVICES + GPU_SERVICES}
    assert commands["world"] == ["toyworld", "sft", "pairs", "dpo", "dpo"]
    assert commands["teachers-gpu"] == ["dpo", "dpo"]
    for name in ("world", "teachers-gpu"):
        assert [a.reverse for a in parsed(name) if a.command == "dpo"] == [False, True]
    assert commands["precompute"] == commands["precompute-gpu"] == ["precompute", "inspect"]
    assert commands["teacher"] == commands["teacher-gpu"] == ["serve"]
    assert commands["trainer"] == ["train", "train"] + ["eval"] * len(MODELS)
    assert commands["trainer-gpu"][:2] == ["train", "train"]
    assert set(commands["trainer-gpu"][2:]) == {"eval"}
    for name in ("trainer", "trainer-gpu"):
        assert [a.mode for a in parsed(name) if a.command == "train"] == \
            ["off-policy", "on-policy"]
    for name in ("precompute", "precompute-gpu"):
        pre, inspect = parsed(name)
        assert inspect.verify and inspect.store == pre.out


def test_cpu_services_run_the_demo_at_its_default_size():
    """The same commands as `aligndistil demo --workdir /data` (seed 0, size default)."""
    size, seed = SIZES["default"], 0
    (toy,) = by_command("world", "toyworld")
    assert (toy.out, toy.seed, toy.demos, toy.train_prompts, toy.eval_prompts) == \
        ("/data/world", seed, size.demos, size.train_prompts, size.eval_prompts)
    (sft,) = by_command("world", "sft")
    assert (sft.lr, sft.epochs, sft.seed) == (size.sft_lr, size.sft_epochs, seed)
    (pairs,) = by_command("world", "pairs")
    assert (pairs.samples_per_prompt, pairs.max_new_tokens, pairs.seed) == \
        (size.samples_per_prompt, size.max_new_tokens, seed)
    for dpo in by_command("world", "dpo"):
        assert (dpo.model, dpo.lr, dpo.epochs, dpo.seed, dpo.min_lr_ratio) == \
            ("/data/sft", size.dpo_lr, size.dpo_epochs, seed, 0)
    (pre,) = by_command("precompute", "precompute")
    (serve,) = by_command("teacher", "serve")
    assert pre.top_k == serve.top_k == size.top_k
    assert (pre.dpo_model, pre.reverse_model) == (serve.dpo_model, serve.reverse_model) == \
        ("/data/dpo", "/data/reverse")
    off, on = by_command("trainer", "train")
    assert (off.store, on.prompts) == (pre.out, "/data/world/prompts_train.jsonl")
    for train, epochs in ((off, size.off_policy_epochs), (on, size.on_policy_epochs)):
        assert (train.model, train.lr, train.global_batch_size, train.epochs, train.seed,
                train.min_lr_ratio) == \
            ("/data/sft", size.student_lr, size.global_batch_size, epochs, seed, 0)
    assert (on.max_new_tokens, on.rollout_batch_size) == \
        (size.max_new_tokens, size.global_batch_size)
    evals = by_command("trainer", "eval")
    assert {(e.model, e.out) for e in evals} == \
        {(f"/data/{folder}", f"/data/eval/{name}.json") for name, folder in MODELS.items()}
    for e in evals:
        assert (e.samples_per_prompt, e.max_new_tokens, e.seed, e.task) == \
            (size.eval_samples, size.max_new_tokens, seed + 1234, "sort")


@pytest.mark.parametrize("name", ["world", "trainer", "teachers-gpu"])
def test_skip_guards_test_the_guarded_commands_own_output(name):
    """`test -f P || aligndistil ... --out O`: P must be O or inside it, or a rerun would skip
    the wrong stage."""
    _, command = full_argv(services()[name])
    guarded = 0
    for line in script_lines(command[0]):
        if line[0][0] == "test":
            path = line[0][2]
            (argv,) = _segment(line[1])
            args = parse(argv)
            assert path == args.out or path.startswith(args.out.rstrip("/") + "/"), \
                f"{name}: guard {path} does not belong to {args.command} --out {args.out}"
            guarded += 1
    assert guarded


def test_gpu_services_use_the_papers_defaults_unless_told_otherwise():
    """Defaults in the file are the CLI's defaults (the paper's), so .env can stay empty."""
    parser_defaults = {a.command: a for a in (
        parse(["train", "--mode", "off-policy", "--model", "m", "--out", "o"]),
        parse(["dpo", "--model", "m", "--data", "d", "--out", "o"]),
        parse(["serve", "--dpo-model", "d"]))}
    off, on = by_command("trainer-gpu", "train")
    d = parser_defaults["train"]
    for train in (off, on):
        for key in ("lr", "global_batch_size", "epochs", "warmup_ratio", "beta0", "max_tokens",
                    "save_every", "max_new_tokens", "rollout_batch_size", "lr_schedule",
                    "adam_betas", "weight_decay", "min_lr_ratio", "max_prompt_len"):
            assert getattr(train, key) == getattr(d, key), key
        assert train.resume == "latest"
    for dpo in by_command("teachers-gpu", "dpo"):
        for key in ("beta", "lr", "batch_size", "epochs", "max_seq_len", "min_lr_ratio"):
            assert getattr(dpo, key) == getattr(parser_defaults["dpo"], key), key
    (serve,) = by_command("teacher-gpu", "serve")
    (pre,) = by_command("precompute-gpu", "precompute")
    assert serve.top_k == pre.top_k == parser_defaults["serve"].top_k
    # DESIGN §2: half-l1 r = 20 off-policy / 30 on-policy (the released l1 r = 10 / 15).
    assert (pre.r, serve.r, pre.tvd_norm, serve.tvd_norm) == (20, 30, "half-l1", "half-l1")


# ------------------------------------------------------------------------------ the scripts, run
_STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "$STUB_LOG"
if [ -n "$STUB_FAIL" ]; then
  case " $* " in *" $STUB_FAIL "*) exit 3;; esac
fi
exit 0
"""


def run_script(name: str, tmp_path: Path, fail: str = "") -> tuple[int, list[str]]:
    """Run a service's sh -c script with stand-ins for aligndistil and torchrun that log their
    arguments (and exit 3 when they contain ``fail``): the shell logic, for real."""
    entrypoint, command = full_argv(services()[name])
    assert entrypoint == ["sh", "-c"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("aligndistil", "torchrun"):
        (bin_dir / tool).write_text(_STUB)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / f"{name}.log"
    log.write_text("")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), "STUB_FAIL": fail}
    rc = subprocess.run(["sh", "-c", command[0]], env=env, timeout=60).returncode
    return rc, log.read_text().splitlines()


needs_sh = pytest.mark.skipif(not all(shutil.which(t) for t in ("sh", "seq", "xargs")),
                              reason="needs a POSIX sh with seq and xargs")


@needs_sh
@pytest.mark.parametrize("name", [n for n in CPU_SERVICES + GPU_SERVICES
                                  if full_argv(services()[n])[0] == ["sh", "-c"]])
def test_scripts_run_every_command_once(name, tmp_path):
    rc, ran = run_script(name, tmp_path)
    assert rc == 0
    expected = len(invocations(services()[name]))
    if name == "precompute-gpu":  # xargs runs the precompute command once per worker
        expected += int(env_example()["PRECOMPUTE_WORKERS"]) - 1
    assert len(ran) == expected, ran


@needs_sh
@pytest.mark.parametrize("name, fail, not_after", [
    ("world", "--out /data/sft", "pairs"),
    ("trainer", "--mode off-policy", "--mode on-policy"),
    ("precompute", "--top-k 8", "inspect"),
    ("teachers-gpu", "--out /work/teachers/dpo", None),      # the background one
    ("teachers-gpu", "--out /work/teachers/reverse", None),
    ("precompute-gpu", "--worker-index 3", "inspect"),
    ("trainer-gpu", "--mode off-policy", "--mode on-policy"),
])
def test_a_failing_command_fails_the_service(name, fail, not_after, tmp_path):
    """Compose starts the next services only on success: a failure must reach the exit code."""
    rc, ran = run_script(name, tmp_path, fail)
    assert rc != 0, f"{name} exited 0 although a command failed"
    if not_after:
        assert not [line for line in ran if not_after in line], ran


# ------------------------------------------------------------------------------ the wiring
def _depends(name: str) -> dict[str, str]:
    deps = services()[name].get("depends_on") or {}
    assert isinstance(deps, dict), f"{name}: depends_on must use the long form with conditions"
    return {dep: spec["condition"] for dep, spec in deps.items()}


def test_dependency_graph():
    assert _depends("world") == {}
    assert _depends("teacher") == {"world": "service_completed_successfully"}
    assert _depends("precompute") == {"world": "service_completed_successfully"}
    assert _depends("trainer") == {"teacher": "service_healthy",
                                   "precompute": "service_completed_successfully"}
    assert _depends("teachers-gpu") == {}
    assert _depends("precompute-gpu") == {"teachers-gpu": "service_completed_successfully"}
    assert _depends("teacher-gpu") == {"teachers-gpu": "service_completed_successfully",
                                       "precompute-gpu": "service_completed_successfully"}
    assert _depends("trainer-gpu") == {"teacher-gpu": "service_healthy",
                                       "precompute-gpu": "service_completed_successfully"}


def test_profiles_keep_the_two_pipelines_apart():
    svc = services()
    for name in CPU_SERVICES:
        assert "profiles" not in svc[name], f"{name} must run on a plain `docker compose up`"
        assert "deploy" not in svc[name]
    for name in GPU_SERVICES:
        assert svc[name]["profiles"] == ["gpu"]
        assert all(dep in GPU_SERVICES for dep in _depends(name))


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_services_reserve_gpus(name):
    devices = services()[name]["deploy"]["resources"]["reservations"]["devices"]
    assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"]
                           and ("count" in d or "device_ids" in d) for d in devices)


def test_volumes():
    compose = raw_compose()
    svc = services()
    assert "aligndistil-data" in compose["volumes"]
    for name in CPU_SERVICES:
        assert "aligndistil-data:/data" in svc[name]["volumes"]
    for name in GPU_SERVICES:
        assert svc[name]["volumes"] == ["./work:/work"]


def test_ports_are_published_on_loopback_only():
    published = 0
    for name, svc in services(env_example()).items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
            published += 1
    assert published == 2


@pytest.mark.parametrize("server, client", [("teacher", "trainer"),
                                            ("teacher-gpu", "trainer-gpu")])
def test_trainer_reaches_the_teacher_it_waits_for(server, client):
    (serve,) = by_command(server, "serve")
    assert serve.host == "0.0.0.0"  # inside the container network; published on loopback
    svc = services()[server]
    assert svc["ports"] == [f"127.0.0.1:8000:{serve.port}"]
    urls = {a.teacher_url for a in parsed(client) if getattr(a, "teacher_url", None)}
    assert urls == {f"http://{server}:{serve.port}"}
    health = svc["healthcheck"]["test"]
    assert health[:3] == ["CMD", "python", "-c"] and \
        f"127.0.0.1:{serve.port}/readyz" in health[3]


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self):  # noqa: N802
        code = self.status if self.path == "/readyz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_command_passes_only_when_ready():
    """The healthcheck's python one-liner against a stand-in /readyz: fails on 503, passes on 200."""
    snippet = services()["teacher"]["healthcheck"]["test"][3]
    server = http.server.HTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check = snippet.replace("127.0.0.1:8000", f"127.0.0.1:{server.server_port}")
        assert check != snippet

        def exit_status() -> int:
            """What `python -c check` exits with: 1 on an uncaught exception, else 0 (run in
            this process: a second interpreter's start-up would cost more than the check)."""
            try:
                exec(compile(check, "<healthcheck>", "exec"), {"__name__": "__main__"})
            except SystemExit as exc:
                return int(exc.code or 0)
            except Exception:  # noqa: BLE001 - any uncaught exception fails the check
                return 1
            return 0

        assert exit_status() != 0
        _Ready.status = 200
        assert exit_status() == 0
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------ variables
def test_every_variable_has_a_default_and_is_documented():
    text = COMPOSE.read_text(encoding="utf-8")
    defaults: dict[str, set[str]] = {}
    for m in _VAR.finditer(text):
        if m["escaped"]:
            continue
        name = m["braced"] or m["bare"]
        # Compose interpolates every service, those of inactive profiles too: a required
        # variable of a gpu service would break a plain `docker compose up`.
        assert m["op"] == ":-", f"${{{name}}} needs a default: ${{{name}:-...}}"
        defaults.setdefault(name, set()).add(m["arg"])
    example = env_example()
    assert set(defaults) == set(example), \
        f"only in compose: {set(defaults) - set(example)}; only in .env.example: " \
        f"{set(example) - set(defaults)}"
    for name, values in defaults.items():
        assert len(values) == 1, f"{name} has different defaults: {values}"
        assert example[name] == values.pop(), f".env.example's {name} differs from the default"
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert _commented_group(lines, i), f".env.example: {line!r} has no comment"


def _commented_group(lines: list[str], i: int) -> bool:
    """A variable directly after other variables shares their comment."""
    while i > 0 and lines[i - 1] and not lines[i - 1].startswith("#"):
        i -= 1
    return i > 0 and lines[i - 1].startswith("#")


# ------------------------------------------------------------------------------ the image
def test_dockerfile_installs_the_pinned_torch_and_runs_aligndistil_as_a_user():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_pin,) = [p for p in pins if p.startswith("torch")]
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert torch_pin.replace(" ", "") in text.replace(" ", "")
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert 'ENTRYPOINT ["aligndistil"]' in text
    assert re.search(r"^USER (?!root\b)\w+", text, re.M)
    assert re.search(r"^VOLUME /data$", text, re.M)
    ignored = [line.strip() for line in
               (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.startswith("#")]
    assert ".venv" in ignored and ".git" in ignored
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert copied not in ignored, f"{copied} is copied but .dockerignore drops it"


# ------------------------------------------------------------------------------ Compose itself
def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.parametrize("extra", [[], ["--env-file", ".env.example", "--profile", "gpu"]],
                         ids=["plain", "gpu-profile-with-env-example"])
def test_compose_validates_the_file(extra):
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed "
                    "(.ci/run installs Debian's docker-compose)")
    result = subprocess.run([*compose, *extra, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
