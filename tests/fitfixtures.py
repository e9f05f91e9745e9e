"""FitResults built by hand, following the contract of ``bayescirc.posterior`` (no fit needed)."""

from __future__ import annotations

import types

import numpy as np
import pandas as pd

from bayescirc import schema
from bayescirc.posterior import FitResult

# The 3-edge graph used across the circuit tests: input -> m0 -> logits plus input -> logits.
A, B, C = "input->m0", "m0->logits", "input->logits"
THREE_EDGES = (A, B, C)


def make_fit(edges, inclusion=None, mu=None, tau=None, chains=1, metadata=None) -> FitResult:
    """A FitResult whose posterior holds the given ``[draws, edges]`` arrays (split into ``chains``)."""
    import arviz as az

    arrays = {"inclusion": inclusion, "mu": mu, "tau": tau}
    shape = next(np.shape(v) for v in arrays.values() if v is not None)
    n_draws, n_edges = shape
    posterior = {}
    for name, value in arrays.items():
        value = np.zeros(shape) if value is None else np.asarray(value, dtype=float)
        if name == "tau" and arrays["tau"] is None:
            value = np.ones(shape)
        posterior[name] = value.reshape(chains, n_draws // chains, n_edges)
    idata = az.from_dict(posterior=posterior, coords={schema.DIM_EDGE: list(edges)},
                         dims={k: [schema.DIM_EDGE] for k in posterior})
    mu_draws = posterior["mu"].reshape(n_draws, n_edges)
    incl = posterior["inclusion"].reshape(n_draws, n_edges)
    table = pd.DataFrame({
        "edge": list(edges), "inclusion_prob": incl.mean(0), "effect_mean": mu_draws.mean(0),
        "effect_sd": mu_draws.std(0), "effect_hdi_low": mu_draws.min(0), "effect_hdi_high": mu_draws.max(0),
        "intrinsic_sd": posterior["tau"].reshape(n_draws, n_edges).mean(0),
    })
    summary = {"inference": "nuts", "n_edges": n_edges, "n_inputs": 10, "hdi_prob": 0.9}
    return FitResult(idata=idata, edges=table, summary=summary, metadata=metadata or {"hdi_prob": 0.9})


def four_draw_fit() -> FitResult:
    """Four draws with 0/1 inclusion, so Bernoulli sampling is deterministic.

    draw 0: {A, B, C}; draw 1: {A, B}; draw 2: {A, C} -> pruned {C} (m0 reaches no logits); draw 3: {C}.
    """
    inclusion = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 1], [0, 0, 1]], dtype=float)
    return make_fit(THREE_EDGES, inclusion=inclusion, mu=inclusion * 2.0)


# Stand-in for the collector's patching: a linear toy where each edge adds a fixed amount to the metric.
CONTRIBUTION = {A: 1.0, B: 1.0, C: 2.0}


def fake_patching(calls):
    def evaluate_circuits(model, task, circuits, *, metric, inputs, device, dtype, batch_size, progress):
        calls.append({"circuits": [set(c) for c in circuits], "inputs": list(inputs), "metric": metric,
                      "progress": progress})
        n = len(inputs)
        corrupted = np.zeros(n)
        clean = np.full(n, sum(CONTRIBUTION.values()))
        values = np.array([[sum(CONTRIBUTION[e] for e in c)] * n for c in circuits])
        return types.SimpleNamespace(input_ids=np.array(inputs), values=values, clean=clean, corrupted=corrupted)
    return types.SimpleNamespace(evaluate_circuits=evaluate_circuits)
