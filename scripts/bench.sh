#!/usr/bin/env bash
# Load benchmark of the webhook against the baseline server (benches/baseline/server.rs)
# and the controller-runtime webhook doing the same mutation (benches/go-webhook):
# throughput at saturation, p50/p99 latency at fixed rates, RSS idle and under
# load, and start-up time to ready, over HTTP/1.1 and HTTP/2 with h2load.
# Before measuring, each pod is sent to the webhook and to the Go webhook, and
# the pods their patches make must be the same.
#
# Environment: RUNS (default 3; medians are reported), DURATION seconds per
# measurement (default 5), CLIENTS (default 16), STREAMS per HTTP/2 client
# (default 4), SERVER_CPU and LOAD_CPU (default 0 and 1: the server and h2load
# are pinned to separate cores with taskset when the machine has two or more),
# LARGE_PODS (default 1: also the throughput for the 60-container and ~600 KB
# pods of benches/mutate.rs; 0 skips them), BENCH_OUT (default .bench: the raw
# figures and h2load's output, replaced on every run). The servers take turns
# going first.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
CLIENTS=${CLIENTS:-16}
STREAMS=${STREAMS:-4}
LARGE_PODS=${LARGE_PODS:-1}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
OUT=${BENCH_OUT:-.bench}
BODY_SOURCE=tests/golden/requests/chiller-api.json

need() {
    command -v "$1" >/dev/null || {
        echo "bench: $1 not found; install it with: $2" >&2
        exit 1
    }
}
need h2load "apt-get install nghttp2-client"
need curl "apt-get install curl"
need python3 "apt-get install python3"
need go "https://go.dev/doc/install (Go 1.26 or newer)"

pin_server=() pin_load=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    pin_server=(taskset -c "$SERVER_CPU")
    pin_load=(taskset -c "$LOAD_CPU")
    echo "pinning: server on CPU $SERVER_CPU, h2load on CPU $LOAD_CPU"
else
    echo "not pinning: taskset missing or fewer than 2 CPUs"
fi

rm -rf "$OUT"
mkdir -p "$OUT/bin"
echo "building release binaries..."
# Apart: a build that includes an example (or `cargo bench`) turns on the
# dev-dependencies' features, which gives the webhook's binary other symbol
# hashes than the hot-code list has. Copies, because `cargo bench` (which
# writes the large pods' bodies below) replaces target/release/chiller-metrics.
# The image's link (Dockerfile): start-up and RSS depend on the packed relocations.
export CHILLER_METRICS_PACK_RELOCS=1
cargo build --release --locked --quiet --example baseline_server
cargo build --release --locked --quiet --bin chiller-metrics
cp target/release/chiller-metrics target/release/examples/baseline_server "$OUT/bin/"
benches/go-webhook/build.sh "$OUT/bin"
OURS_BIN=$OUT/bin/chiller-metrics
BASE_BIN=$OUT/bin/baseline_server
GO_BIN=$OUT/bin/go-webhook
# How much of the hot-code list (build.rs, scripts/hot-symbols.sh) the binary
# has: a low share means the list is stale and resident code grows.
python3 - "$OURS_BIN" layout/hot-symbols.txt <<'EOF'
import subprocess, sys
binary, order = sys.argv[1:]
listed = [l.strip() for l in open(order) if l.strip() and not l.startswith("#")]
present = set(subprocess.run(["nm", binary], capture_output=True, text=True, check=True)
              .stdout.split())
found = sum(name in present for name in listed)
print(f"hot-code list: {found} of {len(listed)} functions found in {binary}")
EOF

"$OURS_BIN" certs --out "$OUT/certs" --dns localhost --dns 127.0.0.1 >/dev/null 2>&1
python3 -c 'import json,sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2], "w"), separators=(",", ":"))' \
    "$BODY_SOURCE" "$OUT/body.json"
LARGE=()
if [ "$LARGE_PODS" = 1 ]; then
    # The large pods of the mutation benchmark, written by it.
    MUTATE_WRITE_BODIES="$PWD/$OUT/bodies" cargo bench --locked --quiet --bench mutate >/dev/null
    LARGE=(60-containers 600KB)
fi

WEBHOOK_PORT=18443
ADMIN_PORT=19090
SERVER_PID=""

stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
trap stop_server EXIT

now_ns() { date +%s%N; }

# start_server ours|baseline|go: starts it pinned, waits for /readyz, sets STARTUP_US.
start_server() {
    local started
    started=$(now_ns)
    case "$1" in
    ours)
        RUST_LOG=warn "${pin_server[@]}" "$OURS_BIN" serve --standalone --no-reconcile \
            --listen "127.0.0.1:$WEBHOOK_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
            --tls-cert "$OUT/certs/tls.crt" --tls-key "$OUT/certs/tls.key" \
            --drain-seconds 0 >"$OUT/ours.log" 2>&1 &
        ;;
    baseline)
        "${pin_server[@]}" "$BASE_BIN" \
            --listen "127.0.0.1:$WEBHOOK_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
            --tls-cert "$OUT/certs/tls.crt" --tls-key "$OUT/certs/tls.key" >"$OUT/baseline.log" 2>&1 &
        ;;
    go)
        "${pin_server[@]}" "$GO_BIN" \
            --listen "127.0.0.1:$WEBHOOK_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
            --cert-dir "$OUT/certs" --mapping src/inject/statsd-mapping.yaml >"$OUT/go.log" 2>&1 &
        ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 1 2000); do
        if curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN_PORT/readyz" 2>/dev/null; then
            STARTUP_US=$((($(now_ns) - started) / 1000))
            return
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || {
            echo "bench: $1 server exited; see $OUT/$1.log" >&2
            exit 1
        }
        sleep 0.005
    done
    echo "bench: $1 server not ready after 10 s" >&2
    exit 1
}

