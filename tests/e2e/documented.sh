#!/usr/bin/env bash
# The install, upgrade and uninstall as the docs give them: runs the shell
# blocks marked `<!-- documented: NAME -->` in README.md and docs/install.md,
# line by line as a user would paste them, in one shell, and checks after
# each what the docs promise:
#   quickstart, try-it  the webhook answers with its CA bundle, `check` is
#                       green, the app's pods carry the sidecar and its
#                       requests reach the namespace's own Prometheus;
#   upgrade             no pod create fails or goes uninjected during
#                       `helm upgrade`; afterwards every pod runs the new
#                       config and `check` is green;
#   uninstall           no pod create fails or hangs during it; afterwards
#                       nothing of ours is left in any namespace.
#
# Run by `make test` on its local cluster (tests/cluster/e2e_documented.rs), where there is
# no Docker and no internet: tests/e2e/local/shims stand in for `kind`,
# `docker build` and the kube-prometheus-stack install, and say so. Every
# other line runs as written.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/e2e/lib.sh
source tests/e2e/lib.sh

APP_NAMESPACE=chiller
RELEASE_NAMESPACE=chiller-metrics
MANAGED=app.kubernetes.io/managed-by=chiller-metrics
# The release binary as `cargo build --release` makes it for a user: no
# build-time switches of the test environment.
unset CHILLER_METRICS_PACK_RELOCS CHILLER_METRICS_PLAIN_LINK

# documented FILE NAME: the lines of the shell block after the marker.
documented() {
  awk -v marker="<!-- documented: $2 -->" '
    $0 == marker { found = 1; next }
    found == 1 && /^```sh$/ { found = 2; next }
    found == 2 && /^```$/ { exit }
    found == 2 { print }
  ' "$1"
}

# run_documented FILE NAME: runs that block in this shell (its exports stay),
# echoing each line.
run_documented() {
  local block
  block=$(mktemp)
  documented "$1" "$2" >"$block"
  [ -s "$block" ] || fail "no block <!-- documented: $2 --> in $1"
  log "$1, $2:"
  cat "$block" >&2
  set -x
  # shellcheck disable=SC1090
  source "$block"
  set +x
  rm -f "$block"
}

trap 'status=$?; set +x; if ((status != 0)); then diagnostics "$RELEASE_NAMESPACE" "$APP_NAMESPACE" || true; fi' EXIT

run_documented README.md quickstart
ca_bundle_injected chiller-metrics || fail "the webhook configuration has no CA bundle after helm install --wait"
command -v chiller-metrics | grep -q target/release || fail "the quick start's chiller-metrics is not on PATH"

run_documented README.md try-it
for app in frontend api; do
  has_native_sidecar "$APP_NAMESPACE" "$app" || fail "$APP_NAMESPACE/$app pods have no statsd-exporter sidecar"
done
gunicorn_series_in_prometheus() {
  prom_query "$APP_NAMESPACE" gunicorn_requests_total | grep -q '"result":\[{'
}
wait_until 300 "gunicorn requests reach the namespace's own Prometheus" gunicorn_series_in_prometheus
wait_until 120 "chiller-metrics check is green with the app" chiller-metrics check

probe_while() {
  # probe_while STOPFILE: dry-run pod creates in the app namespace until STOPFILE exists.
  dry_run_creates_until "$APP_NAMESPACE" chiller-e2e-app:e2e "$1" >"$1.result" &
  probes=$!
  sleep 2
}

# stop_probes STOPFILE: probes a few seconds more (creates right after the
# step count too), then stops them; sets attempts, misses and failures.
stop_probes() {
  sleep 5
  touch "$1"
  wait "$probes"
  read -r attempts misses failures <"$1.result"
  rm -f "$1" "$1.result"
  echo "pod creates: $attempts, not injected: $misses, failed: $failures" >&2
  ((attempts >= 5)) || fail "too few pod creates to tell ($attempts)"
}

stop=$(mktemp -u)
probe_while "$stop"
run_documented docs/install.md upgrade
stop_probes "$stop"
((failures == 0 && misses == 0)) || fail "during the upgrade, $failures pod creates failed and $misses were not injected"
for app in frontend api; do
  wait_until 600 "rollout-outdated rolled $APP_NAMESPACE/$app onto the new config" \
    sidecar_cpu_request_is "$APP_NAMESPACE" "$app" 20m
done
wait_until 300 "no pod of $APP_NAMESPACE is outdated" namespace_status_is "$APP_NAMESPACE" outdatedPods 0
wait_until 120 "chiller-metrics check is green after the upgrade" chiller-metrics check

probe_while "$stop"
run_documented docs/install.md uninstall
stop_probes "$stop"
((failures == 0)) || fail "$failures pod creates failed or hung during the uninstall"

log "nothing of ours is left"
kinds=$(kubectl api-resources --verbs=list -o name | paste -sd, -)
left=$(kubectl get "$kinds" -A -l "$MANAGED" -o name 2>/dev/null || true)
[ -z "$left" ] || fail "left behind, labeled $MANAGED: $left"
for object in mutatingwebhookconfiguration/chiller-metrics clusterrole/chiller-metrics \
  clusterrolebinding/chiller-metrics validatingadmissionpolicy/chiller-metrics-writes \
  validatingadmissionpolicybinding/chiller-metrics-writes; do
  ! kubectl get "$object" >/dev/null 2>&1 || fail "left behind: $object"
done
left=$(kubectl -n "$RELEASE_NAMESPACE" get lease,secret,configmap,deployment,service,serviceaccount,role,rolebinding -o name |
  grep -v -e '^configmap/kube-root-ca.crt$' -e '^serviceaccount/default$' || true)
[ -z "$left" ] || fail "left behind in $RELEASE_NAMESPACE: $left"
ls_pods=$(kubectl -n "$APP_NAMESPACE" get pods -o name | wc -l)
echo "the app's $ls_pods pods keep running (with their sidecars until they restart)" >&2
log "PASSED"
