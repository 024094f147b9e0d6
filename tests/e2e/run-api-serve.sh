#!/usr/bin/env bash
# The gateway's API tests (official `openai` and `ollama` clients) against `kt serve`, the
# all-in-one process (gateway + worker engine + routed experts, in-process transports), on the
# qwen3moe fixture GGUF. Each gateway configuration of the tests (plain, API keys, small limits,
# a tool-calling chat template) is its own `kt serve`, started and stopped by the tests.
#
#   tests/e2e/run-api-serve.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release -p kt
export KT_E2E_SERVE_BIN="$TARGET/release/kt"
export KT_E2E_SERVE_ARGS="--model tests/fixtures/models/qwen3moe/gguf/q8_0.gguf --model-name qwen3moe-tiny"
exec tests/e2e/run-api.sh "$@"
