#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need (scripts/
# install-test-tools.sh), checks formatting and lints, builds every binary, and runs every test —
# unit, integration (real binaries over real sockets), multi-host (network namespaces; needs
# root), and the deployment checks (helm, kubernetes-validate, docker-compose).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh must run as root: the multi-host tests create network namespaces" >&2
  exit 1
fi

say "installing test tools"
scripts/install-test-tools.sh
export PATH="$ROOT/.tools/bin:$PATH"

say "cargo fmt --check"
cargo fmt --all --check

say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "cargo build (all binaries)"
cargo build --workspace --bins --locked

say "cargo test"
cargo test --workspace --locked --no-fail-fast

say "all tests passed"
