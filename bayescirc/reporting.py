"""One self-contained HTML report of a fit: metadata, diagnostics, variance anatomy, circuit.

The file needs nothing but a browser: figures are embedded as base64 PNG,
styles are inline, and no external URL is referenced, so it can be mailed,
archived with the run, or opened offline. Sections:

1. the run (model, task, metric, inference settings);
2. diagnostics with pass/warn flags (r_hat <= 1.01, bulk and tail ESS >= 400,
   no divergent transitions; SVI fits show their loss curve instead);
3. the variance decomposition (table and figure);
4. the top edges (table and forest plot);
5. the circuit graph and the median-probability circuit;
6. posterior predictive checks and exact-vs-approximate scatter (when the
   scores are given);
7. the stability summary (when a ``bayescirc stability`` JSON is given).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import plots
from ._io import atomic_path
from .errors import BayescircError
from .posterior import FitResult

__all__ = ["report", "diagnostic_checks", "Check", "R_HAT_MAX", "ESS_MIN"]

R_HAT_MAX = 1.01
ESS_MIN = 400
TOP_EDGES = 30


@dataclass(frozen=True)
class Check:
    """One diagnostic: its value, the rule, and ``status`` in {"pass", "warn", "n/a"}."""

    name: str
    value: object
    rule: str
    status: str
    note: str = ""


def fit_warnings(summary: dict) -> list[str]:
    """The warnings the fit gave (``summary.json`` → ``diagnostics.warnings``), none for an older summary."""
    return (summary.get("diagnostics") or {}).get("warnings") or []


def diagnostic_checks(summary: dict) -> list[Check]:
    """Pass/warn verdicts for a fit's ``summary["diagnostics"]``.

    NUTS: ``max_r_hat <= 1.01``, ``min_ess_bulk >= 400``, ``min_ess_tail >= 400``,
    ``divergences == 0``. A value the fit did not compute (SVI) is ``"n/a"``.
    """
    diag = summary.get("diagnostics") or {}
    svi = summary.get("inference") == "svi"
    na_note = "not computed for SVI (no Markov chains)" if svi else "not reported by the fit"

    def check(name, key, rule, ok):
        value = diag.get(key)
        if value is None:
            return Check(name, None, rule, "n/a", na_note)
        return Check(name, value, rule, "pass" if ok(value) else "warn")

    checks = [
        check("max R-hat", "max_r_hat", f"≤ {R_HAT_MAX}", lambda v: v <= R_HAT_MAX),
        check("min bulk ESS", "min_ess_bulk", f"≥ {ESS_MIN}", lambda v: v >= ESS_MIN),
        check("min tail ESS", "min_ess_tail", f"≥ {ESS_MIN}", lambda v: v >= ESS_MIN),
        check("divergent transitions", "divergences", "= 0", lambda v: int(v) == 0),
    ]
    if svi:
        final = diag.get("svi_final_loss")
        loss = diag.get("svi_loss") or []
        if final is None:
            checks.append(Check("SVI final loss", None, "finite", "n/a", "not reported by the fit"))
        else:
            ok = bool(np.isfinite(final))
            note = ""
            if ok and len(loss) >= 20:
                # still falling? the last tenth's mean against the tenth before, beyond their noise (as the fit's
                # own stopping rule): a single-draw ELBO jitters by several % at its plateau
                w = max(2, len(loss) // 10)
                last, before = np.asarray(loss[-w:], float), np.asarray(loss[-2 * w:-w], float)
                drop = float(before.mean() - last.mean())
                noise = 2 * float(last.std(ddof=1)) / np.sqrt(w)
                ok = drop <= noise + 1e-3 * max(1.0, abs(float(last.mean())))
                note = (f"fell by {drop:.4g} over the last tenth of the curve (noise {noise:.3g})" if not ok
                        else f"flat over the last tenth of the curve (change {-drop:+.3g}, noise {noise:.3g})")
            checks.append(Check("SVI final loss", final, "finite, flat at the end", "pass" if ok else "warn", note))
    return checks


# --- HTML pieces --------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
     padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f6f8} td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1e7b34;font-weight:600} .warn{color:#b35c00;font-weight:600} .na{color:#777}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555} .muted{color:#666;font-size:.9em} code{background:#f4f6f8;padding:0 .2em}
nav a{margin-right:1em}
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        v = float(value)
        if not np.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(value)


def _figure_html(fig, caption: str, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[list], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    body = []
    for row in rows:
        cells = []
        for j, cell in enumerate(row):
            if isinstance(cell, _Raw):
                cells.append(f"<td>{cell.html}</td>")
            else:
                cls = ' class="num"' if j in numeric else ""
                cells.append(f"<td{cls}>{_esc(_fmt(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


@dataclass(frozen=True)
class _Raw:
    html: str


def _status(check: Check) -> _Raw:
    cls = {"pass": "pass", "warn": "warn"}.get(check.status, "na")
    symbol = {"pass": "✔ pass", "warn": "⚠ warn"}.get(check.status, "n/a")
    return _Raw(f'<span class="{cls}">{symbol}</span>')


def _nested(value, depth: int = 0) -> str:
    """A JSON value as HTML: dicts as two-column tables, lists of dicts as tables, scalars as text."""
    if isinstance(value, dict):
        if not value:
            return '<span class="muted">(empty)</span>'
        rows = [[str(k), _Raw(_nested(v, depth + 1))] for k, v in value.items()]
        return _table(["", ""], rows)
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            keys = list(dict.fromkeys(k for v in value for k in v))
            rows = [[_Raw(_nested(v.get(k), depth + 1)) if isinstance(v.get(k), dict | list) else v.get(k)
                     for k in keys] for v in value]
            return _table(keys, rows)
        if len(value) > 12 and all(isinstance(v, int | float) for v in value):
            arr = np.asarray(value, float)
            return _esc(f"{len(value)} values: mean {arr.mean():.4g}, min {arr.min():.4g}, max {arr.max():.4g}")
        return _esc(", ".join(_fmt(v) for v in value)) if value else '<span class="muted">(none)</span>'
    return _esc(_fmt(value))


# --- sections ---------------------------------------------------------------------------------------


def _run_section(fit: FitResult) -> str:
    info = plots.run_info(fit)
    s = fit.summary
    meta = s.get("metadata") or {}
    rows = [["model", meta.get("model", info["model"])], ["task", meta.get("task", info["task"])],
            ["metric", info["metric"]], ["sign convention", meta.get("sign_convention")],
            ["inputs", s.get("n_inputs")], ["edges", s.get("n_edges", len(fit.edges))],
            ["methods", ", ".join(s.get("methods") or [])], ["exact method", s.get("exact_method")],
            ["inference", s.get("inference")], ["likelihood", s.get("likelihood")],
            ["inclusion rule", s.get("inclusion_rule")], ["HDI probability", s.get("hdi_prob")]]
    if s.get("ppc", {}).get("preferred"):
        rows.append(["preferred likelihood (PPC)", s["ppc"]["preferred"]])
    rows = [r for r in rows if r[1] not in (None, "")]
    settings = s.get("settings") or {}
    extra = ""
    if settings:
        extra = "<h3>Fit settings</h3>" + _nested(settings)
    return "<h2 id='run'>Run</h2>" + _table(["", ""], rows) + extra


def _diagnostics_section(fit: FitResult) -> str:
    checks = diagnostic_checks(fit.summary)
    rows = [[c.name, c.value, c.rule, _status(c), c.note] for c in checks]
    n_warn = sum(c.status == "warn" for c in checks)
    warnings = fit_warnings(fit.summary)
    also = f" The fit gave {len(warnings)} warning(s), below." if warnings else ""
    verdict = (f'<p class="pass">All diagnostics pass.{also}</p>' if n_warn == 0 else
               f'<p class="warn">{n_warn} diagnostic(s) warn: read the posterior with care '
               f"(run more draws or chains, or check the model).{also}</p>")
    warn_html = ("<h3>Warnings from the fit</h3><ul>" + "".join(f"<li>{_esc(w)}</li>" for w in warnings) + "</ul>"
                 if warnings else "")
    figures = []
    kinds = plots._available(fit, None)
    svi = fit.summary.get("inference") == "svi"
    for kind, caption in (("trace", "Trace of the global parameters (chains overlaid)." if not svi else
                           "Draws of the global parameters from the SVI guide (independent; one chain)."),
                          ("rank", "Rank plots: near-uniform histograms mean the chains agree." if not svi else
                           "Rank plots of the SVI guide's draws (one chain of independent draws: near-uniform by "
                           "construction; they check nothing here)."),
                          ("energy", "NUTS energy: marginal and transition energy should overlap; divergences in red."),
                          ("loss", "SVI loss by step: it should flatten out.")):
        if kind in kinds:
            figures.append(_figure_html(plots.plot(fit, kind), caption, f"{kind} plot"))
    return ("<h2 id='diagnostics'>Diagnostics</h2>" + verdict
            + _table(["diagnostic", "value", "rule", "status", "note"], rows, numeric={1}) + warn_html + "".join(figures))


def _decomposition_section(fit: FitResult) -> str:
    per_method = (fit.summary.get("decomposition") or {}).get("per_method") or {}
    if not per_method:
        return "<h2 id='decomposition'>Variance decomposition</h2><p class='muted'>The fit reported no decomposition.</p>"
    rows = [[m, *(shares.get(c) for c in plots.COMPONENTS)] for m, shares in per_method.items()]
    text = ("<p>Of the variance of one observed per-input score around the edge's true mean effect, the share from "
            "<b>intrinsic</b> input-to-input variation of the exact effect, from the method's <b>approximation</b> "
            "error (systematic and per-input; zero for exact patching), and from <b>aggregation</b> noise "
            "(the posterior uncertainty of the mean left by a finite number of inputs).</p>")
    return ("<h2 id='decomposition'>Variance decomposition</h2>" + text
            + _table(["method", *plots.COMPONENTS], rows, numeric={1, 2, 3})
            + _figure_html(plots.plot(fit, "decomposition"), "Shares per method and per receiver layer.",
                           "variance decomposition"))


def _edges_section(fit: FitResult, top: int) -> str:
    table = fit.edges
    names = plots.default_edges(fit, top)
    sub = table.set_index("edge").loc[names]
    hdi = fit.summary.get("hdi_prob") or fit.metadata.get("hdi_prob") or 0.9
    units = plots.run_info(fit)["units"]
    approx = [c.split(":", 1)[1] for c in table.columns if c.startswith("error_bias:")]
    slab = "slab_hdi_low" in table  # fits written before the slab columns existed lack them
    header = ["edge", "inclusion prob.", f"mean effect μ ({units})", "sd", f"{hdi:.0%} HDI"]
    header += [f"{hdi:.0%} HDI if in the circuit"] if slab else []
    header += ["intrinsic sd τ"] + [f"error bias {m}" for m in approx] + [f"error sd {m}" for m in approx]
    rows = []
    for edge, r in sub.iterrows():
        row = [edge, r["inclusion_prob"], r["effect_mean"], r["effect_sd"],
               f"[{_fmt(r['effect_hdi_low'])}, {_fmt(r['effect_hdi_high'])}]"]
        row += [f"[{_fmt(r['slab_hdi_low'])}, {_fmt(r['slab_hdi_high'])}]"] if slab else []
        row += [r.get("intrinsic_sd")]
        row += [r.get(f"error_bias:{m}") for m in approx] + [r.get(f"error_sd:{m}") for m in approx]
        rows.append(row)
    numeric = set(range(1, len(header))) - ({4, 5} if slab else {4})  # the interval columns are text
    return (f"<h2 id='edges'>Top {len(names)} edges</h2>"
            f"<p class='muted'>By inclusion probability, of {len(table):,} edges.</p>"
            + _table(header, rows, numeric=numeric)
            + _figure_html(plots.plot_forest(fit, edges=names), "Posterior mean effect with HDI; hollow: mean exact score.",
                           "forest plot"))


def _circuit_section(fit: FitResult) -> str:
    circuit = plots.median_probability_circuit(fit)
    probs = fit.edges.set_index("edge")["inclusion_prob"]
    listed = sorted(circuit, key=lambda e: -probs.get(e, 0))
    rows = [[e, probs.get(e)] for e in listed[:100]]
    more = f"<p class='muted'>… and {len(listed) - 100} more.</p>" if len(listed) > 100 else ""
    return ("<h2 id='circuit'>Circuit</h2>"
            f"<p>Median-probability circuit (edges in more than half of the posterior circuits, each pruned to "
            "paths from input to logits; as <code>bayescirc circuits</code> gives it): "
            f"<b>{len(circuit)}</b> edges. For posterior circuit samples, credible sets and export, run "
            "<code>bayescirc circuits FIT_DIR</code>.</p>"
            + _figure_html(plots.plot(fit, "circuit", circuit=circuit), "Edges weighted by inclusion probability; red: the median-probability "
                           "circuit.", "circuit graph")
            + (_table(["edge", "inclusion prob."], rows, numeric={1}) + more if rows else ""))


def _scores_section(fit: FitResult, scores) -> str:
    parts = [_figure_html(plots.plot(fit, "ppc", scores=scores),
                          "Posterior predictive check: observed ECDF (black) against replicated data sets (blue).",
                          "posterior predictive check")]
    if plots._methods(fit):
        try:
            parts.append(_figure_html(plots.plot(fit, "scatter", scores=scores),
                                      "Exact vs approximate per-input scores with the fitted calibration α_m + β_m·x.",
                                      "exact vs approximate scatter"))
        except BayescircError as exc:
            parts.append(f"<p class='muted'>No scatter plot: {_esc(exc)}</p>")
    return "<h2 id='ppc'>Per-input scores</h2>" + "".join(parts)


def _load_stability(stability) -> dict:
    if isinstance(stability, str | os.PathLike):
        path = Path(stability)
        if path.is_dir():  # the directory `bayescirc stability --out DIR` writes
            path = path / "stability.json"
        try:
            stability = json.loads(path.read_text())
        except FileNotFoundError:
            raise BayescircError(f"{path}: no such stability file; write one with `bayescirc stability SCORES --out FILE.json`.") from None
        except json.JSONDecodeError as exc:
            raise BayescircError(f"{path}: not valid JSON ({exc}); expected the output of `bayescirc stability`.") from None
    if not isinstance(stability, dict):
        raise BayescircError(f"the stability summary must be a JSON object, got {type(stability).__name__}.")
    return stability


def _stability_section(stability: dict) -> str:
    return ("<h2 id='stability'>Stability</h2><p>From <code>bayescirc stability</code>: how the selected circuits "
            "and edge rankings move under input resampling and across methods, conventional and Bayesian.</p>"
            + _nested(stability))


def _page(fit: FitResult, body: list[str], nav: list[tuple[str, str]]) -> str:
    from . import __version__

    info = plots.run_info(fit)
    title = f"bayescirc report — {info['model']} on {info['task']}"
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    links = "".join(f'<a href="#{anchor}">{_esc(name)}</a>' for anchor, name in nav)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_esc(title)}</h1><p class='muted'>Generated {stamp} by bayescirc {_esc(__version__)}; "
            f"effects in {_esc(info['units'])}.</p><nav>{links}</nav>" + "".join(body) + "</body></html>\n")


def report(fit, out: str | os.PathLike = "report.html", scores=None, stability=None, top: int = TOP_EDGES) -> Path:
    """Write one self-contained HTML report of a fit.

    Parameters
    ----------
    fit : FitResult or path of a fit directory
    out : path, default "report.html"
        The HTML file to write (atomically: a failure leaves no partial file).
    scores : DataFrame or path, optional
        The per-input scores the fit used; adds posterior predictive checks and
        the exact-vs-approximate scatter.
    stability : dict, or path of a JSON file or of a ``bayescirc stability --out`` directory, optional
        The summary of ``bayescirc stability`` (``DIR/stability.json``); adds it to the report.
    top : int, default 30
        Edges in the top-edge table and forest plot.

    Returns
    -------
    Path of the written file.
    """
    fit = fit if isinstance(fit, FitResult) else FitResult.load(fit)
    stability = _load_stability(stability) if stability is not None else None  # fail before the slow part
    nav = [("run", "Run"), ("diagnostics", "Diagnostics"), ("decomposition", "Variance"), ("edges", "Top edges"),
           ("circuit", "Circuit")]
    body = [_run_section(fit), _diagnostics_section(fit), _decomposition_section(fit), _edges_section(fit, top),
            _circuit_section(fit)]
    if scores is not None:
        body.append(_scores_section(fit, scores))
        nav.append(("ppc", "Per-input scores"))
    if stability is not None:
        body.append(_stability_section(stability))
        nav.append(("stability", "Stability"))
    page = _page(fit, body, nav)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
