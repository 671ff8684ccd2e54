#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU (H100/H200 class) whose python3 has torch (CUDA),
# transformers and pyarrow but not aligndistil's other packages, and no network:
#
#   bash benchmarks/gpu/run.sh [--out DIR/gpu] [gpu_bench.py options]
#   bash benchmarks/gpu/run.sh --dry-run [--out /tmp/gpu]   # tiny shapes on the CPU (the tests)
#
# The missing packages come from wheels brought along in benchmarks/gpu/wheels/ (made on a
# machine with the package index by benchmarks/gpu/fetch_wheels.sh) and go into a folder on
# PYTHONPATH; aligndistil itself runs from this checkout. torch is never installed or touched.
# Writes OUT.md and OUT.json (default benchmarks/results/gpu.*; a dry run's default: a temporary
# folder, printed); about 8 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && ! command -v nvidia-smi > /dev/null; then
  PY=.venv/bin/python   # a development checkout without a GPU: its own environment
fi
# What aligndistil needs beyond torch, transformers and pyarrow on the paths the benchmark runs
# (import names; the wheels' list is fetch_wheels.sh's).
NEEDED="zarr numcodecs fastapi starlette uvicorn pydantic prometheus_client httpx"
missing=$("$PY" - "$NEEDED" <<'PY'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1].split() if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  WHEELS=${WHEELS:-benchmarks/gpu/wheels}
  if ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    echo "run.sh: $PY lacks: $missing; and $WHEELS/ has no wheels." >&2
    echo "  Make them where the package index is reachable: bash benchmarks/gpu/fetch_wheels.sh" >&2
    exit 2
  fi
  SITE=${SITE:-/tmp/aligndistil_site}
  echo "run.sh: installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE (missing: $missing)"
  if "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
  else  # no pip in the image: a wheel is a zip of what goes into site-packages
    echo "run.sh: $PY has no pip; unpacking the wheels instead"
    "$PY" - "$SITE" "$WHEELS"/*.whl <<'PY'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PY
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # aligndistil from this checkout, no install
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
# Say what imports; a module that does not only fails the sections that need it (recorded).
"$PY" - <<'PY'
import importlib
import torch, transformers, pyarrow  # without these nothing runs
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU: {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}, pyarrow {pyarrow.__version__}")
for name in ("zarr", "numcodecs", "fastapi", "uvicorn", "pydantic", "prometheus_client", "httpx"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        print(f"run.sh: warning: {name} does not import ({type(exc).__name__}: {exc}); the "
              f"sections that need it will fail")
PY
exec "$PY" benchmarks/gpu/gpu_bench.py "$@"
