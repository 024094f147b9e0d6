#!/usr/bin/env bash
# The gateway's API tests (official `openai` and `ollama` clients) against real processes: two
# kt-expert servers holding the embedded model's experts split by id, and a kt-worker computing
# everything else over them. The gateway under test is started by the tests themselves.
#
#   tests/e2e/run-api-real.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release -p kt-expert-service -p kt-worker-service
MODEL=tests/fixtures/models/qwen3moe/gguf/q8_0.gguf
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

# Starts a server in the background; prints the address it reports once listening.
start() {
    local out="$1"
    shift
    "$@" >"$out" 2>"$out.err" &
    pids+=($!)
    for _ in $(seq 600); do
        if grep -q '^listening on ' "$out"; then
            grep -m1 '^listening on ' "$out" | awk '{print $3}'
            return 0
        fi
        sleep 0.1
    done
    echo "$1 did not start:" >&2
    cat "$out.err" >&2
    return 1
}

e0=$(start "$tmp/e0" "$TARGET/release/kt-expert" --model "$MODEL" --listen 127.0.0.1:0 --name e0 --experts mod:2:0)
e1=$(start "$tmp/e1" "$TARGET/release/kt-expert" --model "$MODEL" --listen 127.0.0.1:0 --name e1 --experts mod:2:1)
w=$(start "$tmp/w" "$TARGET/release/kt-worker" --model "$MODEL" --listen 127.0.0.1:0 \
    --expert "e0=$e0" --expert "e1=$e1")
echo "worker $w over expert servers $e0 and $e1"
KT_E2E_WORKER="$w" tests/e2e/run-api.sh "$@"
