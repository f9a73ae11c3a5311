#!/usr/bin/env bash
# What the review path's speed machinery earns, in instructions per review
# (callgrind; stable on a busy machine, unlike timings). Each piece is
# compared with the plain way it replaces, in the same binary and run
# (benches/mutate.rs, `MUTATE_CALLGRIND`, stages documented at its `stage`):
#
#   envelope read in one pass   review            vs review-sorted (pod kept raw, viewed after)
#   borrowed pod view           pod-view          vs pod-typed, pod-value
#
# "earns" is what the plain way would add to a whole review (parse, mutate,
# verify, response bytes), as a share of today's review.
#
# Environment: PODS (default "chiller-api 60-containers 600KB"). Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."

PODS=${PODS:-chiller-api 60-containers 600KB}
command -v valgrind >/dev/null || { echo "speed-earns: valgrind is missing" >&2; exit 1; }

bench=$(cargo bench --locked --bench mutate --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "mutate" and m.get("executable"):
        print(m["executable"])')
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# per_iteration POD PATH ITERATIONS: instructions per iteration of PATH.
per_iteration() {
    local out=$WORK/$1-$2.out
    MUTATE_CALLGRIND=$1:$2:$3 valgrind --tool=callgrind --callgrind-out-file="$out" \
        --collect-atstart=no --toggle-collect='mutate::callgrind_loop' "$bench" 2>/dev/null
    awk -v n="$3" '/^(summary|totals):/ {print int($2 / n)}' "$out" | tail -1
}

printf '%-14s %-13s %12s %12s %8s\n' pod piece current plain earns
for pod in $PODS; do
    case $pod in
    chiller-api) n=200 ;;
    60-containers) n=20 ;;
    *) n=4 ;;
    esac
    review=$(per_iteration "$pod" review "$n")
    # row PIECE CURRENT PLAIN: the plain way's extra instructions over a review's.
    row() {
        awk -v pod="$pod" -v piece="$1" -v c="$2" -v p="$3" -v r="$review" \
            'BEGIN {printf "%-14s %-13s %12d %12d %7.1f%%\n", pod, piece, c, p, (p - c) * 100 / r}'
    }
    echo "$pod: review $review instructions"
    row envelope "$review" "$(per_iteration "$pod" review-sorted "$n")"
    view=$(per_iteration "$pod" pod-view "$n")
    row view/typed "$view" "$(per_iteration "$pod" pod-typed "$n")"
    row view/value "$view" "$(per_iteration "$pod" pod-value "$n")"
done
