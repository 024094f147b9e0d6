# Load balancer in front of the gateway replicas: nginx from Debian's packages on the same base
# as the runtime image. Runs as www-data on an unprivileged port; every setting comes from the
# environment (see deploy/lb/entrypoint.sh).
ARG BASE=kt-base:bookworm
FROM ${BASE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/* /var/log/nginx/* \
 && mkdir -p /var/lib/kt-lb && chown www-data:www-data /var/lib/kt-lb

COPY nginx.conf.template /etc/kt-lb/nginx.conf.template
COPY entrypoint.sh /usr/local/bin/kt-lb
ENV KT_LB_PORT=8080 \
    KT_LB_UPSTREAM=gateway:8080 \
    KT_LB_RESOLVER=127.0.0.11 \
    KT_LB_RESOLVE_VALID=5s \
    KT_LB_CONNECT_TIMEOUT=1s \
    KT_LB_READ_TIMEOUT=3600s \
    KT_LB_MAX_BODY=32m \
    KT_LB_WORKERS=auto \
    KT_LB_ACCESS_LOG=on
USER www-data
STOPSIGNAL SIGQUIT
CMD ["kt-lb"]
