#!/usr/bin/env bash
# Installs the tools and the reference data the tests use, into .tools/ (no root needed):
#   - gunicorn and Flask in a virtualenv (data-plane test)
#   - helm, kubectl and promtool, built from the Go modules pinned in tools/
#   - .tools/reference/: the data the schema checks in tests/support validate against
#       schemas/kubernetes-v1.37.0-strict/  strict Kubernetes 1.37 JSON schemas, from the
#                                           PyPI package kubernetes-validate (pinned below)
#       crds/monitoring.coreos.com_*.yaml   prometheus-operator CRDs, from the Go module
#                                           pinned in tools/prometheus-operator/go.mod
# Needs python3 and Go 1.26+. Fast when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS/bin"

KUBERNETES_VALIDATE_VERSION=1.37.0
K8S_SCHEMAS=kubernetes-v1.37.0-strict
PROMETHEUS_OPERATOR_MODULE=github.com/prometheus-operator/prometheus-operator
PROMETHEUS_OPERATOR_GO_DIR="$PWD/tools/prometheus-operator"
MONITORING_CRDS=(prometheuses servicemonitors podmonitors)
REFERENCE="$TOOLS/reference"

fail() {
  echo "tools.sh: $*" >&2
  exit 1
}

# Go is needed for the prometheus-operator module (and the tools/ Go modules).
command -v go >/dev/null ||
  fail "go is missing: install Go 1.26 or newer (https://go.dev/doc/install), then run make tools again"
go_version=$(cd "$PROMETHEUS_OPERATOR_GO_DIR" && go env GOVERSION) ||
  fail "\`go env GOVERSION\` failed: install Go 1.26 or newer"
if ! [[ $go_version =~ ^go1\.([0-9]+) ]] || [ "${BASH_REMATCH[1]}" -lt 26 ]; then
  fail "found $go_version: install Go 1.26 or newer"
fi

if [ ! -x "$TOOLS/venv/bin/gunicorn" ]; then
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check gunicorn flask
fi

# helm, kubectl and promtool from pinned Go modules: helm from tools/helm,
# kubectl from tools/cluster (the control plane's own version), promtool from
# tools/prometheus (the Prometheus the tests run).
for module in helm cluster prometheus; do
  tools/build.sh "$module"
done
ln -sf "$TOOLS/helm/bin/helm" "$TOOLS/bin/helm"
ln -sf "$TOOLS/cluster/bin/kubectl" "$TOOLS/bin/kubectl"
ln -sf "$TOOLS/prometheus/bin/promtool" "$TOOLS/bin/promtool"

# Reference data. The stamp names the pinned versions it was copied from, so a
# version bump (here or in tools/prometheus-operator/go.mod) refreshes it.
prometheus_operator_version=$(cd "$PROMETHEUS_OPERATOR_GO_DIR" &&
  go list -m -f '{{.Version}}' "$PROMETHEUS_OPERATOR_MODULE")
[ -n "$prometheus_operator_version" ] ||
  fail "tools/prometheus-operator/go.mod does not require $PROMETHEUS_OPERATOR_MODULE"
stamp="kubernetes-validate==$KUBERNETES_VALIDATE_VERSION $PROMETHEUS_OPERATOR_MODULE@$prometheus_operator_version"
reference_ready() {
  [ "$(cat "$REFERENCE/stamp" 2>/dev/null)" = "$stamp" ] &&
    [ -f "$REFERENCE/schemas/$K8S_SCHEMAS/_definitions.json" ] || return 1
  local plural
  for plural in "${MONITORING_CRDS[@]}"; do
    [ -f "$REFERENCE/crds/monitoring.coreos.com_$plural.yaml" ] || return 1
  done
}
if ! reference_ready; then
  # Kubernetes schemas: kubernetes-validate ships them in its package directory,
  # as kubernetes-json-schema/v<version>-local-strict/.
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  package_dir=$("$TOOLS/venv/bin/python" -c \
    'import importlib.util; print(importlib.util.find_spec("kubernetes_validate").submodule_search_locations[0])')
  schemas="$package_dir/kubernetes-json-schema/v$KUBERNETES_VALIDATE_VERSION-local-strict"
  [ -f "$schemas/_definitions.json" ] ||
    fail "kubernetes-validate $KUBERNETES_VALIDATE_VERSION has no strict schemas at kubernetes-json-schema/v$KUBERNETES_VALIDATE_VERSION-local-strict/"

  # CRDs: example/prometheus-operator-crd/ of the pinned module, checked against go.sum.
  module_dir=$(cd "$PROMETHEUS_OPERATOR_GO_DIR" &&
    go mod download "$PROMETHEUS_OPERATOR_MODULE" &&
    go list -m -json "$PROMETHEUS_OPERATOR_MODULE" |
    python3 -c 'import json, sys; print(json.load(sys.stdin).get("Dir", ""))')
  [ -n "$module_dir" ] && [ -d "$module_dir" ] ||
    fail "go did not download $PROMETHEUS_OPERATOR_MODULE@$prometheus_operator_version"
  crds="$module_dir/example/prometheus-operator-crd"

  # Copy (the module cache is read-only), then swap the folder in whole.
  rm -rf "$REFERENCE.new"
  mkdir -p "$REFERENCE.new/schemas" "$REFERENCE.new/crds"
  cp -R "$schemas" "$REFERENCE.new/schemas/$K8S_SCHEMAS"
  for plural in "${MONITORING_CRDS[@]}"; do
    cp "$crds/monitoring.coreos.com_$plural.yaml" "$REFERENCE.new/crds/" ||
      fail "$PROMETHEUS_OPERATOR_MODULE@$prometheus_operator_version has no example/prometheus-operator-crd/monitoring.coreos.com_$plural.yaml"
  done
  chmod -R u+w "$REFERENCE.new"
  echo "$stamp" >"$REFERENCE.new/stamp"
  rm -rf "$REFERENCE"
  mv "$REFERENCE.new" "$REFERENCE"
fi

if ! command -v promtool >/dev/null; then
  echo "promtool is missing: install the Debian package 'prometheus' (apt-get install -y prometheus)" >&2
  exit 1
fi
echo "tools ready: $("$TOOLS/venv/bin/gunicorn" --version), helm $("$TOOLS/bin/helm" version --short), $(promtool --version 2>&1 | head -1)"
echo "reference data ready in .tools/reference: $stamp"
