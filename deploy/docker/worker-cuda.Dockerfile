# GPU worker image: kt-worker built with CUDA on a CUDA runtime base. Not built by CI (no CUDA
# toolkit, no GPU and no registry there); this is the recipe for a GPU host.
#
#   # on a host with the CUDA toolkit (nvcc) and Debian bookworm / Ubuntu 24.04 or older glibc:
#   cargo build --release -p kt-worker-service --features cuda     # the worker's CUDA backend
#   KT_SKIP_CARGO=1 KT_BINARIES="kt kt-worker" deploy/build.sh     # stages deploy/.build/context
#   docker build -f deploy/docker/worker-cuda.Dockerfile -t kt-worker-cuda:latest \
#       --build-arg CUDA_BASE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 deploy/.build/context
#
# CUDA_BASE must be a CUDA *runtime* image whose CUDA version the driver supports and whose glibc
# is at least the build host's (Ubuntu 24.04 has 2.39; binaries built on bookworm need 2.36).
# Without a registry, import a CUDA runtime root filesystem the same way deploy/base/make-base.sh
# imports Debian, and pass its tag. docker-compose.gpu.yml runs this image as the worker.
ARG CUDA_BASE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
FROM ${CUDA_BASE}

ARG KT_UID=10001
RUN groupadd --gid ${KT_UID} kt \
 && useradd --uid ${KT_UID} --gid kt --home-dir /var/lib/kt --create-home --shell /usr/sbin/nologin kt

COPY models/ /models/
COPY plans/ /etc/kt/plans/
COPY rules/ /usr/share/kt/rules/
COPY bin/kt bin/kt-worker /usr/local/bin/

# The NVIDIA container runtime mounts the driver; these select what it exposes.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    KT_WORKER_DEVICE=cuda:0 \
    RUST_LOG=info \
    NO_COLOR=1
USER kt
WORKDIR /var/lib/kt
CMD ["kt-worker"]
