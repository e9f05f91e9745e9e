"""The one-command demo: collect -> fit -> circuits -> report on the shipped IOI model.

Everything it does is the public pipeline, stage by stage, through the same
functions a user calls (:func:`bayescirc.collection.collect`,
:func:`bayescirc.fitting.fit`, :func:`bayescirc.circuits.sample_circuits`,
:func:`bayescirc.export.write_circuit_json`, :func:`bayescirc.reporting.report`),
so the demo doubles as an end-to-end check. Its default sizes finish in a few
minutes on two CPU cores.

Output directory layout::

    demo-out/
      scores.parquet   per-input scores (exact on the first inputs, EAP and EAP-IG on all)
      fit/             the posterior (edges.parquet, posterior.nc, summary.json)
      circuit.json     the median-probability circuit, EAP-IG/MIB JSON, inclusion frequencies as scores
      report.html      the self-contained report
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import schema
from .bridge import refuse_missing_directory
from .errors import BayescircError

__all__ = ["demo", "DemoResult", "DEMO_METHODS"]

DEMO_METHODS = (schema.EXACT, schema.EAP, schema.EAP_IG_INPUTS)


@dataclass
class DemoResult:
    """Where the demo wrote its files, the circuit it found and how long each stage took."""

    out: Path
    scores: Path
    fit_dir: Path
    circuit_json: Path
    report: Path
    circuit: frozenset
    timings: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return float(sum(self.timings.values()))


def _task_for(model, task) -> Path | str:
    refuse_missing_directory(model)  # before any stage starts, with or without a task
    if task is not None:
        return task
    if isinstance(model, str | os.PathLike) and (Path(model) / "task.jsonl").exists():
        return Path(model) / "task.jsonl"
    raise BayescircError(f"model {model!r} has no task.jsonl beside it: pass task= (a task file, e.g. from `bayescirc task`).")


def demo(out: str | os.PathLike = "demo-out", model=None, n_inputs: int = 200, exact_inputs: int = 50, *,
         task=None, methods=DEMO_METHODS, chains: int = 2, draws: int = 300, ig_steps: int = 5, seed: int = 0,
         device: str = "auto", inference: str = "auto", progress: bool = True, echo=print) -> DemoResult:
    """Run collect -> fit -> circuits -> report and say where the report and the circuit are.

    Parameters
    ----------
    out : path, default "demo-out"
        Directory for ``scores.parquet``, ``fit/``, ``circuit.json`` and ``report.html``.
    model : path, hub name or loaded model, optional
        Default: the shipped ``ioi-toy`` model (``bridge.shipped_model("ioi-toy")``).
    n_inputs : int, default 200
        Inputs of the task scored with the approximate methods.
    exact_inputs : int, default 50
        Inputs (the first ones) also scored by exact activation patching.
    task : path or DataFrame, optional
        Default: the model directory's ``task.jsonl``.
    methods : sequence of str, default ("exact", "eap", "eap-ig-inputs")
    chains, draws : int, default 2, 300
        Settings of the fit (SVI draws ``chains * draws`` samples).
    inference : {"auto", "nuts", "svi"}, default "auto"
        The fit's inference: ``auto`` is NUTS up to 5,000 edges. On one or two
        inputs NUTS can stall at its maximum tree depth; ``svi`` then.
    ig_steps : int, default 5
    seed : int, default 0
    device : str, default "auto"
    progress : bool, default True
        Progress bars of each stage.
    echo : callable, default print
        Where stage messages go (``None`` for silence).

    Returns
    -------
    DemoResult
    """
    from .bridge import shipped_model

    say = echo or (lambda *_: None)
    if n_inputs < 2 or not 0 < exact_inputs <= n_inputs:
        raise BayescircError(f"need n_inputs >= 2 and 0 < exact_inputs <= n_inputs, got {n_inputs} and {exact_inputs}.")
    model = shipped_model("ioi-toy") if model is None else model
    task = _task_for(model, task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"scores": out / "scores.parquet", "fit": out / "fit", "circuit": out / "circuit.json",
             "report": out / "report.html"}
    timings: dict[str, float] = {}
    name = Path(str(model)).name if isinstance(model, str | os.PathLike) else type(model).__name__

    def stage(label: str, index: int):
        say(f"[{index}/4] {label}")
        return time.perf_counter()

    from .collection import collect

    start = stage(f"collect: {', '.join(methods)} scores of every edge of {name} on {n_inputs} inputs "
                  f"(exact on {exact_inputs})", 1)
    scores = collect(model, task, methods=tuple(methods), out=paths["scores"], exact_inputs=exact_inputs,
                     n_inputs=n_inputs, ig_steps=ig_steps, seed=seed, device=device, progress=progress)
    timings["collect"] = time.perf_counter() - start

    from .fitting import chosen_inference, fit

    inference = chosen_inference(inference, scores[schema.EDGE].nunique())  # for the banner
    start = stage(f"fit: hierarchical model, {inference.upper()} {chains} chains x {draws} draws", 2)
    result = fit(paths["scores"], out=paths["fit"], inference=inference, chains=chains, draws=draws, seed=seed,
                 progress=progress)
    timings["fit"] = time.perf_counter() - start

    from .circuits import sample_circuits
    from .export import collected_graph, model_width, write_circuit_json

    start = stage("circuits: sample posterior circuits, export the median-probability circuit", 3)
    samples = sample_circuits(result, seed=seed)
    circuit = frozenset(samples.median_circuit())
    write_circuit_json(paths["circuit"], circuit, samples.frequency,
                       graph=collected_graph(result.summary.get("metadata")), d_model=model_width(model))
    timings["circuits"] = time.perf_counter() - start

    from .reporting import diagnostic_checks, report

    start = stage("report: diagnostics, variance decomposition, circuit graph", 4)
    report(result, paths["report"], scores=paths["scores"])
    timings["report"] = time.perf_counter() - start

    warns = [c.name for c in diagnostic_checks(result.summary) if c.status == "warn"]
    say("")
    say(f"done in {sum(timings.values()):.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    say(f"median-probability circuit: {len(circuit)} of {len(result.edges)} edges; "
        + (f"diagnostics warn: {', '.join(warns)}" if warns else "diagnostics pass"))
    say(f"report:  {paths['report'].resolve()}")
    say(f"circuit: {paths['circuit'].resolve()}  (EAP-IG/MIB JSON)")
    return DemoResult(out=out, scores=paths["scores"], fit_dir=paths["fit"], circuit_json=paths["circuit"],
                      report=paths["report"], circuit=circuit, timings=timings)
