#!/usr/bin/env bash
# Download the wheels benchmarks/gpu/run.sh installs on a GPU image that lacks them (CPython 3.12,
# x86-64 Linux: the image's python3). Run where the package index is reachable; the folder is
# ignored by git and travels with the working tree to the GPU machine (about 15 MB).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../../.venv/bin/python}
PYVER=${PYVER:-3.12}
DEST=${WHEELS:-wheels}
mkdir -p "$DEST"
# The versions this project is tested with (pyproject.toml's ranges), and what they need that the
# GPU image does not have.
PKGS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
      fastapi==0.136.3 starlette==1.10.0 annotated-doc==0.0.7 uvicorn==0.54.0
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      typing-extensions==4.16.0"
for p in $PKGS; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$DEST" "$p"
done
ls -la "$DEST"
