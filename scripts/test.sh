#!/usr/bin/env bash
# The test suite: sets up ./.venv if needed, then runs pytest (vLLM and slow tests are opt-in
# markers: pass e.g. `-m vllm` to run them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
