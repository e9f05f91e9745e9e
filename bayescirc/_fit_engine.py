"""Inference for :mod:`bayescirc.fitting`: MAP start, grid refinement, NUTS/SVI, per-edge draws (JAX)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jax.flatten_util import ravel_pytree
from jax.scipy.special import logsumexp
from numpyro import distributions as dist
from numpyro.handlers import block, replay, seed
from numpyro.infer import ELBO, MCMC, NUTS, SVI, init_to_value
from numpyro.infer.util import constrain_fn, log_density, potential_energy, unconstrain_fn

from . import model as bm
from ._guides import GaussianGuide, PointGuide, global_sites
from .model import Globals

SVI_LOSS_POINTS = 200
SCORE_RESOLUTION = 1e-6  # x the typical score size: a smaller spread across inputs is float32 rounding, not scatter
MAP_EDGES = 600  # edges used to locate the mode of the globals before the grids are refined
MAP_EDGES_PER_GROUP = 20  # ... at least this many of every edge type, error group and layer (or all it has)
SVI_EDGE_BATCH = 500  # SVI subsamples this many edges per step above that size (with a control variate)
SVI_PARTICLES = 1  # draws from the guide per SVI step (2 halved the gradient noise at twice the cost; at GPT-2
# scale, with the control variate, the answer was the same to within Monte Carlo noise)
SVI_LR = 0.005  # Adam step size of SVI
SVI_INIT_SCALE = 0.01  # initial SD of the guide in unconstrained coordinates ...
SVI_INIT_SCALE_SUBSAMPLED = 0.002  # ... above SVI_EDGE_BATCH edges, where the globals are pinned down (GPT-2 scale:
# posterior SDs 0.001-0.4; from 0.002 SVI reached a better loss in 1,000 steps than from 0.01 in 1,600)


@dataclass
class Problem:
    """Everything the sampler needs: data, grids, groups and the (optional) Student-t table."""

    data: bm.EdgeData
    grid: bm.TauGrid
    type_idx: np.ndarray
    layer_idx: np.ndarray
    n_types: int
    n_layers: int
    n_error_groups: int
    scale: float
    spike_sd: float
    exact_present: bool
    student_t: bm.StudentTTable | None
    map_values: dict
    naive_effect: np.ndarray
    edge_batch: int | None = None

    def subset(self, idx) -> Problem:
        return replace(self, data=self.data.take(idx), grid=self.grid.take(idx), type_idx=self.type_idx[idx],
                       layer_idx=self.layer_idx[idx], edge_batch=None)

    @property
    def model(self):
        """The collapsed model with its static settings bound; call it with :attr:`args`."""
        return partial(bm.collapsed_model, n_types=self.n_types, n_layers=self.n_layers,
                       n_error_groups=self.n_error_groups, spike_sd=self.spike_sd, exact_present=self.exact_present,
                       edge_batch=self.edge_batch)

    @property
    def args(self) -> tuple:
        """The model's array arguments: passed to JAX, never closed over, so equal shapes share a compilation."""
        data = self.data
        if self.student_t is not None:  # exact inputs enter through the Student-t terms, so no Gaussian ones
            data = replace(data, n_x=np.zeros_like(data.n_x), sx=np.zeros_like(data.sx), sxx=np.zeros_like(data.sxx),
                           approx_mean_only=False)  # as for any edge without exact inputs in the Gaussian terms
        as_jax = partial(jax.tree.map, jnp.asarray)  # edge subsampling indexes them with traced indices
        return (as_jax(data), as_jax(self.grid), jnp.asarray(self.type_idx), jnp.asarray(self.layer_idx),
                jnp.asarray(self.scale, float), None if self.student_t is None else as_jax(self.student_t))

    @classmethod
    def build(cls, stats, type_idx, layer_idx, n_types, n_layers, scale, spike_sd, likelihood, exact_values,
              exact_mask, error_pooling="type", approx_only="mean", progress=False) -> Problem:
        by_type = error_pooling == "type" and n_types > 1
        data, _ = bm.edge_data(stats, resolution=SCORE_RESOLUTION * scale)
        data = replace(data, approx_mean_only=approx_only == "mean")
        T = n_types if by_type else 1
        if by_type:  # rows 0..T-1 per edge type; row T the method's own values, for edges that say nothing
            data = replace(data, error_group=np.where(bm.silent_edges(data), T, type_idx).astype(np.int32))
        E = data.n_edges
        exact_present = bool(np.asarray(data.n_x).sum() > 0)
        base = cls(data=data, grid=bm.coarse_grid(E, scale), type_idx=type_idx, layer_idx=layer_idx, n_types=n_types,
                   n_layers=n_layers, n_error_groups=T, scale=scale, spike_sd=spike_sd, exact_present=exact_present,
                   student_t=None, map_values=_init_values(data.n_methods, scale, T), naive_effect=np.zeros(E))
        # the globals are shared by all edges: a random subset of edges, every group represented, locates their mode
        sub = map_subset(E, MAP_EDGES, (data.error_group, type_idx, layer_idx), np.random.default_rng(0))
        small = base.subset(sub)
        small.map_values, state = map_estimate(small, steps=300, lr=0.03, progress=progress)
        for _ in range(2):
            small.grid = refine(small)
        small.map_values, _ = map_estimate(small, steps=100, progress=progress, state=state)
        base.map_values = small.map_values
        for _ in range(2):
            base.grid = refine(base)
        base.naive_effect = _posterior_mean_mu(base)
        if likelihood == "student-t":
            if spike_sd > 0:
                from .errors import FitError

                raise FitError("likelihood='student-t' supports a point-mass spike only (spike_sd=0).")
            centre, sd = _mu_centre(base)
            base.student_t = bm.student_t_table(exact_values, exact_mask, base.grid, centre, sd)
        return base


