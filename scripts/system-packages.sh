#!/usr/bin/env bash
# Installs the Debian packages `make test` needs, when they are missing:
# with apt-get as root or through password-less sudo. Otherwise it stops with
# the one command to run, and says which tests need which package.
set -euo pipefail

# package: what needs it
declare -A needs=(
  [nghttp2-client]="h2load: tests/offline/rotation.rs and tests/offline/shutdown.rs (load during rotation and shutdown)"
  [wrk]="wrk: tests/offline/shutdown.rs (HTTP/1.1 load)"
  [curl]="curl: make demo and tests/offline/demo.rs"
  [binutils]="readelf, nm: tests/offline/portability.rs and layout.rs (the release binary's glibc versions and symbols)"
  [iproute2]="ip: tests/cluster/e2e_pods.rs (the node's network namespace and veth)"
  [iptables]="iptables: tests/cluster/e2e_pods.rs (kube-proxy)"
  [util-linux]="unshare, mount: tests/cluster/e2e_pods.rs (the node's namespaces and private mounts)"
  [libseccomp-dev]="libseccomp: tests/cluster/e2e_pods.rs (the real node's runc, built with seccomp by tools/build.sh runc)"
  [mmdebstrap]="mmdebstrap: tests/cluster/e2e_pods.rs (Debian root filesystems for the test images)"
  [gcc]="gcc: tests/cluster/e2e_pods.rs (the static pause binary; cgo for tools/build.sh runc)"
  [libc6-dev]="libc headers and static libc: tests/cluster/e2e_pods.rs (the static pause binary; cgo for tools/build.sh runc)"
)

missing=()
for package in "${!needs[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
((${#missing[@]} == 0)) && exit 0

if ! command -v apt-get >/dev/null; then
  echo "make test needs these packages (or their equivalents), which are missing:" >&2
  for package in "${missing[@]}"; do echo "  $package  ${needs[$package]}" >&2; done
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "make test needs these Debian packages, which are missing:" >&2
  for package in "${missing[@]}"; do echo "  $package  ${needs[$package]}" >&2; done
  echo "run: sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
