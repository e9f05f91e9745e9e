"""The collapsed per-edge likelihood equals brute-force references on per-input data."""

import dataclasses

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from scipy import integrate, stats  # noqa: E402

from bayescirc.model import (  # noqa: E402
    Globals,
    StudentTTable,
    TauGrid,
    edge_conditionals,
    edge_conditionals_repeated,
    edge_data,
    edge_log_marginal,
    gaussian_evidence,
    quadratic_form,
    student_t_parts,
    student_t_table,
)
from bayescirc.scores import sufficient_statistics  # noqa: E402

METHODS = ("eap", "ig")


def per_input_table(rng, n_inputs=7, n_exact=3, n_edges=3, methods=METHODS, missing=()):
    """Random scores; ``missing`` lists (edge, method) pairs that are never scored."""
    rows = []
    for i in range(n_inputs):
        for e in range(n_edges):
            edge = f"x{e}"
            if i < n_exact:
                rows.append((i, edge, "exact", rng.normal()))
            for m in methods:
                if (e, m) not in missing:
                    rows.append((i, edge, m, rng.normal() * 2 + 0.3))
    return pd.DataFrame(rows, columns=["input_id", "edge", "method", "score"])


def stats_of(table, tmp_path):
    path = tmp_path / "s.parquet"
    table.to_parquet(path, index=False)
    with pytest.warns(UserWarning):  # edge names outside the graph syntax
        return sufficient_statistics(path)


GROUPS = [0, 1, 0]  # the three test edges' error groups (edge types): two share one


def globals_(M, rng, T=2):
    """Approximation parameters that differ between the T error groups."""
    return Globals(alpha=jnp.asarray(rng.normal(size=(T, M)) * 0.3), beta=jnp.asarray(0.5 + rng.uniform(size=(T, M))),
                   sigma=jnp.asarray(0.5 + rng.uniform(size=(T, M))), omega=jnp.asarray(0.2 + rng.uniform(size=(T, M))),
                   slab_sd=jnp.asarray(1.7), spike_sd=0.0, pi=jnp.asarray(0.3))


def dense_moments(edge_rows, methods, g, tau, group=0, mu_var=None):
    """Mean and covariance of all of one edge's scores, theta (and optionally u) integrated, built densely."""
    obs = edge_rows.reset_index(drop=True)
    n = len(obs)
    inputs = obs["input_id"].to_numpy()
    is_exact = (obs["method"] == "exact").to_numpy()
    midx = np.array([methods.index(m) if m != "exact" else -1 for m in obs["method"]])
    slope = np.where(is_exact, 1.0, np.asarray(g.beta)[group][midx])
    offset = np.where(is_exact, 0.0, np.asarray(g.alpha)[group][midx])
    same = inputs[:, None] == inputs[None, :]
    cov = tau**2 * np.outer(slope, slope) * same
    cov += np.diag(np.where(is_exact, 0.0, np.asarray(g.sigma)[group][midx] ** 2))
    K = 1 + len(methods)
    H = np.zeros((n, K))
    H[:, 0] = slope
    for j in range(n):
        if not is_exact[j]:
            H[j, 1 + midx[j]] = 1.0
    if mu_var is not None:
        V = np.diag(np.concatenate([[mu_var], np.asarray(g.omega)[group] ** 2]))
        cov = cov + H @ V @ H.T
    return obs["score"].to_numpy(), offset, H, cov


@pytest.mark.parametrize("n_exact", [0, 3, 7])
def test_quadratic_form_matches_dense_gaussian_with_theta_integrated(tmp_path, rng, n_exact):
    table = per_input_table(rng, n_exact=n_exact, missing={(2, "ig")})
    st = stats_of(table, tmp_path)
    data, methods = edge_data(st, error_group=GROUPS)
    assert methods == list(METHODS)
    g = globals_(2, rng)
    tau = np.array([0.4, 1.3, 0.8])
    A, b, c = quadratic_form(data, jnp.asarray(tau[:, None] ** 2), g)
    for e, edge in enumerate(st.edges):
        rows = table[table.edge == edge]
        y, offset, H, cov = dense_moments(rows, list(METHODS), g, tau[e], GROUPS[e])
        for _ in range(3):
            u = rng.normal(size=3)
            want = stats.multivariate_normal(offset + H @ u, cov).logpdf(y)
            got = float(c[e, 0] - 0.5 * u @ A[e, 0] @ u + b[e, 0] @ u)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_evidence_matches_dense_gaussian_with_mu_and_delta_integrated(tmp_path, rng):
    table = per_input_table(rng, n_exact=2)
    st = stats_of(table, tmp_path)
    data, _ = edge_data(st, error_group=GROUPS)
    g = globals_(2, rng)
    tau = np.array([0.4, 1.3, 0.8])
    log_spike, log_slab = edge_log_marginal(data, jnp.asarray(tau[:, None] ** 2), g)
    for e, edge in enumerate(st.edges):
        rows = table[table.edge == edge]
        y, offset, _, cov = dense_moments(rows, list(METHODS), g, tau[e], GROUPS[e], mu_var=1.7**2)
        assert float(log_slab[e, 0]) == pytest.approx(stats.multivariate_normal(offset, cov).logpdf(y), rel=1e-9)
        y, offset, _, cov = dense_moments(rows, list(METHODS), g, tau[e], GROUPS[e], mu_var=0.0)
        assert float(log_spike[e, 0]) == pytest.approx(stats.multivariate_normal(offset, cov).logpdf(y), rel=1e-9)


