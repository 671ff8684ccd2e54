#!/usr/bin/env bash
# The main job: sets up ./.venv if needed, then runs `aligndistil demo` on the embedded toy world
# (extra arguments go to the demo, e.g. --fresh, --size small, --workdir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/aligndistil demo --workdir aligndistil-demo "$@"