status_kb() { awk -v key="$2:" '$1 == key {print $2}' "/proc/$1/status"; }

# load NAME PROTO [RPS_PER_CLIENT [BODY]]: runs h2load, leaves its summary and
# per-request log in $OUT.
load() {
    local name=$1 proto=$2 rps=${3:-} body=${4:-$OUT/body.json}
    local args=(-D "$DURATION" --warm-up-time 1 -c "$CLIENTS" -t 1
        -d "$body" -H 'content-type: application/json'
        --log-file "$OUT/$name.tsv")
    if [ "$proto" = h1 ]; then args+=(--h1 -m 1); else args+=(-m "$STREAMS" --npn-list=h2); fi
    [ -n "$rps" ] && args+=(--rps "$rps")
    "${pin_load[@]}" h2load "${args[@]}" "https://127.0.0.1:$WEBHOOK_PORT/mutate" >"$OUT/$name.txt" 2>&1
    if ! grep -q "^Application protocol: ${proto/h1/http\/1.1}$" "$OUT/$name.txt"; then
        echo "bench: $name did not run over $proto:" >&2
        grep "^Application protocol" "$OUT/$name.txt" >&2
    fi
    if ! grep -q " 0 failed, 0 errored" "$OUT/$name.txt"; then
        echo "bench: requests failed in $name:" >&2
        grep -E "^requests:|status codes:" "$OUT/$name.txt" >&2
    fi
}

rate_of() { awk '/^finished in/ {gsub(",", ""); print $4}' "$OUT/$1.txt"; }

# Percentiles (microseconds) of the per-request log, status 200 only.
percentile() {
    python3 - "$OUT/$1.tsv" "$2" <<'EOF'
import sys
with open(sys.argv[1]) as f:
    times = sorted(int(line.split("\t")[2]) for line in f if line.split("\t")[1] == "200")
q = float(sys.argv[2])
print(times[min(len(times) - 1, int(q * len(times)))] if times else "nan")
EOF
}

# The same pods from both webhooks: each body's answer from each, applied.
BODIES=("$OUT/body.json")
for pod in "${LARGE[@]}"; do BODIES+=("$OUT/bodies/$pod.json"); done
for server in ours go; do
    start_server "$server"
    for body in "${BODIES[@]}"; do
        curl -fsS --cacert "$OUT/certs/ca.crt" -H 'content-type: application/json' \
            --data-binary "@$body" "https://localhost:$WEBHOOK_PORT/mutate" \
            >"$OUT/parity-$server-$(basename "$body")"
    done
    stop_server
done
python3 - "$OUT" "${BODIES[@]}" <<'EOF'
import base64, copy, json, sys
out, bodies = sys.argv[1], sys.argv[2:]
def apply(doc, patch):
    doc = copy.deepcopy(doc)
    for op in patch:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        *parents, last = tokens
        target = doc
        for token in parents:
            target = target[int(token)] if isinstance(target, list) else target[token]
        if isinstance(target, list):
            index = len(target) if last == "-" else int(last)
            if op["op"] == "add":
                target.insert(index, op["value"])
            elif op["op"] == "replace":
                target[index] = op["value"]
            else:
                del target[index]
        elif op["op"] == "remove":
            del target[last]
        else:
            target[last] = op["value"]
    return doc
for body in bodies:
    name = body.split("/")[-1]
    pod = json.load(open(body))["request"]["object"]
    pods = {}
    for server in ("ours", "go"):
        response = json.load(open(f"{out}/parity-{server}-{name}"))["response"]
        result = apply(pod, json.loads(base64.b64decode(response.get("patch") or "W10=")))
        # null and absent are the same creationTimestamp; the Go webhook's typed pod omits it.
        if result["metadata"].get("creationTimestamp", 0) is None:
            del result["metadata"]["creationTimestamp"]
        pods[server] = result
    if pods["ours"] != pods["go"] or pods["ours"] == pod:
        sys.exit(f"bench: the Go webhook's pod differs from ours for {name} (or neither injected)")
    print(f"same pod from both webhooks: {name}")
EOF

RESULTS="$OUT/results.tsv"
: >"$RESULTS"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; }

