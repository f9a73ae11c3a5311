#!/usr/bin/env bash
# Builds the controller-runtime webhook of the benchmarks into OUT_DIR
# (default target/go-webhook), static and stripped as tools/build.sh builds the
# pinned tools; its dependencies come from go.mod and go.sum.
#
#   benches/go-webhook/build.sh [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/go-webhook}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if ! command -v go >/dev/null; then
  echo "Go is missing: the benchmarks' Go webhook is built from benches/go-webhook." >&2
  echo "Install Go 1.26 or newer (https://go.dev/doc/install)." >&2
  exit 1
fi
(cd "$here" && CGO_ENABLED=0 go build -trimpath -gcflags=all=-dwarf=false -ldflags "-s -w" -o "$out/go-webhook" .)
