#!/usr/bin/env bash
# Runs a chiller-metrics binary under heaptrack with the same pid, so that
# what measures it (make scale's /proc readings, its SIGTERM) sees the
# program itself. Used as make scale's SCALE_SERVE_BINARY with the test run
# directly (`make scale` sets its own); docs/development.md has the commands.
#
# heaptrack hooks malloc, so the binary must be built without mimalloc
# (the system-allocator feature). The profile is written when it exits.
set -euo pipefail
binary=${HEAPTRACK_BINARY:?the chiller-metrics binary to profile, built with --features system-allocator}
out=${HEAPTRACK_OUT:?the profile to write, ending in .zst}
lib=${HEAPTRACK_LIB:-/usr/lib/heaptrack}
fifo=$(mktemp -u)
mkfifo "$fifo"
# The interpreter reads what the preloaded library writes until the program exits.
("$lib/libexec/heaptrack_interpret" <"$fifo" | zstd -q -o "$out" -f; rm -f "$fifo") &
export DUMP_HEAPTRACK_OUTPUT=$fifo
export LD_PRELOAD=$lib/libheaptrack_preload.so${LD_PRELOAD:+:$LD_PRELOAD}
exec "$binary" "$@"
