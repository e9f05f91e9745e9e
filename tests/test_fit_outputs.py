"""The fit's posterior predictive check: what it computes per edge, checked against a one-edge-at-a-time reference."""

import numpy as np
import pytest
from scipy import stats as sps

from bayescirc.fit_outputs import chi2_sf_log, gaussian_ppc


def per_edge_reference(values, mask, tau_draws, min_inputs=8, reps=2000, seed=0):
    """The check written edge by edge: sample kurtosis against its Gaussian reference, variance against tau."""
    rng = np.random.default_rng(seed)
    ref, p_kurt, p_var = {}, {}, {}
    for e in range(values.shape[0]):
        x = values[e, mask[e]]
        n = len(x)
        c = x - x.mean()
        if n < min_inputs or np.mean(c**2) <= 0:
            continue
        kurt = np.mean(c**4) / np.mean(c**2) ** 2 - 3
        if n not in ref:
            z = rng.normal(size=(reps, n))
            zc = z - z.mean(1, keepdims=True)
            ref[n] = np.sort(np.mean(zc**4, 1) / np.mean(zc**2, 1) ** 2 - 3)
        p_kurt[e] = 1 - np.searchsorted(ref[n], kurt) / reps
        p_var[e] = np.mean(sps.chi2.sf((n - 1) * np.var(x, ddof=1) / tau_draws[:, e] ** 2, n - 1))
    pk, pv = np.array(list(p_kurt.values())), np.array(list(p_var.values()))
    return len(pk), float(np.mean(pk < 0.05)), float(np.mean((pv < 0.05) | (pv > 0.95)))


def test_ppc_matches_the_per_edge_reference_with_uneven_counts_and_constant_edges():
    rng = np.random.default_rng(1)
    values = rng.standard_t(4, size=(300, 30))
    mask = rng.random((300, 30)) > 0.3
    mask[7, :5] = True
    mask[7, 5:] = False  # too few inputs: not checked
    values[5] = 1.0  # constant: not checked
    tau = np.abs(rng.normal(1.4, 0.1, size=(50, 300)))
    got = gaussian_ppc(values, mask, tau)
    n, share_kurt, share_var = per_edge_reference(values, mask, tau)
    assert got["edges_checked"] == n == 298
    assert got["share_kurtosis_p_below_0.05"] == pytest.approx(share_kurt, abs=1e-12)
    assert got["share_variance_outside_90"] == pytest.approx(share_var, abs=1e-12)


def test_gaussian_scores_pass_and_heavy_tailed_scores_fail():
    rng = np.random.default_rng(2)
    mask = np.ones((400, 60), bool)
    tau = np.full((40, 400), 1.0)
    gaussian = gaussian_ppc(rng.normal(size=(400, 60)), mask, tau)
    assert not gaussian["heavy_tailed"] and gaussian["share_kurtosis_p_below_0.05"] < 0.1
    heavy = gaussian_ppc(rng.standard_t(2.5, size=(400, 60)), mask, tau)
    assert heavy["heavy_tailed"] and heavy["share_kurtosis_p_below_0.05"] > 0.3


def test_too_few_exact_inputs_is_said_not_guessed():
    out = gaussian_ppc(np.ones((3, 4)), np.ones((3, 4), bool), np.ones((10, 3)))
    assert out == {"edges_checked": 0, "note": "fewer than 8 exact inputs per edge: nothing to check"}


def test_the_interpolated_chi2_tail_matches_scipy_for_every_degree_of_freedom():
    rng = np.random.default_rng(3)
    dof = rng.choice([7, 19, 99, 999], size=300)
    log_x = np.log(dof)[:, None] + rng.normal(0, 0.6, size=(300, 200))  # spread well beyond the bulk
    got = chi2_sf_log(log_x, dof, points=4097)  # ~15,000 values per dof: interpolated
    want = sps.chi2.sf(np.exp(log_x), dof[:, None])
    assert np.abs(got - want).max() < 5e-5
    assert np.abs(chi2_sf_log(log_x, dof) - want).max() < 1e-5  # the default table: computed exactly here
