#!/usr/bin/env bash
# The end-to-end scenario, on whatever cluster KUBECONFIG points at, once the
# Prometheus Operator and chiller-metrics are installed. Both journeys run
# it: `make e2e` (kind, tests/e2e/run.sh) and `make e2e-local` (kwok nodes
# and the pod runner, tests/e2e_pods.rs), so they cannot drift apart.
#
# It opts two namespaces in, installs the test app chart in each, and shows:
# injection, gunicorn's statsd reaching each pod's own exporter, one
# Prometheus per namespace holding only its own series (Postgres included),
# every dashboard query answered through the datasource's URL, repair of a
# deleted ServiceMonitor, opt-out, fail-open while the webhook is down, and
# a helm upgrade with a changed config, during which every pod create is
# injected, carried to running pods by rollout-outdated.
#
# Environment: APP_IMAGE and APP_PULL_POLICY (the test app image),
# CHILLER_NAMESPACE (default chiller-metrics), NAMESPACES (default
# "shop-a shop-b"). Needs kubectl, helm and python3 on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/e2e/lib.sh
source tests/e2e/lib.sh

APP_IMAGE=${APP_IMAGE:-chiller-e2e-app:e2e}
APP_PULL_POLICY=${APP_PULL_POLICY:-IfNotPresent}
CHILLER_NAMESPACE=${CHILLER_NAMESPACE:-chiller-metrics}
read -r -a NAMESPACES <<<"${NAMESPACES:-shop-a shop-b}"
INJECT=metrics.chiller.io/inject
APPS=(frontend api)

require helm "install helm v4"
require kubectl "install kubectl"
require python3 "install python3"

trap 'status=$?; if ((status != 0)); then diagnostics "$CHILLER_NAMESPACE" "${NAMESPACES[@]}" || true; fi' EXIT

