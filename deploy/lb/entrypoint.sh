#!/bin/bash
# Renders /etc/kt-lb/nginx.conf.template from KT_LB_* variables (defaults below; the image sets
# the same) and runs nginx in the foreground.
set -euo pipefail
conf=/var/lib/kt-lb/nginx.conf
access_log=/dev/stdout
[[ "${KT_LB_ACCESS_LOG:-on}" == "off" ]] && access_log=off
sed -e "s|@PORT@|${KT_LB_PORT:-8080}|g" \
    -e "s|@UPSTREAM@|${KT_LB_UPSTREAM:-gateway:8080}|g" \
    -e "s|@RESOLVER@|${KT_LB_RESOLVER:-127.0.0.11}|g" \
    -e "s|@RESOLVE_VALID@|${KT_LB_RESOLVE_VALID:-5s}|g" \
    -e "s|@CONNECT_TIMEOUT@|${KT_LB_CONNECT_TIMEOUT:-1s}|g" \
    -e "s|@READ_TIMEOUT@|${KT_LB_READ_TIMEOUT:-3600s}|g" \
    -e "s|@MAX_BODY@|${KT_LB_MAX_BODY:-32m}|g" \
    -e "s|@WORKERS@|${KT_LB_WORKERS:-auto}|g" \
    -e "s|@ACCESS_LOG@|${access_log}|g" \
    /etc/kt-lb/nginx.conf.template > "$conf"
nginx -t -q -c "$conf"
exec nginx -c "$conf" -g 'daemon off;'
