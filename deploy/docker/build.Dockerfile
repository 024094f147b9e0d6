# Multi-stage build inside the official Rust image, for machines that can pull from a registry
# (CI here cannot; it uses deploy/build.sh, which builds on the host). Same runtime layout as
# runtime.Dockerfile. From the repository root:
#
#   docker build -f deploy/docker/build.Dockerfile -t kt:latest .
#   docker build -f deploy/docker/build.Dockerfile --build-arg RUST_IMAGE=rust:1.89-bookworm \
#       --build-arg BASE=debian:bookworm-slim -t kt:latest .
#
# The load balancer image still comes from deploy/docker/lb.Dockerfile:
#   docker build -f deploy/docker/lb.Dockerfile --build-arg BASE=debian:bookworm-slim \
#       -t kt-lb:latest deploy/lb
ARG RUST_IMAGE=rust:1-bookworm
ARG BASE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p kt -p kt-expert-service -p kt-worker-service -p kt-gateway-service \
 && mkdir -p /out/bin /out/models/qwen3moe-tiny /out/plans /out/rules \
 && for b in kt kt-expert kt-worker kt-gateway; do \
      strip --strip-debug -o /out/bin/$b target/release/$b; \
    done \
 && cp tests/fixtures/models/qwen3moe/gguf/q8_0.gguf /out/models/qwen3moe-tiny/ \
 && cp deploy/plans/*.yaml /out/plans/ \
 && cp -r rules/. /out/rules/

FROM ${BASE}
ARG KT_UID=10001
RUN groupadd --gid ${KT_UID} kt \
 && useradd --uid ${KT_UID} --gid kt --home-dir /var/lib/kt --create-home --shell /usr/sbin/nologin kt
COPY --from=build /out/models/ /models/
COPY --from=build /out/plans/ /etc/kt/plans/
COPY --from=build /out/rules/ /usr/share/kt/rules/
COPY --from=build /out/bin/ /usr/local/bin/
ENV KT_MODEL=/models/qwen3moe-tiny/q8_0.gguf \
    KT_PLAN=/etc/kt/plans/qwen3moe-tiny-2numa.yaml \
    RUST_LOG=info \
    NO_COLOR=1
USER kt
WORKDIR /var/lib/kt
CMD ["kt", "--help"]
