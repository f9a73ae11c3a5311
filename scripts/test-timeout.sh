#!/usr/bin/env bash
# Runs one test binary under a time limit (cargo's target runner, set by
# `make test`): TEST_BINARY_TIMEOUT seconds, default 2400. When the limit
# passes it names the binary, shows the tests still running (libtest's
# "has been running for over 60 seconds" lines name them) and the process
# tree it waited for, then stops the whole group and fails.
set -uo pipefail
limit=${TEST_BINARY_TIMEOUT:-2400}
binary=$1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Its own process group, so everything the tests started goes with it.
setsid "$@" > >(tee "$log") 2>&1 &
pid=$!
deadline=$((SECONDS + limit))
while kill -0 "$pid" 2>/dev/null; do
  if ((SECONDS >= deadline)); then
    echo "TIMEOUT: $(basename "$binary") ran for more than ${limit}s" >&2
    grep -h "has been running for over" "$log" | sed 's/^/  still running: /' >&2
    echo "what it was waiting for:" >&2
    ps -o pid,etimes,stat,args --forest -g "$pid" >&2 || true
    kill -TERM -- "-$pid" 2>/dev/null
    sleep 10
    kill -KILL -- "-$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    exit 124
  fi
  sleep 1
done
wait "$pid"
