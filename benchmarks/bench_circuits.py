"""Sampling + pruning posterior circuits on GPT-2 small's graph: vectorised vs a naive per-draw loop.

Target (issue 6): 1,000 posterior circuits over the 32,491 edges of GPT-2 small,
each pruned to input->logits paths, fast enough to run on every fit. The
baseline is the same selections pruned one draw at a time with
``graph.prune_to_paths`` (the pruning EAP-IG applies), in this process; the
script checks both give the same circuits and prints times and the ratio.

    python benchmarks/bench_circuits.py                      # GPT-2 small, 1,000 draws
    python benchmarks/bench_circuits.py --rule topk:3000     # denser circuits
    python benchmarks/bench_circuits.py --layers 4 --heads 4 --draws 200   # quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def synthetic_fit(n_layers: int, n_heads: int, n_draws: int, seed: int):
    """A FitResult shaped like a real one: a planted circuit (~3% of edges, on paths) with high inclusion, the rest low."""
    import arviz as az
    import pandas as pd

    from bayescirc import schema
    from bayescirc.graph import Graph
    from bayescirc.posterior import FitResult

    rng = np.random.default_rng(seed)
    edges = list(Graph(n_layers, n_heads).edges)
    E = len(edges)
    # Planted circuit: union of random forward walks input -> logits until ~3% of the edges.
    from bayescirc.graph import parse_edge

    by_source: dict[str, list[int]] = {}
    receiver = []
    for j, name in enumerate(edges):
        info = parse_edge(name)
        by_source.setdefault(info.source, []).append(j)
        receiver.append(info.receiver)
    planted: set[int] = set()
    while len(planted) < 0.03 * E:
        node = "input"
        while node != "logits":
            j = by_source[node][rng.integers(len(by_source[node]))]
            planted.add(j)
            node = receiver[j]
    in_circuit = np.isin(np.arange(E), list(planted))
    base = np.where(in_circuit, rng.uniform(0.6, 1.0, E), rng.uniform(0.0, 0.02, E))
    noise = rng.normal(0, 0.05, (n_draws, E))
    inclusion = np.clip(base + noise, 0, 1).astype(np.float32)
    mu = (inclusion * rng.normal(0, 1, E) + rng.normal(0, 0.05, (n_draws, E))).astype(np.float32)
    chains = 2 if n_draws % 2 == 0 else 1
    posterior = {k: v.reshape(chains, n_draws // chains, E) for k, v in {"inclusion": inclusion, "mu": mu}.items()}
    idata = az.from_dict(posterior=posterior, coords={schema.DIM_EDGE: edges},
                         dims={k: [schema.DIM_EDGE] for k in posterior})
    table = pd.DataFrame({"edge": edges, "inclusion_prob": inclusion.mean(0)})
    return FitResult(idata=idata, edges=table, summary={}, metadata={})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--rule", default="slab", help="slab | topk:K | threshold:D")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from bayescirc.circuits import _select, parse_rule, sample_circuits
    from bayescirc.graph import prune_to_paths

    fit = synthetic_fit(args.layers, args.heads, args.draws, args.seed)
    edges = fit.edge_names
    print(f"graph: {args.layers} layers x {args.heads} heads = {len(edges):,} edges; {args.draws:,} draws; rule {args.rule}")

    t = time.perf_counter()
    samples = sample_circuits(fit, rule=args.rule, seed=args.seed)
    vectorised = time.perf_counter() - t

    # Baseline: the same selections (same random stream, same chunking), pruned draw by draw.
    kind, param = parse_rule(args.rule)
    values = fit.draws("inclusion" if kind == "slab" else "mu").astype(np.float32)
    rng = np.random.default_rng(args.seed)
    t = time.perf_counter()
    naive = np.zeros_like(samples.indicators)
    for start in range(0, len(values), 256):
        block = values[start:start + 256]
        selected = _select(kind, param, block if kind != "slab" else None, block if kind == "slab" else None, rng)
        for i, row in enumerate(selected):
            kept = prune_to_paths([edges[j] for j in np.flatnonzero(row)])
            naive[start + i] = np.isin(edges, list(kept))
    baseline = time.perf_counter() - t

    same = np.array_equal(naive, samples.indicators)
    print(f"circuit size: mean {samples.sizes.mean():.0f} edges (after pruning)")
    print(f"vectorised sample_circuits : {vectorised:7.2f} s  ({1e3 * vectorised / args.draws:.2f} ms/circuit)")
    print(f"naive prune_to_paths loop   : {baseline:7.2f} s  ({1e3 * baseline / args.draws:.2f} ms/circuit)")
    print(f"speed-up: {baseline / vectorised:.1f}x; identical circuits: {same}")
    t = time.perf_counter()
    summary = samples.summary()
    print(f"summaries (median circuit, credible sets, expected Jaccard, top circuits): {time.perf_counter() - t:.2f} s; "
          f"median circuit {summary['median_circuit_size']} edges, E[Jaccard] {summary['expected_jaccard']:.3f}")
    if not same:
        raise SystemExit("vectorised and naive pruning disagree")


if __name__ == "__main__":
    main()
