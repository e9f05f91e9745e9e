"""Collector speed: batched exact patching vs one hooked forward per edge, EAP vs one forward+backward.

Run from the repository root:

    PYTHONPATH=. python benchmarks/bench_collect.py            # tiny model + GPT-2-small shape (CPU: partial)
    PYTHONPATH=. python benchmarks/bench_collect.py --tiny-only
    PYTHONPATH=. python benchmarks/bench_collect.py --device cuda --big-inputs 100   # on a GPU

Figures (baselines run in the same process, on the same model and inputs):

- exact: seconds per (edge, input) of the engine (rows of one pass patch different
  edges, starting at the receiver's block from the cached clean residual) against
  the naive reference, one full ``run_with_hooks`` forward per edge and input.
- eap: seconds per input of ``eap`` (corrupted forward + clean forward/backward +
  the score contraction) against one plain forward+backward of the same batch.
- inputs/s of each method. On a GPT-2-small-shaped model (12 layers, 12 heads,
  d_model 768, vocabulary 50257, random weights) exact scores of all 32,491 edges
  are timed on a slice of receiver layers when the device is a CPU and
  extrapolated by remaining depth (the printed estimate says so).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tinymodel import make_tiny_model, tiny_task_rows  # noqa: E402

from bayescirc.bridge import load_model, scoring_mode  # noqa: E402
from bayescirc.collection import prepare_inputs  # noqa: E402
from bayescirc.graph import edge_table, parse_edge, receiver_hook  # noqa: E402
from bayescirc.patching import Engine  # noqa: E402


def _task(n: int):
    import pandas as pd

    rows = [r for r in tiny_task_rows() if r["clean"].startswith("When")]  # one length
    return pd.DataFrame([rows[i % len(rows)] for i in range(n)])


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def naive_exact_seconds(model, batch, edges, run, source_index):
    """Seconds per (edge, input) of one full hooked forward per edge (the reference loop)."""
    L = model.cfg.n_layers
    n = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(len(batch)):
            for edge in edges:
                info = parse_edge(edge)
                hook = receiver_hook(info.receiver, info.qkv, L)
                delta = run.diff[b, :, source_index[info.source]]

                def add(x, hook, head=hook.head, delta=delta):
                    x = x.clone()
                    if head is None:
                        x[0] += delta
                    else:
                        x[0, :, head] += delta
                    return x

                model.run_with_hooks(batch.clean[b:b + 1], fwd_hooks=[(hook.name, add)])
                n += 1
    _sync(run.diff.device)
    return (time.perf_counter() - t0) / n


def bench(model, n_inputs: int, label: str, naive_edges: int | None, exact_layers: int | None, ig_steps: int = 5):
    with scoring_mode(model) as graph:
        engine = Engine(model, graph)
        (batch,), _ = prepare_inputs(model, _task(n_inputs))
        E, B = graph.n_edges, len(batch)
        device = engine.device
        print(f"\n== {label}: {graph.n_layers} layers x {graph.n_heads} heads, {E:,} edges, {B} inputs of "
              f"{batch.clean.shape[1]} tokens, d_model {model.cfg.d_model}, vocab {model.cfg.d_vocab}, device {device}")

        # plain forward + backward of the same batch (the EAP baseline)
        def plain():
            logits = model(batch.clean)[:, -1]
            value = logits.gather(-1, batch.answer[:, None]) - logits.gather(-1, batch.distractor[:, None])
            value.sum().backward()
            model.zero_grad(set_to_none=True)
        plain()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            plain()
        _sync(device)
        t_plain = (time.perf_counter() - t0) / 3

        def eap():
            run = engine.prepare(batch, grads=True)
            return run, engine.gradient_scores("eap", batch, run)
        eap()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            run, _ = eap()
        _sync(device)
        t_eap = (time.perf_counter() - t0) / 3
        print(f"eap: {t_eap / B * 1e3:.2f} ms/input vs plain forward+backward {t_plain / B * 1e3:.2f} ms/input "
              f"-> ratio {t_eap / t_plain:.2f}x ; {B / t_eap:.1f} inputs/s")

        t0 = time.perf_counter()
        run = engine.prepare(batch, grads=True)
        _sync(device)
        t_prepare = time.perf_counter() - t0  # EAP-IG shares the clean/corrupted runs, not EAP's contraction
        t0 = time.perf_counter()
        engine.gradient_scores("eap-ig-inputs", batch, run, steps=ig_steps)
        _sync(device)
        t_ig = time.perf_counter() - t0 + t_prepare
        print(f"eap-ig-inputs ({ig_steps} steps): {B / t_ig:.1f} inputs/s")

        run = engine.prepare(batch, resid=True)
        if exact_layers is None:
            t0 = time.perf_counter()
            engine.exact_scores(batch, run, rows=256)
            _sync(device)
            t_exact = time.perf_counter() - t0
            per = t_exact / (E * B)
            print(f"exact (all edges): {per * 1e6:.1f} us per edge-input, {B / t_exact:.2f} inputs/s")
        else:
            # time the receiver layers >= L - exact_layers, extrapolate by remaining depth
            L = graph.n_layers
            mask = engine.edge_layer >= L - exact_layers
            saved = engine.edge_layer.copy()
            engine.edge_layer = np.where(mask, saved, -1)
            t0 = time.perf_counter()
            engine.exact_scores(batch, run, rows=256)
            _sync(device)
            t_part = time.perf_counter() - t0
            engine.edge_layer = saved
            depth = np.where(saved == L, 0.25, L - saved)  # logits rows need no block
            est = t_part * depth.sum() / depth[mask].sum()
            per = t_part / (mask.sum() * B)
            print(f"exact, receivers in the last {exact_layers} layer(s) + logits ({mask.sum():,} edges): "
                  f"{per * 1e6:.1f} us per edge-input; all {E:,} edges estimated {est / B:.1f} s/input "
                  f"(extrapolated by remaining depth)")
        if naive_edges:
            rng = np.random.default_rng(0)
            pick = rng.choice(E, size=min(naive_edges, E), replace=False) if naive_edges < E else np.arange(E)
            edges = [graph.edges[i] for i in pick]
            if exact_layers is not None:
                layer = edge_table(edges, n_layers=L)[0]["receiver_layer"]  # logits: layer L, after the last block
                edges = [e for e, r in zip(edges, layer) if r >= L - exact_layers] or edges
            naive = naive_exact_seconds(model, batch.take(np.arange(min(B, 2))), edges, run, engine.source_index)
            print(f"naive exact (one hooked forward per edge): {naive * 1e6:.1f} us per edge-input "
                  f"-> batched exact is {naive / per:.1f}x faster")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inputs", type=int, default=8, help="inputs (tiny model)")
    parser.add_argument("--big-inputs", type=int, default=2, help="inputs (GPT-2-small shape)")
    parser.add_argument("--tiny-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = load_model(str(make_tiny_model(Path(tmp) / "tiny")), device=args.device)
        bench(tiny, args.inputs, "tiny GPT-2", naive_edges=10**9, exact_layers=None)
        if args.tiny_only:
            return
        big_dir = make_tiny_model(Path(tmp) / "gpt2-small-shape", n_layers=12, n_heads=12, d_model=768,
                                  vocab_size=50257, n_positions=1024)
        big = load_model(str(big_dir), device=args.device)
        on_gpu = str(args.device).startswith("cuda")
        bench(big, args.big_inputs, "GPT-2-small shape (random weights)", naive_edges=200 if not on_gpu else 2000,
              exact_layers=None if on_gpu else 1)


if __name__ == "__main__":
    main()
