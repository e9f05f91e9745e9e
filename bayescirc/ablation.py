"""Task accuracy of a TransformerLens model, and what mean-ablating attention heads does to it.

Used to check the mechanisms claimed in the shipped models' cards (and by
anyone who wants the same check on another model): a set of heads is
necessary for the task when replacing their outputs by their mean over a
reference distribution (the task's corrupted prompts, where the task signal
is absent) drops accuracy to chance (50%: answer vs distractor), while the
same ablation of the other heads does not.

Works on any loaded model with ``run_with_hooks`` and HookedTransformer hook
names (a ``TransformerBridge`` in compatibility mode, see
:func:`bayescirc.bridge.load_model`): a head's output is ``blocks.{l}.attn.hook_z``
``[batch, pos, head, d_head]`` before the output projection.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import TaskError
from .tasks import read_task

__all__ = ["logit_diffs", "head_means", "ablation_table", "attention_to", "direct_logit_attribution"]

Head = tuple[int, int]


def _z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _token_groups(model, prompts: Sequence[str]) -> dict[int, list[int]]:
    """Row indices grouped by token length (with BOS), so batches need no padding."""
    groups: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(int(model.to_tokens(prompt).shape[1]), []).append(i)
    return groups


def _single_token(model, text: str, row: int, column: str) -> int:
    ids = model.to_tokens(text, prepend_bos=False)[0]
    if len(ids) != 1:
        raise TaskError(f"row {row}: {column} {text!r} is {len(ids)} tokens for this model; it must be one token.")
    return int(ids[0])


def head_means(model, prompts: Sequence[str], batch_size: int = 128) -> dict[int, np.ndarray]:
    """Mean of each layer's ``hook_z`` over ``prompts`` and their positions after BOS: ``{layer: [head, d_head]}``."""
    import torch

    layers = range(int(model.cfg.n_layers))
    sums = {layer: 0.0 for layer in layers}
    count = 0
    with torch.no_grad():
        for rows in _token_groups(model, prompts).values():
            for start in range(0, len(rows), batch_size):
                tokens = model.to_tokens([prompts[i] for i in rows[start:start + batch_size]])
                _, cache = model.run_with_cache(tokens, names_filter=[_z_hook(layer) for layer in layers])
                for layer in layers:
                    sums[layer] = sums[layer] + cache[_z_hook(layer)][:, 1:].sum(dim=(0, 1)).double()
                count += tokens.shape[0] * (tokens.shape[1] - 1)
    return {layer: (sums[layer] / count).float().cpu().numpy() for layer in layers}


def _ablation_hooks(heads: Iterable[Head], means: Mapping[int, np.ndarray], positions=None):
    """Forward hooks putting ``means`` into the heads' ``hook_z``: after BOS, or at ``positions`` (one per row)."""
    import torch

    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    hooks = []
    for layer, idx in by_layer.items():
        value = torch.as_tensor(means[layer][idx])

        def hook(z, hook=None, idx=idx, value=value):
            z = z.clone()
            if positions is None:
                z[:, 1:, idx] = value.to(z.dtype)
            else:
                rows = torch.arange(z.shape[0])[:, None]
                z[rows, torch.as_tensor(positions)[:, None], torch.as_tensor(idx)[None, :]] = value.to(z.dtype)
            return z

        hooks.append((_z_hook(layer), hook))
    return hooks


def logit_diffs(model, task, *, ablate: Iterable[Head] = (), means: Mapping[int, np.ndarray] | None = None,
                positions: Sequence[int] | None = None, batch_size: int = 128) -> np.ndarray:
    """Logit of the answer minus logit of the distractor at the clean prompt's last position, per row.

    Parameters
    ----------
    model : TransformerLens model (HookedTransformer names; prepends BOS).
    task : path or DataFrame in the task layout (``clean``, ``answer``, ``distractor``).
    ablate : iterable of (layer, head), default none
        Heads whose ``hook_z`` is replaced by ``means`` at every position after BOS.
    means : {layer: array [head, d_head]}, optional
        From :func:`head_means`; by default the mean over the task's corrupted prompts.
    positions : sequence of int, optional
        Ablate only at this token position of each row (BOS = 0, -1 = last);
        by default at every position after BOS.

    Returns
    -------
    float array, one value per task row; accuracy is ``(result > 0).mean()``.
    """
    import torch

    task = read_task(task)
    ablate = list(ablate)
    if ablate and means is None:
        means = head_means(model, list(task.corrupted), batch_size)
    prompts = list(task.clean)
    answers = [_single_token(model, a, i, "answer") for i, a in enumerate(task.answer)]
    distractors = [_single_token(model, d, i, "distractor") for i, d in enumerate(task.distractor)]
    out = np.empty(len(prompts))
    with torch.no_grad():
        for rows in _token_groups(model, prompts).values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                tokens = model.to_tokens([prompts[i] for i in chunk])
                where = None if positions is None else [positions[i] % tokens.shape[1] for i in chunk]
                hooks = _ablation_hooks(ablate, means, where) if ablate else []
                logits = model.run_with_hooks(tokens, fwd_hooks=hooks)[:, -1]
                a = logits[torch.arange(len(chunk)), torch.tensor([answers[i] for i in chunk])]
                d = logits[torch.arange(len(chunk)), torch.tensor([distractors[i] for i in chunk])]
                out[chunk] = (a - d).float().cpu().numpy()
    return out


