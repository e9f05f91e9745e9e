"""Figures of a fit: diagnostics, predictive checks, variance anatomy and the circuit graph.

Every function takes a :class:`~bayescirc.posterior.FitResult` (or a fit
directory) first and returns a :class:`matplotlib.figure.Figure` built
without pyplot (no global state, no display needed; saving uses Agg). Each
figure has labelled axes in the metric's units and a title naming the model
and task from the fit's metadata. :func:`plot` dispatches on a kind name and
saves to PNG, SVG or PDF by the extension of ``out``.

=============  ==============================================================
kind           what it shows
=============  ==============================================================
trace          ArviZ trace plot of the global parameters (no edge dimension)
rank           ArviZ rank plot of the same (uniform ranks = chains agree)
forest         top edges' posterior mean effect ``mu`` with HDIs
energy         NUTS energy plot, and divergent draws on two global parameters
loss           SVI loss (negative ELBO) by optimisation step
ppc            per-input scores of chosen edges against posterior predictive draws
decomposition  shares of intrinsic / approximation / aggregation variance
scatter        exact vs approximate per-input scores with the fitted calibration
circuit        the edge graph by layer, edges weighted by inclusion probability
=============  ==============================================================
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import schema
from ._io import atomic_path
from .errors import BayescircError
from .graph import INPUT, LOGITS, parse_edge, parse_node, prune_to_paths
from .posterior import FitResult, load_fit

__all__ = [
    "KINDS", "plot", "save_figure", "run_info", "plot_trace", "plot_rank", "plot_forest", "plot_energy",
    "plot_loss", "plot_ppc", "plot_decomposition", "plot_scatter", "plot_circuit", "predictive_draws",
    "calibration_lines", "median_probability_circuit", "circuit_layout", "default_edges",
]

KINDS = ("trace", "rank", "forest", "energy", "loss", "ppc", "decomposition", "scatter", "circuit")
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
COMPONENTS = ("intrinsic", "approximation", "aggregation")
COMPONENT_COLOURS = {"intrinsic": "#4c72b0", "approximation": "#dd8452", "aggregation": "#55a868"}
CIRCUIT_COLOUR = "#c0392b"


# --- inputs ----------------------------------------------------------------------------


def _as_fit(fit: FitResult | str | os.PathLike) -> FitResult:
    return fit if isinstance(fit, FitResult) else load_fit(fit)


def _short(value) -> str:
    """A local path's last component (``models/ioi-toy`` -> ``ioi-toy``); hub names (``org/name``) as they are."""
    text = str(value)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or Path(text).exists():
        return Path(text).name
    return text


def run_info(fit: FitResult) -> dict:
    """``model``, ``task``, ``metric`` (short names) and ``units`` of a fit, from its metadata.

    Looks in ``summary["metadata"]`` (the scores file's metadata), then in the
    fit's own metadata (directly or nested one level). Unknown fields read
    ``"unknown ..."`` rather than failing: a scores file from another tool may
    carry no metadata.
    """
    sources = [fit.summary.get("metadata") or {}, fit.metadata or {}]
    sources += [v for v in (fit.metadata or {}).values() if isinstance(v, dict)]
    found = {}
    for key in ("model", "task", "metric"):
        found[key] = next((s[key] for s in sources if s.get(key) not in (None, "")), None)
    task = found["task"]
    task_name = Path(str(task)).name if task is not None else "unknown task"
    if task is not None and Path(str(task)).stem == "task" and Path(str(task)).parent.name:
        task_name = f"{Path(str(task)).parent.name}/{Path(str(task)).name}"  # a shipped model's own task file
    metric = str(found["metric"]) if found["metric"] else "metric units"
    return {"model": _short(found["model"]) if found["model"] else "unknown model", "task": task_name,
            "metric": metric, "units": metric}


def _title(fit: FitResult, what: str) -> str:
    info = run_info(fit)
    return f"{what} — {info['model']} on {info['task']}".replace("$", r"\$")  # a '$' pair would start mathtext


def _methods(fit: FitResult) -> list[str]:
    """Approximate method labels of the posterior (its ``method`` coordinate)."""
    post = fit.idata.posterior
    if schema.DIM_METHOD not in post.coords:
        return []
    return [str(m) for m in post[schema.DIM_METHOD].values]


def _exact_label(fit: FitResult) -> str:
    return fit.summary.get("exact_method") or schema.EXACT


MAX_GLOBAL_COMPONENTS = 24


def _global_vars(fit: FitResult) -> list[str]:
    """Posterior variables without an edge dimension: the ones trace and rank plots show.

    Variables with more than ``MAX_GLOBAL_COMPONENTS`` components (e.g. a
    per-edge parameter stored under an anonymous dimension) are left out:
    they are not global, and on GPT-2 they would mean thousands of panels.
    """
    post = fit.idata.posterior
    names = []
    for name, var in post.data_vars.items():
        if schema.DIM_EDGE in var.dims:
            continue
        size = int(np.prod([post.sizes[d] for d in var.dims if d not in ("chain", "draw")], dtype=int))
        if size <= MAX_GLOBAL_COMPONENTS:
            names.append(name)
    return names


