"""The fit output contract, and the one module that touches ArviZ's data layer.

A fit directory holds (names in :mod:`bayescirc.schema`):

- ``edges.parquet`` — one row per edge: ``edge``, ``inclusion_prob``,
  ``effect_mean``, ``effect_sd``, ``effect_hdi_low``, ``effect_hdi_high``,
  ``intrinsic_sd``, per-method approximation error columns and the variance
  components; file metadata (key ``bayescirc``) carries ``hdi_prob``, the
  inclusion rule and the scores file's metadata (model, task, metric).
- ``posterior.nc`` — ArviZ InferenceData (netCDF, ``arviz.from_netcdf``). Its
  ``posterior`` group has at least ``mu`` (chain, draw, edge): the edge's mean
  effect, and ``inclusion`` (chain, draw, edge): the conditional probability
  that the edge is in the slab given that draw's parameters (so drawing
  ``Bernoulli(inclusion)`` per draw samples circuits). The ``edge`` coordinate
  holds the edge names.
- ``summary.json`` — diagnostics and the variance decomposition.

ArviZ 0.23 (InferenceData) is what runs on Python 3.11; keeping every
ArviZ call here means moving to ArviZ 1.x (DataTree) touches this module only.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import schema
from ._io import atomic_dir, strict_json
from .errors import BayescircError

__all__ = ["FitResult", "load_fit", "make_idata", "sampling_diagnostics", "stacked_draws"]

FIT_DIR_CONTENTS = (schema.FIT_EDGES_FILE, schema.FIT_POSTERIOR_FILE, schema.FIT_SUMMARY_FILE, "circuits", "plots")
"""What a fit directory holds: the fit's files, and where ``circuits`` and ``plot`` write by default."""


