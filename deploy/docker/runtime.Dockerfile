# kt runtime image: the kt binaries built on the host (deploy/build.sh stages them), the embedded
# default model as a file, the placement plans, and a non-root user. One image serves every
# role; the container's command picks it (kt-gateway, kt-worker, kt-expert, kt serve).
#
#   deploy/build.sh                  # builds the binaries, the base (if needed) and this image
#   docker build --build-arg BASE=debian:bookworm-slim -f deploy/docker/runtime.Dockerfile \
#       -t kt:latest deploy/.build/context        # by hand, with a registry
#
# BASE must be Debian bookworm or newer (glibc >= 2.36, the host the binaries come from).
ARG BASE=kt-base:bookworm
FROM ${BASE}

ARG KT_UID=10001
RUN groupadd --gid ${KT_UID} kt \
 && useradd --uid ${KT_UID} --gid kt --home-dir /var/lib/kt --create-home --shell /usr/sbin/nologin kt

# Binaries (stripped by deploy/build.sh), then data that changes less often than code last.
COPY models/ /models/
COPY plans/ /etc/kt/plans/
COPY rules/ /usr/share/kt/rules/
COPY bin/ /usr/local/bin/

# /models is where the compose file and the Kubernetes manifests mount model volumes; a new
# named volume starts as a copy of what the image holds there (the tiny default model).
ENV KT_MODEL=/models/qwen3moe-tiny/q8_0.gguf \
    KT_PLAN=/etc/kt/plans/qwen3moe-tiny-2numa.yaml \
    RUST_LOG=info \
    NO_COLOR=1
USER kt
WORKDIR /var/lib/kt
CMD ["kt", "--help"]
