#!/usr/bin/env bash
# Runs the gateway's end-to-end tests with the official `openai` and `ollama` Python clients.
#
#   tests/e2e/run-api.sh                 # builds kt-gateway + the simulated worker, runs all tests
#   KT_E2E_WORKER=host:port tests/e2e/run-api.sh   # against a running worker (real or simulated);
#                                               # tests that need the simulator's scripted
#                                               # replies are skipped then
#   KT_E2E_SERVE_BIN=path/to/kt tests/e2e/run-api.sh   # every gateway is a `kt serve` process
#                                               # (see run-api-serve.sh, which builds kt)
#
# Environment: CARGO_TARGET_DIR (where the binaries are built), KT_E2E_API_VENV (see setup-api.sh),
# extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/e2e/setup-api.sh
TARGET="${CARGO_TARGET_DIR:-target}"
if [[ -z "${KT_E2E_SERVE_BIN:-}" ]]; then
    # Two builds: a target filter (--example) would otherwise skip the kt-gateway binary.
    cargo build --release -p kt-gateway-service
    export KT_E2E_GATEWAY_BIN="$TARGET/release/kt-gateway"
    if [[ -z "${KT_E2E_WORKER:-}" ]]; then
        cargo build --release -p kt-gateway --example sim_worker
        export KT_E2E_SIM_BIN="$TARGET/release/examples/sim_worker"
    fi
fi
VENV="${KT_E2E_API_VENV:-$HOME/.cache/kt/venv-e2e-api}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/e2e/api "$@"
