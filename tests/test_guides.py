"""The MAP and SVI guides over the globals agree with NumPyro's AutoDelta and AutoMultivariateNormal."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.handlers import seed, substitute, trace
from numpyro.infer import SVI, Trace_ELBO, init_to_value
from numpyro.infer.autoguide import AutoDelta, AutoMultivariateNormal
from numpyro.infer.util import log_density

from bayescirc._guides import GaussianGuide, PointGuide, global_sites

jax.config.update("jax_enable_x64", True)


def model(y, prior_only=False):
    """Every kind of support the collapsed model uses: real, positive, unit interval, zero-sum, a plate."""
    with numpyro.plate("method", 2):
        beta = numpyro.sample("beta", dist.Normal(1.0, 0.5))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    pi = numpyro.sample("pi", dist.Beta(1.0, 3.0))
    z = numpyro.sample("type_z", dist.ZeroSumNormal(1.0, event_shape=(3,)))
    slab = numpyro.sample("slab_sd", dist.LogNormal(0.0, 1.5))
    if prior_only:
        return
    mean = beta[:, None] * slab + z.sum() + pi
    numpyro.sample("y", dist.Normal(mean, sigma[:, None]), obs=y)


Y = jnp.asarray(np.random.default_rng(0).normal(1.0, 0.7, size=(2, 5)))
START = {"beta": np.array([0.9, 1.1]), "sigma": np.array([0.5, 0.8]), "pi": 0.3,
         "type_z": np.array([0.2, -0.5, 0.3]), "slab_sd": 1.2}


def test_the_sites_come_from_an_abstract_run_of_the_prior_only_model():
    sites = global_sites(model, (Y,))
    assert sites.shapes == {"beta": (2,), "sigma": (2,), "pi": (), "type_z": (3,), "slab_sd": ()}
    assert sites.size == 2 + 2 + 1 + 2 + 1  # the zero-sum effect has one coordinate fewer
    back = sites.constrain(sites.flat(START))
    for k, v in START.items():
        np.testing.assert_allclose(back[k], v, rtol=1e-12, atol=1e-12)
    assert float(jnp.sum(sites.constrain(jnp.ones(sites.size))["type_z"])) == pytest.approx(0.0, abs=1e-12)


def test_sites_missing_from_the_start_begin_at_the_prior_centre():
    sites = global_sites(model, (Y,))
    start = {k: v for k, v in START.items() if k != "type_z"}
    np.testing.assert_allclose(sites.constrain(sites.flat(start))["type_z"], 0.0)


@partial(jax.jit, static_argnums=(0, 2))
def _guide_log_density(guide, params, latent_site, latent):
    return log_density(substitute(guide, {latent_site: latent}), (Y,), {}, params)[0]


@partial(jax.jit, static_argnums=0)
def _guide_values(guide, substituted):
    return {k: site["value"] for k, site in trace(substitute(guide, substituted)).get_trace(Y).items()
            if k in START}


def test_the_gaussian_guide_has_automultivariatenormals_density_and_jacobians():
    ours = GaussianGuide(global_sites(model, (Y,)), START, init_scale=0.1)
    auto = AutoMultivariateNormal(model, init_loc_fn=init_to_value(values=START), init_scale=0.1)
    seed(auto, 0)(Y)  # NumPyro's guide learns the model's sites on its first call
    rng = np.random.default_rng(1)
    P = ours.sites.size
    loc = jnp.asarray(rng.normal(size=P))
    tril = jnp.tril(jnp.asarray(rng.normal(size=(P, P)))) * 0.1 + jnp.eye(P) * 0.3
    latent = jnp.asarray(rng.normal(size=P))
    mine = _guide_log_density(ours, {"loc": loc, "scale_tril": tril}, "_globals_latent", latent)
    theirs = _guide_log_density(auto, {"auto_loc": loc, "auto_scale_tril": tril}, "_auto_latent", latent)
    assert float(mine) == pytest.approx(float(theirs), rel=1e-10)
    # and the values handed to the model: the same constrained globals
    got = _guide_values(ours, {"_globals_latent": latent, "loc": loc, "scale_tril": tril})
    want = _guide_values(auto, {"_auto_latent": latent, "auto_loc": loc, "auto_scale_tril": tril})
    for k in START:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12)


def test_map_with_the_point_guide_finds_autodeltas_mode():
    def fit(guide, steps=3000):
        svi = SVI(model, guide, numpyro.optim.Adam(0.02), Trace_ELBO())
        res = svi.run(jax.random.PRNGKey(0), steps, Y, progress_bar=False)
        return guide.median(res.params)

    ours = fit(PointGuide(global_sites(model, (Y,)), START))
    theirs = fit(AutoDelta(model, init_loc_fn=init_to_value(values=START)))
    for k in START:
        np.testing.assert_allclose(ours[k], theirs[k], atol=2e-3)


def test_gaussian_draws_follow_the_guide():
    ours = GaussianGuide(global_sites(model, (Y,)), START, init_scale=0.1)
    P = ours.sites.size
    params = {"loc": jnp.zeros(P), "scale_tril": 0.2 * jnp.eye(P)}
    draws = ours.sample(jax.random.PRNGKey(0), params, 4000)
    assert draws["sigma"].shape == (4000, 2) and draws["type_z"].shape == (4000, 3)
    np.testing.assert_allclose(np.log(draws["sigma"]).std(0), 0.2, rtol=0.05)  # exp of N(0, 0.2)
    np.testing.assert_allclose(np.sum(draws["type_z"], 1), 0.0, atol=1e-12)