for run in $(seq 1 "$RUNS"); do
    declare -A saturation=()
    # Each run starts with another server, so that drift on the machine
    # (frequency, steal, page cache) lands on every side.
    case $((run % 3)) in
    1) order=(ours baseline go) ;;
    2) order=(baseline go ours) ;;
    0) order=(go ours baseline) ;;
    esac
    for server in "${order[@]}"; do
        start_server "$server"
        sleep 0.5
        record "$run" "$server" startup_ms "$(python3 -c "print($STARTUP_US / 1000)")"
        record "$run" "$server" idle_rss_mb "$(python3 -c "print($(status_kb "$SERVER_PID" VmRSS) / 1024)")"
        record "$run" "$server" idle_anon_mb "$(python3 -c "print($(status_kb "$SERVER_PID" RssAnon) / 1024)")"
        record "$run" "$server" idle_file_mb "$(python3 -c "print($(status_kb "$SERVER_PID" RssFile) / 1024)")"
        for proto in h1 h2; do
            load "$server-$proto-saturation-$run" "$proto"
            rate=$(rate_of "$server-$proto-saturation-$run")
            record "$run" "$server" "${proto}_throughput_rps" "$rate"
            saturation[$server-$proto]=$rate
        done
        record "$run" "$server" peak_rss_mb "$(python3 -c "print($(status_kb "$SERVER_PID" VmHWM) / 1024)")"
        # RSS after the load, split: heap and stacks (anonymous) against the
        # binary's and libraries' pages (file-backed, shared and clean).
        record "$run" "$server" loaded_anon_mb "$(python3 -c "print($(status_kb "$SERVER_PID" RssAnon) / 1024)")"
        record "$run" "$server" loaded_file_mb "$(python3 -c "print($(status_kb "$SERVER_PID" RssFile) / 1024)")"
        for pod in "${LARGE[@]}"; do
            for proto in h1 h2; do
                load "$server-$proto-$pod-$run" "$proto" "" "$OUT/bodies/$pod.json"
                record "$run" "$server" "${proto}_throughput_rps_$pod" "$(rate_of "$server-$proto-$pod-$run")"
            done
        done
        stop_server
    done
    # Latency at fixed rates, the same for every server: half of the
    # webhook's saturation (the Go webhook cannot reach it, so only the
    # webhook and the baseline), and half of the Go webhook's (all three).
    for server in "${order[@]}"; do
        start_server "$server"
        for proto in h1 h2; do
            for rate in half go_half; do
                [ "$rate" = half ] && [ "$server" = go ] && continue
                of=ours suffix=""
                [ "$rate" = go_half ] && of=go suffix=_at_go_half
                per_client=$(python3 -c "print(max(1, int(${saturation[$of-$proto]} / 2 / $CLIENTS)))")
                name="$server-$proto-$rate-$run"
                load "$name" "$proto" "$per_client"
                record "$run" "$server" "${proto}_${rate}_rate_rps" "$(rate_of "$name")"
                record "$run" "$server" "${proto}_p50_ms$suffix" "$(python3 -c "print($(percentile "$name" 0.50) / 1000)")"
                record "$run" "$server" "${proto}_p99_ms$suffix" "$(python3 -c "print($(percentile "$name" 0.99) / 1000)")"
            done
        done
        record "$run" "$server" peak_rss_mb_rate "$(python3 -c "print($(status_kb "$SERVER_PID" VmHWM) / 1024)")"
        stop_server
    done
    unset saturation
    echo "run $run of $RUNS done"
done

python3 - "$RESULTS" "$RUNS" "$CLIENTS clients, $STREAMS streams per HTTP/2 client" <<'EOF'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
values = {}
for run, server, metric, value in rows:
    values.setdefault(metric, {}).setdefault(server, []).append(float(value))
order = ["h1_throughput_rps", "h2_throughput_rps",
         "h1_throughput_rps_60-containers", "h2_throughput_rps_60-containers",
         "h1_throughput_rps_600KB", "h2_throughput_rps_600KB",
         "h1_half_rate_rps", "h1_p50_ms", "h1_p99_ms",
         "h2_half_rate_rps", "h2_p50_ms", "h2_p99_ms",
         "h1_go_half_rate_rps", "h1_p50_ms_at_go_half", "h1_p99_ms_at_go_half",
         "h2_go_half_rate_rps", "h2_p50_ms_at_go_half", "h2_p99_ms_at_go_half", "idle_rss_mb", "peak_rss_mb",
         "peak_rss_mb_rate", "idle_anon_mb", "idle_file_mb", "loaded_anon_mb", "loaded_file_mb",
         "startup_ms"]
order = [metric for metric in order if metric in values]
print(f"\nmedians of {sys.argv[2]} runs, {sys.argv[3]}")
print(f"{'metric':<32}{'ours':>12}{'baseline':>12}{'go':>12}{'/baseline':>10}{'/go':>8}")
for metric in order:
    median = lambda server: statistics.median(values[metric].get(server) or [float("nan")])
    ours, base, go = median("ours"), median("baseline"), median("go")
    ratio = lambda other: ours / other if other == other and other else float("nan")
    print(f"{metric:<32}{ours:>12.3f}{base:>12.3f}{go:>12.3f}{ratio(base):>10.2f}{ratio(go):>8.2f}")
EOF
echo "raw figures: $RESULTS; h2load output: $OUT/*.txt"
