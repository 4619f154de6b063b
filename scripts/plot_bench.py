#!/usr/bin/env python3
"""Plot fold-bench results: latency percentiles per path, and discovery/lookup time against size."""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.loads(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)

lat = [l for l in results["latency"] if not l["name"].startswith("fixed rate")]
names = [l["name"] for l in lat]
fig, ax = plt.subplots(figsize=(11, 5.5))
y = range(len(lat))
for key, label, off in [("p50_us", "p50", -0.25), ("p90_us", "p90", 0.0), ("p99_us", "p99", 0.25)]:
    ax.barh([i + off for i in y], [l[key] / 1000 for l in lat], height=0.25, label=label)
ax.set_yticks(list(y))
ax.set_yticklabels(names, fontsize=8)
ax.invert_yaxis()
ax.set_xscale("log")
ax.set_xlabel("latency (ms, log scale)")
ax.set_title(f"foldmesh round trips, 1 KiB payload — {results['machine']}")
ax.legend()
fig.tight_layout()
fig.savefig(out / "latency.png", dpi=110)

fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
md = results.get("mdns_convergence_s", [])
if md:
    a1.plot([m[0] for m in md], [m[1] * 1000 for m in md], "o-", label="after the last host was ready")
    a1.plot([m[0] for m in md], [m[2] * 1000 for m in md], "s--", label="from the first start")
    a1.set_xlabel("hosts (network namespaces)")
    a1.set_ylabel("until every host is connected to all (ms)")
    a1.set_title("mDNS discovery convergence")
    a1.legend(fontsize=8)
dht = results.get("dht_lookup", [])
if dht:
    a2.plot([d["nodes"] for d in dht], [d["p50_ms"] for d in dht], "o-", label="p50")
    a2.plot([d["nodes"] for d in dht], [d["p90_ms"] for d in dht], "s--", label="p90")
    a2b = a2.twinx()
    a2b.plot([d["nodes"] for d in dht], [d["mean_requests"] for d in dht], "^:", color="gray", label="requests")
    a2b.set_ylabel("requests per lookup (mean)")
    a2.set_xlabel("nodes (memory transport)")
    a2.set_ylabel("provider lookup (ms)")
    a2.set_title("Kademlia provider lookup")
    a2.legend(fontsize=8, loc="upper left")
fig.tight_layout()
fig.savefig(out / "scaling.png", dpi=110)
print(f"wrote {out / 'latency.png'} and {out / 'scaling.png'}")