log "2. chiller-metrics is available on both nodes"
kubectl -n "$CHILLER_NAMESPACE" rollout status deployment/chiller-metrics --timeout=300s
nodes=$(kubectl -n "$CHILLER_NAMESPACE" get pods -l app.kubernetes.io/name=chiller-metrics \
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
# Right after the label, as a user would: the pods must not depend on
# anything the reconcile loop has yet to write.
for ns in "${NAMESPACES[@]}"; do
  helm install app tests/e2e/chart --namespace "$ns" \
    --set image="$APP_IMAGE" --set imagePullPolicy="$APP_PULL_POLICY" --wait --timeout 5m
done

log "3. the first pod: a namespace labeled and a pod created at once, 20 times over"
for trial in $(seq 1 20); do
  first_pod_trial "first-pod-$trial" "$APP_IMAGE" "$APP_PULL_POLICY" 5 ||
    fail "trial $trial: the first pod lost metrics"
done

log "4. sidecars, per-namespace Prometheus, targets"
for ns in "${NAMESPACES[@]}"; do
  for app in "${APPS[@]}"; do
    wait_until 60 "$ns/$app pods carry the native statsd-exporter sidecar" has_native_sidecar "$ns" "$app"
  done
  wait_until 60 "$ns/db is not injected (pod-selector app!=db)" has_no_sidecar "$ns" db
  wait_until 120 "Prometheus chiller-metrics in $ns" kubectl -n "$ns" get prometheus chiller-metrics
  wait_until 300 "the operator's StatefulSet for $ns" \
    kubectl -n "$ns" get statefulset prometheus-chiller-metrics
  kubectl -n "$ns" rollout status deployment/chiller-metrics-postgres-exporter --timeout=300s
  wait_until 300 "the Prometheus of $ns answers" prom_get "$ns" /-/ready
  wait_until 300 "$ns scrapes the statsd sidecars" has_target_job "$ns" statsd
  wait_until 300 "$ns scrapes the postgres exporter" has_target_job "$ns" postgres
  wait_until 300 "all targets of $ns are up" targets_up "$ns"
done
injected_admissions "$CHILLER_NAMESPACE" || fail "the webhook replicas counted no injected admissions"

log "4. traffic: the frontend calls the API through its Service"
for ns in "${NAMESPACES[@]}"; do
  for _ in $(seq 1 40); do
    answer=$(kubectl get --raw "/api/v1/namespaces/$ns/services/frontend:http/proxy/")
    [[ $answer == frontend:* ]] || fail "the frontend of $ns answered: $answer"
  done
  # A request line over gunicorn's limit: gunicorn answers 400 and logs a
  # warning, which its statsd logger counts (the dashboard's log panel).
  kubectl get --raw "/api/v1/namespaces/$ns/services/frontend:http/proxy/$(printf 'x%.0s' $(seq 1 5000))" \
    >/dev/null 2>&1 || true
done

log "4. each pod's exporter counts its own gunicorn"
for ns in "${NAMESPACES[@]}"; do
  for app in "${APPS[@]}"; do
    wait_until 120 "the exporter of $ns/$app serves its gunicorn's requests" \
      exporter_counts_own_app "$ns" "$app" "${APPS[*]}"
  done
done

log "4. gunicorn and Postgres series in each namespace's own Prometheus only"
for ns in "${NAMESPACES[@]}"; do
  wait_until 180 "gunicorn_requests_total in the Prometheus of $ns, only from $ns" \
    series_only_from "$ns" gunicorn_requests_total
  wait_until 60 "gunicorn_request_duration_seconds_bucket in $ns" \
    series_only_from "$ns" gunicorn_request_duration_seconds_bucket
  wait_until 180 "pg_stat_database_tup_fetched in $ns (the Postgres exporter)" \
    series_only_from "$ns" pg_stat_database_tup_fetched
  for other in "${NAMESPACES[@]}"; do
    [ "$other" = "$ns" ] && continue
    no_series_from "$ns" "$other" gunicorn_requests_total ||
      fail "the Prometheus of $ns has series of $other"
  done
done

log "5. every dashboard query answers through the datasource's URL"
for ns in "${NAMESPACES[@]}"; do
  wait_until 180 "every query of the dashboard of $ns returns data of $ns" \
    dashboard_answers "$ns" "${APPS[*]}"
done

log "6. a deleted ServiceMonitor comes back, and so do its targets"
ns=${NAMESPACES[0]}
old_uid=$(kubectl -n "$ns" get servicemonitor chiller-metrics-statsd -o jsonpath='{.metadata.uid}')
kubectl -n "$ns" delete servicemonitor chiller-metrics-statsd --wait=true
wait_until 120 "ServiceMonitor chiller-metrics-statsd recreated in $ns" \
  bash -c "uid=\$(kubectl -n $ns get servicemonitor chiller-metrics-statsd -o jsonpath='{.metadata.uid}') && [ -n \"\$uid\" ] && [ \"\$uid\" != $old_uid ]"
wait_until 300 "$ns scrapes the statsd sidecars again" has_target_job "$ns" statsd
wait_until 300 "all targets of $ns are up again" targets_up "$ns"

log "6. opting ${NAMESPACES[1]} out removes its objects; ${NAMESPACES[0]} keeps scraping"
ns=${NAMESPACES[1]}
kubectl label namespace "$ns" "$INJECT-"
wait_until 180 "every object chiller-metrics made in $ns is gone" no_managed_objects "$ns"
wait_until 180 "the Prometheus pods of $ns are gone" \
  bash -c "[ -z \"\$(kubectl -n $ns get pods -l app.kubernetes.io/name=prometheus -o name)\" ]"
remaining=$(managed_objects "${NAMESPACES[0]}")
grep -q '^prometheus' <<<"$remaining" || fail "opting ${NAMESPACES[1]} out touched ${NAMESPACES[0]}"
before=$(scrape_count "${NAMESPACES[0]}")
wait_until 120 "${NAMESPACES[0]} keeps scraping" bash -c "source tests/e2e/lib.sh; (( \$(scrape_count ${NAMESPACES[0]}) > $before ))"

log "7. fail-open: with the webhook down, a new pod starts uninjected"
ns=${NAMESPACES[0]}
replicas=$(kubectl -n "$CHILLER_NAMESPACE" get deployment chiller-metrics -o jsonpath='{.spec.replicas}')
kubectl -n "$CHILLER_NAMESPACE" scale deployment chiller-metrics --replicas=0
wait_until 180 "no chiller-metrics pod is left" \
  bash -c "[ -z \"\$(kubectl -n $CHILLER_NAMESPACE get pods -l app.kubernetes.io/name=chiller-metrics -o name)\" ]"
kubectl -n "$ns" rollout restart deployment/api
kubectl -n "$ns" rollout status deployment/api --timeout=300s
wait_until 120 "the new $ns/api pod runs without the sidecar" has_no_sidecar "$ns" api
kubectl -n "$CHILLER_NAMESPACE" scale deployment chiller-metrics --replicas="$replicas"
kubectl -n "$CHILLER_NAMESPACE" rollout status deployment/chiller-metrics --timeout=300s
wait_until 180 "the reconcile loop reports the uninjected pod (event PodsNotInjected)" \
  bash -c "kubectl -n $ns get events --field-selector reason=PodsNotInjected -o name | grep -q ."
kubectl annotate namespace "$ns" metrics.chiller.io/restart-uninjected=true
wait_until 300 "restart-uninjected rolls $ns/api, whose pods get the sidecar" has_native_sidecar "$ns" api
kubectl -n "$ns" rollout status deployment/api --timeout=300s

log "8. helm upgrade with a changed config: every pod create meanwhile is injected; rollout-outdated then restarts outdated pods one at a time"
upgraded=$(mktemp)
rm -f "$upgraded"
dry_run_creates_until "$ns" "$APP_IMAGE" "$upgraded" >"$upgraded.result" &
creates=$!
helm upgrade chiller-metrics manifests/chart/chiller-metrics --namespace "$CHILLER_NAMESPACE" \
  --reuse-values --set config.sidecar.resources.requests.cpu=20m \
  --set config.sidecar.resources.requests.memory=24Mi \
  --set config.sidecar.resources.limits.memory=64Mi --wait --timeout 5m
kubectl -n "$CHILLER_NAMESPACE" rollout status deployment/chiller-metrics --timeout=300s
touch "$upgraded"
wait "$creates"
read -r attempts misses <"$upgraded.result"
rm -f "$upgraded" "$upgraded.result"
echo "pod creates during the upgrade: $attempts, not injected: $misses" >&2
((attempts >= 5)) || fail "the upgrade was not probed ($attempts creates)"
((misses == 0)) || fail "$misses of $attempts pod creates during the upgrade were not injected"
wait_until 300 "the status of $ns counts its app pods as outdated" namespace_status_is "$ns" outdatedPods 2
kubectl annotate namespace "$ns" metrics.chiller.io/rollout-outdated=true
wait_until 600 "rollout-outdated restarted the outdated workloads of $ns" namespace_status_is "$ns" outdatedPods 0
for app in "${APPS[@]}"; do
  wait_until 120 "$ns/$app pods run the new sidecar config" sidecar_cpu_request_is "$ns" "$app" 20m
done

log "PASSED"
