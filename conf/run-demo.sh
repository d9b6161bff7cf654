#!/bin/sh
# `make run`: start the demo backends, then ringd in the foreground on
# conf/demo.toml. Ctrl-C stops both.
set -eu
PY="${1:-python3}"
cd "$(dirname "$0")/.."
mkdir -p /tmp/ringd-demo
"$PY" conf/demo_backend.py 8081 8082 &
BACKEND=$!
trap 'kill $BACKEND 2>/dev/null || true' EXIT INT TERM
echo "demo backends on 127.0.0.1:8081 and :8082 (pid $BACKEND)"
echo "ringd listens on 127.0.0.1:8080; try:  curl http://127.0.0.1:8080/   or   nc 127.0.0.1 8080"
echo "metrics: curl http://127.0.0.1:9100/metrics   status: $(dirname "$PY")/ringd status -c conf/demo.toml"
"$(dirname "$PY")/ringd" start -c conf/demo.toml
