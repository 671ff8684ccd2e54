#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU (H100/H200 class) whose python3 has torch (CUDA),
# transformers and pyarrow but not aligndistil's other packages, and no network:
#
#   bash benchmarks/gpu/run.sh [--out DIR/gpu] [gpu_bench.py options]
#   bash benchmarks/gpu/run.sh --dry-run --out /tmp/gpu     # tiny shapes on the CPU (the tests)
#
# The missing packages come from wheels brought along in benchmarks/gpu/wheels/ (made on a
# machine with the package index by benchmarks/gpu/fetch_wheels.sh) and go into a folder on
# PYTHONPATH; aligndistil itself runs from this checkout. torch is never installed or touched.
# Writes OUT.md and OUT.json (default benchmarks/results/gpu.*); about 8 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && ! command -v nvidia-smi > /dev/null; then
  PY=.venv/bin/python   # a development checkout without a GPU: its own environment
fi
NEEDED="zarr numcodecs fastapi uvicorn pydantic"
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
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # aligndistil from this checkout, no install
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
"$PY" -c "import torch, transformers, pyarrow, zarr, fastapi, uvicorn; \
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}, GPU: {torch.cuda.is_available()}), transformers {transformers.__version__}')"
exec "$PY" benchmarks/gpu/gpu_bench.py "$@"
