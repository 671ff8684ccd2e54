"""``docker compose up`` for real: the image built from the Dockerfile, the CPU services run end
to end in containers, and their eval results equal to the demo's on this machine; then the gpu
profile's service scripts run in the same image with ``--device cpu`` on the toy world.

Opt-in (``-m docker``; several minutes, more on a first build) and it needs:

- a Docker daemon (``docker info`` answers) and Compose v1 (``docker-compose``) or v2;
- the base image named by ``ALIGNDISTIL_DOCKER_BASE`` (default ``python:3.11-slim``) present
  locally or pullable. Where no registry is reachable, build one from Debian's packages, from
  the mirror apt itself is configured with::

      mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
      debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \\
          bookworm /tmp/rootfs "$mirror"
      cp /etc/ssl/certs/ca-certificates.crt /tmp/rootfs/etc/ssl/certs/
      tar -C /tmp/rootfs -c . | docker import - local/python:3.11-bookworm
      ALIGNDISTIL_DOCKER_BASE=local/python:3.11-bookworm pytest -m docker tests/test_docker.py

- optionally a ``torch-2.13.0*.whl`` in ``docker/wheels/`` (e.g. this machine's CPU wheel), or
  pip inside the build downloads torch 2.13.0 (on Linux x86_64 the several-GB CUDA build).

What cannot run here: the GPU reservations themselves (``deploy.resources`` with the NVIDIA
runtime). The gpu services' scripts run as written except ``--device cuda`` -> ``--device cpu``
and ``CUDA_VISIBLE_DEVICES`` emptied, on a throwaway network where the teacher answers to
``teacher-gpu``.

Each run uses its own Compose project, volume and network, all removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid

import pytest
import yaml

from live_server import REPO

pytestmark = [pytest.mark.docker, pytest.mark.timeout(7200)]

BASE = os.environ.get("ALIGNDISTIL_DOCKER_BASE", "python:3.11-slim")
IMAGE = "aligndistil:cpu"
#: eval results compared with the demo's (every number the eval computes)
COMPARED = ("num_prompts", "samples", "mean_response_length", "gold_reward", "exact_match",
            "contrastive_reward", "kl_to_dpo", "kl_to_dpo_per_sequence", "kl_to_teacher")
EVALS = ("sft", "dpo", "reverse", "aligndistil-off-policy", "aligndistil-on-policy")


def _compose() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


def _run(argv: list[str], *, timeout: float, env: dict | None = None, check: bool = True,
         **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-4000:]}\n"
                    f"{done.stderr[-4000:]}")
    return done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def compose_env():
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("-m docker needs a running Docker daemon (`docker info` fails); see the "
                    "module docstring")
    if subprocess.run(["docker", "image", "inspect", BASE], capture_output=True).returncode:
        pulled = subprocess.run(["docker", "pull", BASE], capture_output=True, text=True)
        if pulled.returncode:
            pytest.fail(f"base image {BASE} is neither local nor pullable ({pulled.stderr[-300:]}"
                        f"); set ALIGNDISTIL_DOCKER_BASE to a local one (module docstring)")
    tag = uuid.uuid4().hex[:8]
    env = {**os.environ, "BASE_IMAGE": BASE, "COMPOSE_PROJECT_NAME": f"adtest{tag}",
           "DATA_VOLUME": f"aligndistil-test-{tag}", "TEACHER_PORT": str(_free_port()),
           "ALIGNDISTIL_API_KEY": ""}
    # One build (Compose would build the shared image once per service)
    _run(["docker", "build", "-t", IMAGE, "--build-arg", f"BASE_IMAGE={BASE}", "."],
         timeout=3600, env=env)
    yield env
    _run([*_compose(), "down", "-v", "--remove-orphans"], timeout=300, env=env, check=False)


def _read_volume(env: dict, path: str) -> str:
    """A file of the test's volume (mounted at /data), read inside the running teacher service
    (a new container would copy the whole image first under the vfs storage driver)."""
    return _run([*_compose(), "exec", "-T", "teacher", "cat", path], timeout=120,
                env=env).stdout


def test_compose_up_reproduces_the_demo(compose_env, tmp_path_factory):
    env = compose_env
    # up -d waits for each dependency's condition (world done, teacher healthy, ...) in turn
    _run([*_compose(), "up", "-d", "--no-build"], timeout=3600, env=env)
    trainer = _run([*_compose(), "ps", "-q", "trainer"], timeout=60, env=env).stdout.strip()
    code = _run(["docker", "wait", trainer], timeout=3600).stdout.strip()
    if code != "0":
        logs = _run([*_compose(), "logs", "--no-color", "--tail", "80"], timeout=120, env=env,
                    check=False)
        pytest.fail(f"the trainer service exited {code}:\n{logs.stdout[-6000:]}")
    verify = _run([*_compose(), "logs", "--no-color", "precompute"], timeout=120, env=env)
    assert "ok: " in verify.stdout and "FAILED" not in verify.stdout, verify.stdout[-2000:]

    # the demo on this machine: the same commands, flags and seeds, outside containers
    work = tmp_path_factory.mktemp("demo")
    _run([sys.executable, "-m", "aligndistil.cli", "demo", "--workdir", str(work), "--device",
          "cpu", "--seed", "0"], timeout=3600)
    for name in EVALS:
        got = json.loads(_read_volume(env, f"/data/eval/{name}.json"))
        want = json.loads((work / "eval" / f"{name}.json").read_text())
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (name, key)
        assert [e["response"] for e in got["examples"]] == \
            [e["response"] for e in want["examples"]], name


def test_gpu_profile_scripts_run_with_device_cpu(compose_env):
    """The gpu services' scripts as Compose renders them (variables filled from the
    environment), cuda swapped for cpu, on the toy world the CPU services left in the volume
    (mounted at /work here): dpo and reverse teachers -> two precompute workers + verify ->
    serve -> torchrun (2 processes) off- and on-policy training -> eval. Needs the volume the
    test above filled."""
    env = dict(compose_env)
    _read_volume(env, "/data/pairs.jsonl")  # the world exists (the test above ran)
    env.update({
        "BASE_MODEL": "/work/sft", "PREFS": "/work/pairs.jsonl", "DPO_MODEL": "/work/gpu/dpo",
        "REVERSE_MODEL": "/work/gpu/reverse", "STORE": "/work/gpu/store",
        "OUT_DIR": "/work/gpu/runs", "PROMPTS": "/work/world/prompts_train.jsonl",
        "EVAL_PROMPTS": "/work/world/prompts_eval.jsonl", "DPO_BATCH_SIZE": "32",
        "DPO_LR": "5e-5", "DPO_EPOCHS": "1", "DPO_MAX_SEQ_LEN": "64", "PRECOMPUTE_WORKERS": "2",
        "TOP_K": "8", "TRAINER_NPROC": "2", "GLOBAL_BATCH_SIZE": "32", "EPOCHS": "1",
        "MAX_TOKENS": "4096", "SAVE_EVERY": "1000", "MAX_NEW_TOKENS": "16",
        "ROLLOUT_BATCH_SIZE": "32", "EVAL_SAMPLES": "1", "LR": "1e-4"})
    rendered = yaml.safe_load(_run([*_compose(), "--profile", "gpu", "config"], timeout=120,
                                   env=env).stdout)["services"]

    def script(service: str) -> str:
        (text,) = rendered[service]["command"]  # sh -c's one argument
        assert rendered[service]["entrypoint"] == ["sh", "-c"] and "--device cuda" in text
        # Compose's rendering keeps $$ (its escape for a literal $); sh needs the $
        return (text.replace("$$", "$").replace("--device cuda", "--device cpu")
                .replace("CUDA_VISIBLE_DEVICES=", "UNUSED_GPU="))

    network = f"{env['COMPOSE_PROJECT_NAME']}-gpu"
    teacher = f"{env['COMPOSE_PROJECT_NAME']}-teacher-gpu"
    volume = ["-v", f"{env['DATA_VOLUME']}:/work", "-e", "TQDM_DISABLE=1"]

    def run_script(text: str) -> None:
        _run(["docker", "run", "--rm", "--network", network, *volume, "--entrypoint", "sh",
              IMAGE, "-c", text], timeout=3600)

    _run(["docker", "network", "create", network], timeout=60)
    try:
        run_script(script("teachers-gpu"))
        run_script(script("precompute-gpu"))
        serve = ["cpu" if a == "cuda" else a for a in rendered["teacher-gpu"]["command"]]
        _run(["docker", "run", "-d", "--name", teacher, "--network", network, "--network-alias",
              "teacher-gpu", *volume, IMAGE, *serve], timeout=120)
        run_script("for i in $(seq 150); do python -c \"import urllib.request; urllib.request."
                   "urlopen('http://teacher-gpu:8000/readyz', timeout=5)\" 2>/dev/null && exit "
                   "0; sleep 2; done; exit 1")
        run_script(script("trainer-gpu"))
        for name in ("base", "dpo", "aligndistil-off-policy", "aligndistil-on-policy"):
            result = json.loads(_read_volume(env, f"/data/gpu/runs/eval/{name}.json"))
            assert result["samples"] == 128 and "contrastive_reward" in result, name
    finally:
        subprocess.run(["docker", "rm", "-f", teacher], capture_output=True)
        subprocess.run(["docker", "network", "rm", network], capture_output=True)
