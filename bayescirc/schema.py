"""Names shared by every stage: columns, methods, metadata keys and dimensions.

Everything that is written to or read from a file is named here once and
imported everywhere else, so a renamed column is a one-line change.

scores.parquet, schema v1 (long format, one row per input, edge and method):

=============  ==================  ==================================================
column         type                meaning
=============  ==================  ==================================================
input_id       int64               index of the input in the task dataset (>= 0)
edge           string/dictionary   edge name, e.g. ``a0.h3->a2.h1<q>`` (see graph.py)
method         string/dictionary   ``exact``, ``eap``, ``eap-ig-inputs``, ...
score          float32/float64     metric(patched) - metric(clean), metric units
=============  ==================  ==================================================

These four columns are the whole contract that ``fit`` needs. The collector
adds the optional per-input columns below and the file metadata under the key
``bayescirc`` (a JSON object, see :data:`METADATA_FIELDS`).
"""

from __future__ import annotations

SCHEMA_VERSION = 1

# --- scores.parquet columns -------------------------------------------------
INPUT_ID = "input_id"
EDGE = "edge"
METHOD = "method"
SCORE = "score"
REQUIRED_COLUMNS = (INPUT_ID, EDGE, METHOD, SCORE)

# Optional per-input columns written by the collector (repeated on each row of
# an input; parquet's dictionary/RLE encoding makes the repetition cheap).
CLEAN_METRIC = "clean_metric"
CORRUPTED_METRIC = "corrupted_metric"
OPTIONAL_COLUMNS = (CLEAN_METRIC, CORRUPTED_METRIC)

# --- file metadata -----------------------------------------------------------
METADATA_KEY = b"bayescirc"
METADATA_FIELDS = {
    "schema_version": "int, the version of this schema the file follows",
    "model": "str, model path or hub name",
    "task": "str, task file or generator description",
    "metric": "str, e.g. 'logit-diff'",
    "sign_convention": "str, always SIGN_CONVENTION",
    "aggregation": "str, always 'none (per input)'",
    "methods": "dict, method label -> hyper-parameters (e.g. {'steps': 5})",
    "n_inputs": "int, number of inputs in the task (all shards)",
    "seed": "int or null",
    "package_version": "str, bayescirc version that wrote the file",
    "extra": "dict, free-form",
}
SIGN_CONVENTION = "score = metric(patched run) - metric(clean run)"
AGGREGATION = "none (per input)"

# --- methods -------------------------------------------------------------------
EXACT = "exact"
EAP = "eap"
EAP_IG_INPUTS = "eap-ig-inputs"
EAP_IG_ACTIVATIONS = "eap-ig-activations"
CLEAN_CORRUPTED = "clean-corrupted"
KNOWN_METHODS = (EXACT, EAP, EAP_IG_INPUTS, EAP_IG_ACTIVATIONS, CLEAN_CORRUPTED)

def method_label(base: str, **params) -> str:
    """Label of a method run with non-default hyper-parameters.

    ``method_label("eap-ig-inputs", steps=20)`` is ``"eap-ig-inputs:steps=20"``;
    without parameters the label is the base name. Labels keep runs of one
    method with different hyper-parameters apart in one scores file.
    """
    if not params:
        return base
    return base + ":" + ",".join(f"{k}={params[k]}" for k in sorted(params))


def parse_method(label: str) -> tuple[str, dict[str, str]]:
    """Split a method label ``base[:key=value,...]`` into base name and hyper-parameters.

    Any non-empty string is a valid label (files written by other tools carry
    their own method names); a label whose suffix is not ``key=value`` pairs
    is all base name.
    """
    base, sep, rest = label.partition(":")
    if not sep:
        return label, {}
    items = [item.partition("=") for item in rest.split(",")]
    if not all(key and eq for key, eq, _ in items):
        return label, {}
    return base, {key: value for key, _, value in items}


def is_exact(label: str) -> bool:
    """Whether a method label names exact activation patching."""
    return parse_method(label)[0] == EXACT


# --- dimension names (NumPyro plates, ArviZ dims, table columns) ---------------
DIM_EDGE = "edge"
DIM_METHOD = "method"
DIM_EDGE_TYPE = "edge_type"
DIM_INPUT = "input"
DIM_DRAW = "draw"
DIM_CHAIN = "chain"

# --- fit/ output -----------------------------------------------------------------
FIT_EDGES_FILE = "edges.parquet"
FIT_POSTERIOR_FILE = "posterior.nc"
FIT_SUMMARY_FILE = "summary.json"
EDGE_TABLE_COLUMNS = (
    "edge",
    "inclusion_prob",
    "effect_mean",
    "effect_sd",
    "effect_hdi_low",
    "effect_hdi_high",
    "intrinsic_sd",
)
