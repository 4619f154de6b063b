#!/usr/bin/env bash
# Run every benchmark in one go (release build) and plot the results:
#   target/bench/results.json, docs/bench/latency.png, docs/bench/scaling.png
# Needs root for the mDNS phase (network namespaces); pass --no-netns to skip it.
# Installs what it needs: h2load (Debian nghttp2-client) and matplotlib (in .tools/plot).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v h2load >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  echo "==> apt-get install nghttp2-client (h2load)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null || true
fi
if [ ! -x .tools/plot/bin/python ]; then
  echo "==> matplotlib (pip, .tools/plot)" >&2
  python3 -m venv .tools/plot
  .tools/plot/bin/pip install -q --disable-pip-version-check matplotlib
fi

echo "==> cargo build --release" >&2
cargo build --release --locked -p fold-node -p p2p-sidecar -p foldmesh-bench

target/release/fold-bench --out target/bench "$@"
.tools/plot/bin/python scripts/plot_bench.py target/bench/results.json docs/bench

# Where the forwarded path's time goes: CPU per process and each hop's mean, from one more run.
echo "==> forwarded path breakdown (fold-bench forward-loop)" >&2
target/release/fold-bench --secs 5 forward-loop | tee target/bench/forward-breakdown.txt
target/release/fold-bench --secs 5 forward-loop --local | tee -a target/bench/forward-breakdown.txt

# Schema-addressed reads (route any): spread, shift off a slowed provider, kill, injected faults.
echo "==> routing (fold-bench route)" >&2
target/release/fold-bench --secs 8 --out target/bench route
# The DHT on real sidecar processes (20, 50, 100), and across NATs (NAT lab in network
# namespaces: needs root; skipped with --no-netns or when not root).
echo "==> DHT lookups on real sidecar processes (fold-bench dht-procs)" >&2
target/release/fold-bench --out target/bench dht-procs
if [ "$(id -u)" -eq 0 ] && [[ " $* " != *" --no-netns "* ]]; then
  echo "==> across NATs (fold-bench nat)" >&2
  target/release/fold-bench --n 300 --out target/bench nat --rounds 3
fi