def map_subset(n_edges: int, size: int, groupings, rng, per_group: int = MAP_EDGES_PER_GROUP) -> np.ndarray:
    """Sorted indices of ``size`` random edges (or more) holding ``per_group`` edges of every group, or all of its edges.

    ``groupings``: label arrays (E,) such as edge type and layer. A plain random
    subset missed rare groups (at GPT-2 scale 2 of 15 edge types, and 3 more
    with 1 edge), whose noise SD then started SVI a factor of 8 and 250
    posterior SDs from its mode: thousands of steps to walk there.
    """
    if n_edges <= size:
        return np.arange(n_edges)
    chosen = set()
    for labels in groupings:
        labels = np.asarray(labels)
        for group in np.unique(labels):
            members = np.flatnonzero(labels == group)
            chosen.update(rng.choice(members, min(per_group, len(members)), replace=False).tolist())
    rest = np.setdiff1d(np.arange(n_edges), np.fromiter(chosen, int, len(chosen)))
    n_more = min(len(rest), max(0, size - len(chosen)))
    chosen.update(rng.choice(rest, n_more, replace=False).tolist())
    return np.sort(np.fromiter(chosen, int, len(chosen)))


def _init_values(M, scale, n_error_groups=1):
    values = {"slab_sd": scale, "pi": 0.2, "tau_loc": math.log(0.5 * scale), "tau_spread": 0.5, "type_sd": 0.2,
              "layer_sd": 0.2}
    if M:
        values.update(beta=np.ones(M), sigma=np.full(M, 0.3 * scale))
        if n_error_groups > 1:
            values.update(alpha_rel=np.zeros(M), omega_rel=np.full(M, 0.3), beta_type=np.ones((n_error_groups, M)),
                          sigma_type=np.full((n_error_groups, M), 0.3 * scale))
        else:
            values.update(alpha=np.zeros(M), omega=np.full(M, 0.1 * scale))
    return values


def _with_type_errors(samples: dict) -> dict:
    """Add the per-type bias and error SD in metric units (derived, for the posterior file and summaries)."""
    if "sigma_type" in samples:
        samples.update({k: np.asarray(v) for k, v in bm.type_error_values(samples).items()})
    return samples


def _globals(sample: dict, problem: Problem, scale=None) -> Globals:
    """The likelihood's globals from one draw; pass ``scale`` as a traced array inside compiled code."""
    scale = problem.scale if scale is None else scale
    return bm.make_globals(sample, problem.data.n_methods, scale, sample["slab_sd"], problem.spike_sd, sample["pi"])


def _tau_prior(sample: dict, type_idx, layer_idx):
    """Prior of each edge's ``log tau`` under one draw of the globals: (means (E,), spread)."""
    tm = bm.tau_means(sample["tau_loc"], sample["type_sd"] * sample["type_z"], sample["layer_sd"] * sample["layer_z"],
                      type_idx, layer_idx)
    return tm, sample["tau_spread"]


