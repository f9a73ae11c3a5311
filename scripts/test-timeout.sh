#!/usr/bin/env bash
# cargo's target runner in `make test`: runs one test binary.
#
# - The two integration test binaries (tests/offline, tests/cluster) run one
#   module a process and the tests of a module in parallel, as they ran when
#   each file was a binary of its own: a process has one control plane
#   (tests/support/controlplane). TEST_LANES modules (default 3) run side by
#   side, the longest first; a module's output is printed whole when it
#   ends. Each module must run every test it lists, or the run fails.
# - Every test runs under the time limit tests/time-limits gives its name.
#   libtest says when a test has run for 60 seconds; from then on it is
#   watched, and past its limit the run fails with the test's name, how long
#   it ran, the processes it waited for and where its threads were blocked;
#   then the whole process group is stopped.
# - A whole process gets TEST_BINARY_TIMEOUT seconds (default 2400) at most.
set -uo pipefail
binary=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
limits=$here/../tests/time-limits
process_limit=${TEST_BINARY_TIMEOUT:-2400}

# The limit of a test: the longest prefix of its name in tests/time-limits.
limit_of() {
  local test=$1 best=-1 limit=0 prefix seconds
  while read -r prefix seconds; do
    [[ -z $prefix || $prefix == \#* ]] && continue
    [[ $prefix == default ]] && prefix=""
    if [[ $test == "$prefix"* ]] && ((${#prefix} > best)); then
      best=${#prefix}
      limit=$seconds
    fi
  done <"$limits"
  echo "$limit"
}

# Runs the binary with the given arguments under the limits; its status.
run_watched() {
  local work status
  work=$(mktemp -d)
  : >"$work/slow"
  : >"$work/done"
  # Its own process group, so everything the tests started goes with it.
  setsid "$binary" "$@" > >(
    while IFS= read -r line; do
      printf '%s\n' "$line"
      if [[ $line =~ ^test\ (.+)\ has\ been\ running\ for\ over\ 60\ seconds ]]; then
        echo "$((SECONDS - 60)) ${BASH_REMATCH[1]}" >>"$work/slow"
      elif [[ $line =~ ^test\ (.+)\ \.\.\.\  ]]; then
        echo "${BASH_REMATCH[1]}" >>"$work/done"
      fi
    done
  ) 2>&1 &
  local pid=$! started=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    local overdue="" ran=0 limit=0 since test
    while read -r since test; do
      grep -qxF -- "$test" "$work/done" && continue
      limit=$(limit_of "$test")
      ran=$((SECONDS - since))
      if ((ran > limit)); then
        overdue=$test
        break
      fi
    done <"$work/slow"
    if [[ -z $overdue ]] && ((SECONDS - started > process_limit)); then
      overdue="$(basename "$binary") $*"
      ran=$((SECONDS - started))
      limit=$process_limit
    fi
    if [[ -n $overdue ]]; then
      {
        echo "TIMEOUT: test $overdue ran for ${ran}s, past its limit of ${limit}s (tests/time-limits)"
        while read -r since test; do
          grep -qxF -- "$test" "$work/done" || echo "  still running: $test, for $((SECONDS - since))s"
        done <"$work/slow"
        echo "the processes it waited for:"
        ps -o pid,etimes,stat,wchan:24,args --forest -g "$pid" || true
        echo "where the test process's threads were blocked (libtest names them after the tests):"
        ps -L -o tid,stat,wchan:24,comm -p "$pid" || true
      } >&2
      kill -TERM -- "-$pid" 2>/dev/null
      sleep 10
      kill -KILL -- "-$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      rm -rf "$work"
      return 124
    fi
    sleep 1
  done
  wait "$pid"
  status=$?
  rm -rf "$work"
  return "$status"
}

# Runs one module of the binary: its output printed whole once it ends; its
# status (also when it ran fewer tests than it lists). Records how long it took.
run_module() {
  local module=$1 output status ran started=$SECONDS
  shift
  output=$(mktemp)
  run_watched --exact "$@" >"$output" 2>&1
  status=$?
  ran=$(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "$output" |
    awk '{ n += $1 + $2 + $3 } END { print n + 0 }')
  if ((status == 0 && ran != $#)); then
    echo "module $module lists $# tests but ran $ran" >>"$output"
    status=1
  fi
  {
    flock 9
    echo "== $(basename "$binary"): module $module, $# tests, $((SECONDS - started)) s (lane $lane)"
    cat "$output"
    echo "$module $((SECONDS - started))" >>"$durations"
  } 9>>"$queue.lock"
  rm -f "$output"
  return "$status"
}

# The next module of the queue, taken off it; nothing once it is empty.
next_module() {
  {
    flock 9
    head -n 1 "$queue"
    sed -i 1d "$queue"
  } 9>>"$queue.lock"
}

# A lane: takes modules off the queue and runs each until the queue is empty;
# fails if any failed.
run_lane() {
  local lane=$1 module test failed=0
  while module=$(next_module) && [[ -n $module ]]; do
    names=()
    for test in "${tests[@]}"; do
      [[ ${test%::*} == "$module" ]] && names+=("$test")
    done
    run_module "$module" "${names[@]}" || failed=1
  done
  return "$failed"
}

case "$(basename "$binary")" in
offline-* | cluster-*)
  if (($# == 0)); then
    mapfile -t tests < <("$binary" --list --format terse | sed -n 's/: test$//p')
    # A module: the tests of one Rust module, without its submodules (a
    # submodule is a module, and a process, of its own).
    mapfile -t modules < <(printf '%s\n' "${tests[@]}" | sed 's/::[^:]*$//' | sort -u)
    # TEST_LANES modules at a time (default 3), each a process with a control
    # plane of its own; the longest first, by how long each took the last
    # time here (tests/module-seconds, measured on 2 cores, for a module this
    # machine has not run yet).
    durations=$(dirname "$binary")/../test-module-seconds
    touch "$durations"
    queue=$(mktemp)
    for module in "${modules[@]}"; do
      seconds=$(awk -v m="$module" '$1 == m { s = $2 } END { print s + 0 }' "$durations")
      ((seconds == 0)) &&
        seconds=$(awk -v m="$module" '$1 == m { s = $2 } END { print s + 0 }' "$here/../tests/module-seconds")
      [[ $module == e2e_* ]] && ((seconds == 0)) && seconds=100000
      echo "$seconds $module"
    done | sort -k1,1nr -s | cut -d' ' -f2 >"$queue"
    lanes=${TEST_LANES:-3}
    pids=()
    for lane in $(seq 1 "$lanes"); do
      run_lane "$lane" &
      pids+=("$!")
    done
    failed=0
    for pid in "${pids[@]}"; do
      wait "$pid" || failed=1
    done
    rm -f "$queue" "$queue.lock"
    # Only each module's latest time is kept.
    awk '{ last[$1] = $2 } END { for (m in last) print m, last[m] }' "$durations" >"$durations.new" &&
      mv "$durations.new" "$durations"
    exit "$failed"
  fi
  ;;
esac
run_watched "$@"
