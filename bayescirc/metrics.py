"""Task metrics at the last prompt position, as functions of next-token logits.

Every metric maps the logits at the last real prompt position (``[rows, vocab]``)
to one number per row; the collector scores an edge as
``metric(patched run) - metric(clean run)`` (``schema.SIGN_CONVENTION``).

- ``logit-diff`` (default): logit of the answer minus logit of the distractor.
- ``prob-diff``: softmax probability of the answer minus that of the distractor.
- ``kl``: KL divergence of the run's next-token distribution from the clean
  run's, ``KL(p_clean || p_run) = sum p_clean (log p_clean - log p_run)``;
  zero on the clean run, so its gradient there is zero too (``eap`` scores are
  then all zero; the interpolating methods are not).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["METRICS", "DEFAULT_METRIC", "check_metric", "metric_fn"]

DEFAULT_METRIC = "logit-diff"
METRICS = {
    "logit-diff": "logit(answer) - logit(distractor) at the last prompt position",
    "prob-diff": "p(answer) - p(distractor) at the last prompt position",
    "kl": "KL(clean next-token distribution || this run's), at the last prompt position",
}


def check_metric(name: str) -> str:
    """Return ``name`` if it is a known metric, else raise ``ValueError`` listing them."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {list(METRICS)}")
    return name


def metric_fn(name: str) -> Callable:
    """The metric ``name`` as ``f(logits, answer, distractor, clean_logprobs) -> [rows]``.

    ``logits`` is ``[rows, vocab]`` (last position), ``answer`` and ``distractor``
    are ``[rows]`` token ids, ``clean_logprobs`` is ``[rows, vocab]``
    (log-softmax of the clean run's logits; only ``kl`` reads it).
    """
    check_metric(name)
    if name == "logit-diff":
        return _logit_diff
    if name == "prob-diff":
        return _prob_diff
    return _kl


def _pick(values, ids):
    return values.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _logit_diff(logits, answer, distractor, clean_logprobs=None):
    return _pick(logits, answer) - _pick(logits, distractor)


def _prob_diff(logits, answer, distractor, clean_logprobs=None):
    probs = logits.softmax(-1)
    return _pick(probs, answer) - _pick(probs, distractor)


def _kl(logits, answer, distractor, clean_logprobs):
    logprobs = logits.log_softmax(-1)
    return (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1)
