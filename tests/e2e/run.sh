#!/usr/bin/env bash
# End-to-end test on kind: the README's "Install on a cluster" steps, then
# the scenario `make e2e-local` runs too (tests/e2e/scenario.sh): two
# opted-in namespaces each get injected pods and their own Prometheus with
# their own metrics only. Run by `make e2e`.
#
# Needs Docker (a running engine), kind, helm, kubectl, python3 and network
# access to the chart repositories and image registries. Without Docker or
# kind it says so and fails: `make e2e-local` runs the same scenario without them.
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
  echo "make e2e needs a running Docker engine and kind (https://kind.sigs.k8s.io); without them, run make e2e-local (the same scenario, as root)" >&2
  exit 1
fi
require helm "run make tools, or install helm v4"
require kubectl "run make tools, or install kubectl"
require python3 "install python3"

finish() {
  local status=$?
  if ((status != 0)); then
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
kubectl -n chiller-metrics wait --for=condition=Ready certificate/chiller-metrics-serving --timeout=180s
wait_until 180 "cert-manager injected the caBundle" ca_bundle_injected chiller-metrics

# Steps 2 to 8, shared with `make e2e-local`.
APP_IMAGE="$APP_IMAGE" APP_PULL_POLICY=Never CHILLER_NAMESPACE=chiller-metrics \
  NAMESPACES="${NAMESPACES[*]}" tests/e2e/scenario.sh
log "PASSED"
