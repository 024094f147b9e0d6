#!/usr/bin/env bash
# Runs the deploy and web UI end-to-end tests (what .ci/run runs):
#   tests/e2e/run-deploy.sh [manifests|compose|browser|all]      (default all)
# manifests: deploy/k8s schemas + cross-references, docker-compose.yml wiring (no containers)
# compose:   images from deploy/build.sh, then the compose cluster test with real containers
# browser:   the web UI in headless Chromium against kt-gateway + kt-worker + kt-expert
# Binaries come from $KT_BIN_DIR or $CARGO_TARGET_DIR/release (cargo builds them when
# KT_E2E_BUILD=1). Output of pytest ends with its summary line.
set -euo pipefail
cd "$(dirname "$0")/../.."
what="${1:-all}"
python="$(tests/e2e/setup-deploy.sh | tail -n1)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export KT_BIN_DIR="${KT_BIN_DIR:-$CARGO_TARGET_DIR/release}"
if [[ "${KT_E2E_BUILD:-0}" == 1 ]]; then
  cargo build --release -p kt -p kt-expert-service -p kt-worker-service -p kt-gateway-service
fi
pytest() { "$python" -m pytest -q -p no:cacheprovider -o console_output_style=classic "$@"; }

case "$what" in
  manifests|all) pytest tests/e2e/deploy ;;&
  compose|all)
    t0=$SECONDS
    KT_SKIP_CARGO=1 deploy/build.sh
    echo "run-deploy: images built in $((SECONDS - t0)) s" >&2
    t0=$SECONDS
    pytest -s tests/e2e/compose
    echo "run-deploy: compose test took $((SECONDS - t0)) s" >&2 ;;&
  browser|all) pytest tests/e2e/browser ;;
  manifests|compose) ;;
  *) echo "usage: $0 [manifests|compose|browser|all]" >&2; exit 2 ;;
esac
