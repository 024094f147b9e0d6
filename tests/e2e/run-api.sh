#!/usr/bin/env bash
# Runs the gateway's end-to-end tests with the official `openai` and `ollama` Python clients.
#
#   tests/e2e/run-api.sh                 # builds kt-gateway + the simulated worker, runs all tests
#   KT_E2E_WORKER=host:port tests/e2e/run-api.sh   # against a running worker (real or simulated);
#                                               # tests that need the simulator's scripted
#                                               # replies are skipped then
#
# Environment: CARGO_TARGET_DIR (where the binaries are built), KT_E2E_API_VENV (see setup-api.sh),
# extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/e2e/setup-api.sh
# Two builds: a target filter (--example) would otherwise skip the kt-gateway binary.
cargo build --release -p kt-gateway-service
cargo build --release -p kt-gateway --example sim_worker
TARGET="${CARGO_TARGET_DIR:-target}"
export KT_E2E_GATEWAY_BIN="$TARGET/release/kt-gateway"
export KT_E2E_SIM_BIN="$TARGET/release/examples/sim_worker"
VENV="${KT_E2E_API_VENV:-$HOME/.cache/kt/venv-e2e-api}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/e2e/api "$@"
