# shellcheck shell=bash
# Helpers for run.sh: logging, waiting with deadlines, Prometheus queries
# through the API server proxy, and diagnostics.

log() { printf '\n=== %s  %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

require() {
  local tool=$1 hint=$2
  command -v "$tool" >/dev/null || fail "$tool is required: $hint"
}

# wait_until SECONDS DESCRIPTION COMMAND...: polls COMMAND every 2 s until it
# succeeds; fails with DESCRIPTION after SECONDS. Says how long it waited.
wait_until() {
  local seconds=$1 what=$2
  shift 2
  local start=$SECONDS tries=1
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS - start >= seconds)); then
      echo "last attempt of: $what" >&2
      "$@" >&2 || true
      fail "timed out after ${seconds}s waiting for: $what"
    fi
    sleep 2
    tries=$((tries + 1))
  done
  if ((tries == 1)); then
    echo "ok: $what" >&2
  else
    echo "ok: $what (try $tries, after $((SECONDS - start)) s)" >&2
  fi
}

# prom_get NAMESPACE PATH: GET on the namespace's own Prometheus
# (Service prometheus-operated, port web) through the API server proxy.
prom_get() {
  kubectl get --raw "/api/v1/namespaces/$1/services/prometheus-operated:web/proxy$2"
}

# prom_query NAMESPACE PROMQL: the JSON answer of an instant query.
prom_query() {
  local encoded
  encoded=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$2")
  prom_get "$1" "/api/v1/query?query=$encoded"
}

# All active targets of the namespace's Prometheus are up (and there are some).
targets_up() {
  prom_get "$1" /api/v1/targets | python3 -c '
import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
down = [(t["labels"].get("job"), t["health"], t.get("lastError")) for t in targets if t["health"] != "up"]
print(f"{len(targets)} targets, down: {down}")
sys.exit(0 if targets and not down else 1)'
}

# Some active target's job matches the regular expression.
has_target_job() {
  prom_get "$1" /api/v1/targets | python3 -c '
import json, re, sys
jobs = {t["labels"].get("job", "") for t in json.load(sys.stdin)["data"]["activeTargets"]}
print(sorted(jobs))
sys.exit(0 if any(re.search(sys.argv[1], j) for j in jobs) else 1)' "$2"
}

# series_only_from NAMESPACE METRIC: the namespace's Prometheus has METRIC
# series, and every one of them carries namespace=NAMESPACE.
series_only_from() {
  prom_query "$1" "$2" | python3 -c '
import json, sys
ns, metric = sys.argv[1], sys.argv[2]
result = json.load(sys.stdin)["data"]["result"]
namespaces = {r["metric"].get("namespace") for r in result}
print(f"{metric} in {ns}: {len(result)} series from namespaces {sorted(map(str, namespaces))}")
sys.exit(0 if result and namespaces == {ns} else 1)' "$1" "$2"
}

# no_series_from PROM_NAMESPACE OTHER_NAMESPACE METRIC
no_series_from() {
  prom_query "$1" "$3{namespace=\"$2\"}" | python3 -c '
import json, sys
result = json.load(sys.stdin)["data"]["result"]
print(f"{len(result)} series of namespace {sys.argv[2]} in the Prometheus of {sys.argv[1]}")
sys.exit(0 if not result else 1)' "$1" "$2"
}

# exporter_counts_own_app NAMESPACE APP "APPS...": the statsd exporter in
# a pod of APP counts that pod's gunicorn requests (prefix APP), and no
# other app's.
exporter_counts_own_app() {
  local ns=$1 app=$2 apps=$3 pod
  pod=$(kubectl -n "$ns" get pods -l "app=$app" --field-selector=status.phase=Running \
    -o jsonpath='{.items[0].metadata.name}')
  [ -n "$pod" ] || return 1
  kubectl get --raw "/api/v1/namespaces/$ns/pods/$pod:9102/proxy/metrics" | python3 -c '
import re, sys
app, others = sys.argv[1], set(sys.argv[2].split()) - {sys.argv[1]}
counts = {}
for line in sys.stdin:
    m = re.match(r"gunicorn_requests_total\{(.*)\} (\S+)$", line.strip())
    if m:
        prefix = re.search(r"prefix=\"([^\"]*)\"", m.group(1))
        counts[prefix.group(1) if prefix else ""] = float(m.group(2))
print(f"gunicorn_requests_total by prefix: {counts}")
sys.exit(0 if counts.get(app, 0) > 0 and not others & counts.keys() else 1)' "$app" "$apps"
}

