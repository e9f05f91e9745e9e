"""Fit time and peak memory against the number of edges, NUTS vs SVI, with pyarrow's read time as baseline.

Each fit runs in a child process (its own peak RSS). For every graph size it
writes a simulated scores file (exact on --exact-inputs inputs, two
approximate methods on all), times ``pyarrow.parquet.read_table`` on it, then
``fit`` with SVI and (up to --nuts-max-edges) NUTS, and prints a table. The
read is timed three times (a child process each) and the median used.

    python benchmarks/bench_fit.py                                  # small sizes, minutes
    python benchmarks/bench_fit.py --sizes 12x12 --inputs 1000 --exact-inputs 100 --no-nuts   # GPT-2 small
    BENCH_SAVE=/tmp/fit python benchmarks/bench_fit.py ...   # also time writing the fit directory
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time, warnings
os.environ.setdefault("JAX_PLATFORMS", "cpu")
mode, path, draws, chains = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None, int(sys.argv[4])
info = {}
t = time.perf_counter()
if mode == "read":
    import pyarrow.parquet as pq
    t = time.perf_counter()  # the read alone: importing pyarrow (~0.2 s) is not reading
    info["rows"] = pq.read_table(path).num_rows
else:
    from bayescirc.fitting import fit
    import jax, numpyro, bayescirc._fit_engine  # fit imports them lazily; every CLI fit pays it too
    info["import_seconds"] = time.perf_counter() - t  # JAX, NumPyro and bayescirc (~1.5-2 s)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit(path, inference=mode, chains=chains, draws=draws, progress=False)
    info["seconds"] = time.perf_counter() - t  # the fit call; writing the fit directory is timed apart
    d = res.summary["diagnostics"]
    info.update(max_r_hat=d["max_r_hat"], min_ess_bulk=d["min_ess_bulk"], divergences=d["divergences"],
                svi_final_loss=d["svi_final_loss"], timings=res.summary["settings"]["timings"])
    if os.environ.get("BENCH_SAVE"):
        t_save = time.perf_counter()
        res.save(os.environ["BENCH_SAVE"])
        info["timings"]["save"] = round(time.perf_counter() - t_save, 3)
info.setdefault("seconds", time.perf_counter() - t)
info["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(info))
"""


def child(mode, path, draws, chains):
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(draws), str(chains)],
                         capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1x2,2x4,3x6,4x8", help="comma-separated LAYERSxHEADS graphs")
    parser.add_argument("--inputs", type=int, default=200)
    parser.add_argument("--exact-inputs", type=int, default=40)
    parser.add_argument("--draws", type=int, default=0, help="draws per chain [default: fit's default]")
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--nuts-max-edges", type=int, default=600)
    parser.add_argument("--no-nuts", action="store_true")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "bayescirc-bench-fit")
    args = parser.parse_args()

    from bayescirc import simulation
    from bayescirc.graph import Graph
    from bayescirc.simulation import SimulationConfig, write_simulation

    rows = []
    for size in args.sizes.split(","):
        layers, heads = (int(x) for x in size.lower().split("x"))
        n_edges = Graph(layers, heads).n_edges
        config = SimulationConfig(n_layers=layers, n_heads=heads, n_inputs=args.inputs, n_exact=args.exact_inputs,
                                  seed=0)
        # a file from other settings or older simulation code is never reused
        tag = hashlib.sha1(repr(config).encode() + Path(simulation.__file__).read_bytes()).hexdigest()[:10]
        path = args.dir / f"fit-L{layers}-H{heads}-N{args.inputs}-X{args.exact_inputs}-{tag}.parquet"
        if not path.exists():
            write_simulation(path, config)
        reads = []
        for _ in range(3):
            res = child("read", path, 0, 0)
            if "error" in res:
                raise SystemExit(f"reading {path} failed: {res['error']}")
            reads.append(res["seconds"])
        reads.sort()
        read = {"seconds": reads[1]}  # the median of three: one read varied 1.3-5.4 s on the same file
        modes = ["svi"] + ([] if args.no_nuts or n_edges > args.nuts_max_edges else ["nuts"])
        for mode in modes:
            res = child(mode, path, args.draws, 1 if mode == "svi" else args.chains)
            row = {"graph": size, "edges": n_edges, "inputs": args.inputs, "inference": mode,
                   "fit_s": round(res.get("seconds", float("nan")), 1),
                   "import_s": round(res.get("import_seconds", float("nan")), 1), "read_s": round(read["seconds"], 3),
                   "ratio": round(res.get("seconds", float("nan")) / read["seconds"], 1),
                   "peak_gib": round(res.get("peak_rss_gib", float("nan")), 2),
                   "max_r_hat": res.get("max_r_hat"), "divergences": res.get("divergences"), "error": res.get("error")}
            row["timings"] = res.get("timings")
            row["reads_s"] = [round(r, 3) for r in reads]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\nfit: the fit call, after importing JAX and bayescirc (import, s); pyarrow read: read_table, after import")
    print("| graph | edges | inputs | inference | fit (s) | import (s) | pyarrow read (s) | fit/read | peak RSS (GiB) "
          "| max r_hat |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["error"]:
            print(f"| {r['graph']} | {r['edges']} | {r['inputs']} | {r['inference']} | FAILED: {r['error']} |")
            continue
        rh = "n/a" if r["max_r_hat"] is None else f"{r['max_r_hat']:.3f}"
        print(f"| {r['graph']} | {r['edges']} | {r['inputs']} | {r['inference']} | {r['fit_s']} | {r['import_s']} | "
              f"{r['read_s']} | {r['ratio']} | {r['peak_gib']} | {rh} |")
    print("\nSeconds per phase (statistics: read + sufficient statistics + exact matrix; start: MAP and grids;"
          " save: only with BENCH_SAVE=DIR):")
    for r in rows:
        if r.get("timings"):
            print(f"{r['graph']} {r['inference']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))


if __name__ == "__main__":
    main()
