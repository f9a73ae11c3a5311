#!/usr/bin/env bash
# Builds the Go tools of one module under tools/ (its `tool` directives,
# pinned by its go.mod and go.sum) into OUT_DIR, default .tools/MODULE/bin of
# the repository. A stamp of go.mod, go.sum, the module's own Go files and
# this script skips a build that is already current, so only the first run on
# a machine compiles.
#
#   tools/build.sh MODULE [OUT_DIR]
#     MODULE: cluster|prometheus-operator|prometheus|statsd-exporter|postgres-exporter|kwok|helm
#             or one of the real test node's: runc|containerd|cni-plugins|crictl|coredns
#
# The node's tools are separate modules on purpose: in one module with the
# kubelet (tools/cluster), MVS lifts ~40 of the kubelet's dependencies
# (cilium/ebpf, opencontainers/cgroups, containerd/api, ...) to versions that
# no upstream release was tested with.
#
# Everything is static (CGO_ENABLED=0, as the upstream images are built), since
# several of these binaries run in minimal container images; only runc uses cgo
# (libseccomp: Debian libseccomp-dev, which scripts/system-packages.sh installs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
module=${1:?usage: tools/build.sh MODULE [OUT_DIR]}
dir="$here/$module"
[ -f "$dir/go.mod" ] || { echo "no Go module tools/$module" >&2; exit 2; }
out=${2:-$here/../.tools/$module/bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if ! command -v go >/dev/null; then
  echo "Go is missing: tools/$module is built from pinned Go modules." >&2
  echo "Install Go 1.26 or newer (https://go.dev/doc/install)." >&2
  exit 1
fi

# One build of a module at a time: test processes running side by side may
# ask for the same module; the second waits and then finds it current.
exec 9>"$out/.build.lock"
flock 9

stamp="$out/.built-from"
want=$(cat "$dir/go.mod" "$dir/go.sum" "$0" $(find "$dir" -name '*.go' | sort) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# A module's version in go.mod, in a require block or on a `require` line.
version_of() {
  awk -v m="$1" '$1 == "require" { $1 = ""; $0 = $0 } $1 == m { print $2; exit }' "$dir/go.mod"
}
common_version=github.com/prometheus/common/version
cgo=0
tags=
ldflags="-s -w"
case "$module" in
  cluster)
    # /version must be real: the sidecar's `auto` mode reads it.
    kube=$(version_of k8s.io/kubernetes)
    major=${kube#v}; major=${major%%.*}
    minor=${kube#v*.}; minor=${minor%%.*}
    v=k8s.io/component-base/version
    ldflags="$ldflags -X $v.gitVersion=$kube -X $v.gitMajor=$major -X $v.gitMinor=$minor"
    ldflags="$ldflags -X $v.gitTreeState=clean -X $v.buildDate=1970-01-01T00:00:00Z"
    ;;
  prometheus)
    # Service discovery for Kubernetes only (what the operator configures):
    # Prometheus's own build tags leave out the cloud SDKs, 215 of 1,470
    # packages.
    tags="remove_all_sd enable_kubernetes_sd"
    # Module v0.3MM.P is Prometheus v3.MM.P.
    v=$(version_of github.com/prometheus/prometheus); v=${v#v0.}
    ldflags="$ldflags -X $common_version.Version=3.$((10#${v%%.*} - 300)).${v#*.}"
    ;;
  prometheus-operator)
    v=$(version_of github.com/prometheus-operator/prometheus-operator)
    ldflags="$ldflags -X $common_version.Version=${v#v}"
    ;;
  statsd-exporter)
    v=$(version_of github.com/prometheus/statsd_exporter)
    ldflags="$ldflags -X $common_version.Version=${v#v}"
    ;;
  postgres-exporter)
    v=$(version_of github.com/prometheus-community/postgres_exporter)
    ldflags="$ldflags -X $common_version.Version=${v#v}"
    ;;
  helm)
    ldflags="$ldflags -X helm.sh/helm/v4/internal/version.version=$(version_of helm.sh/helm/v4)"
    ;;
  runc)
    # As upstream's Makefile, without libpathrs (a Rust library Debian lacks).
    cgo=1
    tags="seccomp urfave_cli_no_docs"
    v=$(version_of github.com/opencontainers/runc)
    ldflags="$ldflags -X main.version=${v#v}"
    if [ ! -f /usr/include/seccomp.h ]; then
      echo "tools/runc needs libseccomp's headers: install Debian's libseccomp-dev (make system-packages)" >&2
      exit 1
    fi
    ;;
  containerd)
    tags="no_btrfs no_devmapper no_zfs urfave_cli_no_docs"
    ldflags="$ldflags -X github.com/containerd/containerd/v2/version.Version=$(version_of github.com/containerd/containerd/v2)"
    ;;
  cni-plugins)
    ldflags="$ldflags -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$(version_of github.com/containernetworking/plugins)"
    ;;
  crictl)
    ldflags="$ldflags -X sigs.k8s.io/cri-tools/pkg/version.Version=$(version_of sigs.k8s.io/cri-tools)"
    ;;
  coredns)
    # The version is a constant in coremain; no commit is known for a module
    # from the proxy, so GitCommit names the pinned module version.
    ldflags="$ldflags -X github.com/coredns/coredns/coremain.GitCommit=$(version_of github.com/coredns/coredns)"
    ;;
esac

echo "building tools/$module into $out (a cold build takes minutes)" >&2
start=$SECONDS
# No DWARF: -w drops it at link time anyway, and not generating it saves 7% of
# a cold compile (helm: 133 s instead of 142). benches/go-webhook/build.sh
# passes the same flags, so that the two share compiled packages.
(cd "$dir" && CGO_ENABLED=$cgo go build -trimpath -gcflags=all=-dwarf=false -tags "$tags" -o "$out/" -ldflags "$ldflags" tool)
# Binaries are named after the last path element of their package.
[ -f "$out/server" ] && mv "$out/server" "$out/etcd"
echo "$want" > "$stamp"
echo "tools/$module built in $((SECONDS - start)) s" >&2
