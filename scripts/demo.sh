#!/usr/bin/env bash
# Local demo, no cluster needed: build, generate certificates, start the webhook
# over HTTPS, send it the AdmissionReview of a real chiller API pod, show a
# summary of what was injected, then the decoded patch and the resulting pod,
# then stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== building chiller-metrics (a first run compiles every dependency; that takes minutes)"
"${CARGO:-cargo}" build --locked --bin chiller-metrics --example admission_client
bin=target/debug/chiller-metrics
work=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
admin=$(free_port)

echo "== chiller-metrics certs: a CA and a serving certificate for localhost"
"$bin" certs --out "$work/certs" --dns localhost --dns 127.0.0.1 >/dev/null

echo "== chiller-metrics serve on https://localhost:$port (admin http://127.0.0.1:$admin)"
# No cluster on purpose, whatever the kubeconfig says: the webhook serves alone.
env -u KUBERNETES_SERVICE_HOST -u KUBERNETES_SERVICE_PORT KUBECONFIG="$work/no-kubeconfig" \
  "$bin" serve --standalone --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
  --tls-cert "$work/certs/tls.crt" --tls-key "$work/certs/tls.key" --drain-seconds 0 \
  2>"$work/server.log" &
server_pid=$!
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 0.1
done
echo "info: no cluster: pod-level settings only (namespace settings and the reconcile loop need one)"

echo "== POST /mutate with the chiller API pod (tests/golden/requests/chiller-api.json)"
target/debug/examples/admission_client "https://localhost:$port/mutate" "$work/certs/ca.crt" \
  tests/golden/requests/chiller-api.json

echo "== admin /metrics after one admission"
curl -fsS "http://127.0.0.1:$admin/metrics" | grep -E '^chiller_metrics_admissions_total'
echo "== server log"
kill -TERM "$server_pid"; wait "$server_pid" || true; server_pid=""
# The no-cluster fallback was said above, once.
grep -v -e 'no Kubernetes cluster configured' -e 'no cluster reachable' -e 'serving the webhook alone' "$work/server.log" || true
