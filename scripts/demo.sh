#!/usr/bin/env bash
# The main job: sets up ./.venv if needed, then runs the pipeline on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/pipeline_demo.py "$@"