# injected_admissions NAMESPACE: prints each webhook replica's count of
# injected admissions (its own /metrics, through the pod proxy: the Service
# would pick one replica) and succeeds when their sum is above zero.
injected_admissions() {
  local ns=$1 pod port total=0 count
  for pod in $(kubectl -n "$ns" get pods -l app.kubernetes.io/name=chiller-metrics \
    --field-selector=status.phase=Running -o jsonpath='{.items[*].metadata.name}'); do
    port=$(kubectl -n "$ns" get pod "$pod" \
      -o jsonpath='{.spec.containers[0].ports[?(@.name=="admin")].containerPort}')
    count=$(kubectl get --raw "/api/v1/namespaces/$ns/pods/$pod:$port/proxy/metrics" | python3 -c '
import re, sys
total = 0.0
for line in sys.stdin:
    m = re.match(r"chiller_metrics_admissions_total\{(.*)\} (\S+)$", line.strip())
    if m and re.search(r"outcome=\"injected\"", m.group(1)):
        total += float(m.group(2))
print(int(total))')
    echo "$pod: $count injected admissions"
    total=$((total + count))
  done
  ((total > 0))
}

# dashboard_answers NAMESPACE "APPS...": every query of the namespace's
# dashboard returns data through the URL of its datasource.
dashboard_answers() {
  python3 tests/e2e/dashboard_queries.py "$1" "$2"
}

# scrape_count NAMESPACE: the scrapes the namespace's Prometheus recorded in
# the last hour.
scrape_count() {
  prom_query "$1" 'sum(count_over_time(up[1h]))' | python3 -c '
import json, sys
result = json.load(sys.stdin)["data"]["result"]
print(int(float(result[0]["value"][1])) if result else 0)'
}

# namespace_status_is NAMESPACE FIELD VALUE: the reconcile loop's status
# annotation on the namespace has FIELD == VALUE.
namespace_status_is() {
  kubectl get namespace "$1" -o json | python3 -c '
import json, sys
annotations = json.load(sys.stdin)["metadata"].get("annotations", {})
status = json.loads(annotations.get("metrics.chiller.io/reconcile-status", "{}"))
print(f"reconcile-status: {status}")
sys.exit(0 if str(status.get(sys.argv[1])) == sys.argv[2] else 1)' "$2" "$3"
}

# first_pod_trial NAMESPACE IMAGE PULL_POLICY REQUESTS: creates NAMESPACE,
# labeled, and a gunicorn pod in it in one apply (the pod is admitted before
# the reconcile loop can have written anything for the namespace); once the
# pod is Ready, sends REQUESTS requests to it and checks, from the pod's
# status as the node reports it, that the sidecar never restarted, and from
# its exporter that every request was counted. Deletes the namespace.
first_pod_trial() {
  local ns=$1 image=$2 policy=$3 requests=$4 pod=app deadline restarts counted
  kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $ns
  labels:
    metrics.chiller.io/inject: enabled
---
apiVersion: v1
kind: Pod
metadata:
  name: $pod
  namespace: $ns
  labels:
    app: first-pod
spec:
  containers:
    - name: app
      image: $image
      imagePullPolicy: $policy
      env:
        - name: ROLE
          value: api
      ports:
        - name: http
          containerPort: 8000
      # Ready once gunicorn listens; a TCP probe sends no request it would count.
      readinessProbe:
        tcpSocket:
          port: http
        periodSeconds: 1
EOF
  kubectl -n "$ns" wait --for=condition=Ready "pod/$pod" --timeout=120s >/dev/null ||
    { kubectl -n "$ns" get pod "$pod" -o yaml >&2; return 1; }
  has_native_sidecar "$ns" first-pod || { echo "$ns/$pod has no sidecar" >&2; return 1; }
  for _ in $(seq 1 "$requests"); do
    kubectl get --raw "/api/v1/namespaces/$ns/pods/$pod:8000/proxy/api/items" >/dev/null
  done
  deadline=$((SECONDS + 30))
  until counted=$(requests_counted "$ns" "$pod") && ((counted == requests)); do
    if ((SECONDS >= deadline)); then
      echo "$ns: the exporter counted ${counted:-nothing} of $requests requests" >&2
      return 1
    fi
    sleep 1
  done
  restarts=$(kubectl -n "$ns" get pod "$pod" \
    -o jsonpath='{.status.initContainerStatuses[?(@.name=="statsd-exporter")].restartCount}')
  if [ "$restarts" != 0 ]; then
    echo "$ns: the sidecar restarted ${restarts:-?} times" >&2
    kubectl -n "$ns" logs "$pod" -c statsd-exporter --previous >&2 || true
    return 1
  fi
  echo "$ns: sidecar restarts 0, $counted of $requests requests counted"
  kubectl delete namespace "$ns" --wait=false >/dev/null
}

# requests_counted NAMESPACE POD: gunicorn_requests_total in the pod's exporter.
requests_counted() {
  kubectl get --raw "/api/v1/namespaces/$1/pods/$2:9102/proxy/metrics" | python3 -c '
import re, sys
total = sum(float(m.group(1)) for line in sys.stdin
            if (m := re.match(r"gunicorn_requests_total\{.*\} (\S+)$", line.strip())))
print(int(total))'
}

# Every pod of the Deployment APP runs the sidecar with CPU request CPU.
sidecar_cpu_request_is() {
  local ns=$1 app=$2 cpu=$3 requests
  requests=$(kubectl -n "$ns" get pods -l "app=$app" \
    -o jsonpath='{range .items[*]}{.spec.initContainers[?(@.name=="statsd-exporter")].resources.requests.cpu}{"\n"}{end}')
  echo "sidecar CPU requests: $requests"
  [ -n "$requests" ] && ! grep -qv "^$cpu\$" <<<"$requests"
}

ca_bundle_injected() {
  [ -n "$(kubectl get mutatingwebhookconfiguration "$1" -o jsonpath='{.webhooks[0].clientConfig.caBundle}')" ]
}

# Every pod of the Deployment carries the native statsd-exporter sidecar.
has_native_sidecar() {
  local ns=$1 app=$2 policies
  policies=$(kubectl -n "$ns" get pods -l "app=$app" \
    -o jsonpath='{range .items[*]}{.spec.initContainers[?(@.name=="statsd-exporter")].restartPolicy}{"\n"}{end}')
  [ -n "$policies" ] && ! grep -qv '^Always$' <<<"$policies"
}

has_no_sidecar() {
  local ns=$1 app=$2 names
  names=$(kubectl -n "$ns" get pods -l "app=$app" \
    -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.initContainers[*].name}{" "}{.spec.containers[*].name}{"\n"}{end}')
  [ -n "$names" ] && ! grep -q statsd-exporter <<<"$names"
}

# Objects the reconciler made for NAMESPACE (in it, and in the Grafana namespace if any).
managed_objects() {
  kubectl -n "$1" get prometheus,servicemonitor,configmap,service,serviceaccount,role,rolebinding,deployment \
    -l app.kubernetes.io/managed-by=chiller-metrics -o name
}

no_managed_objects() {
  [ -z "$(managed_objects "$1")" ]
}

diagnostics() {
  set +e
  log "diagnostics"
  kubectl get nodes -o wide
  kubectl get pods -A -o wide
  kubectl get events -A --sort-by=.lastTimestamp | tail -100
  kubectl get mutatingwebhookconfiguration -o yaml | grep -v caBundle
  for ns in "$@"; do
    kubectl -n "$ns" get all,configmap,prometheus,servicemonitor -o wide
    kubectl get namespace "$ns" -o yaml
    kubectl -n "$ns" describe pods
  done
  kubectl -n chiller-metrics describe pods
  kubectl -n chiller-metrics logs -l app.kubernetes.io/name=chiller-metrics --all-containers --prefix --tail=300
  kubectl -n monitoring logs -l app=kube-prometheus-stack-operator --all-containers --prefix --tail=200
  kubectl -n cert-manager logs -l app.kubernetes.io/instance=cert-manager --all-containers --prefix --tail=100
}

# Server-side dry-run creates of a probe pod in namespace $1 (image $2), one
# every half second until file $3 exists (at most 10 minutes); prints
# "attempts misses failures", a miss being a create that failed or came back
# without injection, a failure one the API server refused or did not answer
# within 20 s. Dry runs go through admission, our webhook included, and store
# nothing.
dry_run_creates_until() {
  local ns=$1 image=$2 stop=$3 attempts=0 misses=0 failures=0 pod injected
  pod=$(printf '{"apiVersion":"v1","kind":"Pod","metadata":{"generateName":"upgrade-probe-","labels":{"app":"upgrade-probe"}},"spec":{"containers":[{"name":"app","image":"%s"}]}}' "$image")
  for _ in $(seq 1 1200); do
    [ -e "$stop" ] && break
    attempts=$((attempts + 1))
    if ! injected=$(kubectl -n "$ns" create --dry-run=server --request-timeout=20s \
      -o jsonpath='{.metadata.labels.metrics\.chiller\.io/injected}' -f - <<<"$pod" 2>/dev/null); then
      failures=$((failures + 1))
    fi
    [ "$injected" = true ] || misses=$((misses + 1))
    sleep 0.5
  done
  echo "$attempts $misses $failures"
}

# pod_of NAMESPACE APP: the name of a Running pod of the Deployment APP.
pod_of() {
  kubectl -n "$1" get pods -l "app=$2" --field-selector=status.phase=Running \
    -o jsonpath='{.items[0].metadata.name}'
}

# container_state NAMESPACE POD: one line per container of the pod, as the
# kubelet reports it: name, restarts, ready, started, startedAt, containerID,
# last termination reason; then the pod's Ready condition.
container_state() {
  kubectl -n "$1" get pod "$2" -o json | python3 -c '
import json, sys
pod = json.load(sys.stdin)
status = pod["status"]
for s in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
    running = s.get("state", {}).get("running", {})
    last = s.get("lastState", {}).get("terminated", {})
    print(s["name"], s.get("restartCount", 0), s.get("ready"), s.get("started"),
          running.get("startedAt", "-"), s.get("containerID", "-"), last.get("reason", "-"))
ready = [c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"]
print("pod-ready", ready[0] if ready else "-")'
}

# sidecar_ready_before_app NAMESPACE POD APP_CONTAINER: from the pod's status:
# the sidecar started (its startup probe passed) no later than the app
# container, and the sidecar, the app and the pod are ready.
sidecar_ready_before_app() {
  container_state "$1" "$2" | python3 -c '
import sys
rows = {line.split()[0]: line.split() for line in sys.stdin}
side, app = rows["statsd-exporter"], rows[sys.argv[1]]
print("sidecar started", side[4], "ready", side[2], "| app started", app[4], "ready", app[2], "| pod", rows["pod-ready"][1])
ok = (side[3] == "True" and side[2] == "True" and app[2] == "True" and rows["pod-ready"][1] == "True"
      and side[4] != "-" and app[4] != "-" and side[4] <= app[4])
sys.exit(0 if ok else 1)' "$3"
}

# field_of NAMESPACE POD CONTAINER COLUMN: one column of container_state
# (2 restarts, 3 ready, 6 containerID, 7 last termination reason).
field_of() {
  container_state "$1" "$2" | awk -v c="$3" -v f="$4" '$1 == c { print $f }'
}

# sidecar_restarted_alone NAMESPACE POD APP_CONTAINER APP_ID: the sidecar has
# restarted and is ready again; the app container is the same one, never
# restarted, and the pod is Ready.
sidecar_restarted_alone() {
  local ns=$1 pod=$2 app=$3 app_id=$4
  [ "$(field_of "$ns" "$pod" statsd-exporter 2)" -ge 1 ] &&
    [ "$(field_of "$ns" "$pod" statsd-exporter 3)" = True ] &&
    [ "$(field_of "$ns" "$pod" "$app" 2)" = 0 ] &&
    [ "$(field_of "$ns" "$pod" "$app" 6)" = "$app_id" ] &&
    [ "$(field_of "$ns" "$pod" pod-ready 2)" = True ]
}

# requests_of_app NAMESPACE APP: gunicorn_requests_total summed over the
# exporters of every Running pod of APP.
requests_of_app() {
  local ns=$1 app=$2 pod total=0 count
  for pod in $(kubectl -n "$ns" get pods -l "app=$app" --field-selector=status.phase=Running \
    -o jsonpath='{.items[*].metadata.name}'); do
    count=$(requests_counted "$ns" "$pod") || return 1
    total=$((total + count))
  done
  echo "$total"
}

# service_routes NAMESPACE FROM_POD HOST PORT: a TCP connection from inside
# FROM_POD to HOST:PORT opens. A new Service routes only once cluster DNS
# knows its name and kube-proxy has written its endpoint's rules, a moment
# after the pod is Ready. The connection sends nothing, so gunicorn counts no
# request, as with the kubelet's TCP probe.
service_routes() {
  kubectl -n "$1" exec "$2" -- python3 -c '
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()' "$3" "$4"
}

# requests_through_service NAMESPACE FROM_POD URL COUNT: COUNT GETs of URL
# from inside FROM_POD (cluster DNS, then kube-proxy's Service routing);
# fails unless every one answers 200, naming the first that did not.
requests_through_service() {
  kubectl -n "$1" exec "$2" -- python3 -c '
import sys, urllib.request
url, count = sys.argv[1], int(sys.argv[2])
ok = 0
for n in range(1, count + 1):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            ok += response.status == 200
    except Exception as error:
        print(f"request {n} of {count} to {url} failed: {error!r}", file=sys.stderr)
        break
print(f"{ok} of {count} requests to {url} answered 200")
sys.exit(0 if ok == count else 1)' "$3" "$4"
}

# statsd_load NAMESPACE NAME TARGET_IP RATE SECONDS IMAGE: a pod (never
# injected) that sends RATE gunicorn-like statsd lines a second to
# TARGET_IP:9125 over UDP for SECONDS.
statsd_load() {
  local ns=$1 name=$2 ip=$3 rate=$4 seconds=$5 image=$6
  kubectl -n "$ns" run "$name" --image="$image" --image-pull-policy=IfNotPresent --restart=Never \
    --labels=metrics.chiller.io/inject=disabled --command -- python3 -c '
import random, socket, sys, time
ip, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
lines = [b"load.gunicorn.requests:1|c", b"load.gunicorn.request.status.200:1|c",
         b"load.gunicorn.workers:2|g", b"load.gunicorn.log.warning:1|c"]
sent, start = 0, time.monotonic()
while (elapsed := time.monotonic() - start) < seconds:
    while sent < rate * elapsed:
        line = random.choice(lines) if sent % 2 else b"load.gunicorn.request.duration:%.1f|ms" % random.uniform(1, 500)
        sock.sendto(line, (ip, 9125))
        sent += 1
    time.sleep(0.01)
print(f"sent {sent} statsd lines in {seconds} s")' "$ip" "$rate" "$seconds" >/dev/null
}

# working_set NAMESPACE POD CONTAINER: the container's working set in bytes,
# from the kubelet's /stats/summary (through the API server).
working_set() {
  local node
  node=$(kubectl -n "$1" get pod "$2" -o jsonpath='{.spec.nodeName}')
  kubectl get --raw "/api/v1/nodes/$node/proxy/stats/summary" | python3 -c '
import json, sys
ns, pod, container = sys.argv[1:4]
for p in json.load(sys.stdin)["pods"]:
    if p["podRef"]["namespace"] == ns and p["podRef"]["name"] == pod:
        for c in p.get("containers", []):
            if c["name"] == container and "workingSetBytes" in c.get("memory", {}):
                print(c["memory"]["workingSetBytes"]); sys.exit(0)
sys.exit(1)' "$1" "$2" "$3"
}

# create_pods_until NAMESPACE IMAGE PREFIX STOP_FILE: creates pods PREFIX-N
# (a sleeping container) one every 0.3 s until STOP_FILE exists; prints how
# many were created and how many creates failed.
create_pods_until() {
  local ns=$1 image=$2 prefix=$3 stop=$4 created=0 failed=0 n pod
  for n in $(seq 1 400); do
    [ -e "$stop" ] && break
    pod=$(printf '{"apiVersion":"v1","kind":"Pod","metadata":{"name":"%s-%s","labels":{"app":"%s"}},"spec":{"terminationGracePeriodSeconds":1,"containers":[{"name":"app","image":"%s","imagePullPolicy":"IfNotPresent","command":["sleep","3600"]}]}}' \
      "$prefix" "$n" "$prefix" "$image")
    if kubectl -n "$ns" create --request-timeout=20s -f - >/dev/null 2>&1 <<<"$pod"; then
      created=$((created + 1))
    else
      failed=$((failed + 1))
    fi
    sleep 0.3
  done
  echo "$created $failed"
}

# injected_count NAMESPACE APP: pods of APP labeled injected, and all of them.
injected_count() {
  kubectl -n "$1" get pods -l "app=$2" \
    -o jsonpath='{range .items[*]}{.metadata.labels.metrics\.chiller\.io/injected}{"\n"}{end}' |
    awk '$1 == "true" { n++ } END { print n + 0, NR }'
}

# datasource_url NAMESPACE: the Prometheus URL of the namespace's Grafana datasource.
datasource_url() {
  kubectl get configmap -A -l "grafana_datasource=1,metrics.chiller.io/owner-namespace=$1" \
    -o jsonpath='{.items[0].data.*}' | sed -n 's/^[[:space:]]*url:[[:space:]]*//p' | tr -d "'\"" | head -n 1
}

# counted_app NAMESPACE IMAGE PULL_POLICY: a pod "counted" of the test app
# (ROLE=api) behind a Service of the same name; Ready once gunicorn listens,
# with a TCP probe, so only requests sent to it reach its gunicorn.
counted_app() {
  kubectl -n "$1" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: counted
  labels: {app: counted}
spec:
  containers:
    - name: app
      image: $2
      imagePullPolicy: $3
      env: [{name: ROLE, value: api}]
      ports: [{name: http, containerPort: 8000}]
      readinessProbe:
        tcpSocket: {port: http}
        periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: counted
spec:
  selector: {app: counted}
  ports: [{name: http, port: 8000, targetPort: http}]
EOF
}

# workers_gauge NAMESPACE POD: gunicorn_workers in the pod's exporter.
# gunicorn sends this gauge once, as its arbiter boots the workers, and again
# only when their number changes: it is there only if the exporter was
# listening before gunicorn started.
workers_gauge() {
  kubectl get --raw "/api/v1/namespaces/$1/pods/$2:9102/proxy/metrics" | python3 -c '
import re, sys
values = [m.group(1) for line in sys.stdin
          if (m := re.match(r"gunicorn_workers\{.*\} (\S+)$", line.strip()))]
print(values[0] if values else "absent")'
}
