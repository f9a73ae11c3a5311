#!/usr/bin/env bash
# End-to-end test on kind: the README's "Install on a cluster" steps, then
# checks that two opted-in namespaces each get injected pods and their own
# Prometheus with their own metrics only. Run by `make e2e`.
#
# Needs Docker (a running engine), kind, helm, kubectl, python3 and network
# access to the chart repositories and image registries. Without Docker or
# kind it prints "SKIPPED: docker/kind not available" and exits 0.
# KEEP_CLUSTER=1 keeps the cluster (and prints how to delete it).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
export PATH="$ROOT/.tools/bin:$PATH"
# shellcheck source=tests/e2e/lib.sh
source tests/e2e/lib.sh

# Pinned versions.
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.34.0}
CERT_MANAGER_VERSION=${CERT_MANAGER_VERSION:-v1.19.1}
KUBE_PROMETHEUS_STACK_VERSION=${KUBE_PROMETHEUS_STACK_VERSION:-88.6.4}

CLUSTER=${KIND_CLUSTER:-chiller-metrics-e2e}
IMAGE=chiller-metrics:e2e
APP_IMAGE=chiller-e2e-app:e2e
NAMESPACES=(shop-a shop-b)
INJECT=metrics.chiller.io/inject

if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1 || ! command -v kind >/dev/null; then
  echo "SKIPPED: docker/kind not available (the end-to-end test needs a running Docker engine and kind: https://kind.sigs.k8s.io)"
  exit 0
fi
require helm "run make tools, or install helm v4"
require kubectl "run make tools, or install kubectl"
require python3 "install python3"

finish() {
  local status=$?
  if ((status != 0)); then
    diagnostics "${NAMESPACES[@]}" || true
    echo "FAILED (exit $status)" >&2
  fi
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    echo "keeping cluster $CLUSTER (kind delete cluster --name $CLUSTER)" >&2
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$status"
}
trap finish EXIT

log "1. kind cluster $CLUSTER ($KIND_NODE_IMAGE)"
kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE" \
  --config tests/e2e/kind.yaml --wait 180s
kubectl config use-context "kind-$CLUSTER"

log "1. kube-prometheus-stack $KUBE_PROMETHEUS_STACK_VERSION with manifests/kube-prometheus-stack-values.yaml"
helm install monitoring kube-prometheus-stack \
  --repo https://prometheus-community.github.io/helm-charts \
  --version "$KUBE_PROMETHEUS_STACK_VERSION" \
  --namespace monitoring --create-namespace \
  -f manifests/kube-prometheus-stack-values.yaml --wait --timeout 10m

log "1. cert-manager $CERT_MANAGER_VERSION"
helm install cert-manager cert-manager \
  --repo https://charts.jetstack.io --version "$CERT_MANAGER_VERSION" \
  --namespace cert-manager --create-namespace \
  --set crds.enabled=true --wait --timeout 10m

log "2. images: $IMAGE and $APP_IMAGE"
make kind-load IMAGE="$IMAGE" KIND_CLUSTER="$CLUSTER"
docker build -t "$APP_IMAGE" tests/e2e/app
kind load docker-image "$APP_IMAGE" --name "$CLUSTER"

log "2. chiller-metrics (Helm chart, cert-manager mode)"
helm install chiller-metrics manifests/chart/chiller-metrics \
  --namespace chiller-metrics --create-namespace \
  --set image.repository=chiller-metrics --set image.tag=e2e --set image.pullPolicy=Never \
  --wait --timeout 5m
