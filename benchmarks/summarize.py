"""Prints a pytest-benchmark JSON as a short table: group, case, median, and the ratio to the slowest
peer in the group (how many times faster than it), plus GB/s where a benchmark recorded `bytes` and
the fraction of the machine's measured read bandwidth where it recorded `fraction_of_read`
(benchmarks/conftest.py). `python -m benchmarks.run` renders the fuller benchmarks/RESULTS.md.

    python benchmarks/summarize.py .benchmarks/.../0001_run.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def summarize(path: str) -> str:
    with open(path) as handle:
        data = json.load(handle)
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        groups[bench.get("group") or "-"].append(bench)
    machine = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
    lines = []
    if data.get("benchmarks"):
        extra = data["benchmarks"][0].get("extra_info", {})
        lines.append(f"machine: {extra.get('gpu') or machine}  torch {extra.get('torch')}  triton {extra.get('triton')}")
    lines.append(f"{'group':34s} {'case':44s} {'median':>11s} {'x slowest':>9s} {'GB/s':>8s} {'of read':>7s}")
    for group, benches in sorted(groups.items()):
        slowest = max(b["stats"]["median"] for b in benches)
        for bench in sorted(benches, key=lambda b: b["stats"]["median"]):
            median = bench["stats"]["median"]
            moved = bench.get("extra_info", {}).get("bytes")
            gbps = f"{moved / median / 1e9:8.1f}" if moved else f"{'':8s}"
            fraction = bench.get("extra_info", {}).get("fraction_of_read")
            read = f"{fraction:7.0%}" if fraction is not None else ""
            lines.append(f"{group[:34]:34s} {bench['name'][:44]:44s} {median * 1e3:9.3f}ms {slowest / median:8.2f}x {gbps} {read}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/summarize.py BENCH_JSON")
    print(summarize(sys.argv[1]))
