#!/usr/bin/env bash
# Download the wheels benchmarks/gpu/run.sh installs on a GPU image that lacks them (CPython 3.12,
# x86-64 Linux: the image's python3). Run where the package index is reachable; the folder is
# ignored by git and travels with the working tree to the GPU machine (about 15 MB).
# PYTHON picks the interpreter whose pip downloads (default: this checkout's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")"
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x ../../.venv/bin/python ]; then
  PY=../../.venv/bin/python
else
  PY=python3
fi
PYVER=${PYVER:-3.12}
DEST=${WHEELS:-wheels}
mkdir -p "$DEST"
# The versions this project is tested with (pyproject.toml's ranges), and what they need that the
# GPU image may not have: the image's transformers/huggingface_hub bring some of the HTTP stack
# (httpx or httpx2, anyio, h11, idna, click), which version of it is not known here, so all of
# it comes along. prometheus_client: the server imports it; httpx: the benchmark's client and
# student_trainer.client.
PKGS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
      fastapi==0.136.3 starlette==1.10.0 annotated-doc==0.0.7 uvicorn==0.55.0
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      typing-extensions==4.16.0 prometheus-client==0.26.0
      httpx==0.29.0 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 idna==3.21
      certifi==2026.10.19.post1 click==8.5.1"
for p in $PKGS; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$DEST" "$p"
done
ls -la "$DEST"
