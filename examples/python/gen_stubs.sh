#!/usr/bin/env bash
# Generate the Python gRPC stubs for the client API (fold.v1) from proto/ into
# examples/python/gen/ (gitignored), with grpcio-tools' bundled protoc: no system protoc needed.
# Needs: pip install grpcio grpcio-tools. PYTHON picks the interpreter (default python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="$HERE/gen"

"$PYTHON" -c 'import grpc_tools' 2>/dev/null || {
  echo "grpcio-tools is missing: pip install grpcio grpcio-tools (or run scripts/install-test-tools.sh)" >&2
  exit 1
}
rm -rf "$OUT"
mkdir -p "$OUT"
# grpc_tools.protoc adds its own include path, which has google/protobuf/*.proto.
"$PYTHON" -m grpc_tools.protoc \
  -I "$ROOT/proto" \
  --python_out="$OUT" \
  --grpc_python_out="$OUT" \
  "$ROOT/proto/fold/v1/fold_node.proto" \
  "$ROOT/proto/fold/v1/network.proto"
echo "stubs written to $OUT" >&2
