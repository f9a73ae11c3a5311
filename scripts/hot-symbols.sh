#!/usr/bin/env bash
# Regenerates layout/hot-symbols.txt: every function of the release binary that
# `serve` runs while it starts and answers admission reviews, hottest first.
# build.rs hands the list to the linker (lld's --symbol-ordering-file), which
# places those functions together, so the kernel maps far fewer pages of code.
#
# The profile is valgrind's callgrind (instruction counts, not time): the
# server starts, answers every request of tests/golden/requests over HTTP/1.1
# and HTTP/2, then the pods of scripts/bench.sh with 16 clients, at saturation
# and at a fixed rate, serves its admin endpoints and drains. Run it after
# changes to the serving path, the dependencies, the release profile or the
# compiler (then set the Dockerfile's rust:VERSION to the one it records). A
# stale list costs only resident memory, since the linker skips the names it
# does not find; tests/offline/layout.rs says when it is stale.
#
# Needs valgrind, h2load (nghttp2-client) and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/wait-ready.sh

for tool in valgrind h2load curl; do
    command -v "$tool" >/dev/null || { echo "hot-symbols: $tool is missing" >&2; exit 1; }
done

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Linked as the image's binary (Dockerfile), which scripts/bench.sh measures.
export CHILLER_METRICS_PACK_RELOCS=1
cargo build --release --locked --quiet --bin chiller-metrics
# Built alone, as scripts/bench.sh builds it: with an example or a bench in
# the same build, dev-dependency features give other symbol hashes. A copy:
# `cargo bench` below replaces target/release/chiller-metrics with its build.
cp target/release/chiller-metrics "$WORK/"
BIN=$WORK/chiller-metrics

"$BIN" certs --out "$WORK/certs" --dns localhost --dns 127.0.0.1 >/dev/null 2>&1
WEBHOOK_PORT=${WEBHOOK_PORT:-18443}
ADMIN_PORT=${ADMIN_PORT:-19090}

RUST_LOG=warn valgrind --tool=callgrind --demangle=no --compress-strings=no \
    --compress-pos=no --callgrind-out-file="$WORK/callgrind.out" \
    "$BIN" serve --standalone --no-reconcile \
    --listen "127.0.0.1:$WEBHOOK_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
    --tls-cert "$WORK/certs/tls.crt" --tls-key "$WORK/certs/tls.key" \
    --drain-seconds 0 >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
wait_ready hot-symbols "$SERVER_PID" "$ADMIN_PORT" "$WORK/serve.log"

# review BODY COUNT [CLIENTS [H2LOAD ARGS...]]: COUNT requests over HTTP/1.1,
# then over HTTP/2 with 4 streams per client (scripts/bench.sh's loads).
review() {
    local body=$1 count=$2 clients=${3:-4}
    shift $(($# < 3 ? $# : 3))
    local common=(-n "$count" -c "$clients" -t 1 -d "$body" -H 'content-type: application/json' "$@")
    local url="https://127.0.0.1:$WEBHOOK_PORT/mutate"
    h2load "${common[@]}" --h1 "$url" >"$WORK/h2load.txt" 2>&1
    h2load "${common[@]}" -m 4 --npn-list=h2 "$url" >>"$WORK/h2load.txt" 2>&1
    grep -q "^requests: .* 0 errored" "$WORK/h2load.txt" ||
        { echo "hot-symbols: requests with $body failed:" >&2; cat "$WORK/h2load.txt" >&2; exit 1; }
}
for body in tests/golden/requests/*.json; do
    review "$body" 20
done
# The benchmark's pods, at saturation and at a fixed rate.
MUTATE_WRITE_BODIES="$WORK/bodies" cargo bench --locked --quiet --bench mutate >/dev/null
for pod in chiller-api 60-containers 600KB; do
    review "$WORK/bodies/$pod.json" 400 16
done
review "$WORK/bodies/chiller-api.json" 2000 16
review "$WORK/bodies/chiller-api.json" 320 16 --rps 2
for path in readyz livez metrics; do
    curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN_PORT/$path"
done

kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
SERVER_PID=""

python3 - "$WORK/callgrind.out" "$(basename "$BIN")" layout/hot-symbols.txt "$(rustc --version)" <<'EOF'
import re
import sys

profile, binary, out, rustc = sys.argv[1:]
# Exclusive instruction counts per function of the binary itself. A cost line
# right after `calls=` is the callee's inclusive cost and is not counted.
cost = {}
in_binary = False
function = None
skip_next = False
for line in open(profile, encoding="utf-8", errors="replace"):
    if line.startswith("ob="):
        in_binary = line[3:].strip().endswith("/" + binary)
    elif line.startswith("fl=") or line.startswith("fi=") or line.startswith("fe="):
        pass
    elif line.startswith("fn="):
        function = line[3:].strip() if in_binary else None
    elif line.startswith("calls="):
        skip_next = True
    elif line[:1].isdigit() or line[:1] in "+-*":
        if skip_next:
            skip_next = False
        elif function:
            parts = line.split()
            if len(parts) >= 2:
                cost[function] = cost.get(function, 0) + int(parts[1])
    elif line.startswith(("cob=", "cfi=", "cfl=", "cfn=")):
        pass

symbols = {}
for name, instructions in cost.items():
    name = re.sub(r"'\d+$", "", name)  # callgrind's recursion-depth suffix
    if name.startswith("0x") or name.startswith("("):
        continue
    # LLVM names the local functions it promotes `NAME.llvm.<hash>`, the
    # hash taken from where the crate was built: a build in another
    # directory (the image's /src) never has them.
    if ".llvm." in name:
        continue
    symbols[name] = symbols.get(name, 0) + instructions
ordered = sorted(symbols, key=lambda name: (-symbols[name], name))
with open(out, "w") as f:
    f.write("# Generated by scripts/hot-symbols.sh: the functions serve runs, hottest first.\n")
    f.write("# build.rs passes this file to the linker (--symbol-ordering-file).\n")
    f.write(f"# Made with {rustc}\n")
    for name in ordered:
        f.write(name + "\n")
print(f"hot-symbols: {len(ordered)} functions written to {out}")
EOF