@dataclass
class FitResult:
    """What ``fit`` returns and what a fit directory holds.

    Attributes
    ----------
    idata : arviz.InferenceData
        Posterior (``mu``, ``inclusion`` and the model's other sites), sample
        stats, and the data the fit saw.
    edges : DataFrame
        One row per edge (see module docstring).
    summary : dict
        Diagnostics, variance decomposition, settings; what ``summary.json`` holds.
    metadata : dict
        ``hdi_prob``, inclusion rule, and the scores file's metadata.
    """

    idata: object
    edges: pd.DataFrame
    summary: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def save(self, directory: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write ``edges.parquet``, ``posterior.nc`` and ``summary.json`` into ``directory`` (atomically).

        An existing fit directory is replaced whole, with the ``circuits/`` and
        ``plots/`` that later commands wrote into it (they describe the old fit);
        a directory holding anything else is refused.
        """
        directory = Path(directory)
        with atomic_dir(directory, overwrite=overwrite, replaces=FIT_DIR_CONTENTS) as tmp:
            table = pa.Table.from_pandas(self.edges, preserve_index=False)
            table = table.replace_schema_metadata(
                {schema.METADATA_KEY: strict_json(self.metadata, sort_keys=True, default=str).encode()})
            pq.write_table(table, tmp / schema.FIT_EDGES_FILE)
            self.idata.to_netcdf(str(tmp / schema.FIT_POSTERIOR_FILE))
            (tmp / schema.FIT_SUMMARY_FILE).write_text(strict_json(self.summary, indent=2, sort_keys=True,
                                                                   default=str))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FitResult:
        return load_fit(directory)

    def draws(self, var: str) -> np.ndarray:
        """Posterior draws of a per-edge variable as ``[n_draws, n_edges]`` (chains stacked)."""
        return stacked_draws(self.idata, var)

    @property
    def edge_names(self) -> list[str]:
        return [str(e) for e in self.idata.posterior[schema.DIM_EDGE].values]

    def sample_circuits(self, n: int | None = None, rule: str = "slab", seed: int = 0):
        """Sample circuits from this posterior; see :func:`bayescirc.circuits.sample_circuits`."""
        from .circuits import sample_circuits

        return sample_circuits(self, n=n, rule=rule, seed=seed)


def load_fit(directory: str | os.PathLike) -> FitResult:
    """Read a fit directory written by :meth:`FitResult.save`."""
    import arviz as az

    directory = Path(directory)
    missing = [n for n in (schema.FIT_EDGES_FILE, schema.FIT_POSTERIOR_FILE, schema.FIT_SUMMARY_FILE)
               if not (directory / n).exists()]
    if missing:
        raise BayescircError(f"{directory}: not a fit directory (missing {', '.join(missing)}). "
                             "Create one with `bayescirc fit SCORES --out DIR`.")
    table = pq.read_table(directory / schema.FIT_EDGES_FILE)
    raw = (table.schema.metadata or {}).get(schema.METADATA_KEY)
    metadata = json.loads(raw) if raw else {}
    idata = az.from_netcdf(str(directory / schema.FIT_POSTERIOR_FILE))
    summary = json.loads((directory / schema.FIT_SUMMARY_FILE).read_text())
    return FitResult(idata=idata, edges=table.to_pandas(), summary=summary, metadata=metadata)


def stacked_draws(idata, var: str) -> np.ndarray:
    """Draws of ``posterior[var]`` as a ``[chain*draw, ...]`` array."""
    if var not in idata.posterior:
        raise BayescircError(f"the posterior has no variable {var!r} (it has {sorted(idata.posterior.data_vars)}).")
    values = idata.posterior[var].values
    return values.reshape(-1, *values.shape[2:])


def make_idata(posterior: dict, coords: dict, dims: dict, sample_stats: dict | None = None,
               observed_data: dict | None = None, attrs: dict | None = None):
    """Build the InferenceData of a fit from ``{name: array (chain, draw, ...)}`` dictionaries.

    ``dims`` maps each variable to the names of its dimensions after (chain,
    draw), e.g. ``{"mu": ["edge"]}``; ``coords`` gives their labels.
    """
    import arviz as az

    # arrays, not lists: ArviZ deep-copies the coordinates once per variable (1.6 s for 32k edge names as a list)
    coords = {k: np.asarray(v) for k, v in coords.items()}
    idata = az.from_dict(posterior=posterior, sample_stats=sample_stats or None, coords=coords, dims=dims,
                         observed_data=observed_data or None, attrs=attrs or {})
    return idata


def sampling_diagnostics(idata, var_names: list[str]) -> dict:
    """Max r_hat and min bulk/tail ESS over ``var_names`` (None when there is a single chain or draw)."""
    import arviz as az

    names = [v for v in var_names if v in idata.posterior]
    post = idata.posterior[names]
    if post.sizes.get("chain", 1) < 2 or post.sizes.get("draw", 1) < 4:
        ess_ok = post.sizes.get("draw", 1) >= 4
    else:
        ess_ok = True
    out = {"max_r_hat": None, "min_ess_bulk": None, "min_ess_tail": None, "worst": {}}
    if not names or not ess_ok:
        return out

    def extreme(ds, fn):
        best, where = None, None
        for name, arr in ds.data_vars.items():
            values = np.asarray(arr.values, float)
            values = values[np.isfinite(values)]
            if values.size:
                v = float(fn(values))
                if best is None or fn([best, v]) == v:
                    best, where = v, name
        return best, where

    # constant draws (an edge always in the spike) have undefined r_hat/ESS: skipped, not warned about
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if post.sizes.get("chain", 1) >= 2:
            out["max_r_hat"], out["worst"]["r_hat"] = extreme(az.rhat(post), np.max)
        out["min_ess_bulk"], out["worst"]["ess_bulk"] = extreme(az.ess(post, method="bulk"), np.min)
        out["min_ess_tail"], out["worst"]["ess_tail"] = extreme(az.ess(post, method="tail"), np.min)
    return out