class _FixedOrderELBO(ELBO):
    """The evidence lower bound, written so that its compiled program is the same in every process.

    NumPyro's Trace_ELBO forms its per-site terms over a ``set`` of site names,
    whose order (and so the emitted program) changes with Python's hash seed, so
    compiled SVI/MAP programs never came from the persistent cache. Here the
    model and guide log densities are summed in trace order (the order the
    model samples its sites); the value is the same ELBO.
    """

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        def particle(key):
            guide_key, model_key = jax.random.split(key)
            guide_lp, guide_trace = log_density(seed(guide, guide_key), args, kwargs, param_map)
            model_lp, _ = log_density(replay(seed(model, model_key), guide_trace), args, kwargs, param_map)
            return model_lp - guide_lp

        if self.num_particles == 1:
            elbo = particle(rng_key)
        else:
            elbo = jnp.mean(jax.vmap(particle)(jax.random.split(rng_key, self.num_particles)))
        return {"loss": -elbo, "mutable_state": None}


def map_estimate(problem: Problem, steps: int, lr: float | None = None, progress: bool = False, state=None):
    """Posterior mode of the globals (Adam on a point-mass guide), from ``problem.map_values`` or ``state``.

    ``lr`` sets up a fresh optimiser; ``state`` (returned by an earlier call)
    continues that one, learning rate and moments included, after the grids
    change (it is compiled once per data shape and reused). Give one of them.
    Returns ``(values, state)``.
    """
    if (lr is None) == (state is None):
        raise ValueError("map_estimate: give lr for a fresh optimiser or state to continue one, not both")
    args = problem.args
    if state is None:
        model = problem.model
        guide = PointGuide(global_sites(model, args), problem.map_values)
        svi = SVI(model, guide, numpyro.optim.Adam(lr), _FixedOrderELBO())
        svi_state = _init(svi, jax.random.PRNGKey(1), args)
    else:
        svi, guide, svi_state = state
    svi_state, _ = _svi_steps(svi, svi_state, args, steps)
    return {k: np.asarray(v) for k, v in guide.median(svi.get_params(svi_state)).items()}, (svi, guide, svi_state)


def _init(svi: SVI, key, args):
    """``svi.init`` as one compiled program: the guide's parameters come from the globals alone (prior-only model)."""
    return jax.jit(partial(svi.init, prior_only=True))(key, *args)


SVI_CHUNK = 100  # optimisation steps per compiled call


SVI_MIN_STEPS = 500  # SVI never stops at a plateau before this many steps
SVI_WINDOW = 250  # ... and compares the mean loss of the last two windows of this many steps


def still_falling(losses: np.ndarray, window: int) -> bool:
    """Did the loss fall over the last ``window`` steps by more than its noise (2 SE) and 0.1%?"""
    last, before = np.mean(losses[-window:]), np.mean(losses[-2 * window : -window])
    noise = 2 * np.std(losses[-window:]) / math.sqrt(window)
    return bool(before - last > 1e-3 * max(1.0, abs(last)) + noise)


def _svi_steps(svi: SVI, state, args, steps: int, progress: bool = False, stop_at_plateau: bool = False,
               reanchor=None):
    """Run ``steps`` SVI updates in compiled chunks, the data passed as arguments (not baked into the program).

    With ``stop_at_plateau``, stop early once at least :data:`SVI_MIN_STEPS`
    have run and the loss no longer falls (:func:`still_falling` over
    :data:`SVI_WINDOW` steps): more steps of a constant-rate optimiser then
    only jitter the guide. (Measured at GPT-2 scale: stopped at 500 steps,
    the same AUC, HDI coverage and intrinsic SDs as 2,000 steps to 3-4
    decimals, inclusion probabilities within 0.021.)
    ``reanchor(state)``, when given, returns the arguments for the next chunk
    (the control variate moved to the guide's current median).
    """
    from tqdm.auto import tqdm

    def chunk(state, args):
        return jax.lax.scan(lambda st, _: svi.update(st, *args), state, None, length=SVI_CHUNK)

    fn = jax.jit(chunk)
    losses = []
    bar = tqdm(total=steps, desc="svi", unit="step", disable=not progress)
    for i in range(math.ceil(steps / SVI_CHUNK)):
        if reanchor is not None and i and not i & (i - 1):  # after chunks 1, 2, 4, 8, ...: the guide settles
            args = reanchor(state)
        state, loss = fn(state, args)
        losses.append(np.asarray(loss))
        if not np.isfinite(losses[-1]).all():
            from .errors import FitError

            step = (len(losses) - 1) * SVI_CHUNK + int(np.argmin(np.isfinite(losses[-1])))
            raise FitError(f"the optimiser diverged: the loss became {losses[-1][step % SVI_CHUNK]} at step {step}. "
                           "Check the scores for extreme values (bayescirc inspect); try --approx-only full "
                           "(Python: approx_only='full'), which takes approximate-only inputs one by one; in Python, "
                           "fit(..., prior_scale=S) with S the scores' typical size.")
        bar.update(SVI_CHUNK)
        if progress:
            bar.set_postfix(loss=f"{float(losses[-1][-1]):.4g}")
        done = len(losses) * SVI_CHUNK
        if stop_at_plateau and done >= SVI_MIN_STEPS and not still_falling(np.concatenate(losses), SVI_WINDOW):
            break
    bar.close()
    return state, np.concatenate(losses)[:steps] if losses else np.zeros(0)


