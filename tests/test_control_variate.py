"""SVI's control variate for subsampled edges: exact gradients, an unbiased and far quieter estimate."""

from dataclasses import replace

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numpyro.handlers import seed  # noqa: E402
from numpyro.infer.util import log_density  # noqa: E402

from bayescirc import _fit_engine as engine  # noqa: E402
from bayescirc import fitting  # noqa: E402
from bayescirc import model as bm  # noqa: E402
from bayescirc.scores import sufficient_statistics, write_scores  # noqa: E402
from bayescirc.simulation import simulate  # noqa: E402


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    path = tmp_path_factory.mktemp("cv") / "scores.parquet"
    write_scores(simulate(n_layers=2, n_heads=2, n_inputs=60, n_exact=12, seed=3).scores, path)
    stats = sufficient_statistics(path)
    _, type_idx, layer_idx, types, layers = fitting._groups(stats.edges)
    return engine.Problem.build(stats, type_idx, layer_idx, len(types), len(layers), fitting._scale(stats), 0.0,
                                "gaussian", None, None)


def moved(values: dict, rng, size: float) -> dict:
    """The globals moved by ``size`` in every unconstrained coordinate (zero-sum effects stay zero-sum)."""
    coords = bm.unconstrained(values)
    out = {}
    for k, v in coords.items():
        step = size * rng.standard_normal(np.shape(v))
        out[k] = v + (step - step.mean() if k in ("type_z", "layer_z") else step)
    return {k: jnp.asarray(v) for k, v in bm.constrained(out).items()}


def per_edge_log_lik(problem, values):
    return np.asarray(bm.globals_log_likelihood({k: jnp.asarray(v) for k, v in values.items()}, problem.data,
                                                problem.grid, problem.type_idx, problem.layer_idx, problem.scale))


def control_variate(problem, values):
    return bm.control_variate(values, problem.data, problem.grid, problem.type_idx, problem.layer_idx, problem.scale)


def test_slopes_are_each_edges_gradient_in_unconstrained_coordinates(problem):
    anchor = problem.map_values
    cv = control_variate(problem, anchor)
    np.testing.assert_allclose(cv.value, per_edge_log_lik(problem, anchor), rtol=1e-10)
    coords = bm.unconstrained(anchor)
    names = sorted(coords)
    offsets = np.cumsum([0] + [np.size(coords[k]) for k in names])
    h = 1e-5
    for name in ("sigma_type", "tau_loc", "pi", "layer_z"):  # log, identity, logit and a vector coordinate
        col = offsets[names.index(name)]
        up, down = dict(coords), dict(coords)
        up[name] = jnp.ravel(coords[name]).at[0].add(h).reshape(np.shape(coords[name]))
        down[name] = jnp.ravel(coords[name]).at[0].add(-h).reshape(np.shape(coords[name]))
        numeric = (per_edge_log_lik(problem, bm.constrained(up)) - per_edge_log_lik(problem, bm.constrained(down))) / (2 * h)
        np.testing.assert_allclose(cv.slope[:, col], numeric, rtol=1e-5, atol=1e-6 * np.abs(numeric).max())


def test_with_every_edge_the_expansion_cancels_exactly(problem, rng):
    cv = control_variate(problem, problem.map_values)
    values = moved(problem.map_values, rng, 0.1)
    plain, _ = log_density(problem.model, problem.args, {}, values)
    with_cv, _ = log_density(problem.model, (*problem.args, cv), {}, values)
    assert float(with_cv) == pytest.approx(float(plain), rel=1e-10)


def test_subsampled_estimate_is_unbiased_and_far_quieter_than_plain_subsampling(problem, rng):
    """Near the anchor (where SVI's guide sits) the remainder of the expansion is second order."""
    cv = control_variate(problem, problem.map_values)
    values = moved(problem.map_values, rng, 0.02)
    exact = float(log_density(problem.model, problem.args, {}, values)[0])
    batch = problem.data.n_edges // 5
    model = replace(problem, edge_batch=batch).model

    def estimates(args):
        one = jax.jit(lambda key, args: log_density(seed(model, key), args, {}, values)[0])
        return np.array([float(one(key, args)) for key in jax.random.split(jax.random.PRNGKey(0), 400)])

    plain, anchored = estimates(problem.args), estimates((*problem.args, cv))
    for draws in (plain, anchored):
        assert abs(draws.mean() - exact) < 4 * draws.std() / np.sqrt(len(draws)) + 1e-9 * abs(exact)
    assert anchored.std() < plain.std() / 10