kubectl -n chiller-metrics rollout status deployment/chiller-metrics --timeout=180s
kubectl -n chiller-metrics wait --for=condition=Ready certificate/chiller-metrics-serving --timeout=180s
wait_until 180 "cert-manager injected the caBundle" ca_bundle_injected chiller-metrics
nodes=$(kubectl -n chiller-metrics get pods -l app.kubernetes.io/name=chiller-metrics \
  -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' | sort -u | wc -l)
echo "webhook replicas on $nodes node(s)"
((nodes == 2)) || fail "the two webhook replicas should spread over two nodes, got $nodes"

log "3. opt in ${NAMESPACES[*]} and install the test app"
for ns in "${NAMESPACES[@]}"; do
  kubectl create namespace "$ns"
  kubectl annotate namespace "$ns" \
    metrics.chiller.io/postgres=db:5432/chiller \
    metrics.chiller.io/postgres-secret=db-auth \
    'metrics.chiller.io/pod-selector=app!=db'
  kubectl label namespace "$ns" "$INJECT=enabled"
done
for ns in "${NAMESPACES[@]}"; do
  wait_until 180 "statsd mapping ConfigMap in $ns" \
    kubectl -n "$ns" get configmap chiller-metrics-statsd-mapping
  helm install app tests/e2e/chart --namespace "$ns" \
    --set image="$APP_IMAGE" --set imagePullPolicy=Never --wait --timeout 5m
done

log "4. sidecars, per-namespace Prometheus, targets"
for ns in "${NAMESPACES[@]}"; do
  for app in frontend api; do
    wait_until 60 "$ns/$app pods carry the native statsd-exporter sidecar" has_native_sidecar "$ns" "$app"
  done
  wait_until 60 "$ns/db is not injected (pod-selector app!=db)" has_no_sidecar "$ns" db
  wait_until 120 "Prometheus chiller-metrics in $ns" kubectl -n "$ns" get prometheus chiller-metrics
  kubectl -n "$ns" rollout status deployment/chiller-metrics-postgres-exporter --timeout=300s
  wait_until 300 "the Prometheus of $ns answers" prom_get "$ns" /-/ready
  wait_until 300 "$ns scrapes the statsd sidecars" has_target_job "$ns" statsd
  wait_until 300 "$ns scrapes the postgres exporter" has_target_job "$ns" postgres
  wait_until 300 "all targets of $ns are up" targets_up "$ns"
done
admissions=$(kubectl get --raw /api/v1/namespaces/chiller-metrics/services/chiller-metrics:admin/proxy/metrics |
  grep '^chiller_metrics_admissions_total{.*outcome="injected"' || true)
echo "$admissions"
[ -n "$admissions" ] || fail "the webhook counted no injected admissions"

log "4. traffic, then gunicorn_requests_total in each namespace's own Prometheus only"
for ns in "${NAMESPACES[@]}"; do
  for _ in $(seq 1 40); do
    kubectl get --raw "/api/v1/namespaces/$ns/services/frontend:http/proxy/" >/dev/null
  done
done
for ns in "${NAMESPACES[@]}"; do
  wait_until 180 "gunicorn_requests_total in the Prometheus of $ns, only from $ns" \
    series_only_from "$ns" gunicorn_requests_total
  wait_until 60 "gunicorn_request_duration_seconds_bucket in $ns" \
    series_only_from "$ns" gunicorn_request_duration_seconds_bucket
  for other in "${NAMESPACES[@]}"; do
    [ "$other" = "$ns" ] && continue
    no_series_from "$ns" "$other" gunicorn_requests_total ||
      fail "the Prometheus of $ns has series of $other"
  done
  [ -n "$(kubectl -n "$ns" get configmap -l grafana_dashboard=1 -o name)" ] ||
    fail "no Grafana dashboard ConfigMap in $ns"
  [ -n "$(kubectl -n "$ns" get configmap -l grafana_datasource=1 -o name)" ] ||
    fail "no Grafana datasource ConfigMap in $ns"
done

log "5. a deleted ServiceMonitor comes back"
ns=${NAMESPACES[0]}
old_uid=$(kubectl -n "$ns" get servicemonitor chiller-metrics-statsd -o jsonpath='{.metadata.uid}')
kubectl -n "$ns" delete servicemonitor chiller-metrics-statsd --wait=true
wait_until 120 "ServiceMonitor chiller-metrics-statsd recreated in $ns" \
  bash -c "uid=\$(kubectl -n $ns get servicemonitor chiller-metrics-statsd -o jsonpath='{.metadata.uid}') && [ -n \"\$uid\" ] && [ \"\$uid\" != $old_uid ]"

log "5. opting ${NAMESPACES[1]} out removes its objects"
ns=${NAMESPACES[1]}
kubectl label namespace "$ns" "$INJECT-"
wait_until 180 "every object chiller-metrics made in $ns is gone" no_managed_objects "$ns"
remaining=$(managed_objects "${NAMESPACES[0]}")
grep -q '^prometheus' <<<"$remaining" || fail "opting ${NAMESPACES[1]} out touched ${NAMESPACES[0]}"

log "PASSED"
