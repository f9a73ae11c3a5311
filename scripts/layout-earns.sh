#!/usr/bin/env bash
# What the symbol ordering (build.rs, layout/hot-symbols.txt) earns: two
# release binaries of the same code, one linked with the hot-code order and
# one plain (CHILLER_METRICS_PLAIN_LINK=1), measured alternately in the same
# run. What the ordering is for, fewer pages of code mapped, counted rather
# than timed: the binary's resident text (scripts/resident-text.py), the
# file-backed RSS and the minor page faults of `serve`, at idle and after
# REQUESTS requests of the chiller pod.
#
# ORDERED and PLAIN name prebuilt binaries; without them both are built
# (the second build recompiles the crate: the link arguments come from
# build.rs). Environment: ROUNDS (default 3), REQUESTS (default 20000),
# CLIENTS (default 16). Needs h2load and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/wait-ready.sh

ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-20000}
CLIENTS=${CLIENTS:-16}
WEBHOOK_PORT=${WEBHOOK_PORT:-28443}
ADMIN_PORT=${ADMIN_PORT:-29090}

with_work_dir

export CHILLER_METRICS_PACK_RELOCS=1
if [ -z "${ORDERED:-}" ]; then
    cargo build --release --locked --quiet --bin chiller-metrics
    cp target/release/chiller-metrics "$WORK/ordered"
    ORDERED=$WORK/ordered
fi
if [ -z "${PLAIN:-}" ]; then
    CHILLER_METRICS_PLAIN_LINK=1 cargo build --release --locked --quiet --bin chiller-metrics
    cp target/release/chiller-metrics "$WORK/plain"
    PLAIN=$WORK/plain
fi
"$ORDERED" certs --out "$WORK/certs" --dns localhost --dns 127.0.0.1 >/dev/null 2>&1
python3 -c 'import json,sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2], "w"), separators=(",", ":"))' \
    tests/golden/requests/chiller-api.json "$WORK/body.json"

rss_file() { awk '/^RssFile:/ {print $2}' "/proc/$1/status"; }
text_kb() { python3 scripts/resident-text.py "$1" | awk '/^resident text:/ {print $3}'; }
minor_faults() { awk '{print $10}' "/proc/$1/stat"; }

# measure NAME BINARY: prints NAME, then resident text (KB), file-backed RSS
# (KB) and minor faults, at idle and after the load.
measure() {
    local name=$1 binary=$2
    RUST_LOG=warn taskset -c 0 "$binary" serve --standalone --no-reconcile --drain-seconds 0 \
        --listen "127.0.0.1:$WEBHOOK_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
        --tls-cert "$WORK/certs/tls.crt" --tls-key "$WORK/certs/tls.key" >"$WORK/$name.log" 2>&1 &
    SERVER_PID=$!
    wait_ready "layout-earns ($name)" "$SERVER_PID" "$ADMIN_PORT" "$WORK/$name.log"
    local idle
    idle="$(text_kb "$SERVER_PID") $(rss_file "$SERVER_PID") $(minor_faults "$SERVER_PID")"
    taskset -c 1 h2load -n "$REQUESTS" -c "$CLIENTS" -t 1 --h1 -d "$WORK/body.json" \
        -H 'content-type: application/json' "https://127.0.0.1:$WEBHOOK_PORT/mutate" >"$WORK/$name-load.txt" 2>&1
    grep -q " $REQUESTS succeeded, 0 failed, 0 errored" "$WORK/$name-load.txt" ||
        { echo "layout-earns: requests to $name failed:" >&2; cat "$WORK/$name-load.txt" >&2; exit 1; }
    # shellcheck disable=SC2086
    printf '%-8s %9s %9s %9s %9s %9s %9s\n' "$name" $idle \
        "$(text_kb "$SERVER_PID")" "$(rss_file "$SERVER_PID")" "$(minor_faults "$SERVER_PID")"
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

printf '%-8s %29s %29s\n' '' 'idle' "after $REQUESTS requests"
printf '%-8s %9s %9s %9s %9s %9s %9s\n' link 'text KB' 'file KB' faults 'text KB' 'file KB' faults
for _ in $(seq 1 "$ROUNDS"); do
    measure ordered "$ORDERED"
    measure plain "$PLAIN"
done
