"""Write the notebooks in this directory from the cell sources below (without outputs).

The notebooks are generated so that their code lives in one reviewable file
and the committed .ipynb files never carry outputs. After editing, run

    python notebooks/build_notebooks.py

and commit the script and the notebooks together. tests/test_notebooks.py
checks that the committed notebooks match this script and executes 01.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

QUICKSTART = [
    ("md", """# bayescirc quickstart: circuits with uncertainty on the shipped IOI model

This notebook runs the whole pipeline on `ioi-toy`, a small GPT-2-architecture model shipped with
bayescirc and trained on indirect-object identification ("When Mary and John went to the store,
John gave a drink to" → " Mary"). It takes a few minutes on a laptop CPU.

1. **collect** per-input edge scores: exact activation patching on some inputs, EAP and EAP-IG on all;
2. **fit** the hierarchical model: each edge's mean effect μ, its input-to-input spread τ, each method's
   bias/scale/noise, and each edge's **inclusion probability**;
3. **circuits**: sample circuits from the posterior, take the median-probability circuit;
4. **plots** and the **report**."""),
    ("code", """%matplotlib inline
import os
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the fit runs on CPU here
from pathlib import Path

import pandas as pd

from bayescirc import bridge
from bayescirc.tasks import read_task

OUT = Path("quickstart-out")
OUT.mkdir(exist_ok=True)
model_dir = bridge.shipped_model("ioi-toy")
task_file = model_dir / "task.jsonl"
read_task(task_file).head()"""),
    ("md", """## 1. Collect per-input scores

Every method estimates the same quantity, in the metric's units (logit difference here): the change in
the metric when one edge carries the corrupted activation. Scores are kept **per input**: nothing is
averaged away. Exact patching costs one patched run per edge and input, so it runs on the first
`exact_inputs` inputs only; the approximations run on all."""),
    ("code", """from bayescirc.collection import collect

scores = collect(model_dir, task_file, methods=("exact", "eap", "eap-ig-inputs"),
                 n_inputs=120, exact_inputs=30, out=OUT / "scores.parquet", seed=0, progress=False)
print(scores.groupby("method", observed=True).agg(inputs=("input_id", "nunique"), edges=("edge", "nunique")))
scores.head()"""),
    ("md", """## 2. Fit the hierarchical model

The fit pools the exact and approximate scores: approximate method *m* observes
α<sub>m</sub> + β<sub>m</sub>·θ + δ<sub>e,m</sub> + noise, where θ is the per-input exact effect. Check the
diagnostics before reading the posterior (R-hat ≤ 1.01, ESS ≥ 400, no divergences)."""),
    ("code", """from bayescirc.fitting import fit

result = fit(OUT / "scores.parquet", out=OUT / "fit", chains=2, draws=300, seed=0, progress=False)
{k: v for k, v in result.summary["diagnostics"].items() if k != "svi_loss"}"""),
    ("code", """columns = ["edge", "inclusion_prob", "effect_mean", "effect_hdi_low", "effect_hdi_high", "intrinsic_sd"]
result.edges.sort_values("inclusion_prob", ascending=False)[columns].head(10)"""),
    ("md", """## 3. Circuits from the posterior

Each posterior draw gives a circuit (indicators drawn from their inclusion probabilities, pruned to
paths from `input` to `logits`). The median-probability circuit keeps the edges that are in more than
half of them."""),
    ("code", """from bayescirc.circuits import sample_circuits

samples = sample_circuits(result, seed=0)
circuit = samples.median_circuit()
print(f"median-probability circuit: {len(circuit)} of {len(result.edges)} edges")
samples.frequency.sort_values(ascending=False).head(10)"""),
    ("md", """## 4. Plots and the report

`bayescirc.plots.plot(fit, kind)` returns a matplotlib figure (shown inline here: `%matplotlib inline`
above); the same figures come from `bayescirc plot FIT_DIR --kind KIND`."""),
    ("code", """from bayescirc.plots import plot

plot(result, "circuit")"""),
    ("code", """plot(result, "forest", out=OUT / "forest.png")"""),
    ("code", """plot(result, "decomposition")"""),
    ("code", """plot(result, "trace")"""),
    ("code", """plot(result, "scatter", scores=OUT / "scores.parquet")"""),
    ("code", """plot(result, "ppc", scores=OUT / "scores.parquet")"""),
    ("code", """from bayescirc.reporting import report

path = report(result, OUT / "report.html", scores=OUT / "scores.parquet")
print(f"open {path.resolve()} in a browser")"""),
]

GPT2 = [
    ("md", """# GPT-2 small on IOI: circuits with uncertainty

The quickstart's workflow on GPT-2 small (12 layers × 12 heads, 32,491 edges) with the standard IOI
dataset (plain English names). **Needs a GPU and access to the Hugging Face hub** (or a local copy of
GPT-2: pass its directory instead of `"gpt2"`). Not executed by the test suite.

Sizes: exact patching of all 32,491 edges costs one patched forward pass per edge and input; 100 exact
inputs should take minutes on one modern GPU (not yet measured: no GPU was available while this was written;
`benchmarks/bench_collect.py --device cuda` measures it); on a CPU, about an hour per input. The approximations
run on all 500 inputs."""),
    ("code", """%matplotlib inline
import os
from pathlib import Path

import pandas as pd

OUT = Path("gpt2-ioi-out")
OUT.mkdir(exist_ok=True)
MODEL = "gpt2"          # a hub name, or the directory of a local copy
DEVICE = "cuda"
"""),
    ("md", """## The task

`bayescirc task ioi --vocabulary english` writes IOI prompt pairs with the standard ABC corruption (the
repeated subject replaced by a third name). The collector checks that every name is a single GPT-2 token."""),
    ("code", """!bayescirc task ioi --n 500 --seed 0 --vocabulary english --out {OUT}/ioi.jsonl"""),
    ("code", """from bayescirc.tasks import read_task

task = read_task(OUT / "ioi.jsonl")
task.head()"""),
    ("md", "## Collect (GPU)"),
    ("code", """from bayescirc.collection import collect

scores = collect(MODEL, OUT / "ioi.jsonl", methods=("exact", "eap", "eap-ig-inputs"), n_inputs=500,
                 exact_inputs=100, ig_steps=5, device=DEVICE, out=OUT / "scores.parquet", seed=0)
scores.groupby("method", observed=True).input_id.nunique()"""),
    ("md", """## Fit

With more than a few thousand edges `inference="auto"` uses SVI (NUTS is the reference posterior for
small graphs). JAX runs the fit on the GPU when `jax[cuda]` is installed, else on the CPU."""),
    ("code", """from bayescirc.fitting import fit

result = fit(OUT / "scores.parquet", out=OUT / "fit", inference="auto", draws=1000, seed=0)
print(result.summary["inference"], result.summary["diagnostics"]["warnings"])"""),
    ("code", """from bayescirc.plots import plot

plot(result, "loss" if result.summary["inference"] == "svi" else "energy")"""),
    ("code", """columns = ["edge", "inclusion_prob", "effect_mean", "effect_hdi_low", "effect_hdi_high", "intrinsic_sd"]
result.edges.sort_values("inclusion_prob", ascending=False)[columns].head(20)"""),
    ("md", "## Circuits"),
    ("code", """from bayescirc.circuits import sample_circuits
from bayescirc.export import write_circuit_json

samples = sample_circuits(result, seed=0)
circuit = samples.median_circuit()
write_circuit_json(OUT / "circuit.json", circuit, samples.frequency)   # EAP-IG / MIB JSON
print(f"median-probability circuit: {len(circuit)} edges")"""),
    ("code", """plot(result, "circuit", threshold=0.2, max_edges=60)"""),
    ("code", """plot(result, "decomposition")"""),
    ("code", """plot(result, "scatter", scores=OUT / "scores.parquet")"""),
    ("md", """## Stability and the report

`bayescirc stability` bootstraps the inputs and compares the conventional top-k circuit with the
Bayesian one; its JSON goes into the report."""),
    ("code", """!bayescirc stability {OUT}/scores.parquet --out {OUT}/stability"""),
    ("code", """import json

from bayescirc.reporting import report

stability = json.loads((OUT / "stability" / "stability.json").read_text())
print(json.dumps(stability, indent=1)[:2000])
path = report(result, OUT / "report.html", scores=OUT / "scores.parquet", stability=stability)
print(f"open {path.resolve()}")"""),
]

ANATOMY = [
    ("md", """# The anatomy of variance in circuit discovery

On the shipped toy models, this notebook takes apart the three sources of variance that make circuits
fragile (Méloux, Portet, Peyrard, *Mechanistic Interpretability as Statistical Estimation*, 2025):

1. **intrinsic**: an edge's exact effect varies from input to input;
2. **approximation**: EAP and EAP-IG estimate that effect with bias and noise, and IG steps matter;
3. **aggregation**: a circuit selected from the mean over a finite set of inputs moves when the inputs
   are resampled;

and then what the Bayesian fit does instead: it carries all three into inclusion probabilities.
Runs in a few minutes on CPU."""),
    ("code", """%matplotlib inline
import os
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bayescirc import bridge
from bayescirc.collection import collect

MODEL = "ioi-toy"        # or "induction"
OUT = Path("anatomy-out")
OUT.mkdir(exist_ok=True)
model_dir = bridge.shipped_model(MODEL)
task_file = model_dir / "task.jsonl"
N, N_EXACT = 160, 80"""),
    ("md", """## Per-input scores, with two IG step counts

`collect` labels a non-default step count in the method name (`eap-ig-inputs:steps=20`), so both runs
live in one table."""),
    ("code", """base = collect(model_dir, task_file, methods=("exact", "eap", "eap-ig-inputs"), n_inputs=N,
               exact_inputs=N_EXACT, ig_steps=5, seed=0, progress=False)
more_steps = collect(model_dir, task_file, methods=("eap-ig-inputs",), n_inputs=N, ig_steps=20, seed=0,
                     progress=False)
scores = pd.concat([base, more_steps], ignore_index=True)
for col in ("edge", "method"):
    scores[col] = scores[col].astype(str)
wide = scores.pivot_table(index=["input_id", "edge"], columns="method", values="score")
methods = [m for m in wide.columns if m != "exact"]
print(methods)"""),
    ("md", """## 1. Intrinsic variance: exact effects vary from input to input

For the edges with the largest mean exact effect: the spread of their per-input exact effects, the
coefficient of variation (sd / |mean|) and the sign consistency (fraction of inputs with the majority
sign)."""),
    ("code", """exact = wide["exact"].dropna().unstack("edge")          # inputs x edges
stats = pd.DataFrame({"mean": exact.mean(), "sd": exact.std()})
stats["cv"] = stats["sd"] / stats["mean"].abs()
stats["sign_consistency"] = np.maximum((exact > 0).mean(), (exact < 0).mean())
top = stats["mean"].abs().sort_values(ascending=False).index[:12]
stats.loc[top]"""),
    ("code", """fig = Figure(figsize=(9, 4), layout="constrained")
ax = fig.subplots()
ax.boxplot([exact[e].to_numpy() for e in top], orientation="horizontal", tick_labels=list(top))
ax.axvline(0, color="grey", lw=0.8)
ax.set_xlabel("exact per-input effect (logit-diff)")
ax.set_title(f"Per-input exact effects of the top edges, {MODEL}")
fig"""),
    ("md", """## 2. Approximation error: EAP vs EAP-IG

The error of a method on an input is its score minus the exact score. Its mean over inputs is the
systematic part (bias), its sd the per-input noise."""),
    ("code", """both = wide.dropna(subset=["exact"])
rows = []
for m in methods:
    err = (both[m] - both["exact"]).dropna()
    slope = np.polyfit(both["exact"].loc[err.index], both[m].loc[err.index], 1)[0]
    rows.append({"method": m, "mean error": err.mean(), "error sd": err.std(),
                 "mean |error|": err.abs().mean(), "slope vs exact": slope,
                 "corr with exact": np.corrcoef(both["exact"].loc[err.index], both[m].loc[err.index])[0, 1]})
pd.DataFrame(rows).set_index("method")"""),
    ("code", """fig = Figure(figsize=(5 * len(methods), 4), layout="constrained")
for ax, m in zip(fig.subplots(1, len(methods)), methods):
    sub = both[["exact", m]].dropna()
    ax.scatter(sub["exact"], sub[m], s=4, alpha=0.4)
    ax.axline((0, 0), slope=1, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("exact score (logit-diff)")
    ax.set_ylabel(f"{m} score (logit-diff)")
    ax.set_title(m)
fig"""),
    ("md", """## 3. Aggregation: conventional circuits under input resampling and IG steps

The conventional pipeline ranks edges by |mean score| and keeps the top k. Resample the inputs with
replacement and the selected circuit moves; change the IG step count and it moves again."""),
    ("code", """rng = np.random.default_rng(0)
K = 15


def top_k(frame, method, k=K, inputs=None):
    col = frame[method].dropna().unstack("edge")
    if inputs is not None:
        col = col.iloc[inputs]
    return set(col.mean().abs().sort_values(ascending=False).index[:k])


def jaccard(a, b):
    return len(a & b) / max(1, len(a | b))


n_in = wide["eap-ig-inputs"].dropna().unstack("edge").shape[0]
boot = [top_k(wide, "eap-ig-inputs", inputs=rng.integers(0, n_in, n_in)) for _ in range(50)]
pairs = [jaccard(a, b) for i, a in enumerate(boot) for b in boot[i + 1:]]
print(f"top-{K} on mean EAP-IG: bootstrap Jaccard mean {np.mean(pairs):.3f}, 5th percentile {np.percentile(pairs, 5):.3f}")
print(f"EAP vs EAP-IG (5 steps): Jaccard {jaccard(top_k(wide, 'eap'), top_k(wide, 'eap-ig-inputs')):.3f}")
print(f"EAP-IG 5 vs 20 steps:    Jaccard {jaccard(top_k(wide, 'eap-ig-inputs'), top_k(wide, 'eap-ig-inputs:steps=20')):.3f}")"""),
    ("md", """## 4. What the Bayesian circuit does instead

The fit models all three sources at once: intrinsic variance (τ), each method's error (α, β, δ, σ),
and the uncertainty of each edge's mean given the inputs seen. Its output is not one circuit but a
posterior over circuits; the variance decomposition says which source dominates."""),
    ("code", """from bayescirc.fitting import fit
from bayescirc.plots import plot

result = fit(base, out=OUT / "fit", chains=2, draws=300, seed=0, progress=False)
plot(result, "decomposition")"""),
    ("code", """from bayescirc.circuits import sample_circuits

samples = sample_circuits(result, seed=0)
circuit = samples.median_circuit()
draws = [set(np.asarray(samples.edges)[row]) for row in samples.indicators[:200]]
within = [jaccard(a, b) for i, a in enumerate(draws) for b in draws[i + 1:]]
print(f"median-probability circuit: {len(circuit)} edges")
print(f"expected Jaccard between two posterior circuits: {np.mean(within):.3f}")
k_matched = max(1, len(circuit))
boot_matched = [top_k(wide, "eap-ig-inputs", k=k_matched, inputs=rng.integers(0, n_in, n_in)) for _ in range(50)]
print(f"top-{k_matched} (same size) on mean EAP-IG vs the Bayesian circuit: "
      f"Jaccard {np.mean([jaccard(b, set(circuit)) for b in boot_matched]):.3f} over bootstraps")"""),
    ("md", """The posterior circuit draws disagree where the data cannot decide; the inclusion probabilities say
which edges those are, instead of a hand-picked k hiding them."""),
    ("code", """plot(result, "circuit")"""),
    ("code", """plot(result, "scatter", scores=base)"""),
]


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART, "02_gpt2_ioi.ipynb": GPT2, "03_variance_anatomy.ipynb": ANATOMY}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = build(cells)
        nbformat.validate(nb)
        # Stable cell ids so regenerating without changes gives identical files.
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"{Path(name).stem[:2]}-{i:02d}"
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    main()
