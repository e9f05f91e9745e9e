"""The hierarchical model of per-input edge scores, collapsed onto sufficient statistics.

Generative model, for edge ``e``, input ``i`` and approximate method ``m``::

    theta[i, e] = mu[e] + tau[e] * eps[i, e]                    (eps ~ N(0, 1), or Student-t)
    exact[i, e] = theta[i, e]
    y[i, e, m]  = alpha[t, m] + beta[t, m] * theta[i, e] + delta[e, m] + sigma[t, m] * eta[i, e, m]
    delta[e, m] ~ N(0, omega[t, m]^2)                          (t = the edge type of e)
    mu[e]       ~ (1 - pi) * N(0, spike_sd^2) + pi * N(0, slab_sd^2)
    log tau[e]  ~ N(tau_loc + type_eff[type(e)] + layer_eff[layer(e)], tau_spread^2)

The approximation parameters are pooled by method and edge type: each edge
type ``t`` (``attn->attn<q>``, ``mlp->logits``, ...) has its own scale
``beta[t, m]`` and per-input noise SD ``sigma[t, m]``, partially pooled
towards the method's (``beta[t, m] ~ N(beta[m], 0.5^2)``, ``log sigma[t, m]
~ N(log sigma[m], 1.5^2)``), and its bias and per-edge error SD are the
method's proportions of that noise: ``alpha[t, m] = alpha_rel[m] * sigma[t,
m]``, ``omega[t, m] = omega_rel[m] * sigma[t, m]``. On the shipped ioi-toy
model EAP's scale runs from 0.01 (``input->attn<q>``) to 3.5
(``mlp->attn<k>``) and its noise SD over three orders of magnitude across
edge types, which one value per method cannot describe; the per-edge error
SD follows the noise (0.03-0.6 of it, where its absolute value spans 2,600x).
Free per-type biases and error SDs were tried and left out: a type has 1-16
edges, so they are barely identified and NUTS met funnels (mean tree size
~1,000, ESS ~3). With ``error_pooling="method"`` there is one group, the
plain per-method model with ``alpha[m]``, ``omega[m]`` in metric units.

Given ``tau[e]`` and the globals, everything about one edge is linear-Gaussian
in ``u = (mu[e], delta[e, :])``: the per-input effects ``theta`` integrate out
(exact inputs observe them; approximate-only inputs give a rank-one-plus-
diagonal Gaussian across methods), the log-likelihood is a quadratic form
``c - u'Au/2 + b'u`` computed from the per-pattern sums of
:class:`~bayescirc.scores.SufficientStats`, and ``u`` integrates out in closed
form under each mixture component. ``tau[e]`` integrates out numerically on a
per-edge grid in ``log tau`` (trapezoid rule, exact to many digits once the
spacing is below the width of prior x likelihood: :func:`refine_grid`
describes each edge's likelihood and :func:`placed_grid` puts the points on its
product with the current tau prior, however narrow that prior), so
the sampler sees only the ~20 global parameters and the cost per evaluation is
O(edges x grid), independent of the number of inputs.

Sample sites (posterior variables): ``beta``, ``sigma`` and either
``alpha``, ``omega`` (one group) or ``alpha_rel``, ``omega_rel`` (plate
``method``), ``beta_type``, ``sigma_type`` (plates ``edge_type`` x
``method``; by edge type), ``slab_sd``, ``pi``, ``tau_loc``, ``tau_spread``,
``type_sd``, ``type_z`` (plate ``edge_type``), ``layer_sd``, ``layer_z``
(plate ``layer``); the per-edge ``mu``, ``tau``, ``delta`` and ``inclusion``
are drawn afterwards from their exact conditionals (:func:`edge_conditionals`).

The Student-t variant replaces the exact inputs' Gaussian by a Student-t with
unit-variance scaling (so ``tau`` stays the input-to-input SD), marginalises
the degrees of freedom over a small set, and integrates ``mu`` on a per-edge
grid; it needs the exact per-input scores (a table of ``edges x mu-grid x
tau-grid`` log-densities, built once), while approximate-only inputs keep the
moment-matched Gaussian likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import logsumexp

from . import schema

__all__ = [
    "EdgeData",
    "Globals",
    "TauGrid",
    "collapsed_model",
    "edge_data",
    "edge_log_marginal",
    "edge_conditionals",
    "gaussian_evidence",
    "quadratic_form",
    "quadratic_terms",
    "evidence_terms",
    "refine_grid",
    "coarse_grid",
    "student_t_table",
]

LOG_2PI = math.log(2 * math.pi)
STUDENT_T_DF = (3.0, 5.0, 10.0, 30.0)


# --- data -----------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclass
class EdgeData:
    """Per-edge sufficient statistics in the form the likelihood uses (numpy or JAX arrays).

    ``M`` is the number of approximate methods. Exact moments: ``n_x, sx, sxx``
    (E,). Approximate given exact, per method over inputs with both:
    ``n_xy, sx_m, sxx_m, sy_m, syy_m, sxy_m`` (E, M). Approximate-only
    patterns: ``pat_n[p]`` (E,), ``pat_s[p]`` (E, q), ``pat_c[p]`` (E, q, q)
    for the methods ``pat_idx[p]`` (static). ``error_group`` (E,) int: the
    row of :class:`Globals` whose approximation parameters the edge uses (see
    :func:`make_globals`: its edge type, or the method's own row).
    ``approx_mean_only`` (static): approximate-only inputs of an edge with
    exact inputs enter through their mean alone (see :func:`quadratic_terms`).
    ``pat_mean[p]`` (E,) bool: with ``approx_mean_only``, the edges where the
    inputs of pattern ``p`` enter through their mean (:func:`edge_data` says
    when); elsewhere, or when empty, they keep the full likelihood.
    """

    n_x: jnp.ndarray
    sx: jnp.ndarray
    sxx: jnp.ndarray
    n_xy: jnp.ndarray
    sx_m: jnp.ndarray
    sxx_m: jnp.ndarray
    sy_m: jnp.ndarray
    syy_m: jnp.ndarray
    sxy_m: jnp.ndarray
    pat_n: tuple
    pat_s: tuple
    pat_c: tuple
    error_group: jnp.ndarray
    pat_idx: tuple = field(metadata=dict(static=True))
    n_methods: int = field(metadata=dict(static=True))
    approx_mean_only: bool = field(default=False, metadata=dict(static=True))
    pat_mean: tuple = ()

    @property
    def n_edges(self) -> int:
        return int(self.n_x.shape[0])

    def take(self, idx) -> EdgeData:
        """The statistics of edges ``idx`` only (a subset or minibatch)."""
        arrays = {k: getattr(self, k)[idx] for k in ("n_x", "sx", "sxx", "n_xy", "sx_m", "sxx_m", "sy_m", "syy_m", "sxy_m",
                                                      "error_group")}
        return EdgeData(**arrays, pat_n=tuple(a[idx] for a in self.pat_n), pat_s=tuple(a[idx] for a in self.pat_s),
                        pat_c=tuple(a[idx] for a in self.pat_c), pat_idx=self.pat_idx, n_methods=self.n_methods,
                        approx_mean_only=self.approx_mean_only, pat_mean=tuple(a[idx] for a in self.pat_mean))


def edge_data(stats, error_group=None, resolution: float = 0.0) -> tuple[EdgeData, list[str]]:
    """Turn :class:`~bayescirc.scores.SufficientStats` into :class:`EdgeData`.

    ``error_group`` (E,) ints: each edge's approximation-parameter row
    (default: 0 for all, the method's own parameters; see :func:`make_globals`).
    ``resolution``: the smallest score SD that is not rounding (the fit uses
    1e-6 x the typical score size: scores are float32).
    An approximate-only pattern may enter an edge's likelihood through its
    mean (``pat_mean``, see :func:`quadratic_terms`) where the edge has >= 2
    exact inputs, the pattern >= q + 2 inputs for its q methods, and the
    methods' scores scatter across them, in every direction (:func:`_scatters`),
    by more than ``resolution`` and by more than 1e-6 x their mean: a smaller
    sample covariance (say 1e-21 for scores that are float32 noise around 0)
    would claim a precision no score has, and the evidence overflowed.
    Returns the data and the approximate method labels (in ``stats.methods``
    order, the exact method removed).
    """
    methods = list(stats.methods)
    exact = [k for k, m in enumerate(methods) if schema.is_exact(m)]
    x = exact[0] if exact else None
    approx = [k for k in range(len(methods)) if k != x]
    E, M = len(stats.edges), len(approx)
    pats = np.asarray(stats.patterns, bool).reshape(-1, len(methods))
    n = np.asarray(stats.n, float)
    sums, cross = np.asarray(stats.sums, float), np.asarray(stats.cross, float)
    zeros = np.zeros(E)
    n_x, sx, sxx = zeros.copy(), zeros.copy(), zeros.copy()
    blk = {k: np.zeros((E, M)) for k in ("n_xy", "sx_m", "sxx_m", "sy_m", "syy_m", "sxy_m")}
    pat_n, pat_s, pat_c, pat_idx = [], [], [], []
    for p, members in enumerate(pats):
        if x is not None and members[x]:
            n_x += n[:, p]
            sx += sums[:, p, x]
            sxx += cross[:, p, x, x]
            for j, k in enumerate(approx):
                if members[k]:
                    blk["n_xy"][:, j] += n[:, p]
                    blk["sx_m"][:, j] += sums[:, p, x]
                    blk["sxx_m"][:, j] += cross[:, p, x, x]
                    blk["sy_m"][:, j] += sums[:, p, k]
                    blk["syy_m"][:, j] += cross[:, p, k, k]
                    blk["sxy_m"][:, j] += cross[:, p, x, k]
        else:
            idx = tuple(j for j, k in enumerate(approx) if members[k])
            cols = [approx[j] for j in idx]
            if not idx:
                continue
            pat_idx.append(idx)
            pat_n.append(n[:, p])
            pat_s.append(sums[:, p][:, cols])
            pat_c.append(cross[:, p][:, cols][:, :, cols])
    pat_mean = [(n_x >= 2) & (count >= len(idx) + 2) & _scatters(count, S, C, resolution)  # needs all of n_x
                for idx, count, S, C in zip(pat_idx, pat_n, pat_s, pat_c)]
    group = np.zeros(E, np.int32) if error_group is None else np.asarray(error_group, np.int32)
    data = EdgeData(n_x=n_x, sx=sx, sxx=sxx, **blk, pat_n=tuple(pat_n), pat_s=tuple(pat_s), pat_c=tuple(pat_c),
                    error_group=group, pat_idx=tuple(pat_idx), n_methods=M, pat_mean=tuple(pat_mean))
    return data, [methods[k] for k in approx]


def _scatters(n, S, C, resolution):
    """(E,) bool: the methods' scores over the ``n`` inputs scatter in every direction.

    Every eigenvalue of their sample covariance must exceed ``resolution``^2
    and (1e-6 x the largest |mean|)^2: not only each method's own spread but
    also that of their differences. Two methods that are one another up to
    rounding on an edge (EAP and EAP-IG on the query of a saturated head:
    correlation 0.99999999) leave a direction of variance 1e-19, which the
    mean likelihood would read as a precision of 1e19; the fit's first step
    gave NaN.
    """
    count = np.maximum(n, 2.0)
    mean = S / count[:, None]
    cov = (C - S[:, :, None] * mean[:, None, :]) / (count - 1)[:, None, None]
    lowest = np.linalg.eigvalsh((cov + np.swapaxes(cov, 1, 2)) / 2)[:, 0]
    floor = np.maximum(resolution**2, 1e-12 * np.max(np.abs(mean), axis=1) ** 2) + 1e-300
    return lowest > floor


@jax.tree_util.register_dataclass
@dataclass
class Globals:
    """Method and prior parameters that the per-edge likelihood is conditioned on (JAX arrays)."""

    alpha: jnp.ndarray  # (T, M): error group x method
    beta: jnp.ndarray  # (T, M)
    sigma: jnp.ndarray  # (T, M)
    omega: jnp.ndarray  # (T, M)
    slab_sd: jnp.ndarray  # ()
    spike_sd: float | jnp.ndarray  # ()
    pi: jnp.ndarray  # ()


def silent_edges(data: EdgeData) -> np.ndarray:
    """Edges whose every score, exact and approximate, is exactly 0 (E,) bool: they carry no information."""
    quiet = (np.asarray(data.sxx) == 0) & (np.asarray(data.syy_m).sum(-1) == 0)
    for c in data.pat_c:
        quiet &= np.trace(np.asarray(c), axis1=1, axis2=2) == 0
    return quiet


def method_params(g: Globals, data: EdgeData):
    """``alpha, beta, sigma, omega`` of each edge's error group: (E, M) each."""
    grp = data.error_group
    return g.alpha[grp], g.beta[grp], g.sigma[grp], g.omega[grp]


# --- small dense linear algebra, unrolled over K (K = 1 + methods is tiny; batched LAPACK calls are slow) ---


def _cholesky_entries(entry, K: int) -> list[list]:
    """Lower Cholesky factor as nested lists ``L[i][j]`` (j <= i), from ``entry(i, j)`` of the SPD matrix."""
    L = [[None] * (i + 1) for i in range(K)]
    for j in range(K):
        s = entry(j, j)
        for k in range(j):
            s = s - L[j][k] ** 2
        L[j][j] = jnp.sqrt(s)
        for i in range(j + 1, K):
            t = entry(i, j)
            for k in range(j):
                t = t - L[i][k] * L[j][k]
            L[i][j] = t / L[j][j]
    return L


def _solve_lower_entries(L_entry, r: list) -> list:
    """Solve L y = r entry by entry for lower-triangular L given by ``L_entry(i, k)``."""
    y = []
    for i in range(len(r)):
        t = r[i]
        for k in range(i):
            t = t - L_entry(i, k) * y[k]
        y.append(t / L_entry(i, i))
    return y


def cholesky(B):
    """Lower Cholesky factor of a batch of small SPD matrices (..., K, K), unrolled elementwise."""
    K = B.shape[-1]
    L = _cholesky_entries(lambda i, j: B[..., i, j], K)
    zero = jnp.zeros_like(B[..., 0, 0])
    return jnp.stack([jnp.stack([L[i][j] if j <= i else zero for j in range(K)], -1) for i in range(K)], -2)


def solve_lower(L, r):
    """Solve L y = r for lower-triangular L (..., K, K), r (..., K)."""
    return jnp.stack(_solve_lower_entries(lambda i, k: L[..., i, k], [r[..., i] for i in range(L.shape[-1])]), -1)


def solve_upper_t(L, y):
    """Solve L' x = y for lower-triangular L (..., K, K), y (..., K)."""
    K = L.shape[-1]
    x = [None] * K
    for i in reversed(range(K)):
        t = y[..., i]
        for k in range(i + 1, K):
            t = t - L[..., k, i] * x[k]
        x[i] = t / L[..., i, i]
    return jnp.stack(x, -1)


def log_diag_sum(L):
    return jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)


# --- the quadratic form in u = (mu, delta_1..delta_M) ----------------------------------------


def quadratic_form(data: EdgeData, var: jnp.ndarray, g: Globals):
    """Log-likelihood of one edge's scores as ``c - u'Au/2 + b'u`` in ``u = (mu, delta_1..delta_M)``.

    ``var`` is ``tau^2`` with shape (E, G) (G grid points per edge). Returns
    ``A`` (E, G, K, K), ``b`` (E, G, K), ``c`` (E, G) with ``K = 1 + M``.
    Theta is integrated out; terms for absent methods are zero. The stacked
    form of :func:`quadratic_terms`.
    """
    A, b, c = quadratic_terms(data, var, g)
    full = partial(jnp.broadcast_to, shape=var.shape)
    K = len(b)
    rows = [jnp.stack([full(A[max(i, j)][min(i, j)]) for j in range(K)], -1) for i in range(K)]
    return jnp.stack(rows, -2), jnp.stack([full(x) for x in b], -1), full(c)


def quadratic_terms(data: EdgeData, var: jnp.ndarray, g: Globals):
    """:func:`quadratic_form` as separate (E, G) arrays: ``A[i][j]`` for ``j <= i``, ``b[i]``, ``c``.

    Every entry is written out in closed form, so the whole likelihood is a
    few elementwise passes over (edges x grid points): arrays with trailing
    K x K dimensions and scatter updates made the same algebra 3-4x slower on
    CPU, and it runs in every gradient of the fit. Entries may be scalars or
    (E, 1) where they do not vary with tau; they broadcast against ``var``.

    With ``data.approx_mean_only``, an edge with at least 2 exact inputs takes
    its approximate-only inputs through their mean alone, ``ybar ~ N(alpha +
    H u, S / n)`` with ``S`` their sample covariance
    (:func:`_add_approx_mean`), instead of the full model likelihood
    ``N(alpha + H u, D + tau^2 beta beta')`` per input. The full likelihood
    makes their scatter inform ``tau`` through the edge *type's* scale
    ``beta``; where an edge's own slope is far from its type's, hundreds of
    approximate-only inputs then outvote its exact inputs and inflate ``tau``
    (measured on ioi-toy: intrinsic SD 3.4 for an edge whose exact scores have
    SD 1.6-2.0). With the mean alone, ``tau`` is learnt from the exact inputs
    and the approximations inform ``mu`` with their own observed precision.
    Where :func:`edge_data` finds too few inputs or no scatter beyond the
    scores' resolution (``pat_mean`` false), the full likelihood stays.
    """
    M = data.n_methods
    K = 1 + M
    v = var
    A = [[0.0] * (i + 1) for i in range(K)]
    # exact inputs: x_i ~ N(mu, v)
    A[0][0] = data.n_x[:, None] / v
    b = [data.sx[:, None] / v] + [0.0] * M
    c = -0.5 * data.n_x[:, None] * (LOG_2PI + jnp.log(v)) - 0.5 * data.sxx[:, None] / v
    if M:
        # approximate given exact: y - alpha - beta x - delta ~ N(0, sigma^2), independent of tau
        a, be, sg, _ = method_params(g, data)  # (E, M)
        s2 = sg**2
        n = data.n_xy
        r1 = data.sy_m - n * a - be * data.sx_m
        r2 = (data.syy_m + n * a**2 + be**2 * data.sxx_m - 2 * a * data.sy_m - 2 * be * data.sxy_m
              + 2 * a * be * data.sx_m)
        for m in range(M):
            A[1 + m][1 + m] = (n[:, m] / s2[:, m])[:, None]
            b[1 + m] = (r1[:, m] / s2[:, m])[:, None]
        c = c + jnp.sum(-0.5 * n * (LOG_2PI + jnp.log(s2)) - 0.5 * r2 / s2, axis=-1)[:, None]
        mean_ok = data.pat_mean if data.approx_mean_only else ()
        for p, (idx, pn, ps, pc) in enumerate(zip(data.pat_idx, data.pat_n, data.pat_s, data.pat_c)):
            idx = tuple(int(i) for i in idx)
            if p >= len(mean_ok):
                c = _add_approx_only(A, b, c, v, idx, pn, ps, pc, a, be, s2)
                continue
            A_full, b_full = [list(row) for row in A], list(b)
            c_full = _add_approx_only(A_full, b_full, c, v, idx, pn, ps, pc, a, be, s2)
            use = jnp.reshape(jnp.asarray(mean_ok[p]), (-1, 1))
            c_mean = _add_approx_mean(A, b, c, idx, pn, ps, pc, a, be, use)
            for i in range(K):
                b[i] = jnp.where(use, b[i], b_full[i])
                for j in range(i + 1):
                    A[i][j] = jnp.where(use, A[i][j], A_full[i][j])
            c = jnp.where(use, c_mean, c_full)
    return A, b, c


def _add_approx_mean(A, b, c, idx, n, S, C, alpha, beta, use):
    """Inputs scored by approximate methods ``idx`` only, through their mean: ``ybar ~ N(a + H u, S_c / n)``.

    ``S_c`` is the sample covariance of those inputs' scores. Adds
    ``n H' S_c^-1 H`` to ``A`` and ``n H' S_c^-1 (ybar - a)`` to ``b`` in place
    and returns the new ``c``. ``use`` (E, 1) marks the edges where this
    applies (``EdgeData.pat_mean``); elsewhere the caller keeps the full
    likelihood and the values here are finite placeholders.
    """
    q = len(idx)
    nf = jnp.maximum(n, 2.0)
    ybar = S / nf[:, None]  # (E, q)
    cov = (C - S[:, :, None] * S[:, None, :] / nf[:, None, None]) / (nf - 1)[:, None, None]
    cov = jnp.where(use[:, :, None], cov, jnp.eye(q))  # placeholders keep the unused branch finite
    cov = cov + jnp.eye(q) * 1e-12 * jnp.max(jnp.diagonal(cov, axis1=1, axis2=2), -1)[:, None, None]  # collinear methods
    chol = cholesky(cov / nf[:, None, None])  # covariance of ybar
    a = jnp.stack([alpha[:, i] for i in idx], -1)
    be = jnp.stack([beta[:, i] for i in idx], -1)
    r = ybar - a

    def solve(x):  # (S_c / n)^-1 x
        return solve_upper_t(chol, solve_lower(chol, x))

    p_be, p_r = solve(be), solve(r)
    A[0][0] = A[0][0] + jnp.sum(be * p_be, -1)[:, None]
    b[0] = b[0] + jnp.sum(be * p_r, -1)[:, None]
    for j in range(q):
        row = 1 + idx[j]
        A[row][0] = A[row][0] + p_be[:, j][:, None]
        e_j = jnp.zeros(q).at[j].set(1.0)
        p_j = solve(jnp.broadcast_to(e_j, r.shape))
        for k in range(j + 1):
            A[row][1 + idx[k]] = A[row][1 + idx[k]] + p_j[:, k][:, None]
        b[row] = b[row] + p_r[:, j][:, None]
    log_norm = -0.5 * q * LOG_2PI - log_diag_sum(chol) - 0.5 * jnp.sum(r * p_r, -1)
    return c + log_norm[:, None]


def _add_approx_only(A, b, c, v, idx, n, S, C, alpha, beta, s2):
    """Inputs scored by approximate methods ``idx`` only: y ~ N(a + H u, D + v beta beta').

    ``H`` maps ``u`` to the methods' means (``beta`` on ``mu``, 1 on the
    method's own ``delta``). With ``w = beta / d`` and ``kappa = beta'w``, the
    precision is ``D^-1 - gamma w w'`` (``gamma = v / (1 + v kappa)``), which
    gives every entry of ``n H' P H``, ``H' P r`` and ``tr(P Q)`` in closed form.
    ``alpha``, ``beta``, ``s2`` are the edges' (E, M) parameters. Adds to ``A``
    and ``b`` in place and returns the new ``c``.
    """
    q = len(idx)
    a = [alpha[:, i] for i in idx]  # (E,) each
    be = [beta[:, i] for i in idx]
    d = [s2[:, i] for i in idx]
    w = [be[j] / d[j] for j in range(q)]
    kappa = sum(be[j] * w[j] for j in range(q))[:, None]  # (E, 1)
    denom = 1.0 + v * kappa  # (E, G)
    gamma = v / denom
    nn = n[:, None]
    A[0][0] = A[0][0] + nn * kappa / denom
    r = [S[:, j] - n * a[j] for j in range(q)]  # (E,) each
    wr = sum(w[j] * r[j] for j in range(q))[:, None]
    b[0] = b[0] + wr / denom
    wc = [x[:, None] for x in w]
    for j in range(q):
        row = 1 + idx[j]
        A[row][0] = A[row][0] + nn * wc[j] / denom
        for k in range(j + 1):
            col = 1 + idx[k]
            A[row][col] = A[row][col] + nn * ((1.0 / d[j][:, None] if k == j else 0.0) - gamma * wc[j] * wc[k])
        b[row] = b[row] + (r[j] / d[j])[:, None] - gamma * wc[j] * wr
    Q = [[C[:, j, k] - S[:, j] * a[k] - a[j] * S[:, k] + n * a[j] * a[k] for k in range(q)] for j in range(q)]
    tr_dq = sum(Q[j][j] / d[j] for j in range(q))[:, None]
    wqw = sum(w[j] * w[k] * Q[j][k] for j in range(q) for k in range(q))[:, None]
    logdet = sum(jnp.log(d[j]) for j in range(q))[:, None] + jnp.log1p(v * kappa)
    return c - 0.5 * nn * (q * LOG_2PI + logdet) - 0.5 * (tr_dq - gamma * wqw)


def evidence_terms(A, b, c, sd):
    """:func:`gaussian_evidence` on :func:`quadratic_terms`, with the prior SDs ``sd`` (K entries).

    Returns ``log ∫ exp(c - u'Au/2 + b'u) N(u; 0, diag(sd^2)) du`` only, computed
    entry by entry (the hot path of every likelihood evaluation).
    """
    return _evidence_entries(A, b, c, sd)[0]


def _evidence_entries(A, b, c, sd):
    """:func:`evidence_terms` and its factors: ``(log_z, L, z)`` with ``L`` the lower Cholesky factor of
    ``B = I + S A S`` (``S = diag(sd)``) as nested lists and ``z = L^-1 S b``, so that the posterior of
    ``u`` is ``S B^-1 S b + S L'^-1 eps`` (:func:`_posterior_draw`)."""
    K = len(b)
    L = _cholesky_entries(lambda i, j: (1.0 if i == j else 0.0) + sd[i] * A[i][j] * sd[j], K)
    z = _solve_lower_entries(lambda i, k: L[i][k], [sd[i] * b[i] for i in range(K)])
    return c - sum(jnp.log(L[i][i]) for i in range(K)) + 0.5 * sum(zi**2 for zi in z), L, z


def gaussian_evidence(A, b, c, prior_var):
    """``log ∫ exp(c - u'Au/2 + b'u) N(u; 0, diag(prior_var)) du`` and the posterior of ``u``.

    Works with zero prior variances (a point mass at 0) because it factors the
    well-conditioned ``B = I + L A L`` with ``L = sqrt(prior_var)``. Returns
    ``(log_z, chol, Lb)``: the posterior is ``N(L B^-1 L b, L B^-1 L)``.
    """
    L = jnp.sqrt(prior_var)  # (..., K)
    K = A.shape[-1]
    B = jnp.eye(K) + L[..., :, None] * A * L[..., None, :]
    chol = cholesky(B)
    z = solve_lower(chol, L * b)
    log_z = c - log_diag_sum(chol) + 0.5 * jnp.sum(z**2, -1)
    return log_z, chol, L


def _prior_vars(g: Globals, data: EdgeData, mu_var):
    """Prior variances of u = (mu, delta) broadcast with ``mu_var`` (E, ...)."""
    mu_var = jnp.asarray(mu_var)
    om2 = method_params(g, data)[3] ** 2  # (E, M)
    om = jnp.broadcast_to(jnp.expand_dims(om2, tuple(range(1, mu_var.ndim))), mu_var.shape + (data.n_methods,))
    return jnp.concatenate([mu_var[..., None], om], axis=-1)


def edge_log_marginal(data: EdgeData, var, g: Globals):
    """Per edge and grid point: log p(scores | tau^2 = var, globals) under spike and under slab.

    Returns ``(log_spike, log_slab)`` each (E, G), with ``mu`` and ``delta``
    integrated out analytically.
    """
    A, b, c = quadratic_terms(data, var, g)
    log_spike, log_slab = (evidence_terms(A, b, c, sd) for sd in _component_sds(g, data))
    return jnp.broadcast_to(log_spike, var.shape), jnp.broadcast_to(log_slab, var.shape)


def _component_sds(g: Globals, data: EdgeData) -> tuple[list, list]:
    """Prior SDs of ``u = (mu, delta)`` under spike and under slab, as entry lists for :func:`evidence_terms`."""
    om = method_params(g, data)[3]
    omega = [om[:, m][:, None] for m in range(data.n_methods)]
    return [jnp.asarray(g.spike_sd, float)] + omega, [g.slab_sd] + omega


# --- the tau grid -----------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclass
class TauGrid:
    """Per-edge grid of ``log tau`` points (E, G) with spacing ``step`` (E,): trapezoid weights.

    ``unit`` = 0: the points are used as they are (the wide starting grid).
    ``unit`` > 0: the grid describes edge e's likelihood in ``log tau`` (centre
    = middle point, spacing ``unit`` likelihood SDs) and :func:`placed_grid`
    moves it onto prior x likelihood for each value of the tau prior.
    """

    log_tau: jnp.ndarray
    step: jnp.ndarray
    unit: float = field(default=0.0, metadata=dict(static=True))

    def take(self, idx) -> TauGrid:
        return TauGrid(log_tau=self.log_tau[idx], step=self.step[idx], unit=self.unit)


def coarse_grid(n_edges: int, scale: float, points: int = 40) -> TauGrid:
    """The same wide grid for every edge: tau from scale/3000 to 30*scale."""
    lt = np.linspace(math.log(scale / 3000), math.log(30 * scale), points)
    return TauGrid(log_tau=np.tile(lt, (n_edges, 1)), step=np.full(n_edges, lt[1] - lt[0]))


def placed_grid(grid: TauGrid, tau_mean, tau_spread) -> TauGrid:
    """The quadrature points for ``log tau`` under the prior N(tau_mean, tau_spread).

    A fixed grid fails when the prior is narrower than its spacing: the
    trapezoid sum of a spike-shaped prior is then far from 1 and peaks whenever
    ``tau_mean`` sits on a grid point, a spurious mode that pulled
    ``tau_spread`` towards 0 (found by simulation-based calibration: tau
    posteriors far too narrow). The points are therefore placed on the Gaussian
    product of the edge's likelihood proxy and the prior, spaced ``unit`` SDs
    of that product, so they always resolve the integrand.
    """
    if not grid.unit:
        return grid
    G = grid.log_tau.shape[-1]
    lik_sd = grid.step / grid.unit
    centre = jnp.mean(grid.log_tau, -1)
    prec = 1.0 / lik_sd**2 + 1.0 / tau_spread**2
    sd = 1.0 / jnp.sqrt(prec)
    mean = (centre / lik_sd**2 + tau_mean / tau_spread**2) / prec
    z = (jnp.arange(G) - (G - 1) / 2) * grid.unit
    return TauGrid(log_tau=mean[:, None] + sd[:, None] * z[None, :], step=sd * grid.unit, unit=0.0)


def grid_log_weights(data: EdgeData, grid: TauGrid, g: Globals, tau_mean, tau_spread):
    """log of [prior(log tau) * likelihood * spacing] per grid point, and the spike/slab parts.

    ``grid`` must already be placed (:func:`placed_grid`). Returns
    ``(log_w, log_spike, log_slab)``, each (E, G); ``log_w`` already includes
    the mixture over spike and slab and the inclusion rate ``pi``.
    """
    log_mix, log_spike, log_slab = _log_mix(data, grid, g)
    return _log_tau_prior(grid, tau_mean, tau_spread) + log_mix, log_spike, log_slab


def _log_tau_prior(grid: TauGrid, tau_mean, tau_spread):
    """log of [prior(log tau) * spacing] at each point of a placed grid, (E, G)."""
    return dist.Normal(tau_mean[:, None], tau_spread).log_prob(grid.log_tau) + jnp.log(grid.step)[:, None]


def _log_mix(data: EdgeData, grid: TauGrid, g: Globals):
    """Per grid point: log of the spike/slab mixture likelihood, and its two parts, each (E, G)."""
    log_spike, log_slab = edge_log_marginal(data, jnp.exp(2 * grid.log_tau), g)
    return _mixture(g, log_spike, log_slab), log_spike, log_slab


def _mixture(g: Globals, log_spike, log_slab):
    """log[(1 - pi) p(data | spike) + pi p(data | slab)]."""
    return jnp.logaddexp(jnp.log1p(-g.pi) + log_spike, jnp.log(g.pi) + log_slab)


def refine_grid(data: EdgeData, grid: TauGrid, g: Globals, points: int = 11, width: float = 5.0,
                min_sd: float = 1e-3) -> TauGrid:
    """A per-edge grid describing the edge's likelihood in ``log tau`` at the given parameters.

    Centred on the likelihood's mean, spanning ``width`` of its SDs either
    side with ``points`` points (spacing one SD); :func:`placed_grid` then
    moves it onto prior x likelihood. Apply twice from :func:`coarse_grid`.
    The tau prior plays no part: the description must not depend on the prior
    it is later combined with.
    """
    log_mix = _log_mix(data, grid, g)[0]
    w = jax.nn.softmax(log_mix + jnp.log(grid.step)[:, None], axis=-1)
    m = jnp.sum(w * grid.log_tau, -1)
    sd = jnp.sqrt(jnp.sum(w * (grid.log_tau - m[:, None]) ** 2, -1))
    sd = jnp.maximum(sd, jnp.maximum(min_sd, 0.35 * grid.step))
    z = jnp.linspace(-width, width, points)
    lt = m[:, None] + sd[:, None] * z[None, :]
    return TauGrid(log_tau=lt, step=sd * (z[1] - z[0]), unit=2 * width / (points - 1))


# --- the NumPyro model ----------------------------------------------------------------------------


POOLING_SPREAD = {"beta": 0.5, "sigma": 1.5}
"""Prior SD of an edge type's scale beta around its method's, and of its log noise SD around the method's
(fixed, not learnt: a learnt spread over a dozen types makes a funnel)."""
SIGMA_FLOOR = 1e-4
"""Per-input noise SD floor, x scale: keeps the likelihood finite where exact and approximate scores agree
to the last bit."""


def make_globals(params: dict, M: int, scale, slab_sd, spike_sd, pi) -> Globals:
    """:class:`Globals` from sampled values.

    Pooled by method (no ``*_type`` values): one row, the method's ``alpha,
    beta, sigma, omega``. Pooled by edge type: one row per type, ``beta`` and
    ``sigma`` the type's own, the bias and the per-edge error SD in units of
    the type's noise (``alpha = alpha_rel * sigma``, ``omega = omega_rel *
    sigma``), then one row of the method's own values. Edges whose every score
    is exactly 0 use that last row: they say nothing about the error, and a
    type made of them alone would have its noise pulled towards 0.
    """
    if not M:
        z = jnp.zeros((1, 0))
        return Globals(alpha=z, beta=z, sigma=z, omega=z, slab_sd=slab_sd, spike_sd=spike_sd, pi=pi)
    if "sigma_type" in params:
        sigma = jnp.concatenate([jnp.asarray(params["sigma_type"]), jnp.asarray(params["sigma"])[None]])
        beta = jnp.concatenate([jnp.asarray(params["beta_type"]), jnp.asarray(params["beta"])[None]])
        alpha, omega = params["alpha_rel"] * sigma, params["omega_rel"] * sigma
    else:
        alpha, beta, sigma, omega = (jnp.asarray(params[k])[None] for k in ("alpha", "beta", "sigma", "omega"))
    return Globals(alpha=alpha, beta=beta, sigma=jnp.sqrt(sigma**2 + (SIGMA_FLOOR * scale) ** 2), omega=omega,
                   slab_sd=slab_sd, spike_sd=spike_sd, pi=pi)


def type_error_values(sample: dict) -> dict:
    """Bias and per-edge error SD in metric units from a fit pooled by edge type.

    ``alpha_type``, ``omega_type`` (..., types, M) and the method's own
    ``alpha``, ``omega`` (..., M) (the row :func:`make_globals` appends), so a
    posterior always has ``alpha, beta, sigma, omega`` per method.
    """
    sig, sig_m = sample["sigma_type"], sample["sigma"]
    a, w = sample["alpha_rel"], sample["omega_rel"]
    return {"alpha_type": a[..., None, :] * sig, "omega_type": w[..., None, :] * sig, "alpha": a * sig_m,
            "omega": w * sig_m}


def tau_means(tau_loc, type_eff, layer_eff, edge_type_idx, layer_idx):
    """Prior mean of log tau per edge: global + edge type + receiver layer."""
    return tau_loc + type_eff[edge_type_idx] + layer_eff[layer_idx]


def _group_prior(n: int):
    """Standardised group effects that sum to zero.

    Plain N(0, 1) effects are additive with ``tau_loc``: shifting ``tau_loc``
    and every ``sd * z`` against each other leaves the likelihood unchanged, a
    curved ridge only the prior resolves (on the 110-edge test graph NUTS took
    ~42 leapfrog steps per draw with zero-sum effects; the gain over plain
    effects was not measured cleanly).
    """
    if n < 2:
        return dist.Normal(0.0, 1.0).expand([n]).to_event(1)
    return dist.ZeroSumNormal(1.0, event_shape=(n,))


def collapsed_model(data: EdgeData, grid: TauGrid, edge_type_idx, layer_idx, scale, student_t=None,
                    control_variate=None, *, n_types: int, n_layers: int, n_error_groups: int = 1,
                    spike_sd: float = 0.0, exact_present: bool = True, edge_batch: int | None = None,
                    prior_only: bool = False):
    """Global parameters with every per-edge quantity integrated out.

    Parameters
    ----------
    data : EdgeData
    grid : TauGrid
        Per-edge ``log tau`` quadrature grid.
    edge_type_idx, layer_idx : int arrays (E,)
        Pooling groups of each edge for ``log tau``.
    scale : float or 0-d array
        Typical size of the scores (metric units); priors are relative to it.
        Data and ``scale`` are arguments, not closed over, so that fits of
        equally shaped data (bootstrap refits, SBC replications) reuse one
        compiled program.
    spike_sd : float, default 0
        SD of the spike component (0: a point mass at zero).
    n_error_groups : int, default 1
        Groups of ``data.error_group``; above 1 each group gets its own
        approximation parameters, pooled towards the method's.
    exact_present : bool
        Without exact scores, ``alpha``/``beta`` are pinned near (0, 1) by tighter priors.
    student_t : StudentTTable, optional
        Use the Student-t intrinsic-variation likelihood (see :func:`student_t_table`).
    edge_batch : int, optional
        Subsample this many edges per evaluation (stochastic-gradient SVI at scale;
        the likelihood is rescaled by the plate).
    control_variate : ControlVariate, optional
        With ``edge_batch``: estimate the sum over edges as the sum of each
        edge's first-order expansion around an anchor (exact, over all edges)
        plus the subsampled remainder (:class:`ControlVariate`). The same
        value in expectation, far less noise near the anchor. Without
        ``edge_batch`` it cancels exactly.
    prior_only : bool, default False
        Sample the globals from their prior and stop: no likelihood. The
        guides' shapes and ``SVI.init`` need the global sites only
        (:mod:`bayescirc._guides`), so they run this, not the edge likelihood.
    """
    M = data.n_methods
    params = {}
    if M:
        loose = 1.0 if exact_present else 0.1
        with numpyro.plate(schema.DIM_METHOD, M):
            params["beta"] = numpyro.sample("beta", dist.Normal(1.0, 0.5 * loose))
            params["sigma"] = numpyro.sample("sigma", dist.HalfNormal(scale))
            if n_error_groups > 1:
                params["alpha_rel"] = numpyro.sample("alpha_rel", dist.Normal(0.0, loose))
                params["omega_rel"] = numpyro.sample("omega_rel", dist.HalfNormal(1.0))
            else:
                params["alpha"] = numpyro.sample("alpha", dist.Normal(0.0, loose * scale))
                params["omega"] = numpyro.sample("omega", dist.HalfNormal(0.5 * scale))
        if n_error_groups > 1:
            s = POOLING_SPREAD
            with numpyro.plate(schema.DIM_EDGE_TYPE, n_error_groups, dim=-2), numpyro.plate(schema.DIM_METHOD, M, dim=-1):
                params["beta_type"] = numpyro.sample("beta_type", dist.Normal(params["beta"], s["beta"] * loose))
                params["sigma_type"] = numpyro.sample("sigma_type", dist.LogNormal(jnp.log(params["sigma"]), s["sigma"]))
    slab_sd = numpyro.sample("slab_sd", dist.LogNormal(jnp.log(scale), 1.5))
    pi = numpyro.sample("pi", dist.Beta(1.0, 3.0))
    tau_loc = numpyro.sample("tau_loc", dist.Normal(jnp.log(scale), 2.0))
    tau_spread = numpyro.sample("tau_spread", dist.HalfNormal(1.0))
    type_sd = numpyro.sample("type_sd", dist.HalfNormal(0.5))
    type_z = numpyro.sample("type_z", _group_prior(n_types))
    layer_sd = numpyro.sample("layer_sd", dist.HalfNormal(0.5))
    layer_z = numpyro.sample("layer_z", _group_prior(n_layers))
    if prior_only:
        return
    g = make_globals(params, M, scale, slab_sd, spike_sd, pi)
    if student_t is not None:
        tm = tau_means(tau_loc, type_sd * type_z, layer_sd * layer_z, edge_type_idx, layer_idx)
        numpyro.factor("edges", student_t_total(student_t_parts(data, grid, g, tm, tau_spread, student_t)[0])[0])
        return
    if control_variate is not None:
        params.update(slab_sd=slab_sd, pi=pi, tau_loc=tau_loc, tau_spread=tau_spread, type_sd=type_sd, type_z=type_z,
                      layer_sd=layer_sd, layer_z=layer_z)
        step = control_variate.step(params)
        numpyro.factor("edges_expansion", control_variate.expansion_total(step))
    with numpyro.plate(schema.DIM_EDGE, data.n_edges, subsample_size=edge_batch) as idx:
        if edge_batch is not None:
            data, grid = data.take(idx), grid.take(idx)
            edge_type_idx, layer_idx = edge_type_idx[idx], layer_idx[idx]
        tm = tau_means(tau_loc, type_sd * type_z, layer_sd * layer_z, edge_type_idx, layer_idx)
        log_lik = edge_log_likelihood(data, grid, g, tm, tau_spread)
        if control_variate is not None:
            log_lik = log_lik - control_variate.expansion(step, idx)
        numpyro.factor("edges", log_lik)


# --- a control variate for subsampled edges -------------------------------------------------------

POSITIVE_SITES = ("sigma", "omega", "omega_rel", "sigma_type", "slab_sd", "tau_spread", "type_sd", "layer_sd")


def unconstrained(params: dict) -> dict:
    """The globals in coordinates where the likelihood is smooth and unbounded: log of SDs, logit of ``pi``."""
    out = {}
    for k, v in params.items():
        v = jnp.asarray(v)
        out[k] = jnp.log(v) if k in POSITIVE_SITES else (jnp.log(v) - jnp.log1p(-v) if k == "pi" else v)
    return out


def constrained(coords: dict) -> dict:
    """Inverse of :func:`unconstrained`."""
    return {k: jnp.exp(v) if k in POSITIVE_SITES else (jax.nn.sigmoid(v) if k == "pi" else v)
            for k, v in coords.items()}


def globals_log_likelihood(params: dict, data: EdgeData, grid: TauGrid, edge_type_idx, layer_idx, scale,
                           spike_sd: float = 0.0):
    """Each edge's log-likelihood (E,) at the globals ``params`` (every site of :func:`collapsed_model`)."""
    g = make_globals(params, data.n_methods, scale, params["slab_sd"], spike_sd, params["pi"])
    tm = tau_means(params["tau_loc"], params["type_sd"] * params["type_z"], params["layer_sd"] * params["layer_z"],
                   edge_type_idx, layer_idx)
    return edge_log_likelihood(data, grid, g, tm, params["tau_spread"])


@jax.tree_util.register_dataclass
@dataclass
class ControlVariate:
    """First-order expansion of every edge's log-likelihood around anchor globals (difference estimator).

    Stochastic-gradient SVI subsamples edges; the edges' log-likelihoods
    differ by orders of magnitude, so the subsampled sum (and its gradient)
    is noisy. Each edge's log-likelihood is written as its expansion
    ``value[e] + slope[e] . (phi - anchor)`` in :func:`unconstrained`
    coordinates ``phi``, whose sum over all edges is exact and cheap, plus a
    remainder that is only subsampled. Unbiased for any anchor; near the
    anchor the remainder, and so the noise, is second order in the distance
    (the anchor is the posterior mode of the globals, which are pinned down
    at the scales where edges are subsampled). See Bardenet, Doucet & Holmes
    (2017), *On Markov chain Monte Carlo methods for tall data*, section 7.
    """

    anchor: jnp.ndarray  # (P,) flattened unconstrained coordinates
    value: jnp.ndarray  # (E,)
    slope: jnp.ndarray  # (E, P)
    value_total: jnp.ndarray  # ()
    slope_total: jnp.ndarray  # (P,)

    def step(self, params: dict) -> jnp.ndarray:
        """``phi - anchor`` for the globals ``params`` (flattened in sorted site order)."""
        return _flat(unconstrained(params)) - self.anchor

    def expansion_total(self, step) -> jnp.ndarray:
        return self.value_total + self.slope_total @ step

    def expansion(self, step, idx) -> jnp.ndarray:
        return self.value[idx] + self.slope[idx] @ step


def _flat(tree: dict) -> jnp.ndarray:
    return jnp.concatenate([jnp.ravel(tree[k]) for k in sorted(tree)])


def control_variate(anchor: dict, data: EdgeData, grid: TauGrid, edge_type_idx, layer_idx, scale,
                    spike_sd: float = 0.0, chunk: int = 4096) -> ControlVariate:
    """:class:`ControlVariate` at the globals ``anchor``: each edge's log-likelihood and its gradient there."""
    coords = {k: jnp.asarray(v, float) for k, v in unconstrained(anchor).items()}
    flat0 = _flat(coords)
    E = data.n_edges
    values, slopes = [], []
    size = min(E, chunk)
    for start in range(0, E, size):
        n = min(E, start + size) - start
        idx = np.minimum(np.arange(start, start + size), E - 1)  # the last block padded: one shape, one compilation
        v, s = _edge_values_and_slopes(coords, data.take(idx), grid.take(idx), jnp.asarray(edge_type_idx)[idx],
                                       jnp.asarray(layer_idx)[idx], jnp.asarray(scale, float), spike_sd)
        values.append(v[:n])
        slopes.append(s[:n])
    value, slope = jnp.concatenate(values), jnp.concatenate(slopes)
    return ControlVariate(anchor=flat0, value=value, slope=slope, value_total=value.sum(), slope_total=slope.sum(0))


@partial(jax.jit, static_argnames="spike_sd")
def _edge_values_and_slopes(coords, data, grid, edge_type_idx, layer_idx, scale, spike_sd):
    """Per edge: log-likelihood and its gradient in the flattened coordinates (edges are independent given the globals)."""

    def one(c, d, gr, t, lyr):
        d = jax.tree.map(lambda x: x[None], d)
        gr = jax.tree.map(lambda x: x[None], gr)
        return globals_log_likelihood(constrained(c), d, gr, t[None], lyr[None], scale, spike_sd)[0]

    value_and_grad = jax.vmap(jax.value_and_grad(one), in_axes=(None, 0, 0, 0, 0))
    value, grads = value_and_grad(coords, data, grid, edge_type_idx, layer_idx)
    return value, jnp.concatenate([grads[k].reshape(value.shape[0], -1) for k in sorted(grads)], -1)


@jax.jit
def edge_log_likelihood(data: EdgeData, grid: TauGrid, g: Globals, tau_mean, tau_spread):
    """log p(edge e's scores | globals), tau integrated on its grid: (E,).

    Compiled as one function: NumPyro runs the model eagerly while it
    initialises, and op-by-op dispatch of the per-edge algebra would compile
    hundreds of tiny kernels (most of a small fit's time).
    """
    return logsumexp(grid_log_weights(data, placed_grid(grid, tau_mean, tau_spread), g, tau_mean, tau_spread)[0],
                     axis=-1)


# --- per-edge conditionals, for drawing mu, tau, delta and inclusion per posterior draw -------------


@jax.tree_util.register_dataclass
@dataclass
class EvidenceFactors:
    """Per edge and grid point, under spike and under slab: the log evidence and the factors of u's posterior.

    ``log_z`` (2, E, G); ``chol`` (2, E, G, K, K) and ``z`` (2, E, G, K) as in
    :func:`gaussian_evidence` (``z = L^-1 S b``); ``sd`` (2, E, K) the prior
    SDs ``S`` of ``u = (mu, delta)``. Index 0 is the spike, 1 the slab.
    """

    log_z: jnp.ndarray
    chol: jnp.ndarray
    z: jnp.ndarray
    sd: jnp.ndarray


def evidence_factors(data: EdgeData, grid: TauGrid, g: Globals) -> EvidenceFactors:
    """:func:`edge_log_marginal` on a placed grid, keeping what a draw of ``u`` at any grid point needs."""
    var = jnp.exp(2 * grid.log_tau)
    A, b, c = quadratic_terms(data, var, g)
    E, G = var.shape
    K = 1 + data.n_methods
    full = partial(jnp.broadcast_to, shape=(E, G))
    out = []
    for sd in _component_sds(g, data):
        log_z, L, z = _evidence_entries(A, b, c, sd)
        zero = jnp.zeros((E, G))
        chol = jnp.stack([jnp.stack([full(L[i][j]) if j <= i else zero for j in range(K)], -1) for i in range(K)], -2)
        out.append((full(log_z), chol, jnp.stack([full(x) for x in z], -1),
                    jnp.stack([jnp.broadcast_to(x, (E, 1))[:, 0] for x in sd], -1)))
    return EvidenceFactors(*(jnp.stack(parts) for parts in zip(*out)))


def edge_conditionals(key, data: EdgeData, grid: TauGrid, g: Globals, tau_mean, tau_spread, threshold=None):
    """One posterior draw of the per-edge quantities given one draw of the globals.

    Draws ``log tau`` from its grid posterior (jittered within its cell), the
    indicator and ``(mu, delta)`` from their exact Gaussian conditionals.
    Returns a dict with ``mu`` (E,), ``tau`` (E,), ``delta`` (E, M),
    ``inclusion`` (E,): P(slab | data, globals) with tau integrated
    (Rao-Blackwellised), or, when ``threshold`` is given, P(|mu| > threshold
    | data, globals), and ``mu_slab`` (E,): a draw of mu given that the edge
    is in the slab (tau drawn from its slab-conditional posterior).
    """
    return jax.tree.map(lambda x: x[0], edge_conditionals_repeated(key[None], data, grid, g, tau_mean, tau_spread,
                                                                   threshold=threshold))


def edge_conditionals_repeated(keys, data: EdgeData, grid: TauGrid, g: Globals, tau_mean, tau_spread, threshold=None):
    """``len(keys)`` draws of :func:`edge_conditionals` for one draw of the globals.

    Every edge's evidence and posterior factors at every grid point (the
    costly part) depend on the globals only, so they are computed once and
    the draws only pick grid points and back-substitute. Each output gains a
    leading axis of ``len(keys)``.
    """
    grid = placed_grid(grid, tau_mean, tau_spread)
    f = evidence_factors(data, grid, g)
    log_w = _log_tau_prior(grid, tau_mean, tau_spread) + _mixture(g, *f.log_z)
    cells = _cell_table(f)  # shared by the draws
    return jax.vmap(lambda k: _edge_sample(k, grid, g, log_w, f, cells, threshold=threshold))(keys)


def _cell_table(f: EvidenceFactors):
    """``chol`` and ``z`` with one row (K K + K,) per component, edge and grid point (row (c E + e) G + g).

    A draw needs them at one grid point and component per edge: a row gather
    from this table, for the component drawn only, instead of indexing
    ``chol[:, rows, points]`` and solving for both components.
    """
    C, E, G, K = f.z.shape
    return jnp.concatenate([f.chol.reshape(C * E * G, K * K), f.z.reshape(C * E * G, K)], -1)


def _at_cells(cells, component, points, K):
    """``chol`` (E, K, K) and ``z`` (E, K) of ``component`` (0/1, scalar or (E,)) at ``points`` (E,)."""
    E = points.shape[0]
    G = cells.shape[0] // (2 * E)
    picked = jnp.take(cells, (component * E + jnp.arange(E)) * G + points, axis=0)
    return picked[:, : K * K].reshape(E, K, K), picked[:, K * K :]


def _edge_sample(key, grid: TauGrid, g: Globals, log_w, f: EvidenceFactors, cells, threshold=None):
    """The draws of :func:`edge_conditionals` given the grid weights and factors (``grid`` already placed)."""
    k_tau, k_jit, k_ind, k_u, k_slab = jax.random.split(key, 5)
    E, G = log_w.shape
    K = f.z.shape[-1]
    rows = jnp.arange(E)
    gi = _categorical(k_tau, log_w)  # (E,)
    at = rows * G + gi
    jitter = (jax.random.uniform(k_jit, (E,)) - 0.5) * grid.step
    log_tau = jnp.ravel(grid.log_tau)[at] + jitter  # u is drawn at the grid point (its exact conditional there)
    log_cond_slab = jax.nn.log_sigmoid(jnp.log(g.pi) + f.log_z[1] - jnp.log1p(-g.pi) - f.log_z[0])  # P(slab | tau point)
    p_slab_here = jnp.exp(jnp.ravel(log_cond_slab)[at])
    slab = jax.random.uniform(k_ind, (E,)) < p_slab_here
    eps = jax.random.normal(k_u, (E, K))
    chol, z = _at_cells(cells, slab.astype(jnp.int32), gi, K)  # the drawn component's factors
    u = jnp.where(slab[:, None], f.sd[1], f.sd[0]) * solve_upper_t(chol, z + eps)
    # Rao-Blackwellised inclusion: tau integrated over its grid posterior
    post = jax.nn.softmax(log_w, axis=-1)
    if threshold is None:
        inclusion = jnp.sum(post * jnp.exp(log_cond_slab), -1)
    else:
        exceeds = []
        for c in (0, 1):  # the probability under each component at the drawn grid point
            chol_c, z_c = _at_cells(cells, c, gi, K)
            exceeds.append(_prob_exceeds(chol_c, f.sd[c], z_c, threshold))
        inclusion = exceeds[0] * (1 - p_slab_here) + exceeds[1] * p_slab_here
    # mu given that the edge is in the slab: tau from its slab-conditional grid posterior, then mu
    gs = _categorical(k_slab, log_w + log_cond_slab)
    chol_s, z_s = _at_cells(cells, 1, gs, K)
    mu_slab = f.sd[1][:, 0] * solve_upper_t(chol_s, z_s + eps)[:, 0]
    return {"mu": u[:, 0], "delta": u[:, 1:], "tau": jnp.exp(log_tau), "inclusion": inclusion, "mu_slab": mu_slab}


def _categorical(key, logits):
    """One draw per row of ``logits`` (..., G), by inverting the row's CDF with a single uniform.

    ``jax.random.categorical`` (Gumbel-max) needs a random number per cell:
    at GPT-2 scale two such draws per posterior draw took ~23 ms of its ~24.
    The CDF does not depend on the key, so repeated draws share it.
    """
    cdf = jnp.cumsum(jax.nn.softmax(logits, -1), -1)
    u = jax.random.uniform(key, logits.shape[:-1]) * cdf[..., -1]
    return jnp.minimum(jnp.sum(cdf < u[..., None], -1), logits.shape[-1] - 1)


def _posterior_draw(chol, L, b, z):
    """A draw from N(L B^-1 L b, L B^-1 L) given the Cholesky factor of B."""
    return L * solve_upper_t(chol, solve_lower(chol, L * b) + z)


def _prob_exceeds(chol, L, z, threshold):
    """P(|mu| > threshold) under the Gaussian posterior of u (mu is component 0), given ``z = chol^-1 L b``."""
    mean = L[..., 0] * solve_upper_t(chol, z)[..., 0]
    e0 = jnp.zeros(chol.shape[:-1]).at[..., 0].set(1.0)
    sd = L[..., 0] * jnp.sqrt(jnp.sum(solve_lower(chol, e0) ** 2, -1))
    sd = jnp.maximum(sd, 1e-30)
    norm = dist.Normal(mean, sd)
    return norm.cdf(-threshold) + 1 - norm.cdf(threshold)


# --- Student-t intrinsic variation ---------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclass
class StudentTTable:
    """Exact scores' Student-t log-likelihood, tabulated per edge on a mu-grid and the tau grid.

    ``log_lik[d, e, j, g]``: sum over edge e's exact inputs of log t_df(x; mu_j,
    tau_g) (unit-variance scaling) for ``df = STUDENT_T_DF[d]``; ``log_lik0``
    the same at ``mu = 0`` (the spike). ``mu`` (E, J) with spacing ``mu_step`` (E,).
    """

    log_lik: jnp.ndarray
    log_lik0: jnp.ndarray
    mu: jnp.ndarray
    mu_step: jnp.ndarray


def student_t_table(exact_scores: np.ndarray, mask: np.ndarray, grid: TauGrid, mu_center, mu_sd,
                    points: int = 41, width: float = 6.0, df=STUDENT_T_DF, chunk: int = 256) -> StudentTTable:
    """Tabulate the Student-t exact-score log-likelihood (cost: edges x exact inputs x mu-grid x tau-grid).

    ``exact_scores`` (E, N) with ``mask`` (E, N) marking observed entries.
    """
    z = np.linspace(-width, width, points)
    mu = np.asarray(mu_center)[:, None] + np.asarray(mu_sd)[:, None] * z[None, :]
    tau = np.exp(np.asarray(grid.log_tau))
    out, out0 = [], []

    @jax.jit
    def block(x, m, mu_b, tau_b, nu):
        scale = tau_b * jnp.sqrt((nu - 2) / nu)  # (e, G)
        resid = x[:, None, None, :] - mu_b[:, :, None, None]  # (e, J, 1, N)
        lp = dist.StudentT(nu, 0.0, scale[:, None, :, None]).log_prob(resid)
        full = jnp.sum(jnp.where(m[:, None, None, :], lp, 0.0), -1)
        lp0 = dist.StudentT(nu, 0.0, scale[:, :, None]).log_prob(x[:, None, :])
        zero = jnp.sum(jnp.where(m[:, None, :], lp0, 0.0), -1)
        return full, zero

    for nu in df:
        parts, parts0 = [], []
        for s in range(0, exact_scores.shape[0], chunk):
            sl = slice(s, s + chunk)
            f, f0 = block(exact_scores[sl], mask[sl], mu[sl], tau[sl], float(nu))
            parts.append(np.asarray(f))
            parts0.append(np.asarray(f0))
        out.append(np.concatenate(parts))
        out0.append(np.concatenate(parts0))
    return StudentTTable(log_lik=np.stack(out), log_lik0=np.stack(out0), mu=mu, mu_step=np.asarray(mu_sd) * (z[1] - z[0]))


def _schur_mu(A, b, c, om2):
    """Integrate delta out of ``c - u'Au/2 + b'u`` (prior N(0, om2)): a quadratic in mu ``c' - a mu^2/2 + b mu``.

    ``om2`` broadcasts against ``A``'s leading dimensions plus the method axis.
    """
    M = A.shape[-1] - 1
    if M == 0:
        return A[..., 0, 0], b[..., 0], c
    Add = A[..., 1:, 1:] + jnp.eye(M) / om2[..., None]
    Adm = A[..., 1:, 0]
    # delta prior normaliser: -1/2 sum log om2 ; Gaussian integral: +M/2 log 2pi - 1/2 logdet Add + 1/2 r' Add^-1 r
    chol = cholesky(Add)

    def solve(v):
        return solve_upper_t(chol, solve_lower(chol, v))

    bd = b[..., 1:]
    s_b = solve(bd)
    s_a = solve(Adm)
    logdet = 2 * log_diag_sum(chol)
    c2 = c - 0.5 * jnp.sum(jnp.log(om2), -1) - 0.5 * logdet + 0.5 * jnp.sum(bd * s_b, -1)
    a2 = A[..., 0, 0] - jnp.sum(Adm * s_a, -1)
    b2 = b[..., 0] - jnp.sum(Adm * s_b, -1)
    return a2, b2, c2


def student_t_parts(data_no_exact: EdgeData, grid: TauGrid, g: Globals, tau_mean, tau_spread, table: StudentTTable):
    """Per degrees of freedom d: log weights of the tau grid with Student-t exact scores.

    ``data_no_exact`` holds everything but the exact-score moments (``n_x = 0``);
    the exact inputs enter through ``table``. Returns ``(log_w, log_spike,
    log_slab, gauss)`` with shapes (D, E, G) for the first three and (E, G, J)
    for ``gauss`` (the approximate-score log-likelihood on the mu-grid, delta
    integrated out).
    """
    var = jnp.exp(2 * grid.log_tau)
    A, b, c = quadratic_form(data_no_exact, var, g)
    om2 = method_params(g, data_no_exact)[3] ** 2
    a2, b2, c2 = _schur_mu(A, b, c, jnp.maximum(om2, 1e-30)[:, None, :])
    mu = table.mu[:, None, :]  # (E,1,J)
    gauss = c2[..., None] - 0.5 * a2[..., None] * mu**2 + b2[..., None] * mu  # (E,G,J)
    slab_prior = dist.Normal(0.0, g.slab_sd).log_prob(table.mu) + jnp.log(table.mu_step)[:, None]  # (E,J)
    log_slab = logsumexp(jnp.swapaxes(table.log_lik, -1, -2) + gauss[None] + slab_prior[None, :, None, :], axis=-1)
    log_spike = table.log_lik0 + c2[None]
    log_mix = jnp.logaddexp(jnp.log1p(-g.pi) + log_spike, jnp.log(g.pi) + log_slab)  # (D,E,G)
    log_prior = dist.Normal(tau_mean[:, None], tau_spread).log_prob(grid.log_tau) + jnp.log(grid.step)[:, None]
    return log_prior[None] + log_mix, log_spike, log_slab, gauss


def student_t_total(log_w):
    """Log marginal likelihood with the degrees of freedom uniform over the tabulated values."""
    per_df = jnp.sum(logsumexp(log_w, axis=-1), axis=-1)  # (D,)
    return logsumexp(per_df) - math.log(log_w.shape[0]), per_df