@pytest.mark.parametrize("n_exact", [0, 1, 3])
def test_approximate_only_inputs_enter_through_their_mean_when_asked(tmp_path, rng, n_exact):
    """approx_mean_only: exact inputs and their approximations as before, the others as ybar ~ N(a + H u, S / n).

    With fewer than 2 exact inputs the edge keeps the full likelihood (tau would rest on the prior alone).
    """
    table = per_input_table(rng, n_inputs=9, n_exact=n_exact, missing={(2, "ig")})
    st = stats_of(table, tmp_path)
    data, _ = edge_data(st, error_group=GROUPS)
    data = dataclasses.replace(data, approx_mean_only=True)
    g = globals_(2, rng)
    tau = np.array([0.4, 1.3, 0.8])
    A, b, c = quadratic_form(data, jnp.asarray(tau[:, None] ** 2), g)
    for e, edge in enumerate(st.edges):
        rows = table[table.edge == edge]
        exact_inputs = set(rows.loc[rows.method == "exact", "input_id"])
        split = n_exact >= 2
        dense_rows = rows[rows.input_id.isin(exact_inputs)] if split else rows
        y, offset, H, cov = dense_moments(dense_rows, list(METHODS), g, tau[e], GROUPS[e])
        rest = rows[~rows.input_id.isin(exact_inputs)].pivot(index="input_id", columns="method", values="score")
        cols = [m for m in METHODS if m in rest.columns]
        idx = [METHODS.index(m) for m in cols]
        scores = rest[cols].to_numpy()
        for _ in range(3):
            u = rng.normal(size=3)
            want = stats.multivariate_normal(offset + H @ u, cov).logpdf(y)
            if split:
                mean = np.asarray(g.alpha)[GROUPS[e]][idx] + np.asarray(g.beta)[GROUPS[e]][idx] * u[0] + u[1:][idx]
                sample_cov = np.atleast_2d(np.cov(scores.T, ddof=1)) / len(scores)
                want += stats.multivariate_normal(mean, sample_cov).logpdf(scores.mean(0))
            got = float(c[e, 0] - 0.5 * u @ A[e, 0] @ u + b[e, 0] @ u)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_methods_equal_up_to_rounding_keep_the_full_likelihood(tmp_path, rng):
    """Two methods whose scores are one another up to rounding on an edge scatter in one direction only.

    Their sample covariance is then singular (an eigenvalue of 1e-19 on a real collect), which the mean
    likelihood would read as a precision of 1e19: the edge keeps the full likelihood, as for no scatter.
    Edges whose methods scatter independently still take the mean.
    """
    table = per_input_table(rng, n_inputs=12, n_exact=4)
    copy = (table.edge == "x1") & (table.method == "ig")
    eap = table.loc[(table.edge == "x1") & (table.method == "eap"), "score"].to_numpy()
    table.loc[copy, "score"] = 0.13 * eap * (1 + 1e-9 * rng.normal(size=len(eap)))
    data, _ = edge_data(stats_of(table, tmp_path), resolution=1e-6)
    assert data.pat_idx == ((0, 1),)
    assert data.pat_mean[0].tolist() == [True, False, True]
    one_method = per_input_table(rng, n_inputs=12, n_exact=4, methods=("eap",))
    data, _ = edge_data(stats_of(one_method, tmp_path), resolution=1e-6)
    assert data.pat_mean[0].tolist() == [True, True, True]


def test_exact_only_evidence_matches_numerical_integration_over_mu(rng):
    x = rng.normal(0.7, 0.5, size=9)
    A = jnp.asarray([[[len(x) / 0.25]]])
    b = jnp.asarray([[x.sum() / 0.25]])
    c = jnp.asarray([-0.5 * len(x) * np.log(2 * np.pi * 0.25) - 0.5 * (x**2).sum() / 0.25])
    log_z = gaussian_evidence(A, b, c, jnp.asarray([[2.0**2]]))[0]

    def integrand(mu):
        return np.exp(stats.norm(mu, 0.5).logpdf(x).sum() + stats.norm(0, 2.0).logpdf(mu))

    want = np.log(integrate.quad(integrand, -10, 10, points=[x.mean()])[0])
    assert float(log_z[0]) == pytest.approx(want, rel=1e-7)


