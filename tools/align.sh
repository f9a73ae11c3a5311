#!/usr/bin/env bash
# Lifts the dependencies a tool module shares with tools/cluster to the
# cluster's versions where the module's own are older, so that Go's build
# cache compiles the shared packages (k8s.io/client-go, k8s.io/api,
# go-openapi, ...) once for all of them: a package is reused only when its
# version and those of everything it imports are the same.
#
#   tools/align.sh MODULE...   e.g. prometheus prometheus-operator kwok
#
# Run it after tools/cluster/update.sh or a bump of MODULE. Only versions
# older than the cluster's are lifted; nothing is lowered. The node's tools
# (containerd, runc, ...) are left as their releases pin them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
(($# > 0)) || { echo "usage: tools/align.sh MODULE..." >&2; exit 2; }

# The module versions a tool module's binaries are built from (a replaced
# module's replacement version: tools/cluster pins its staging modules so).
built_from() {
  (cd "$here/$1" && go list -deps -f \
    '{{with .Module}}{{.Path}} {{with .Replace}}{{.Version}}{{else}}{{$.Module.Version}}{{end}}{{end}}' tool) |
    sort -u
}

cluster=$(mktemp)
trap 'rm -f "$cluster"' EXIT
built_from cluster >"$cluster"
for module in "$@"; do
  [ "$module" != cluster ] && [ -f "$here/$module/go.mod" ] || { echo "no tool module tools/$module" >&2; exit 2; }
  lifts=$(built_from "$module" | python3 -c '
import re, sys
def order(version):
    core, _, pre = version.lstrip("v").split("+")[0].partition("-")
    return ([int(n) for n in re.findall(r"\d+", core)], pre == "", pre)
cluster = dict(line.split() for line in open(sys.argv[1]) if len(line.split()) == 2)
for line in sys.stdin:
    fields = line.split()
    if len(fields) == 2 and fields[0] in cluster and order(cluster[fields[0]]) > order(fields[1]):
        print(f"{fields[0]}@{cluster[fields[0]]}")
' "$cluster")
  if [ -z "$lifts" ]; then
    echo "tools/$module: nothing to lift"
    continue
  fi
  echo "tools/$module: lifting $(wc -l <<<"$lifts") modules to the cluster's versions"
  # shellcheck disable=SC2086 # one module@version a word
  (cd "$here/$module" && go get $lifts && go mod tidy)
done
