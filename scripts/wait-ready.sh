# Sourced by the scripts that start `serve` or the baseline under valgrind.
# wait_ready NAME PID ADMIN_PORT LOG: polls /readyz for up to a minute
# (valgrind starts slowly); exits the script, showing LOG, if the server
# ends or never gets ready.
wait_ready() {
    local name=$1 pid=$2 port=$3 log=$4
    for _ in $(seq 1 240); do
        curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    echo "$name: the server did not start:" >&2
    cat "$log" >&2
    exit 1
}

# with_work_dir: sets WORK to a new temporary folder and SERVER_PID to "";
# on exit, ends the server SERVER_PID names and removes WORK.
with_work_dir() {
    WORK=$(mktemp -d)
    SERVER_PID=""
    trap 'if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT
}