def refine(problem: Problem) -> bm.TauGrid:
    sample = {k: jnp.asarray(v) for k, v in problem.map_values.items()}
    g = _globals(sample, problem)
    E = problem.data.n_edges
    step = max(1, int(2e6 // problem.grid.log_tau.shape[1]))
    parts = [_refine_jit(problem.data.take(sl), problem.grid.take(sl), g)
             for sl in (slice(s, s + step) for s in range(0, E, step))]
    return bm.TauGrid(log_tau=np.concatenate([np.asarray(p.log_tau) for p in parts]),
                      step=np.concatenate([np.asarray(p.step) for p in parts]), unit=parts[0].unit)


@jax.jit
def _refine_jit(data, grid, g):
    return bm.refine_grid(data, grid, g)


def _conditional_mu(problem: Problem):
    """Slab-conditional posterior mean and SD of mu at the MAP, tau at the grid centre."""
    sample = {k: jnp.asarray(v) for k, v in problem.map_values.items()}
    g = _globals(sample, problem)
    mean, sd = _conditional_mu_jit(problem.data, jnp.asarray(problem.grid.log_tau), g)
    return np.asarray(mean), np.asarray(sd)


@jax.jit
def _conditional_mu_jit(data, log_tau, g):
    G = log_tau.shape[1]
    var = jnp.exp(2 * log_tau[:, G // 2 : G // 2 + 1])
    A, b, c = bm.quadratic_form(data, var, g)
    prior = bm._prior_vars(g, data, jnp.full(var.shape, g.slab_sd**2))
    _, chol, L = bm.gaussian_evidence(A, b, c, prior)
    mean = bm._posterior_draw(chol, L, b, jnp.zeros(b.shape))[:, 0, 0]
    e0 = jnp.zeros(b.shape).at[..., 0].set(1.0)
    sd = L[..., 0] * jnp.sqrt(jnp.sum(bm.solve_lower(chol, e0) ** 2, -1))
    return mean, sd[:, 0]


def _posterior_mean_mu(problem: Problem) -> np.ndarray:
    return _conditional_mu(problem)[0]


def _mu_centre(problem: Problem):
    mean, sd = _conditional_mu(problem)
    return mean, np.maximum(sd, 1e-6 * problem.scale)


# --- inference ---------------------------------------------------------------------------------------


NUTS_DENSE_MASS_MAX_GLOBALS = 30
"""NUTS adapts a dense mass matrix up to this many global parameters, a diagonal one above. Warm-up
estimates the matrix from a few hundred draws: over ~25 globals (errors pooled by method) dense took 17
leapfrog steps per draw against 31; over the ~55-100 of errors pooled by edge type it took 56 against 31
(13 simulated edges, bulk ESS 198 vs 203), 102 and 158 against 31 (ioi-toy, 60 inputs, ESS 335 vs 350) and
60 and 51 against 24 and 15 (ioi-toy, 200 inputs, ESS 327 vs 248: more per draw, fewer per second, 133 s vs
81 s), all with 2 x 300 draws. On unit-scale coordinates (:func:`unit_scale`) the gap grew: the ioi-toy demo
file (200 inputs, exact on 50, ~90 globals) took 175 steps per draw dense against 23 diagonal (sampling 101 s
vs 10.5 s, bulk ESS 339 vs 253)."""


def n_globals(problem: Problem) -> int:
    """Number of global parameters (the sampled sites; every per-edge quantity is integrated out)."""
    return sum(int(np.size(v)) for v in problem.map_values.values())


@dataclass
class InferenceResult:
    samples: dict  # site -> (chain, draw, ...)
    sample_stats: dict
    svi_loss: np.ndarray | None
    mass_matrix: str | None = None  # NUTS: "dense" or "diagonal"
    chain_method: str | None = None  # NUTS: "parallel" (side by side) or "sequential"
    rescaled: int | None = None  # NUTS: unconstrained coordinates narrowed to their curvature at the MAP


# --- NUTS on unit-scale coordinates ---------------------------------------------------------------

NUTS_STIFF = 1.0
"""NUTS samples a global in units of its conditional SD at the MAP where that SD is below 1 in unconstrained
coordinates (curvature above this). Warm-up's mass matrix cannot do it alone: it is shrunk towards 1e-3 (as
in Stan), i.e. no coordinate's SD is taken below ~0.005, and with one global pinned to a SD of 2e-4 (the
method bias ``alpha_rel`` of small induction collects, exact on a few inputs) the step size fell to 0.006
and 92-100% of iterations hit the maximum tree depth."""


def _on_unit_scale(model, centre, scale, *args, unravel):
    """``model``'s posterior over ``w``, with its unconstrained globals at ``centre + scale * w``.

    The map is affine, so its Jacobian is a constant and the target is the same posterior; ``centre`` and
    ``scale`` are arguments (not constants) so that the sampler's program is compiled once per shape."""
    w = numpyro.sample("w", dist.ImproperUniform(dist.constraints.real, (), event_shape=centre.shape))
    with block():  # the model's own sites are read through its potential, not recorded again here
        energy = potential_energy(model, args, {}, unravel(centre + scale * w))
    numpyro.factor("target", -energy)


def _curvatures(model, unravel, flat, args, step):
    """Diagonal of the Hessian of ``model``'s potential at ``flat``: central differences of its gradient.

    One gradient program (compiled in ~6 s here, where the forward-over-reverse Hessian-vector products
    took ~18 s), evaluated twice per coordinate; ``step`` (n,) is each coordinate's difference step."""
    grad = jax.grad(lambda x: potential_energy(model, args, {}, unravel(x)))

    def one(i):
        e = jnp.zeros_like(flat).at[i].set(step[i])
        return (grad(flat + e)[i] - grad(flat - e)[i]) / (2 * step[i])

    return jax.lax.map(one, jnp.arange(flat.size))


def unit_scale(model, prior, args: tuple, values: dict):
    """Centre (``values``, the MAP) and scales of the coordinates NUTS samples, and the map back to sites.

    ``prior`` is ``model`` without its likelihood (the same sites, cheap to replay for every draw).
    Returns ``(centre, scale, unravel, to_sites)``: flat unconstrained vectors, the function that turns
    one into the model's site dict, and a function from draws of ``w`` (..., n) to constrained sites."""
    flat, unravel = ravel_pytree(unconstrain_fn(prior, args, {}, values))
    # compiled per call (the persistent cache still serves it), so no jit cache keeps each fit's model alive
    curvatures = jax.jit(partial(_curvatures, model, unravel))
    curvature = np.asarray(curvatures(flat, args, jnp.full(flat.size, 1e-4)))
    # again with steps of a tenth of each coordinate's SD, where 1e-4 was more than that
    finite = np.isfinite(curvature) & (curvature > 0)
    step = np.where(finite, np.clip(0.1 / np.sqrt(np.where(finite, curvature, 1.0)), 1e-9, 1e-4), 1e-4)
    curvature = np.asarray(curvatures(flat, args, jnp.asarray(step)))
    curvature = np.where(np.isfinite(curvature), curvature, 0.0)
    scale = np.where(curvature > NUTS_STIFF, 1.0 / np.sqrt(np.maximum(curvature, NUTS_STIFF)), 1.0)
    centre, scale = jnp.asarray(flat), jnp.asarray(scale)

    def to_sites(w: np.ndarray) -> dict:
        lead = w.shape[:-1]
        u = centre + scale * jnp.reshape(jnp.asarray(w), (-1, centre.size))
        sites = jax.vmap(lambda x: constrain_fn(prior, args, {}, unravel(x)))(u)
        return {k: np.asarray(v).reshape(lead + v.shape[1:]) for k, v in sites.items()}

    return centre, scale, unravel, to_sites


def nuts(model, prior, args: tuple, values: dict, *, key, chains: int, draws: int, warmup: int, dense: bool,
         chain_method: str = "sequential", progress: bool = False):
    """NUTS from ``values`` on unit-scale coordinates (:data:`NUTS_STIFF`).

    Returns ``(samples, sample_stats, rescaled)``: constrained site values (chain, draw, ...), the
    sampler's per-iteration statistics, and how many coordinates were narrowed."""
    centre, scale, unravel, to_sites = unit_scale(model, prior, args, values)
    kernel = NUTS(partial(_on_unit_scale, model, unravel=unravel),
                  init_strategy=init_to_value(values={"w": jnp.zeros_like(centre)}), target_accept_prob=0.9,
                  dense_mass=dense)
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=draws, num_chains=chains, chain_method=chain_method,
                progress_bar=progress, jit_model_args=True)
    mcmc.run(key, centre, scale, *args, extra_fields=("diverging", "energy", "num_steps"))
    samples = to_sites(np.asarray(mcmc.get_samples(group_by_chain=True)["w"]))
    extra = mcmc.get_extra_fields(group_by_chain=True)
    stats = {"diverging": np.asarray(extra["diverging"]), "energy": np.asarray(extra["energy"]),
             "n_steps": np.asarray(extra["num_steps"])}
    return samples, stats, int(np.sum(np.asarray(scale) < 1.0))


MAPS_SHARE = 0.5
"""A NUTS fit clears JAX's in-memory caches once the process holds this share of Linux's memory-map limit."""


def release_programs(share: float | None = None) -> bool:
    """Clear JAX's in-memory caches when the process nears its memory-map limit; say whether it did.

    NumPyro's sampler leaves its compiled programs mapped after it is gone: ~1,200 memory maps per NUTS fit of
    110 edges, and Linux allows 65,530 per process (``vm.max_map_count``), so the ~55th NUTS fit in one process
    (a bootstrap of refits) died in "LLVM compilation error: Cannot allocate memory". Clearing at every fit
    cost ~4 s per fit of retracing; at half the limit it costs that once per ~27 fits. Programs then come back
    from the disk cache. Elsewhere than Linux nothing is counted or cleared."""
    share = MAPS_SHARE if share is None else share
    try:
        with open("/proc/self/maps") as f:
            used = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return False
    if used <= share * limit:
        return False
    jax.clear_caches()
    return True


def run(problem: Problem, inference: str, chains: int, draws: int, warmup: int, seed: int, progress: bool,
        svi_steps: int) -> InferenceResult:
    model, args = problem.model, problem.args
    key = jax.random.PRNGKey(seed)
    if inference == "nuts":
        chain_method = "parallel" if jax.local_device_count() >= chains else "sequential"
        dense = n_globals(problem) <= NUTS_DENSE_MASS_MAX_GLOBALS
        samples, stats, rescaled = nuts(model, partial(model, prior_only=True), args, problem.map_values, key=key,
                                        chains=chains, draws=draws, warmup=warmup, dense=dense,
                                        chain_method=chain_method, progress=progress)
        release_programs()
        return InferenceResult(samples=_with_type_errors(samples), sample_stats=stats, svi_loss=None,
                               mass_matrix="dense" if dense else "diagonal", chain_method=chain_method,
                               rescaled=rescaled)
    subsample = problem.data.n_edges > SVI_EDGE_BATCH and problem.student_t is None
    if subsample:
        model = replace(problem, edge_batch=SVI_EDGE_BATCH).model
        base = args

        def anchored(values):  # the model's arguments with a control variate anchored at ``values``
            return (*base, bm.control_variate(values, problem.data, problem.grid, problem.type_idx, problem.layer_idx,
                                              problem.scale, problem.spike_sd))

        args = anchored(problem.map_values)
    guide = GaussianGuide(global_sites(model, args), problem.map_values,
                          init_scale=SVI_INIT_SCALE_SUBSAMPLED if subsample else SVI_INIT_SCALE)
    svi = SVI(model, guide, numpyro.optim.Adam(SVI_LR), _FixedOrderELBO(num_particles=SVI_PARTICLES))
    state = _init(svi, key, args)
    reanchor = (lambda st: anchored(guide.median(svi.get_params(st)))) if subsample else None
    state, losses = _svi_steps(svi, state, args, svi_steps, progress=progress, stop_at_plateau=True, reanchor=reanchor)
    params = svi.get_params(state)
    samples = {k: np.asarray(v)[None] for k, v in guide.sample(jax.random.fold_in(key, 1), params, chains * draws).items()}
    return InferenceResult(samples=_with_type_errors(samples), sample_stats={}, svi_loss=losses)


# --- per-edge draws ---------------------------------------------------------------------------------------


def _t_conditionals(key, data, grid, g, tau_mean, tau_spread, table, threshold=None):
    """Student-t analogue of :func:`bayescirc.model.edge_conditionals`."""
    k_df, k_tau, k_ind, k_mu, k_jit, k_d = jax.random.split(key, 6)
    log_w, log_spike, log_slab, gauss = bm.student_t_parts(data, grid, g, tau_mean, tau_spread, table)
    _, per_df = bm.student_t_total(log_w)
    d = jax.random.categorical(k_df, per_df)
    lw, ls0, ls1 = log_w[d], log_spike[d], log_slab[d]
    E = lw.shape[0]
    rows = jnp.arange(E)
    gi = jax.random.categorical(k_tau, lw, axis=-1)
    p_slab = jax.nn.sigmoid(jnp.log(g.pi) + ls1 - jnp.log1p(-g.pi) - ls0)  # (E, G)
    inclusion = jnp.sum(jax.nn.softmax(lw, -1) * p_slab, -1)
    p_here = p_slab[rows, gi]
    slab = jax.random.uniform(k_ind, (E,)) < p_here
    mu_grid = jnp.asarray(table.mu)
    slab_prior = numpyro.distributions.Normal(0.0, g.slab_sd).log_prob(mu_grid)
    logits = jnp.asarray(table.log_lik)[d][rows, :, gi] + gauss[rows, gi, :] + slab_prior  # (E, J)
    j = jax.random.categorical(k_mu, logits, axis=-1)
    jitter = (jax.random.uniform(k_jit, (E,)) - 0.5) * jnp.asarray(table.mu_step)
    mu_slab = mu_grid[rows, j] + jitter  # given the slab, at the tau drawn from the marginal grid posterior
    mu = jnp.where(slab, mu_slab, 0.0)
    if threshold is not None:
        post = jax.nn.softmax(logits, -1)
        inclusion = p_here * jnp.sum(post * (jnp.abs(mu_grid) > threshold), -1)
    log_tau = jnp.asarray(grid.log_tau)[rows, gi]
    var = jnp.exp(2 * log_tau)[:, None]
    A, b, _ = bm.quadratic_form(data, var, g)
    A, b = A[:, 0], b[:, 0]
    M = data.n_methods
    if M:
        Add = A[:, 1:, 1:] + jnp.eye(M) / jnp.maximum(bm.method_params(g, data)[3] ** 2, 1e-30)[:, :, None]
        rhs = b[:, 1:] - A[:, 1:, 0] * mu[:, None]
        chol = bm.cholesky(Add)
        z = jax.random.normal(k_d, (E, M))
        delta = bm.solve_upper_t(chol, bm.solve_lower(chol, rhs) + z)
    else:
        delta = jnp.zeros((E, 0))
    tau = jnp.exp(log_tau + (jax.random.uniform(k_jit, (E,)) - 0.5) * jnp.asarray(grid.step))
    return {"mu": mu, "delta": delta, "tau": tau, "inclusion": inclusion, "df": jnp.asarray(bm.STUDENT_T_DF)[d],
            "mu_slab": mu_slab}


def edge_draws(problem: Problem, result: InferenceResult, seed: int, threshold: float | None,
               progress: bool = False, keep_delta_max: float = 5e7, per_global: int = 1) -> dict:
    """Per-edge draws for every posterior draw of the globals, plus running sums for the error summaries.

    ``per_global`` > 1 (Gaussian likelihood): the first ceil(draws / per_global)
    draws of the globals each get ``per_global`` per-edge draws, which share
    that draw's grid weights and factors (every edge's evidence at every grid
    point, the costly part); ``res["samples"]`` then holds the globals
    repeated to match. A valid posterior sample for independent draws of the
    globals (SVI's); at GPT-2 scale, where the globals are pinned down, 500
    draws took ~60 s with one per draw of the globals, ~12.5 s with 10 and
    ~9 s with 20 (each draw of the globals: ~0.11 s of factors, then ~15 ms
    per per-edge draw).
    """
    from tqdm.auto import tqdm

    samples = result.samples
    C, D = next(iter(samples.values())).shape[:2]
    N = C * D
    R = max(1, int(per_global)) if problem.student_t is None else 1
    K = -(-N // R)  # distinct draws of the globals used
    flat = {k: np.asarray(v).reshape(N, *v.shape[2:])[:K] for k, v in samples.items()}  # indexed per chunk: numpy
    E = problem.data.n_edges
    M = problem.data.n_methods
    G = problem.grid.log_tau.shape[1]

    def one(keys, sample, data, grid, type_idx, layer_idx, scale, table):
        g = _globals(sample, problem, scale)
        tm, ts = _tau_prior(sample, type_idx, layer_idx)
        if table is None:  # (R, ...) outputs
            out = bm.edge_conditionals_repeated(keys, data, grid, g, tm, ts, threshold=threshold)
            out["df"] = jnp.full((R,), jnp.inf)
        else:  # R == 1
            out = {k: v[None] for k, v in _t_conditionals(keys[0], data, grid, g, tm, ts, table,
                                                          threshold=threshold).items()}
        if M:
            alpha, beta, sigma, _ = bm.method_params(g, data)  # (E, M)
            err = alpha + (beta - 1) * out["mu"][..., None] + out["delta"]  # (R, E, M)
            out["err"] = err
            out["err_sd"] = jnp.sqrt((beta - 1) ** 2 * out["tau"][..., None] ** 2 + sigma**2)
            out["intr"] = beta**2 * out["tau"][..., None] ** 2
            out["sig2"] = jnp.broadcast_to(sigma**2, err.shape)
        return out

    per_draw = E * G * (1 + M) ** 2 * 8 * 8 + (R - 1) * E * (1 + M) ** 2 * 8 * 2
    if problem.student_t is not None:
        per_draw += problem.student_t.log_lik.size * 8 * 3
    chunk = int(max(1, min(K, 4e8 // per_draw)))
    batched = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, None, None, None, None)))
    args = problem.args

    def fn(k, smp):
        return batched(k, smp, *args)

    keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed + 7919), K * R)).reshape(K, R, -1)
    keep_delta = M and N * E * M <= keep_delta_max
    mu = np.zeros((N, E), np.float32)
    mu_slab = np.zeros((N, E), np.float32)
    tau = np.zeros((N, E), np.float32)
    inc = np.zeros((N, E), np.float32)
    df = np.zeros(N)
    delta = np.zeros((N, E, M), np.float32) if keep_delta else None
    acc = {k: np.zeros((E, M)) for k in ("err", "err2", "err_sd", "intr", "sig2")}
    bar = tqdm(total=N, desc="edge draws", unit="draw", disable=not progress)
    for s in range(0, K, chunk):
        n_here = min(K, s + chunk) - s
        pad = np.r_[np.arange(s, s + n_here), np.full(chunk - n_here, s)]  # one shape: one compilation
        sl = slice(s * R, min(N, (s + n_here) * R))
        n_draws = sl.stop - sl.start
        out = {k: np.asarray(v[:n_here]).reshape(n_here * R, *v.shape[2:])[:n_draws]
               for k, v in fn(keys[pad], {k: v[pad] for k, v in flat.items()}).items()}
        mu[sl] = out["mu"]
        mu_slab[sl] = out["mu_slab"]
        tau[sl] = out["tau"]
        inc[sl] = out["inclusion"]
        df[sl] = out["df"]
        if M:
            err = out["err"]
            acc["err"] += err.sum(0)
            acc["err2"] += (err**2).sum(0)
            acc["err_sd"] += out["err_sd"].sum(0)
            acc["intr"] += out["intr"].sum(0)
            acc["sig2"] += out["sig2"].sum(0)
            if keep_delta:
                delta[sl] = out["delta"]
        bar.update(n_draws)
    bar.close()
    shape = (C, D)
    res = {"mu": mu.reshape(*shape, E), "mu_slab": mu_slab.reshape(*shape, E), "tau": tau.reshape(*shape, E), "inclusion": inc.reshape(*shape, E),
           "delta": None if delta is None else delta.reshape(*shape, E, M), "df": df.reshape(shape),
           **{k: v / N for k, v in acc.items()}}
    if R > 1:
        res["samples"] = {k: np.repeat(v.reshape(N, *v.shape[2:])[:K], R, axis=0)[:N].reshape(v.shape)
                          for k, v in samples.items()}
    return res


def thin(values: np.ndarray, points: int = SVI_LOSS_POINTS) -> list[float]:
    if values is None or len(values) == 0:
        return []
    idx = np.unique(np.linspace(0, len(values) - 1, min(points, len(values))).astype(int))
    return [float(values[i]) for i in idx]


__all__ = ["Problem", "InferenceResult", "run", "edge_draws", "thin", "logsumexp"]
