"""Streaming sufficient statistics on a GPT-2-small-sized scores file: time and peak memory.

Target (issue 2): 32,491 edges x 1,000 inputs x 3 methods (~97 M rows) summarised
within 6 GiB of memory. The baseline is pyarrow reading the same file into an
Arrow table, run in this process's children so each gets its own peak-RSS figure.

    python benchmarks/bench_scores.py                 # GPT-2-small scale (writes ~0.5 GB once)
    python benchmarks/bench_scores.py --layers 4 --heads 4 --inputs 200   # quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
mode, path = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if mode == "read":
    import pyarrow.parquet as pq
    rows = pq.read_table(path).num_rows
else:
    from bayescirc.scores import sufficient_statistics
    stats = sufficient_statistics(path)
    rows = int((stats.n * stats.patterns.sum(1)).sum())
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "rows": rows,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run_child(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--exact-inputs", type=int, default=None, help="default: all inputs (3 methods on every input)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "bayescirc-bench")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from bayescirc.simulation import SimulationConfig, write_simulation

    n_exact = args.inputs if args.exact_inputs is None else args.exact_inputs
    config = SimulationConfig(n_layers=args.layers, n_heads=args.heads, n_inputs=args.inputs, n_exact=n_exact, seed=0)
    path = args.dir / f"scores-L{args.layers}-H{args.heads}-N{args.inputs}-X{n_exact}.parquet"
    if not path.exists():
        t = time.perf_counter()
        write_simulation(path, config, progress=True)
        print(f"wrote {path} in {time.perf_counter() - t:.1f} s")
    size = path.stat().st_size / 2**20

    read = min((run_child("read", path) for _ in range(args.repeats)), key=lambda r: r["seconds"])
    stats = min((run_child("stats", path) for _ in range(args.repeats)), key=lambda r: r["seconds"])
    print(f"file: {path.name}, {read['rows']:,} rows, {size:.0f} MiB")
    print(f"{'':28}{'seconds':>10}{'peak RSS GiB':>14}")
    print(f"{'pyarrow read_table':28}{read['seconds']:>10.2f}{read['peak_rss_gib']:>14.2f}")
    print(f"{'sufficient_statistics':28}{stats['seconds']:>10.2f}{stats['peak_rss_gib']:>14.2f}")
    print(f"ratio stats/read: {stats['seconds'] / read['seconds']:.2f}x; "
          f"memory target 6 GiB: {'met' if stats['peak_rss_gib'] <= 6 else 'MISSED'}")
    assert stats["rows"] == read["rows"], "statistics did not see every row"


if __name__ == "__main__":
    main()
