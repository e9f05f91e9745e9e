"""bayescirc: uncertainty-aware circuit discovery.

Collect per-input edge scores from a TransformerLens model, fit hierarchical
models that separate intrinsic input variance, approximation error and
aggregation noise, and get circuits with calibrated uncertainty.

Heavy dependencies (torch, TransformerLens, JAX) load only when the stage
that needs them is used.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it; imported on first use. A module never shares a
# public function's name: importing a submodule binds its name on the package, which
# would shadow the function (``bayescirc.simulate`` must stay the function).
_EXPORTS = {
    "Graph": "graph",
    "parse_edge": "graph",
    "prune_to_paths": "graph",
    "read_scores": "scores",
    "write_scores": "scores",
    "read_metadata": "scores",
    "validate_scores": "scores",
    "sufficient_statistics": "scores",
    "SufficientStats": "scores",
    "ScoresWriter": "scores",
    "simulate": "simulation",
    "SimulationConfig": "simulation",
    "MethodError": "simulation",
    "write_simulation": "simulation",
    "read_truth": "simulation",
    "read_task": "tasks",
    "make_task": "taskgen",
    "TASK_KINDS": "taskgen",
    "load_model": "bridge",
    "shipped_model": "bridge",
    "collect": "collection",
    "evaluate_circuits": "patching",
    "CircuitScores": "patching",
    "fit": "fitting",
    "FitResult": "posterior",
    "load_fit": "posterior",
    "sample_circuits": "circuits",
    "CircuitSamples": "circuits",
    "write_circuit_json": "export",
    "read_circuit_json": "export",
    "stability": "stability_metrics",
    "StabilityResult": "stability_metrics",
    "evaluate": "faithfulness",
    "circuit_faithfulness": "faithfulness",
    "plot": "plots",
    "report": "reporting",
    "demo": "pipeline",
    "BayescircError": "errors",
    "ScoresError": "errors",
    "TaskError": "errors",
    "ModelError": "errors",
    "FitError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bayescirc' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