def default_edges(fit: FitResult, n: int = 3) -> list[str]:
    """The ``n`` edges with the highest inclusion probability (ties: larger |effect|)."""
    table = fit.edges.assign(_abs=fit.edges["effect_mean"].abs())
    return table.sort_values(["inclusion_prob", "_abs"], ascending=False)["edge"].head(n).tolist()


def _check_edges(fit: FitResult, edges: Sequence[str] | None, n: int = 3) -> list[str]:
    if edges is None or len(edges) == 0:
        return default_edges(fit, n)
    known = set(fit.edge_names)
    missing = [e for e in edges if e not in known]
    if missing:
        raise BayescircError(f"edge(s) {missing} are not in the fit ({len(known)} edges, e.g. {sorted(known)[:3]}).")
    return list(edges)


def _scores_for(scores, edges: Sequence[str]) -> pd.DataFrame:
    """Rows of ``scores`` (a DataFrame or a scores file / directory) for ``edges`` only."""
    if scores is None:
        raise BayescircError("this plot needs the per-input scores the fit saw: pass scores= (or --scores FILE).")
    if isinstance(scores, pd.DataFrame):
        frame = scores
    else:
        import pyarrow.parquet as pq

        from .scores import _part_files

        parts = _part_files(Path(scores))
        try:
            frames = [pq.read_table(p, columns=list(schema.REQUIRED_COLUMNS), filters=[(schema.EDGE, "in", list(edges))])
                      .to_pandas() for p in parts]
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise BayescircError(f"{scores}: cannot read the scores ({exc}); pass the scores.parquet the fit read.") from None
        frame = pd.concat(frames, ignore_index=True)
    missing = [c for c in schema.REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise BayescircError(f"scores lack column(s) {missing}; expected {list(schema.REQUIRED_COLUMNS)}.")
    frame = frame[frame[schema.EDGE].astype(str).isin(edges)].copy()
    frame[schema.EDGE] = frame[schema.EDGE].astype(str)
    frame[schema.METHOD] = frame[schema.METHOD].astype(str)
    if frame.empty:
        raise BayescircError(f"the scores hold no rows for edge(s) {list(edges)}: are they the scores this fit used?")
    return frame


# --- saving ----------------------------------------------------------------------------


def save_figure(fig: Figure, out: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` atomically as PNG, SVG or PDF, chosen by ``out``'s extension."""
    out = Path(out)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise BayescircError(f"{out}: cannot tell the format from the extension; use one of {sorted(FORMATS)}.")
    import matplotlib as mpl

    # SVG keeps text as text (searchable, editable) rather than outlines.
    with atomic_path(out) as tmp, mpl.rc_context({"svg.fonttype": "none"}):
        fig.savefig(tmp, format=fmt, dpi=dpi, metadata=None if fmt != "png" else {"Software": "bayescirc"})
    return out


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


# --- ArviZ diagnostics -------------------------------------------------------------------


@contextlib.contextmanager
def _arviz_quiet() -> Iterator[None]:
    """ArviZ 0.23 calls matplotlib APIs that matplotlib 3.11 deprecates; not ours to fix, not the user's concern."""
    from matplotlib import MatplotlibDeprecationWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=MatplotlibDeprecationWarning, module=r"arviz(\..*)?")
        yield


def _n_panels(fit: FitResult, names: list[str]) -> int:
    post = fit.idata.posterior
    return sum(int(np.prod([post.sizes[d] for d in post[v].dims if d not in ("chain", "draw")], dtype=int))
               for v in names)


def _var_names(fit: FitResult, var_names: Sequence[str] | None) -> list[str]:
    names = list(var_names) if var_names else _global_vars(fit)
    if not names:
        raise BayescircError("the posterior has no global (edge-free) parameters to plot; pass var_names.")
    unknown = [v for v in names if v not in fit.idata.posterior]
    if unknown:
        raise BayescircError(f"no posterior variable(s) {unknown}; the posterior has {sorted(fit.idata.posterior.data_vars)}.")
    return names


def plot_trace(fit, var_names: Sequence[str] | None = None) -> Figure:
    """ArviZ trace plot (density and trace per chain) of the global parameters.

    Parameters
    ----------
    fit : FitResult or fit directory
    var_names : list of str, optional
        Posterior variables; default every variable without an ``edge`` dimension.
    """
    import arviz as az

    fit = _as_fit(fit)
    names = _var_names(fit, var_names)
    fig = _figure(11, 1.9 * len(names) + 0.8)
    axes = fig.subplots(len(names), 2, squeeze=False)
    with _arviz_quiet():
        az.plot_trace(_globals_for_arviz(fit, names), var_names=names, axes=axes, compact=True, legend=True,
                      show=False)
    for ax in axes.ravel():
        legend = ax.get_legend()
        if legend is not None and len(legend.get_texts()) > 6:
            legend.remove()  # e.g. one line per edge type: a legend that long hides the panel
    for ax in axes[:, 0]:
        ax.set_xlabel("parameter value")
        ax.set_ylabel("density")
    for ax in axes[:, 1]:
        ax.set_xlabel("draw")
        ax.set_ylabel("value")
    fig.suptitle(_title(fit, "Trace of global parameters") + f"\n(lines = chains; {_units_note(fit)})")
    return fig


def _globals_for_arviz(fit: FitResult, names: Sequence[str]):
    """The posterior of ``names`` with its ``method`` dimension renamed ``approx_method``.

    ArviZ picks each panel with ``.sel(<dim>=<value>)``, and xarray reads
    ``.sel(method=...)`` as its own fill-method argument ("Invalid fill method
    ... Got eap"): every fit with an approximate method failed its rank plot.
    """
    posterior = fit.idata.posterior[list(names)]
    if schema.DIM_METHOD in posterior.dims:
        posterior = posterior.rename({schema.DIM_METHOD: "approx_method"})
    return posterior


def _units_note(fit: FitResult) -> str:
    return f"effects in {run_info(fit)['units']}"


def plot_rank(fit, var_names: Sequence[str] | None = None) -> Figure:
    """ArviZ rank plot of the global parameters: flat histograms mean the chains mix."""
    import arviz as az

    fit = _as_fit(fit)
    names = _var_names(fit, var_names)
    while len(names) > 1 and _n_panels(fit, names) > 2 * MAX_GLOBAL_COMPONENTS:
        names = names[:-1]  # one panel per component: keep the figure readable
    n = _n_panels(fit, names)
    cols = min(4, n)
    rows = -(-n // cols)
    fig = _figure(3.2 * cols, 2.4 * rows + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False)
    with _arviz_quiet():
        az.plot_rank(_globals_for_arviz(fit, names), var_names=names, ax=axes.ravel()[:n], show=False)
    for ax in axes.ravel()[:n]:
        ax.set_xlabel("rank of draw (all chains)")
        ax.set_ylabel("chain")
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    fig.suptitle(_title(fit, "Rank plot of global parameters") + f"\n({_units_note(fit)})")
    return fig


def plot_forest(fit, top: int = 30, edges: Sequence[str] | None = None) -> Figure:
    """The top edges' posterior mean effect ``mu`` with its HDI, coloured by inclusion probability.

    Edges are ranked by inclusion probability (ties by |effect|); the naive
    mean exact score (``naive_mean:exact``), when the edges table has it, is
    drawn as a hollow marker for comparison.
    """
    import matplotlib as mpl

    fit = _as_fit(fit)
    names = _check_edges(fit, edges, top) if edges else default_edges(fit, top)
    table = fit.edges.set_index("edge").loc[names]
    hdi = fit.summary.get("hdi_prob") or fit.metadata.get("hdi_prob") or 0.9
    fig = _figure(8, 0.28 * len(names) + 1.8)
    ax = fig.subplots()
    y = np.arange(len(names))[::-1]
    cmap = mpl.colormaps["viridis"]
    colours = cmap(table["inclusion_prob"].to_numpy())
    ax.hlines(y, table["effect_hdi_low"], table["effect_hdi_high"], colors=colours, lw=2.5)
    ax.scatter(table["effect_mean"], y, c=colours, s=28, zorder=3, label="posterior mean of μ")
    naive = f"naive_mean:{_exact_label(fit)}"
    if naive in table.columns and table[naive].notna().any():
        ax.scatter(table[naive], y, facecolors="none", edgecolors="k", s=28, zorder=4, label="mean exact score")
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_ylim(-0.8, len(names) - 0.2)
    units = run_info(fit)["units"]
    ax.set_xlabel(f"edge mean effect μ ({units}); bars: {hdi:.0%} HDI")
    ax.set_ylabel("edge (by inclusion probability)")
    shown_cmap = mpl.colors.ListedColormap(cmap(np.linspace(0.35, 1.0, 256)))  # the colours the arrows use
    sm = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, 1), cmap=shown_cmap)
    fig.colorbar(sm, ax=ax, label="inclusion probability")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(_title(fit, f"Top {len(names)} edges"))
    return fig


def plot_energy(fit) -> Figure:
    """NUTS energy plot (marginal vs transition energy) and divergent draws.

    The right panel scatters the two global parameters with the most spread
    against each other and marks divergent transitions in red: divergences
    that cluster show where the sampler struggles.
    """
    import arviz as az

    fit = _as_fit(fit)
    stats = getattr(fit.idata, "sample_stats", None)
    if stats is None or "energy" not in stats:
        raise BayescircError(f"the energy plot needs a NUTS fit (this fit used {fit.summary.get('inference', '?')!r}, "
                             "with no sample_stats.energy); use --kind loss for SVI.")
    fig = _figure(11, 4.2)
    ax_energy, ax_div = fig.subplots(1, 2)
    with _arviz_quiet():
        az.plot_energy(fit.idata, ax=ax_energy, show=False)
    ax_energy.set_xlabel("energy − mean energy (Hamiltonian units)")
    ax_energy.set_ylabel("density")
    ax_energy.set_title("energy: marginal vs transition")
    diverging = stats["diverging"].values.reshape(-1).astype(bool) if "diverging" in stats else None
    columns = _global_columns(fit)
    if len(columns) >= 2:
        (xname, x), (yname, y) = columns[:2]
        div = diverging if diverging is not None else np.zeros(len(x), bool)
        ax_div.scatter(x[~div], y[~div], s=6, alpha=0.4, color="#4c72b0", label="draw")
        ax_div.scatter(x[div], y[div], s=18, color="red", label=f"divergent ({int(div.sum())})")
        ax_div.set_xlabel(xname)
        ax_div.set_ylabel(yname)
        ax_div.legend(fontsize=8)
    else:
        ax_div.text(0.5, 0.5, "fewer than two global parameters", ha="center", transform=ax_div.transAxes)
        ax_div.set_xlabel("-")
        ax_div.set_ylabel("-")
    n_div = int(diverging.sum()) if diverging is not None else 0
    ax_div.set_title(f"divergent transitions: {n_div}")
    fig.suptitle(_title(fit, "NUTS energy and divergences") + f" ({_units_note(fit)})")
    return fig


def _global_columns(fit: FitResult) -> list[tuple[str, np.ndarray]]:
    """Every scalar component of the global parameters as (label, stacked draws), most spread first."""
    post = fit.idata.posterior
    out = []
    for name in _global_vars(fit):
        values = post[name].values
        flat = values.reshape(values.shape[0] * values.shape[1], -1)
        coords = [""] if flat.shape[1] == 1 else [
            str(c) for c in post[name][post[name].dims[2]].values] if values.ndim == 3 else [str(i) for i in range(flat.shape[1])]
        for j in range(flat.shape[1]):
            out.append((name if coords[j] == "" else f"{name}[{coords[j]}]", flat[:, j]))
    out.sort(key=lambda item: -float(np.std(item[1]) / (abs(np.mean(item[1])) + 1e-9)))
    return out


def plot_loss(fit) -> Figure:
    """SVI loss (negative ELBO) by optimisation step, on a log scale when it spans decades."""
    fit = _as_fit(fit)
    diag = fit.summary.get("diagnostics") or {}
    loss = diag.get("svi_loss")
    if not loss:
        raise BayescircError(f"this fit has no SVI loss (inference {fit.summary.get('inference', '?')!r}); "
                             "the loss plot is for fits run with --inference svi.")
    loss = np.asarray(loss, dtype=float)
    settings = fit.summary.get("settings") or {}
    steps = diag.get("svi_steps_run") or settings.get("svi_steps") or settings.get("steps")  # run, not the cap
    x = np.linspace(0, steps, len(loss)) if steps else np.arange(len(loss))
    fig = _figure(8, 4)
    ax = fig.subplots()
    ax.plot(x, loss, color="#4c72b0", lw=1.2)
    if np.all(loss > 0) and loss.max() / loss.min() > 30:
        ax.set_yscale("log")
    final = diag.get("svi_final_loss")
    if final is not None:
        ax.axhline(final, color="grey", ls="--", lw=0.8, label=f"final loss {final:.4g}")
        ax.legend()
    ax.set_xlabel("optimisation step" if steps else "recorded step (thinned)")
    ax.set_ylabel("loss = −ELBO (nats)")
    ax.set_title(_title(fit, "SVI loss"))
    return fig


# --- posterior predictive checks and calibration --------------------------------------------


def _draw_index(fit: FitResult, n_draws: int, seed: int) -> np.ndarray:
    post = fit.idata.posterior
    total = post.sizes["chain"] * post.sizes["draw"]
    rng = np.random.default_rng(seed)
    return rng.choice(total, size=min(n_draws, total), replace=False)


def _stack(fit: FitResult, var: str) -> np.ndarray:
    values = fit.idata.posterior[var].values
    return values.reshape(-1, *values.shape[2:])


def _method_param(fit: FitResult, var: str, m: int, edge: str | None) -> np.ndarray:
    """Draws of method ``m``'s ``var`` (alpha, beta, sigma, omega) for ``edge``'s edge type, or the method's own."""
    post = fit.idata.posterior
    if f"{var}_type" in post and edge is not None:
        edge_type = fit.edges.set_index(schema.EDGE).loc[edge, "edge_type"]
        types = [str(t) for t in post[schema.DIM_EDGE_TYPE].values]
        return _stack(fit, f"{var}_type")[:, types.index(str(edge_type)), m]
    return _stack(fit, var)[:, m]


def predictive_draws(fit, edge: str, method: str, n_inputs: int, n_draws: int = 100, seed: int = 0) -> np.ndarray:
    """Replicated per-input scores of ``edge`` under ``method``, ``[n_draws, n_inputs]``.

    For each of ``n_draws`` posterior draws: ``theta = mu_e + tau_e * z`` per
    input; the exact method observes ``theta``; an approximate method ``m``
    observes ``alpha + beta * theta + delta_e + sigma * eps`` (the parameters of
    the edge's type when the fit pooled them by edge type), with ``delta``
    from the posterior when it was kept, else drawn from its prior
    ``N(0, omega^2)`` (once per draw: it is systematic, shared by the inputs).
    """
    fit = _as_fit(fit)
    e = fit.edge_names.index(edge)
    idx = _draw_index(fit, n_draws, seed)
    rng = np.random.default_rng([seed, 1])
    mu = _stack(fit, "mu")[idx, e]
    tau = _stack(fit, "tau")[idx, e] if "tau" in fit.idata.posterior else np.zeros(len(idx))
    z = rng.normal(size=(len(idx), n_inputs))
    if "df" in fit.idata.posterior:  # Student-t fits: unit-variance t deviates with each draw's df
        df = _stack(fit, "df")
        df = np.broadcast_to(df[idx, e] if df.ndim == 2 else df[idx], (len(idx),)).astype(float)
        heavy = np.isfinite(df) & (df > 2)
        if heavy.any():
            t = rng.standard_t(np.where(heavy, df, 3.0)[:, None], size=z.shape)
            z = np.where(heavy[:, None], t * np.sqrt((np.where(heavy, df, 3.0) - 2) / np.where(heavy, df, 3.0))[:, None], z)
    theta = mu[:, None] + tau[:, None] * z
    if schema.is_exact(method) or method == _exact_label(fit):
        return theta
    methods = _methods(fit)
    if method not in methods:
        raise BayescircError(f"method {method!r} is not in the fit (approximate methods: {methods}).")
    m = methods.index(method)
    alpha, beta, sigma = (_method_param(fit, v, m, edge)[idx] for v in ("alpha", "beta", "sigma"))
    if "delta" in fit.idata.posterior:
        delta = _stack(fit, "delta")[idx, e, m]
    elif "omega" in fit.idata.posterior:
        delta = _method_param(fit, "omega", m, edge)[idx] * rng.normal(size=len(idx))
    else:
        delta = np.zeros(len(idx))
    noise = sigma[:, None] * rng.normal(size=theta.shape)
    return alpha[:, None] + beta[:, None] * theta + delta[:, None] + noise


def plot_ppc(fit, scores, edges: Sequence[str] | None = None, n_draws: int = 60, seed: int = 0) -> Figure:
    """Observed per-input scores of chosen edges against posterior predictive replicates.

    One row per edge, one column per method (exact first). Each thin line is
    the empirical CDF of one replicated data set of the same size as the
    observed one; the thick line is the observed ECDF. Observed data
    outside the replicates' envelope point at a misfit (heavy tails: try
    ``--likelihood student-t``).
    """
    fit = _as_fit(fit)
    edges = _check_edges(fit, edges)
    data = _scores_for(scores, edges)
    methods = [m for m in [_exact_label(fit), *_methods(fit)] if m in set(data[schema.METHOD])]
    if not methods:
        raise BayescircError(f"the scores have no rows for the fit's methods {[_exact_label(fit), *_methods(fit)]}.")
    units = run_info(fit)["units"]
    fig = _figure(3.4 * len(methods) + 0.6, 2.6 * len(edges) + 0.9)
    axes = fig.subplots(len(edges), len(methods), squeeze=False)
    for r, edge in enumerate(edges):
        for c, method in enumerate(methods):
            ax = axes[r, c]
            observed = data.loc[(data[schema.EDGE] == edge) & (data[schema.METHOD] == method), schema.SCORE].to_numpy()
            if observed.size == 0:
                ax.text(0.5, 0.5, "no scores", ha="center", transform=ax.transAxes)
            else:
                reps = predictive_draws(fit, edge, method, observed.size, n_draws=n_draws, seed=seed + r)
                steps = np.arange(1, observed.size + 1) / observed.size
                for rep in reps:
                    ax.step(np.sort(rep), steps, where="post", color="#4c72b0", alpha=0.15, lw=0.8)
                ax.step(np.sort(observed), steps, where="post", color="k", lw=2, label=f"observed (n={observed.size})")
                ax.plot([], [], color="#4c72b0", label="posterior predictive")
                if r == 0 and c == 0:
                    ax.legend(fontsize=7)
            ax.set_title(f"{edge}\n{method}", fontsize=8)
            ax.set_xlabel(f"per-input score ({units})")
            ax.set_ylabel("fraction of inputs ≤ x")
    fig.suptitle(_title(fit, "Posterior predictive check of per-input scores"))
    return fig


def calibration_lines(fit, method: str, x: np.ndarray, hdi_prob: float = 0.9,
                      edge: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fitted calibration ``alpha + beta * x``: posterior mean and a central band, each ``[len(x)]``.

    With ``edge``, the line of that edge's type (fits that pool the error by
    edge type); without, the method's pooled line.
    """
    fit = _as_fit(fit)
    methods = _methods(fit)
    if method not in methods:
        raise BayescircError(f"method {method!r} is not in the fit (approximate methods: {methods}).")
    m = methods.index(method)
    alpha, beta = _method_param(fit, "alpha", m, edge), _method_param(fit, "beta", m, edge)
    lines = alpha[:, None] + beta[:, None] * np.asarray(x, float)[None, :]
    tail = (1 - hdi_prob) / 2
    lo, hi = np.quantile(lines, [tail, 1 - tail], axis=0)
    return lines.mean(0), lo, hi


def plot_scatter(fit, scores, edges: Sequence[str] | None = None) -> Figure:
    """Exact vs approximate per-input scores for chosen edges, with the fitted calibration line.

    One panel per edge; each approximate method in its colour. Points are
    inputs with both an exact and that method's score; the solid line is the
    posterior mean of ``alpha + beta * x`` for the edge's type (band: its central interval),
    the dashed line the identity (a perfect approximation).
    """
    import matplotlib as mpl

    fit = _as_fit(fit)
    edges = _check_edges(fit, edges)
    data = _scores_for(scores, edges)
    exact = _exact_label(fit)
    if exact not in set(data[schema.METHOD]):
        raise BayescircError("the scatter plot needs exact scores for the chosen edges; these scores have none.")
    methods = [m for m in _methods(fit) if m in set(data[schema.METHOD])]
    units = run_info(fit)["units"]
    hdi = fit.summary.get("hdi_prob") or 0.9
    colours = mpl.colormaps["tab10"].colors
    cols = min(3, len(edges))
    rows = -(-len(edges) // cols)
    fig = _figure(4 * cols, 3.6 * rows + 0.7)
    axes = fig.subplots(rows, cols, squeeze=False)
    wide = data.pivot_table(index=[schema.EDGE, schema.INPUT_ID], columns=schema.METHOD, values=schema.SCORE)
    for k, edge in enumerate(edges):
        ax = axes.ravel()[k]
        sub = wide.loc[edge] if edge in wide.index.get_level_values(0) else wide.iloc[:0]
        xs_all = sub[exact].dropna().to_numpy() if exact in sub else np.array([])
        for j, method in enumerate(methods):
            both = sub[[exact, method]].dropna() if method in sub else sub.iloc[:0]
            colour = colours[j % len(colours)]
            ax.scatter(both[exact], both[method], s=12, alpha=0.7, color=colour, label=f"{method} (n={len(both)})")
            if len(xs_all):
                grid = np.linspace(xs_all.min(), xs_all.max(), 50)
                mean, lo, hi = calibration_lines(fit, method, grid, hdi, edge=edge)
                ax.plot(grid, mean, color=colour, lw=1.5)
                ax.fill_between(grid, lo, hi, color=colour, alpha=0.2)
        if len(xs_all):
            ax.axline((0, 0), slope=1, color="grey", ls="--", lw=0.8, label="identity")
        ax.set_title(edge, fontsize=9)
        ax.set_xlabel(f"exact score ({units})")
        ax.set_ylabel(f"approximate score ({units})")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(edges):]:
        ax.set_visible(False)
    fig.suptitle(_title(fit, "Exact vs approximate scores per input") + "\n(lines: fitted α_m + β_m·x)")
    return fig


# --- variance decomposition ------------------------------------------------------------------


def _stacked(ax, labels: list[str], shares: list[dict], width: float = 0.7, offset: float = 0.0, legend: bool = True):
    x = np.arange(len(labels)) + offset
    bottom = np.zeros(len(labels))
    for comp in COMPONENTS:
        values = np.array([float(s.get(comp, 0.0) or 0.0) for s in shares])
        ax.bar(x, values, width, bottom=bottom, color=COMPONENT_COLOURS[comp], label=comp if legend else None,
               edgecolor="white", lw=0.5)
        bottom += values
    return x


def plot_decomposition(fit) -> Figure:
    """Stacked shares of intrinsic input variance, approximation error and aggregation noise.

    Left: per method. Right: per layer (receiver layer), one panel per
    method. A share is the fraction of the variance of one observed
    per-input score around the edge's true mean effect (see the fit's
    summary, ``decomposition``).
    """
    fit = _as_fit(fit)
    decomposition = fit.summary.get("decomposition") or {}
    per_method = decomposition.get("per_method") or {}
    per_layer = decomposition.get("per_layer") or {}
    if not per_method:
        raise BayescircError("the fit's summary has no variance decomposition (summary.json: decomposition.per_method).")
    methods = sorted(per_method, key=lambda m: (not schema.is_exact(m), list(per_method).index(m)))
    layers = sorted(per_layer, key=lambda s: (not str(s).lstrip("-").isdigit(), int(s) if str(s).lstrip("-").isdigit() else 0, str(s)))
    n_panels = 1 + (len(methods) if layers else 0)
    fig = _figure(3.6 + 0.35 * len(methods) + (n_panels - 1) * (1.2 + 0.35 * len(layers)), 4.4)
    widths = [max(2.0, 0.6 * len(methods))] + [max(2.0, 0.45 * len(layers))] * (n_panels - 1)
    axes = fig.subplots(1, n_panels, squeeze=False, width_ratios=widths)[0]
    x = _stacked(axes[0], methods, [per_method[m] for m in methods])
    axes[0].set_xticks(x, methods, rotation=30, ha="right")
    axes[0].set_title("per method")
    axes[0].set_xlabel("scoring method")
    axes[0].set_ylabel("share of score variance")
    axes[0].set_ylim(0, 1.05)
    for ax, method in zip(axes[1:], methods):
        shares = [per_layer[layer].get(method, {}) for layer in layers]
        x = _stacked(ax, layers, shares, legend=False)
        ax.set_xticks(x, layers)
        ax.set_title(f"per layer: {method}", fontsize=9)
        ax.set_xlabel("receiver layer")
        ax.set_ylabel("share of variance")
        ax.set_ylim(0, 1.05)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(_title(fit, "Variance decomposition of per-input scores"))
    return fig


# --- the circuit graph -------------------------------------------------------------------------


def median_probability_circuit(fit, seed: int = 0) -> set[str]:
    """The median-probability circuit as ``bayescirc circuits`` and the demo's ``circuit.json`` give it.

    Edges in more than half of the posterior circuits (one per draw, pruned to
    input->logits paths), pruned again: :meth:`CircuitSamples.median_circuit`.
    Edges whose names are not in the graph syntax are left out.
    """
    from .circuits import sample_circuits

    fit = _as_fit(fit)
    parsable = []
    for edge in fit.edge_names:
        try:
            parse_edge(edge)
        except ValueError:
            continue
        parsable.append(edge)
    if len(parsable) < len(fit.edge_names):  # circuits need graph names: keep only those edges
        return prune_to_paths(e for e in fit.edges.loc[fit.edges["inclusion_prob"] > 0.5, "edge"] if e in set(parsable))
    if not prune_to_paths(parsable):  # scores over part of the graph: no circuit to draw (circuits refuses it)
        return set()
    return set(sample_circuits(fit, seed=seed).median_circuit())


def circuit_layout(edges: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Positions of every node of the graph the edge names imply, laid out by layer.

    ``input`` at x = 0; layer ``l``'s attention heads in column ``2l + 1``
    (one row per head), its MLP in column ``2l + 2``; ``logits`` last. Rows
    are centred so MLPs, input and logits sit in the middle.
    """
    layers, heads = -1, 0
    for edge in edges:
        try:
            info = parse_edge(edge)
        except ValueError:
            continue
        for node in (info.source, info.receiver):
            n = parse_node(node)
            if n.layer is not None:
                layers = max(layers, n.layer)
            if n.head is not None:
                heads = max(heads, n.head + 1)
    n_layers = layers + 1
    centre = (max(heads, 1) - 1) / 2
    pos = {INPUT: (0.0, centre)}
    for layer in range(n_layers):
        for head in range(heads):
            pos[f"a{layer}.h{head}"] = (2.0 * layer + 1, float(heads - 1 - head))
        pos[f"m{layer}"] = (2.0 * layer + 2, centre)
    pos[LOGITS] = (2.0 * n_layers + 1, centre)
    return pos


def plot_circuit(fit, threshold: float = 0.1, max_edges: int = 60, circuit: set[str] | None = None) -> Figure:
    """The edge graph by layer; edges' width and opacity follow their inclusion probability.

    Shown: the edges with inclusion probability >= ``threshold``, at most
    ``max_edges`` of them (the most probable), plus every edge of the
    highlighted circuit (default :func:`median_probability_circuit`, the one
    ``bayescirc circuits`` reports), drawn in red on top. Receivers'
    q/k/v inputs are told apart by line style. Fine for GPT-2 small: its
    32,491 edges reduce to the tens that matter.
    """
    import matplotlib as mpl
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch

    fit = _as_fit(fit)
    table = fit.edges[["edge", "inclusion_prob"]].copy()
    circuit = median_probability_circuit(fit) if circuit is None else set(circuit)
    parsable = []
    for edge in table["edge"]:
        try:
            parse_edge(edge)
            parsable.append(True)
        except ValueError:
            parsable.append(False)
    table = table[parsable].sort_values("inclusion_prob", ascending=False)
    shown = table[table["inclusion_prob"] >= threshold].head(max_edges)
    shown = pd.concat([shown, table[table["edge"].isin(circuit) & ~table["edge"].isin(shown["edge"])]])
    pos = circuit_layout(fit.edges["edge"].tolist())
    n_cols = max(x for x, _ in pos.values()) + 1
    n_rows = max(y for _, y in pos.values()) + 1
    fig = _figure(min(30, max(8, 0.75 * n_cols + 2)), min(16, max(4.5, 0.45 * n_rows + 2.2)))
    ax = fig.subplots()
    cmap = mpl.colormaps["Blues"]
    # <v> as round dots (a near-zero dash with round caps): ":" scales its square dots with the line width, and
    # at the width of a probable edge they read as the dashes of <k>
    styles = {"q": "-", "k": "--", "v": (0, (0.01, 2.4)), None: "-"}
    caps = {"v": "round"}
    touched, in_circuit_nodes = set(), set()
    for edge, p in shown.sort_values("inclusion_prob").itertuples(index=False):
        info = parse_edge(edge)
        hot = edge in circuit
        touched.update((info.source, info.receiver))
        if hot:
            in_circuit_nodes.update((info.source, info.receiver))
        (x0, y0), (x1, y1) = pos[info.source], pos[info.receiver]
        rad = 0.25 if abs(y1 - y0) < 0.5 else 0.1
        arrow = FancyArrowPatch((x0, y0), (x1, y1), connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                mutation_scale=6 + 6 * p, lw=0.4 + 3.2 * p, linestyle=styles[info.qkv],
                                capstyle=caps.get(info.qkv, "butt"),
                                color=CIRCUIT_COLOUR if hot else cmap(0.35 + 0.65 * p),
                                alpha=0.95 if hot else 0.15 + 0.75 * p, zorder=3 if hot else 2,
                                shrinkA=5, shrinkB=5)
        ax.add_patch(arrow)
    for node, (x, y) in pos.items():
        kind = parse_node(node).kind
        hot, seen = node in in_circuit_nodes, node in touched
        ax.scatter([x], [y], s=110 if seen else 25, marker="s" if kind in ("mlp", "input", "logits") else "o",
                   color=CIRCUIT_COLOUR if hot else ("#34495e" if seen else "#d5d8dc"), zorder=4)
        if seen or kind in ("input", "logits"):
            ax.annotate(node, (x, y), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=7, zorder=5)
    n_layers = int((n_cols - 2) // 2)
    ax.set_xticks([2.0 * layer + 1.5 for layer in range(n_layers)], [str(layer) for layer in range(n_layers)])
    ax.set_xlim(-0.8, n_cols - 0.2)
    ax.set_ylim(-0.8, n_rows - 0.2)
    heads = int(round(n_rows))
    ax.set_yticks(range(heads), [f"h{heads - 1 - h}" for h in range(heads)], fontsize=7)
    ax.set_xlabel("layer (per layer: attention heads, then MLP)")
    ax.set_ylabel("attention head")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    sm = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, 1), cmap=cmap)
    fig.colorbar(sm, ax=ax, label="inclusion probability (width, opacity)", shrink=0.8)
    handles = [Line2D([], [], color=CIRCUIT_COLOUR, lw=2, label=f"median-probability circuit ({len(circuit)} edges)")]
    handles += [Line2D([], [], color="#555", ls=styles[x], lw=1.8, dash_capstyle=caps.get(x, "butt"),
                       label=f"into head <{x}>") for x in ("q", "k", "v")]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    info = run_info(fit)
    ax.set_title(_title(fit, "Circuit graph")
                 + f"\nshowing {len(shown)} of {len(fit.edges)} edges (inclusion ≥ {threshold:g}, top {max_edges});"
                 + f" effects in {info['units']}", fontsize=10)
    return fig


# --- dispatcher ----------------------------------------------------------------------------------


def _available(fit: FitResult, scores) -> list[str]:
    kinds = ["trace", "rank", "forest"]
    stats = getattr(fit.idata, "sample_stats", None)
    if stats is not None and "energy" in stats:
        kinds.append("energy")
    if (fit.summary.get("diagnostics") or {}).get("svi_loss"):
        kinds.append("loss")
    if scores is not None:
        kinds.append("ppc")
    if (fit.summary.get("decomposition") or {}).get("per_method"):
        kinds.append("decomposition")
    if scores is not None and _methods(fit) and fit.summary.get("exact_method"):
        kinds.append("scatter")  # approximate against exact scores: needs both
    kinds.append("circuit")
    return kinds


def plot(fit, kind: str, scores=None, edges: Sequence[str] | None = None, out: str | os.PathLike | None = None,
         **options):
    """Draw one kind of figure (or ``"all"``) for a fit, optionally saving it.

    Parameters
    ----------
    fit : FitResult or path of a fit directory
    kind : {"trace", "rank", "forest", "energy", "loss", "ppc", "decomposition", "scatter", "circuit", "all"}
        See the module docstring. ``"all"`` draws every kind this fit supports
        (energy for NUTS, loss for SVI, ppc and scatter when ``scores`` is given).
    scores : DataFrame or path, optional
        The per-input scores the fit used; needed by ``ppc`` and ``scatter``.
    edges : list of str, optional
        Edges for ``ppc``, ``scatter`` and ``forest``; default the most probable.
    out : path, optional
        File to write (``.png``, ``.svg`` or ``.pdf``); for ``"all"`` a
        directory that receives ``<kind>.png`` files.
    **options
        Passed to the plotting function (e.g. ``threshold``, ``max_edges``, ``top``).

    Returns
    -------
    Figure, or for ``"all"`` a dict kind -> Figure.
    """
    fit = _as_fit(fit)
    if kind == "all":
        per_kind = {"circuit": ("threshold", "max_edges"), "forest": ("top",)}
        figures = {k: plot(fit, k, scores=scores, edges=edges, **{o: v for o, v in options.items() if o in per_kind.get(k, ())})
                   for k in _available(fit, scores)}
        if out is not None:
            out = Path(out)
            if out.suffix.lower() in FORMATS:
                raise BayescircError(f"{out}: --kind all writes one file per kind; give a directory, not a file.")
            for k, fig in figures.items():
                save_figure(fig, out / f"{k}.png")
        return figures
    functions = {"trace": plot_trace, "rank": plot_rank, "forest": plot_forest, "energy": plot_energy,
                 "loss": plot_loss, "decomposition": plot_decomposition, "circuit": plot_circuit}
    if kind in ("ppc", "scatter"):
        fig = (plot_ppc if kind == "ppc" else plot_scatter)(fit, scores, edges=edges, **options)
    elif kind == "forest" and edges:
        fig = plot_forest(fit, edges=edges, **options)
    elif kind in functions:
        fig = functions[kind](fit, **options)
    else:
        raise BayescircError(f"unknown plot kind {kind!r}; choose one of {', '.join(KINDS)} or all.")
    if out is not None:
        out = Path(out)
        if not out.suffix or out.is_dir():  # a directory: <out>/<kind>.png
            out = out / f"{kind}.png"
        save_figure(fig, out)
    return fig
