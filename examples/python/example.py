"""example.py: load a schema, write records, query them, read a field's history, and show a
refused call, against a running fold-node (default FOLD_ADDR or 127.0.0.1:50051). Prints one
JSON line per step. Run examples/python/gen_stubs.sh first."""

import argparse
import json
import os
import sys

from fold_client import FoldClient, FoldError

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = os.path.join(HERE, "..", "schemas", "sensor_readings.json")


def show(step, value):
    print(json.dumps({"step": step, "result": value}, sort_keys=True), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--addr", default=os.environ.get("FOLD_ADDR", "127.0.0.1:50051"))
    ap.add_argument("--tls-ca", default=os.environ.get("FOLD_TLS_CA"))
    args = ap.parse_args()

    client = FoldClient(args.addr, ca=args.tls_ca)
    with open(SCHEMA) as f:
        show("load_schema", client.load_schema(f.read(), approve=True))
    show("list_schemas", client.list_schemas())

    show("create", client.mutate("SensorReadings", "create",
                                 {"sensor_id": "py-1", "celsius": 20.5, "location": "attic"}))
    show("create", client.mutate("SensorReadings", "create", {"sensor_id": "py-2", "celsius": 18}))
    show("update", client.mutate("SensorReadings", "update", {"sensor_id": "py-1", "celsius": 21}))

    show("query", client.query("SensorReadings", ["celsius", "location"], prefix="py-"))
    show("history", client.history("SensorReadings", "celsius", key="py-1"))

    # Page through a larger result, two records a page.
    for i in range(3, 8):
        client.mutate("SensorReadings", "create", {"sensor_id": f"py-{i}", "celsius": i})
    pages = list(client.query_pages("SensorReadings", ["celsius"], page_size=2, prefix="py-"))
    show("pages", {"pages": len(pages), "keys": [r["key"] for p in pages for r in p]})

    try:
        client.query("NoSuchSchema", ["x"])
    except FoldError as e:
        show("error", {"code": e.code, "message": e.message})
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
