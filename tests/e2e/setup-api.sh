#!/usr/bin/env bash
# Makes the virtual environment of the gateway's end-to-end tests: ~/.cache/kt/venv-e2e-api
# (or $KT_E2E_API_VENV) with the pinned official clients of requirements-api.txt. Idempotent: does
# nothing when the venv already has exactly these pins.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${KT_E2E_API_VENV:-$HOME/.cache/kt/venv-e2e-api}"
STAMP="$VENV/.requirements"
if [[ -f "$STAMP" ]] && cmp -s "$STAMP" "$HERE/requirements-api.txt"; then
    echo "e2e venv ready: $VENV"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$HERE/requirements-api.txt"
cp "$HERE/requirements-api.txt" "$STAMP"
echo "e2e venv ready: $VENV"
