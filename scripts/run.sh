#!/usr/bin/env bash
# Build foldmesh (release) and start a working node: the p2p-sidecar and the fold-node, sharing
# ./data, with their defaults (gRPC on 127.0.0.1:50051, libp2p on 127.0.0.1:4001, metrics on
# 127.0.0.1:9464 and :9465). Ctrl-C (or SIGTERM) stops both. Extra arguments are passed to
# fold-node; use the FOLD_* environment variables to configure either process.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "==> building (cargo build --release; the first build takes a few minutes)" >&2
cargo build --release --locked -p fold-node -p p2p-sidecar -p foldctl

BIN="$ROOT/target/release"
pids=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

"$BIN/p2p-sidecar" &
pids+=("$!")
"$BIN/fold-node" "$@" &
pids+=("$!")

cat >&2 <<'MSG'
==> foldmesh node starting (data in ./data):
      gRPC API      127.0.0.1:50051   try: target/release/foldctl status  (or foldctl check)
      libp2p        /ip4/127.0.0.1/tcp/4001, /ip4/127.0.0.1/udp/4001/quic-v1
      metrics       http://127.0.0.1:9464/metrics (node), http://127.0.0.1:9465/metrics (sidecar)
    Ctrl-C stops both processes.
MSG

# If either process ends, stop the other one too.
wait -n "${pids[@]}"
status=$?
stop
exit "$status"
