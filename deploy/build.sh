#!/usr/bin/env bash
# Builds kt's container images in one command, without any registry:
#   1. the release binaries on the host (cargo),
#   2. the Debian base image from debootstrap (deploy/base/make-base.sh) if it is not there,
#   3. kt:latest (runtime: every kt binary, non-root) and kt-lb:latest (nginx load balancer).
# Then `docker compose up` (or `docker-compose up`) at the repository root serves the
# embedded default model.
#
# Environment (all optional):
#   KT_IMAGE          runtime image tag            (default kt:latest)
#   KT_LB_IMAGE       load-balancer image tag      (default kt-lb:latest)
#   KT_BASE_IMAGE     base image of both           (default kt-base:bookworm, made locally;
#                     with a registry e.g. debian:bookworm-slim)
#   KT_SKIP_CARGO=1   use binaries already built in $CARGO_TARGET_DIR/release (or target/release)
#   KT_BINARIES       binaries to put in the image (default: kt kt-expert kt-worker kt-gateway)
#   CARGO_TARGET_DIR  cargo's target folder (default target)
set -euo pipefail
cd "$(dirname "$0")/.."

image="${KT_IMAGE:-kt:latest}"
lb_image="${KT_LB_IMAGE:-kt-lb:latest}"
base="${KT_BASE_IMAGE:-kt-base:bookworm}"
binaries=(${KT_BINARIES:-kt kt-expert kt-worker kt-gateway})
target="${CARGO_TARGET_DIR:-target}"
ctx=deploy/.build/context
t0=$SECONDS

if [[ -z "${KT_SKIP_CARGO:-}" ]]; then
  echo "== cargo build --release (${binaries[*]})" >&2
  packages=()
  for b in "${binaries[@]}"; do
    case "$b" in
      kt) packages+=(-p kt) ;;
      kt-expert) packages+=(-p kt-expert-service) ;;
      kt-worker) packages+=(-p kt-worker-service) ;;
      kt-gateway) packages+=(-p kt-gateway-service) ;;
      *) echo "build.sh: unknown binary $b" >&2; exit 1 ;;
    esac
  done
  cargo build --release "${packages[@]}"
fi

echo "== staging the build context in $ctx" >&2
rm -rf "$ctx"
mkdir -p "$ctx/bin" "$ctx/models/qwen3moe-tiny" "$ctx/plans" "$ctx/rules"
for b in "${binaries[@]}"; do
  src="$target/release/$b"
  [[ -x "$src" ]] || { echo "build.sh: $src is missing (build it, or unset KT_SKIP_CARGO)" >&2; exit 1; }
  # The images need no debug info; line tables stay in the host build for backtraces.
  if command -v strip >/dev/null; then strip --strip-debug -o "$ctx/bin/$b" "$src"; else cp "$src" "$ctx/bin/$b"; fi
done
cp tests/fixtures/models/qwen3moe/gguf/q8_0.gguf "$ctx/models/qwen3moe-tiny/q8_0.gguf"
cp deploy/plans/*.yaml "$ctx/plans/"
cp -r rules/. "$ctx/rules/"
cp deploy/lb/nginx.conf.template deploy/lb/entrypoint.sh "$ctx/"

if ! docker image inspect "$base" >/dev/null 2>&1; then
  if [[ "$base" == kt-base:* ]]; then
    echo "== making the base image $base (debootstrap)" >&2
    KT_BASE_TAG="$base" KT_BASE_SUITE="${base#kt-base:}" deploy/base/make-base.sh >/dev/null
  fi  # any other base is pulled by docker build
fi

export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"
echo "== docker build $image (base $base)" >&2
docker build -q --build-arg BASE="$base" -f deploy/docker/runtime.Dockerfile -t "$image" "$ctx" >&2
echo "== docker build $lb_image (base $base)" >&2
docker build -q --build-arg BASE="$base" -f deploy/docker/lb.Dockerfile -t "$lb_image" "$ctx" >&2
echo "build.sh: $image and $lb_image ready in $((SECONDS - t0)) s" >&2
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E "^(${image%%:*}|${lb_image%%:*}|${base%%:*}):" >&2 || true