def ablation_table(model, task, groups: Mapping[str, Iterable[Head]], batch_size: int = 128) -> pd.DataFrame:
    """Accuracy and mean logit difference with each group of heads mean-ablated.

    ``groups`` maps a label to the heads ablated together (an empty group is
    the unablated model). Means come from the task's corrupted prompts.
    Returns one row per group: ``ablated``, ``heads``, ``accuracy``, ``mean_logit_diff``.
    """
    task = read_task(task)
    means = head_means(model, list(task.corrupted), batch_size)
    rows = []
    for label, heads in groups.items():
        heads = list(heads)
        diff = logit_diffs(model, task, ablate=heads, means=means, batch_size=batch_size)
        rows.append({"ablated": label, "heads": " ".join(f"a{layer}.h{head}" for layer, head in heads) or "-",
                     "accuracy": float((diff > 0).mean()), "mean_logit_diff": float(diff.mean())})
    return pd.DataFrame(rows)


def attention_to(model, prompts: Sequence[str], query: Sequence[int], keys: Mapping[str, Sequence[int]],
                 batch_size: int = 128) -> pd.DataFrame:
    """Mean attention of every head from a query position to labelled key positions.

    ``query[i]`` and ``keys[label][i]`` are token positions (BOS = 0) in
    prompt ``i``. Returns one row per head (``layer``, ``head``) with one
    column per label: the attention weight averaged over prompts.
    """
    import torch

    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    total = {label: np.zeros((n_layers, n_heads)) for label in keys}
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    with torch.no_grad():
        for rows in _token_groups(model, prompts).values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                _, cache = model.run_with_cache(model.to_tokens([prompts[i] for i in chunk]), names_filter=names)
                b = torch.arange(len(chunk))
                q = torch.tensor([query[i] for i in chunk])
                for layer in range(n_layers):
                    pattern = cache[names[layer]]  # [batch, head, query_pos, key_pos]
                    for label, positions in keys.items():
                        k = torch.tensor([positions[i] for i in chunk])
                        total[label][layer] += pattern[b, :, q, k].sum(dim=0).float().cpu().numpy()
    rows = [{"layer": layer, "head": head, **{label: total[label][layer, head] / len(prompts) for label in keys}}
            for layer in range(n_layers) for head in range(n_heads)]
    return pd.DataFrame(rows)


def direct_logit_attribution(model, task, batch_size: int = 128) -> pd.DataFrame:
    """Each head's direct effect on the answer and distractor logits at the last position.

    A head's output there (``hook_z @ W_O``), put through the final norm's
    linear part with the run's scale frozen (centred for LayerNorm, divided by
    the scale, times the norm's weight) and read out through the unembedding,
    is what it adds to each logit without passing through later layers. Right
    on TransformerLens-processed weights (norm weight folded into ``W_U``,
    ``W_O`` centred) and on raw ones (a bridge loaded without processing); on
    processed weights the values' constant part (value bias, and the previous
    norm's bias through ``W_V``) sits in ``b_O``, so no head is credited with it. Returns one row per head
    (``layer``, ``head``) with the mean over rows of ``to_answer``,
    ``to_distractor`` and ``to_diff`` (their difference): positive ``to_diff``
    pushes towards the answer; a negative ``to_distractor`` is suppression.
    """
    import torch

    task = read_task(task)
    prompts = list(task.clean)
    answers = [_single_token(model, a, i, "answer") for i, a in enumerate(task.answer)]
    distractors = [_single_token(model, d, i, "distractor") for i, d in enumerate(task.distractor)]
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    to_answer, to_distractor = np.zeros((n_layers, n_heads)), np.zeros((n_layers, n_heads))
    names = [_z_hook(layer) for layer in range(n_layers)] + ["ln_final.hook_scale"]
    centre = str(getattr(model.cfg, "normalization_type", "LN") or "").startswith("LN")
    weight = getattr(model.ln_final, "w", None)  # absent when folded into W_U (LNPre / RMSPre)
    norm_weight = 1.0 if weight is None else weight.detach()
    with torch.no_grad():
        for rows in _token_groups(model, prompts).values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                _, cache = model.run_with_cache(model.to_tokens([prompts[i] for i in chunk]), names_filter=names)
                scale = cache["ln_final.hook_scale"][:, -1] / norm_weight  # [batch, d_model]
                w_a = model.W_U[:, torch.tensor([answers[i] for i in chunk])].T  # [batch, d_model]
                w_d = model.W_U[:, torch.tensor([distractors[i] for i in chunk])].T
                for layer in range(n_layers):
                    out = torch.einsum("bhd,hdm->bhm", cache[_z_hook(layer)][:, -1], model.W_O[layer])
                    if centre:
                        out = out - out.mean(-1, keepdim=True)
                    out = out / scale[:, None, :]
                    to_answer[layer] += torch.einsum("bhm,bm->h", out, w_a).float().cpu().numpy()
                    to_distractor[layer] += torch.einsum("bhm,bm->h", out, w_d).float().cpu().numpy()
    n = len(prompts)
    return pd.DataFrame([{"layer": layer, "head": head, "to_answer": to_answer[layer, head] / n,
                          "to_distractor": to_distractor[layer, head] / n,
                          "to_diff": (to_answer[layer, head] - to_distractor[layer, head]) / n}
                         for layer in range(n_layers) for head in range(n_heads)])
