#!/usr/bin/env bash
# Runs the sample hub-and-spoke cluster on this machine: a center nats-server and two
# leaf nats-servers, one presenced on each (HTTP 8080 center, 8081 leaf-a, 8082 leaf-b).
# Ctrl-C stops everything. Logs go to deploy/.run/*.log.
set -euo pipefail
cd "$(dirname "$0")"
BIN=${PRESENCED:-../target/release/presenced}
[ -x "$BIN" ] || { echo "build first: cargo build --release (or set PRESENCED=/path/to/presenced)"; exit 1; }
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)
export JWT_SECRET=${JWT_SECRET:-local-cluster-secret-change-me-0123456789}
mkdir -p .run
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for s in center leaf-a leaf-b; do
  "$NATS" -c "nats/$s.conf" > ".run/nats-$s.log" 2>&1 & pids+=($!)
done
sleep 1
for n in center leaf-a leaf-b; do
  "$BIN" serve --config "presenced/$n.yaml" > ".run/$n.log" 2>&1 & pids+=($!)
  sleep 0.5
done
echo "cluster up: curl localhost:8080/health; a token: PRESENCE_AUTH__JWT_SECRET=$JWT_SECRET $BIN token --sub alice"
wait
