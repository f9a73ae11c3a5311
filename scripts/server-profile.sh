#!/usr/bin/env bash
# Instruction counts per request over the whole server, the webhook against
# the baseline server (benches/baseline/server.rs): TLS, HTTP, the handler,
# and for the webhook its limits, timeouts and metrics. Both run under
# valgrind's callgrind with its cache and branch simulation; after WARMUP
# requests of the chiller pod the counters are zeroed, REQUESTS more are sent,
# and the counts are divided by REQUESTS. Counts, not time: a busy machine
# gives the same figures within a fraction of a percent (how many requests
# one read of a connection brings varies a little).
#
# Environment: PROTO (h1 or h2, default h1; h2 uses 4 streams per client),
# CLIENTS (default 16), WARMUP (default 2000), REQUESTS (default 4000).
# Needs valgrind, h2load (nghttp2-client) and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/wait-ready.sh

PROTO=${PROTO:-h1}
CLIENTS=${CLIENTS:-16}
WARMUP=${WARMUP:-2000}
REQUESTS=${REQUESTS:-4000}
WEBHOOK_PORT=${WEBHOOK_PORT:-28443}
ADMIN_PORT=${ADMIN_PORT:-29090}

for tool in valgrind callgrind_control h2load curl python3; do
    command -v "$tool" >/dev/null || { echo "server-profile: $tool is missing" >&2; exit 1; }
done
case "$PROTO" in
h1) protocol=(--h1 -m 1) ;;
h2) protocol=(-m 4 --npn-list=h2) ;;
*) echo "server-profile: PROTO is h1 or h2, got $PROTO" >&2; exit 1 ;;
esac

with_work_dir

# Built apart and copied, as scripts/bench.sh does, so the webhook's binary
# is the one the hot-code list was made for, linked as the image's (Dockerfile).
export CHILLER_METRICS_PACK_RELOCS=1
cargo build --release --locked --quiet --example baseline_server
cargo build --release --locked --quiet --bin chiller-metrics
cp target/release/chiller-metrics target/release/examples/baseline_server "$WORK/"
"$WORK/chiller-metrics" certs --out "$WORK/certs" --dns localhost --dns 127.0.0.1 >/dev/null 2>&1
python3 -c 'import json,sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2], "w"), separators=(",", ":"))' \
    tests/golden/requests/chiller-api.json "$WORK/body.json"

# profile ours|baseline: leaves the measured phase's profile in $WORK/NAME.out.1.
profile() {
    local name=$1 args=()
    [ "$name" = ours ] && args=(serve --standalone --no-reconcile --drain-seconds 0)
    local binary=$WORK/chiller-metrics
    [ "$name" = baseline ] && binary=$WORK/baseline_server
    RUST_LOG=warn valgrind --tool=callgrind --cache-sim=yes --branch-sim=yes \
        --callgrind-out-file="$WORK/$name.out" "$binary" "${args[@]}" \
        --listen "127.0.0.1:$WEBHOOK_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
        --tls-cert "$WORK/certs/tls.crt" --tls-key "$WORK/certs/tls.key" >"$WORK/$name.log" 2>&1 &
    SERVER_PID=$!
    wait_ready "server-profile ($name)" "$SERVER_PID" "$ADMIN_PORT" "$WORK/$name.log"
    local load=(-c "$CLIENTS" -t 1 "${protocol[@]}" -d "$WORK/body.json"
        -H 'content-type: application/json' "https://127.0.0.1:$WEBHOOK_PORT/mutate")
    h2load -n "$WARMUP" "${load[@]}" >"$WORK/$name-warmup.txt" 2>&1
    callgrind_control -z "$SERVER_PID" >/dev/null
    h2load -n "$REQUESTS" "${load[@]}" >"$WORK/$name-load.txt" 2>&1
    callgrind_control -d "$SERVER_PID" >/dev/null
    grep -q " $REQUESTS succeeded, 0 failed, 0 errored" "$WORK/$name-load.txt" ||
        { echo "server-profile: requests to $name failed:" >&2; cat "$WORK/$name-load.txt" >&2; exit 1; }
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

profile ours
profile baseline

python3 - "$WORK/ours.out.1" "$WORK/baseline.out.1" "$REQUESTS" "$PROTO, $CLIENTS clients" <<'EOF'
import sys

def totals(path):
    lines = open(path).read().splitlines()
    events = next(l for l in lines if l.startswith("events:")).split()[1:]
    summary = next(l for l in lines if l.startswith("summary:")).split()[1:]
    counts = dict(zip(events, map(int, summary)))
    return {
        "instructions": counts["Ir"],
        "L1 instruction misses": counts["I1mr"],
        "L1 data misses": counts["D1mr"] + counts["D1mw"],
        "branch misses": counts["Bcm"] + counts["Bim"],
    }

ours_path, base_path, requests, label = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ours, base = totals(ours_path), totals(base_path)
print(f"\nper request over the whole server, {requests} requests, {label}")
print(f"{'event':<24}{'ours':>12}{'baseline':>12}{'ratio':>9}")
for event in ours:
    o, b = ours[event] / requests, base[event] / requests
    print(f"{event:<24}{o:>12,.0f}{b:>12,.0f}{o / b:>9.2f}")
EOF
