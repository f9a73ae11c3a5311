#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kube-scheduler from
# the modules pinned in go.mod into OUT_DIR (default: .tools/cluster/bin of the
# repository). Skips the build when the binaries match go.sum already.
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-../../.tools/cluster/bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if ! command -v go >/dev/null; then
  echo "Go is missing: the local control plane is built from Go modules." >&2
  echo "Install Go 1.26 or newer (https://go.dev/doc/install, or Debian's golang-go if it is new enough)." >&2
  exit 1
fi

stamp="$out/.built-from"
want=$(sha256sum go.mod go.sum build.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

kube_version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' go.mod)
major=${kube_version#v}; major=${major%%.*}
minor=${kube_version#v*.}; minor=${minor%%.*}
version_pkg=k8s.io/component-base/version
ldflags="-s -w -X $version_pkg.gitVersion=$kube_version -X $version_pkg.gitMajor=$major -X $version_pkg.gitMinor=$minor"
ldflags="$ldflags -X $version_pkg.gitTreeState=clean -X $version_pkg.buildDate=1970-01-01T00:00:00Z"

echo "building the control plane ($kube_version) into $out; a cold build takes a while" >&2
start=$SECONDS
go build -o "$out/" -ldflags "$ldflags" tool
mv "$out/server" "$out/etcd"
echo "$want" > "$stamp"
echo "control plane built in $((SECONDS - start)) s" >&2
