#!/usr/bin/env bash
# The end-to-end scenario, on whatever cluster KUBECONFIG points at, once the
# Prometheus Operator and chiller-metrics are installed. Both journeys run
# it: `make e2e` (kind, tests/e2e/run.sh) and `make e2e-local` (a real
# node of our own, tests/cluster/e2e_pods.rs), so they cannot drift apart.
#
# It opts two namespaces in, installs the test app chart in each, and shows:
# injection, gunicorn's statsd reaching each pod's own exporter, one
# Prometheus per namespace holding only its own series (Postgres included),
# every dashboard query answered through the datasource's URL, repair of a
# deleted ServiceMonitor, opt-out, fail-open while the webhook is down, and
# a helm upgrade with a changed config, during which every pod create is
# injected, carried to running pods by rollout-outdated. Under the kubelet:
# the sidecar is ready before gunicorn starts and restarts alone, no statsd
# line is lost through a Service, the sidecar's memory limit holds under
# load, a pod of another namespace cannot stop or reload an exporter, a
# webhook pod deleted during a burst of creates loses no pod, and the
# datasource's URL resolves through cluster DNS.
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

log "2. chiller-metrics is available, its replicas spread over the nodes"
kubectl -n "$CHILLER_NAMESPACE" rollout status deployment/chiller-metrics --timeout=300s
nodes=$(kubectl -n "$CHILLER_NAMESPACE" get pods -l app.kubernetes.io/name=chiller-metrics \
  -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' | sort -u | wc -l)
# Nodes that take pods: no NoSchedule taint (kind's control plane has one).
schedulable=$(kubectl get nodes -o jsonpath='{range .items[*]}{.spec.taints[*].effect}{"\n"}{end}' |
  grep -cv NoSchedule || true)
spread=$((schedulable < 2 ? schedulable : 2))
echo "webhook replicas on $nodes of $schedulable schedulable node(s)"
((nodes == spread)) || fail "the two webhook replicas should spread over $spread node(s), got $nodes"

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

log "3. the first pod: a namespace labeled and a pod created at once, 20 times over, 5 at a time"
for batch in 0 5 10 15; do
  trials=()
  for trial in $(seq $((batch + 1)) $((batch + 5))); do
    first_pod_trial "first-pod-$trial" "$APP_IMAGE" "$APP_PULL_POLICY" 5 &
    trials+=("$trial $!")
  done
  for entry in "${trials[@]}"; do
    read -r trial pid <<<"$entry"
    wait "$pid" || { jobs -p | xargs -r kill 2>/dev/null; fail "trial $trial: the first pod lost metrics"; }
  done
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

log "5. the sidecar under the kubelet: started and ready before gunicorn, restarted alone"
ns=${NAMESPACES[0]}
pod=$(pod_of "$ns" api)
container_state "$ns" "$pod"
sidecar_ready_before_app "$ns" "$pod" api ||
  fail "the kubelet started $ns/$pod's app before its sidecar was started and ready"
workers=$(workers_gauge "$ns" "$pod")
echo "gunicorn_workers, sent once as gunicorn booted: $workers"
[ "$workers" = 2 ] || fail "the exporter of $ns/$pod missed gunicorn's first lines (gunicorn_workers: $workers)"
app_id=$(field_of "$ns" "$pod" api 6)
# The exporter's process exits (SIGTERM to its PID 1); the kubelet restarts it alone.
kubectl -n "$ns" exec "$pod" -c statsd-exporter -- sh -c 'kill -TERM 1' || true
wait_until 120 "the exporter of $ns/$pod restarted alone, the app untouched, the pod Ready" \
  sidecar_restarted_alone "$ns" "$pod" api "$app_id"
container_state "$ns" "$pod"

log "5. no statsd line lost: requests through a Service, every one counted"
# A pod of its own, with a TCP probe, so only these requests reach its gunicorn.
counted_app "$ns" "$APP_IMAGE" "$APP_PULL_POLICY"
kubectl -n "$ns" wait --for=condition=Ready pod/counted --timeout=180s
wait_until 60 "the Service counted.$ns routes from $ns/frontend (DNS and kube-proxy)" \
  service_routes "$ns" "$(pod_of "$ns" frontend)" "counted.$ns.svc.cluster.local" 8000
requests_through_service "$ns" "$(pod_of "$ns" frontend)" "http://counted.$ns.svc.cluster.local:8000/api/items" 200 ||
  fail "requests through the Service counted failed"
wait_until 60 "the exporter of $ns/counted counts exactly the 200 requests" \
  bash -c "source tests/e2e/lib.sh; (( \$(requests_counted $ns counted) == 200 ))"
sleep 10
counted=$(requests_counted "$ns" counted)
echo "requests sent 200, counted $counted"
((counted == 200)) || fail "the exporter counted $counted of 200 requests"

log "5. the sidecar's memory limit holds: a minute of statsd lines at 2,000 a second"
ip=$(kubectl -n "$ns" get pod counted -o jsonpath='{.status.podIP}')
limit=$(kubectl -n "$ns" get pod counted \
  -o jsonpath='{.spec.initContainers[?(@.name=="statsd-exporter")].resources.limits.memory}')
limit_bytes=$(python3 -c 'import sys; v = sys.argv[1]; u = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
print(int(v[:-2]) * u[v[-2:]] if v[-2:] in u else int(v))' "$limit")
statsd_load "$ns" statsd-load "$ip" 2000 60 "$APP_IMAGE"
peak=0
for _ in $(seq 1 16); do
  bytes=$(working_set "$ns" counted statsd-exporter || echo 0)
  ((bytes > peak)) && peak=$bytes
  sleep 5
done
kubectl -n "$ns" wait --for=jsonpath='{.status.phase}'=Succeeded pod/statsd-load --timeout=120s
kubectl -n "$ns" logs statsd-load
restarts=$(field_of "$ns" counted statsd-exporter 2)
reason=$(field_of "$ns" counted statsd-exporter 7)
echo "sidecar working set under load: peak $((peak / 1048576)) MiB of its $limit limit; restarts $restarts, last termination ${reason}"
((peak > 0)) || fail "the kubelet reported no working set for the sidecar"
((peak < limit_bytes)) || fail "the sidecar's working set reached its limit"
[ "$restarts" = 0 ] || fail "the sidecar restarted under load (last termination: $reason)"

log "5. a pod of another namespace can neither stop nor reload the exporter"
other=${NAMESPACES[1]}
restarts=$(field_of "$ns" counted statsd-exporter 2)
kubectl -n "$other" exec "$(pod_of "$other" api)" -- python3 -c '
import sys, urllib.error, urllib.request
for path in ("/-/quit", "/-/reload"):
    request = urllib.request.Request(f"http://{sys.argv[1]}:9102{path}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as refused:
        status, body = refused.code, refused.read().decode()
    # Without --web.enable-lifecycle the path is not routed: the landing page
    # answers instead of "Requesting termination"/"Requesting reload".
    first = (body.strip().splitlines() or ["(empty)"])[0][:60]
    print(f"POST {path}: {status}, {first}")
    if "Requesting" in body:
        sys.exit(f"POST {path} reached the lifecycle API")' "$ip" ||
  fail "a pod of $other could use the exporter's lifecycle API"
sleep 5
[ "$(field_of "$ns" counted statsd-exporter 2)" = "$restarts" ] &&
  [ "$(field_of "$ns" counted statsd-exporter 3)" = True ] ||
  fail "the exporter of $ns/counted stopped after a POST from $other"
kubectl -n "$ns" delete pod/statsd-load pod/counted service/counted --wait=false >/dev/null

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
read -r attempts misses _ <"$upgraded.result"
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

log "9. a webhook pod deleted during a burst of pod creates: no pod lost, every one injected"
stop=$(mktemp)
rm -f "$stop"
create_pods_until "$ns" "$APP_IMAGE" burst "$stop" >"$stop.result" &
creator=$!
sleep 3
victim=$(kubectl -n "$CHILLER_NAMESPACE" get pods -l app.kubernetes.io/name=chiller-metrics \
  -o jsonpath='{.items[0].metadata.name}')
kubectl -n "$CHILLER_NAMESPACE" delete pod "$victim" --wait=false
wait_until 180 "webhook pod $victim is gone" \
  bash -c "! kubectl -n $CHILLER_NAMESPACE get pod $victim >/dev/null 2>&1"
kubectl -n "$CHILLER_NAMESPACE" rollout status deployment/chiller-metrics --timeout=300s
sleep 3
touch "$stop"
wait "$creator"
read -r created failed <"$stop.result"
rm -f "$stop" "$stop.result"
read -r injected all < <(injected_count "$ns" burst)
echo "pod creates during the burst: $created created, $failed failed; $injected of $all injected"
((created >= 10)) || fail "the burst created only $created pods"
((failed == 0)) || fail "$failed pod creates failed while a webhook pod was deleted"
((injected == created && all == created)) || fail "$injected of $created burst pods were injected"
kubectl -n "$ns" delete pods -l app=burst --wait=false >/dev/null

log "9. cluster DNS: the datasource's URL resolves and answers inside a pod"
url=$(datasource_url "$ns")
[ -n "$url" ] || fail "no datasource URL for $ns"
kubectl -n "$ns" exec "$(pod_of "$ns" api)" -- python3 -c '
import json, sys, urllib.request
url = sys.argv[1].rstrip("/") + "/api/v1/query?query=up"
with urllib.request.urlopen(url, timeout=10) as response:
    answer = json.load(response)
status, series = answer["status"], len(answer["data"]["result"])
print(f"{url}: {status}, {series} series")
sys.exit(0 if answer["status"] == "success" and answer["data"]["result"] else 1)' "$url" ||
  fail "the datasource URL $url does not answer from inside a pod"

log "PASSED"