def test_conditional_draws_of_mu_match_the_exact_posterior(tmp_path, rng):
    table = per_input_table(rng, n_exact=4, n_edges=1)
    st = stats_of(table, tmp_path)
    data, _ = edge_data(st)
    g = globals_(2, rng)
    g.pi = jnp.asarray(0.999999)
    tau = 0.6
    grid = TauGrid(log_tau=np.full((1, 1), np.log(tau)), step=np.ones(1))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = jax.vmap(lambda k: edge_conditionals(k, data, grid, g, jnp.zeros(1), 1.0)["mu"])(keys)[:, 0]
    # reference: posterior of mu from the dense Gaussian (mu prior N(0, slab^2), delta integrated)
    rows = table.reset_index(drop=True)
    y, offset, H, cov = dense_moments(rows, list(METHODS), g, tau)
    V = np.diag(np.concatenate([[1.7**2], np.asarray(g.omega)[0] ** 2]))
    prior_cov = H @ V @ H.T + cov
    gain = V @ H.T @ np.linalg.solve(prior_cov, y - offset)
    post_cov = V - V @ H.T @ np.linalg.solve(prior_cov, H @ V)
    assert float(np.mean(draws)) == pytest.approx(gain[0], abs=4 * np.sqrt(post_cov[0, 0] / 4000))
    assert float(np.std(draws)) == pytest.approx(np.sqrt(post_cov[0, 0]), rel=0.05)


def test_repeated_draws_pick_grid_points_with_their_posterior_probabilities(tmp_path, rng):
    """Draws that share one draw of the globals are independent draws of tau from its grid posterior."""
    table = per_input_table(rng, n_exact=4, n_edges=3)
    data, _ = edge_data(stats_of(table, tmp_path))
    g = globals_(2, rng)
    g.pi = jnp.asarray(0.4)
    log_tau = np.log(np.array([[0.3, 0.6, 1.2]] * 3))
    grid = TauGrid(log_tau=log_tau, step=np.full(3, np.log(2.0)))
    tm, ts = jnp.array([-0.5, 0.0, 0.5]), 1.0
    n = 4000
    draws = edge_conditionals_repeated(jax.random.split(jax.random.PRNGKey(1), n), data, grid, g, tm, ts)
    # reference: prior x evidence at each grid point, from edge_log_marginal
    log_spike, log_slab = (np.asarray(x) for x in edge_log_marginal(data, np.exp(2 * log_tau), g))
    pi = float(g.pi)
    log_w = (stats.norm.logpdf(log_tau, np.asarray(tm)[:, None], ts) + np.log(2.0)
             + np.logaddexp(np.log1p(-pi) + log_spike, np.log(pi) + log_slab))
    prob = np.exp(log_w - log_w.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    picked = np.abs(np.log(np.asarray(draws["tau"]))[:, :, None] - log_tau[None]).argmin(-1)  # jitter < half a cell
    freq = (picked[:, :, None] == np.arange(3)).mean(0)
    assert np.all(np.abs(freq - prob) <= 4 * np.sqrt(prob * (1 - prob) / n) + 1e-12)
    p_slab = 1 / (1 + np.exp(np.log1p(-pi) + log_spike - np.log(pi) - log_slab))
    np.testing.assert_allclose(np.asarray(draws["inclusion"][0]), (prob * p_slab).sum(1), rtol=1e-8)


def test_student_t_evidence_matches_numerical_integration(rng):
    """Exact-only edge: tabulated Student-t likelihood times the slab, integrated on the mu-grid."""
    x = rng.standard_t(4, size=12) * 0.5 + 0.8
    tau, nu, slab = 0.6, 5.0, 1.5
    grid = TauGrid(log_tau=np.full((1, 1), np.log(tau)), step=np.ones(1))
    table = student_t_table(x[None], np.ones((1, 12), bool), grid, mu_center=[0.8], mu_sd=[0.3], points=81,
                            width=8.0, df=(nu,))
    assert isinstance(table, StudentTTable)
    empty = edge_data_exact_free(1)
    g = Globals(alpha=jnp.zeros((1, 0)), beta=jnp.zeros((1, 0)), sigma=jnp.zeros((1, 0)), omega=jnp.zeros((1, 0)),
                slab_sd=jnp.asarray(slab), spike_sd=0.0, pi=jnp.asarray(0.5))
    _, log_spike, log_slab, _ = student_t_parts(empty, grid, g, jnp.zeros(1), 1.0, table)
    s = tau * np.sqrt((nu - 2) / nu)

    def integrand(mu):
        return np.exp(stats.t(nu, mu, s).logpdf(x).sum() + stats.norm(0, slab).logpdf(mu))

    want = np.log(integrate.quad(integrand, -5, 5, points=[0.8])[0])
    assert float(log_slab[0, 0, 0]) == pytest.approx(want, rel=1e-6)
    assert float(log_spike[0, 0, 0]) == pytest.approx(stats.t(nu, 0, s).logpdf(x).sum(), rel=1e-9)


def edge_data_exact_free(E):
    from bayescirc.model import EdgeData

    z = np.zeros(E)
    zm = np.zeros((E, 0))
    return EdgeData(n_x=z, sx=z, sxx=z, n_xy=zm, sx_m=zm, sxx_m=zm, sy_m=zm, syy_m=zm, sxy_m=zm,
                    pat_n=(), pat_s=(), pat_c=(), pat_idx=(), error_group=np.zeros(E, np.int32), n_methods=0)
