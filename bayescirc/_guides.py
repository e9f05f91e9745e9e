"""Guides over the globals for MAP and SVI: a point and a Gaussian in unconstrained coordinates.

NumPyro's AutoGuides learn the model's sites by running it op by op, outside
any compiled program, and check the log density and its gradient at the
start: ~500 small eager programs at GPT-2 scale, 5.3 s for the MAP's guide
and 2.8 s for SVI's (2.7 s and 1.1 s with the prior-only model, most of it
JAX's one-off cost per process of compiling each eager operation). Here the sites come from an
abstract run of the prior-only model (:func:`global_sites`, no arrays
computed), and the guides are plain NumPyro functions of the same form as
``AutoDelta`` and ``AutoMultivariateNormal``/``AutoLowRankMultivariateNormal``,
so ``SVI.init`` compiles into one small program.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import sum_rightmost
from numpyro.handlers import seed, trace

LOW_RANK_ABOVE = 200  # unconstrained coordinates above which the Gaussian guide is low-rank plus diagonal


@dataclass(frozen=True)
class GlobalSites:
    """The model's global sample sites: shapes, bijections to unconstrained space, and the flat layout.

    ``flat(values)``: the unconstrained flat vector of ``values`` (constrained,
    {site: array}); sites missing from ``values`` start at 0, the prior's
    centre for the zero-sum group effects, the only sites a fit's starting
    values leave out. ``constrain(flat)``: its inverse. Both compiled.
    """

    shapes: dict  # site -> constrained shape
    event_dims: dict  # site -> event dimensions of its distribution
    plates: dict  # site -> ((plate name, size, dim), ...) it sits in
    transforms: dict  # site -> bijection from unconstrained to constrained values
    unravel: Callable  # flat unconstrained vector -> {site: unconstrained array}
    size: int  # number of unconstrained coordinates
    flat: Callable
    constrain: Callable

    def constrain_with_jacobian(self, flat) -> dict:
        """``{site: (value, log |d value / d coordinates|)}``, the latter per element of the site's plates."""
        out = {}
        for k, v in self.unravel(flat).items():
            t = self.transforms[k]
            y = t(v)
            ldj = t.log_abs_det_jacobian(v, y)
            out[k] = (y, sum_rightmost(ldj, jnp.ndim(ldj) - jnp.ndim(y) + self.event_dims[k]))
        return out

    def sample_sites(self, values: dict, log_density: dict | None = None) -> None:
        """Sample each site as a point mass at ``values`` inside the model's plates (with ``log_density``)."""
        for name, value in values.items():
            delta = dist.Delta(value, log_density=0.0 if log_density is None else log_density[name],
                               event_dim=self.event_dims[name])
            with ExitStack() as stack:
                for plate, size, dim in self.plates[name]:
                    stack.enter_context(numpyro.plate(plate, size, dim=dim))
                numpyro.sample(name, delta)


def global_sites(model, args) -> GlobalSites:
    """The latent sites of ``model(*args, prior_only=True)``, found by tracing it abstractly (no arrays computed)."""
    found = {}

    def probe(args):
        for name, site in trace(seed(model, 0)).get_trace(*args, prior_only=True).items():
            if site["type"] == "sample" and not site["is_observed"]:
                plates = tuple((f.name, f.size, f.dim) for f in site["cond_indep_stack"])
                found[name] = (tuple(site["value"].shape), site["fn"].support, site["fn"].event_dim, plates)
        return jnp.zeros(())

    jax.eval_shape(probe, args)
    transforms = {k: biject_to(found[k][1]) for k in found}
    shapes = {k: found[k][0] for k in found}
    names = list(found)  # the model's order, as NumPyro's AutoGuides lay out their latent vector
    zeros = [np.zeros(transforms[k].inverse_shape(shapes[k])) for k in names]
    flat0, unravel_list = ravel_pytree(zeros)

    def unravel(flat):
        return dict(zip(names, unravel_list(flat)))

    @jax.jit
    def flat(values):
        return ravel_pytree([transforms[k].inv(jnp.asarray(values[k], float)) if k in values else jnp.asarray(z)
                             for k, z in zip(names, zeros)])[0]

    @jax.jit
    def constrain(flat):
        return {k: transforms[k](v) for k, v in unravel(flat).items()}

    return GlobalSites(shapes=shapes, event_dims={k: found[k][2] for k in found}, plates={k: found[k][3] for k in found},
                       transforms=transforms, unravel=unravel, size=int(flat0.size), flat=flat,
                       constrain=constrain)


class PointGuide:
    """A point mass at the globals (MAP, as ``AutoDelta``): parameter ``loc``, unconstrained."""

    def __init__(self, sites: GlobalSites, start: dict):
        self.sites, self.start = sites, sites.flat(start)

    def __call__(self, *args, **kwargs):
        self.sites.sample_sites(self.sites.constrain(numpyro.param("loc", self.start)))

    def median(self, params: dict) -> dict:
        return self.sites.constrain(params["loc"])


class GaussianGuide:
    """A Gaussian over the unconstrained globals (as ``AutoMultivariateNormal``; low-rank plus diagonal above
    :data:`LOW_RANK_ABOVE` coordinates, as ``AutoLowRankMultivariateNormal`` with rank sqrt(P))."""

    def __init__(self, sites: GlobalSites, start: dict, init_scale: float):
        self.sites, self.start, self.init_scale = sites, sites.flat(start), init_scale
        self.low_rank = sites.size > LOW_RANK_ABOVE

    def distribution(self, params: dict):
        if self.low_rank:
            scale = params["scale"]
            return dist.LowRankMultivariateNormal(params["loc"], params["cov_factor"] * scale[:, None], scale**2)
        return dist.MultivariateNormal(params["loc"], scale_tril=params["scale_tril"])

    def __call__(self, *args, **kwargs):
        P = self.sites.size
        params = {"loc": numpyro.param("loc", self.start)}
        if self.low_rank:
            params["cov_factor"] = numpyro.param("cov_factor", jnp.zeros((P, int(round(P**0.5)))))
            params["scale"] = numpyro.param("scale", jnp.full(P, self.init_scale),
                                            constraint=constraints.softplus_positive)
        else:
            params["scale_tril"] = numpyro.param("scale_tril", self.init_scale * jnp.eye(P),
                                                 constraint=constraints.scaled_unit_lower_cholesky)
        latent = numpyro.sample("_globals_latent", self.distribution(params), infer={"is_auxiliary": True})
        values = self.sites.constrain_with_jacobian(latent)
        self.sites.sample_sites({k: v for k, (v, _) in values.items()}, {k: -ldj for k, (_, ldj) in values.items()})

    def median(self, params: dict) -> dict:
        return self.sites.constrain(params["loc"])

    def sample(self, key, params: dict, n: int) -> dict:
        """``n`` draws of the globals: {site: (n, ...)}, as one compiled program."""
        draw = jax.jit(lambda key, params: jax.vmap(self.sites.constrain)(self.distribution(params).sample(key, (n,))))
        return draw(key, params)


__all__ = ["GlobalSites", "global_sites", "PointGuide", "GaussianGuide", "LOW_RANK_ABOVE"]
