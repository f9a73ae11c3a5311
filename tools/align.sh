#!/usr/bin/env bash
# Aligns the tool modules on the control plane's side with tools/cluster, so
# that Go's build cache compiles the packages they share (k8s.io/client-go,
# k8s.io/api, k8s.io/apimachinery, go-openapi, golang.org/x, ...) once for
# all of them: a compiled package is reused only when its version and those
# of everything it imports are the same.
#
#   tools/align.sh MODULE...   e.g. helm prometheus prometheus-operator kwok
#
# 1. tools/cluster takes the highest version any MODULE needs of what
#    k8s.io/client-go is built from (a patch or minor of golang.org/x,
#    protobuf, ...; the MODULEs cannot go below their own).
# 2. Each MODULE takes the cluster's version of every dependency it shares
#    with the cluster where its own is older.
# Nothing is ever lowered. tools/cluster/update.sh runs it after a bump of
# Kubernetes; run it after a bump of MODULE. The node's tools (containerd,
# runc, ...) keep the versions their releases pin.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
(($# > 0)) || { echo "usage: tools/align.sh MODULE..." >&2; exit 2; }
for module in "$@"; do
  [ "$module" != cluster ] && [ -f "$here/$module/go.mod" ] ||
    { echo "no tool module tools/$module" >&2; exit 2; }
done

# The module versions the packages PATTERN of tool module $1 are built from
# (a replaced module's replacement version: tools/cluster pins its staging
# modules so).
built_from() {
  local module=$1
  shift
  (cd "$here/$module" && go list -deps -f \
    '{{with .Module}}{{.Path}} {{with .Replace}}{{.Version}}{{else}}{{$.Module.Version}}{{end}}{{end}}' "$@") |
    sort -u
}

# Reads "path version" lines; prints path@version of each line whose version
# is newer than the one FILE gives for that path.
newer_than() {
  python3 -c '
import re, sys
def order(version):
    core, _, pre = version.lstrip("v").split("+")[0].partition("-")
    return ([int(n) for n in re.findall(r"\d+", core)], pre == "", pre)
base = dict(line.split() for line in open(sys.argv[1]) if len(line.split()) == 2)
best = {}
for line in sys.stdin:
    fields = line.split()
    if len(fields) == 2 and fields[0] in base and order(fields[1]) > order(base[fields[0]]):
        if fields[0] not in best or order(fields[1]) > order(best[fields[0]]):
            best[fields[0]] = fields[1]
for path, version in sorted(best.items()):
    print(f"{path}@{version}")
' "$1"
}

# lift MODULE LIFTS: go get each path@version of LIFTS in tools/MODULE.
lift() {
  if [ -z "$2" ]; then
    echo "tools/$1: nothing to lift"
    return
  fi
  echo "tools/$1: lifting $(wc -l <<<"$2") modules: $(tr '\n' ' ' <<<"$2")"
  # shellcheck disable=SC2086 # one path@version a word
  (cd "$here/$1" && go get $2 && go mod tidy)
}

base=$(mktemp)
trap 'rm -f "$base"' EXIT
client=k8s.io/client-go/kubernetes
built_from cluster "$client" >"$base"
lift cluster "$(for module in "$@"; do
  if (cd "$here/$module" && go list -deps tool | grep -qx "$client"); then
    built_from "$module" "$client"
  fi
done | newer_than "$base")"

built_from cluster tool >"$base"
for module in "$@"; do
  # The cluster's versions where the module's are older: the cluster's
  # list is the base, so the comparison is turned around.
  lift "$module" "$(built_from "$module" tool | python3 -c '
import sys
ours = dict(line.split() for line in open(sys.argv[1]) if len(line.split()) == 2)
for line in sys.stdin:
    fields = line.split()
    if len(fields) == 2 and fields[0] in ours:
        print(fields[0], ours[fields[0]])
' "$base" | newer_than <(built_from "$module" tool))"
done
