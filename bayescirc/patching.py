"""The scoring engine: per-input edge scores and circuit evaluation on a TransformerLens model.

Every score of edge ``u->v`` on input ``i`` estimates the same quantity, in the
metric's units: ``metric(run where only v's input gets corr_out_u - clean_out_u
added, at all positions) - metric(clean run)`` (``schema.SIGN_CONVENTION``).

Methods (``diff_u = corr_out_u - clean_out_u``, summed over positions and the
model dimension; ``g_v = d metric / d in_v``, the gradient with respect to an
additive patch at v's input hook, which is exactly what ``exact`` perturbs):

- ``exact``: the patched run itself. Rows of one forward pass patch different
  (input, edge) pairs; a pass starts at the receiver's block from the cached
  clean residual stream and runs only the remaining blocks, so the cost is
  about edges x remaining depth block evaluations.
- ``eap``: ``diff_u . g_v`` at the clean run (one forward and one backward per
  batch of inputs for all edges).
- ``eap-ig-inputs`` (steps m): ``diff_u`` times ``g_v`` averaged over the runs
  whose token embeddings (``hook_embed``; positional embeddings are equal in
  both prompts) are ``corr + (k/m)(clean - corr)``, k = 0..m-1 (EAP-IG's
  ``get_scores_eap_ig``).
- ``eap-ig-activations`` (steps m): ``diff_u`` times ``g_v`` averaged over
  runs in which one node group (input, the heads of one layer, one MLP) outputs
  ``a clean + (1-a) corr`` (a constant: no gradient flows through it),
  a = k/m for k = 1..m, over all groups (EAP-IG's ``get_scores_ig_activations``).
- ``clean-corrupted``: ``diff_u`` times the mean of ``g_v`` at the clean and at
  the corrupted run.

Relation to EAP-IG and MIB: EAP-IG's scores with batch size 1 and
``metric = our metric`` are ours (EAP-IG divides batch sums by the number of
examples; ours are per input and never depend on batching). MIB attributes
against the negative logit difference, so an MIB score is minus ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import schema
from .bridge import _model_name
from .errors import BayescircError, ModelError
from .graph import LOGITS, QKV, Graph, parse_edge
from .metrics import metric_fn

__all__ = ["Batch", "Engine", "CircuitScores", "evaluate_circuits", "GRADIENT_METHODS", "SCORING_METHODS",
           "is_oom", "backoff"]

GRADIENT_METHODS = (schema.EAP, schema.EAP_IG_INPUTS, schema.EAP_IG_ACTIVATIONS, schema.CLEAN_CORRUPTED)
SCORING_METHODS = (schema.EXACT, *GRADIENT_METHODS)


@dataclass
class Batch:
    """Inputs that tokenise to one length: ``clean``/``corrupted`` are ``[B, pos]`` token ids."""

    ids: np.ndarray
    clean: torch.Tensor
    corrupted: torch.Tensor
    answer: torch.Tensor
    distractor: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index) -> Batch:
        index = np.asarray(index)
        t = torch.as_tensor(index, device=self.clean.device)
        return Batch(self.ids[index], self.clean[t], self.corrupted[t], self.answer[t], self.distractor[t])


@dataclass
class Run:
    """Cached activations of one batch: source outputs ``[B, pos, source, d_model]`` and more."""

    clean_out: torch.Tensor
    corr_out: torch.Tensor
    clean_metric: torch.Tensor
    corrupted_metric: torch.Tensor
    clean_logprobs: torch.Tensor
    resid_pre: list[torch.Tensor] | None = None  # clean residual entering each block
    resid_final: torch.Tensor | None = None  # clean input of the unembedding (last block's resid_post)
    grads: torch.Tensor | None = None  # clean-run receiver gradients [B, pos, slot, d_model]

    @property
    def diff(self) -> torch.Tensor:
        return self.corr_out - self.clean_out


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA, MPS or CPU allocator)."""
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def backoff(run: Callable[[int], object], size: int, minimum: int = 1):
    """Call ``run(size)``, halving ``size`` after each out-of-memory error; returns (result, size)."""
    while True:
        try:
            return run(size), size
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is an OOM
            if not is_oom(exc) or size <= minimum:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = max(minimum, size // 2)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class Engine:
    """Edge scores on a model in :func:`bayescirc.bridge.scoring_mode` (per-head hooks on).

    Sources are the graph's nodes except ``logits`` (index ``s``); receiver
    *slots* are, per layer, the q, k and v inputs of each head and the MLP
    input, then ``logits`` (index ``r``); ``edge_src``/``edge_slot`` map each
    edge of ``graph.edges`` to its pair.
    """

    def __init__(self, model, graph: Graph, metric: str = "logit-diff"):
        self.model = model
        self.graph = graph
        self.metric_name = metric
        self.metric = metric_fn(metric)
        self.L, self.H = graph.n_layers, graph.n_heads
        self.sources = [n for n in graph.nodes if n != LOGITS]
        self.source_index = {n: i for i, n in enumerate(self.sources)}
        self.slots: list[tuple[str, str | None]] = []
        for layer in range(self.L):
            self.slots += [(f"a{layer}.h{h}", x) for x in QKV for h in range(self.H)]
            self.slots.append((f"m{layer}", None))
        self.slots.append((LOGITS, None))
        self.slot_index = {s: i for i, s in enumerate(self.slots)}
        self.edges = list(graph.edges)
        infos = [parse_edge(e) for e in self.edges]
        self.edge_src = np.array([self.source_index[i.source] for i in infos])
        self.edge_slot = np.array([self.slot_index[(i.receiver, i.qkv)] for i in infos])
        self.edge_layer = np.array([self.L if i.receiver_layer is None else i.receiver_layer for i in infos])
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # scores and metrics in float32 at least: half-precision sums over positions x d_model lose digits
        self.score_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self._direct = None  # whether blocks can be run one by one from a residual (checked once)
        self._unembed = None  # whether ln_final + unembed of the last residual give the logits (checked once)
        self._additive = False  # whether the source hooks add up to each block's residual write (checked once)

    # --- hooks ---------------------------------------------------------------------------

    def _source_hooks(self, store: dict) -> list:
        hooks = [("hook_embed", _keep(store, "embed"))]
        for layer in range(self.L):
            hooks.append((f"blocks.{layer}.attn.hook_result", _keep(store, ("attn", layer))))
            hooks.append((f"blocks.{layer}.hook_mlp_out", _keep(store, ("mlp", layer))))
        return hooks

    def _stack_sources(self, store: dict) -> torch.Tensor:
        parts = [store["embed"].unsqueeze(2)]
        for layer in range(self.L):
            parts += [store[("attn", layer)], store[("mlp", layer)].unsqueeze(2)]
        return torch.cat(parts, dim=2)

    def _forward(self, tokens, hooks) -> torch.Tensor:
        """Last-position logits of a full forward pass with ``hooks``."""
        with self.model.hooks(fwd_hooks=hooks):
            logits = self.model(tokens)
        return logits[:, -1]

    def _metric(self, logits, batch: Batch, clean_logprobs):
        return self.metric(logits.to(self.score_dtype), batch.answer, batch.distractor, clean_logprobs)

    # --- clean / corrupted runs ------------------------------------------------------------

    def check_additive(self, tokens: torch.Tensor) -> None:
        """Raise :class:`ModelError` unless each block's residual write is the sum of its sources' outputs.

        The graph's sources are what a node writes into the residual stream:
        ``resid_post - resid_pre`` of block l must be ``sum_h attn.hook_result
        + hook_mlp_out`` up to a constant bias (``b_O``). Architectures that
        normalise a sublayer's output before adding it (OLMo-2, Gemma-2: norms
        after attention and MLP) break this, and every score of an edge out of
        a head would patch the wrong quantity.
        """
        store: dict = {}
        hooks = self._source_hooks(store)
        for layer in range(self.L):
            hooks += [(f"blocks.{layer}.hook_resid_pre", _keep(store, ("pre", layer))),
                      (f"blocks.{layer}.hook_resid_post", _keep(store, ("post", layer)))]
        with torch.no_grad():
            self._forward(tokens[:1], hooks)
        tol = {torch.float64: 1e-7, torch.float32: 1e-3}.get(self.dtype, 0.1)  # relative to the residual's size
        for layer in range(self.L):
            post = store[("post", layer)].to(self.score_dtype)
            write = post - store[("pre", layer)].to(self.score_dtype)
            rest = write - store[("attn", layer)].to(self.score_dtype).sum(2) - store[("mlp", layer)].to(self.score_dtype)
            off = float((rest - rest.mean(dim=(0, 1), keepdim=True)).abs().max())
            size = max(1.0, float(post.abs().max()))
            if off > tol * size:
                raise ModelError(
                    f"{_model_name(self.model)}: block {layer}'s residual write is not the sum of its heads' outputs "
                    f"(attn.hook_result) and its MLP output (hook_mlp_out): they differ by up to {off:.3g} (residual "
                    f"stream up to {size:.3g}). This architecture transforms sublayer outputs before adding them "
                    "(e.g. a norm after attention or the MLP), so per-edge patching of the graph's sources would "
                    "patch the wrong quantity; it is not supported.")
        self._additive = True

    def prepare(self, batch: Batch, *, resid: bool = False, grads: bool = False) -> Run:
        """Corrupted and clean runs; with ``grads`` the clean run also gives the receiver gradients."""
        if not self._additive:
            self.check_additive(batch.clean)
        corr: dict = {}
        with torch.no_grad():
            corr_logits = self._forward(batch.corrupted, self._source_hooks(corr))
        clean: dict = {}
        hooks = self._source_hooks(clean)
        if resid:
            hooks += [(f"blocks.{layer}.hook_resid_pre", _keep(clean, ("resid", layer))) for layer in range(self.L)]
            hooks.append((f"blocks.{self.L - 1}.hook_resid_post", _keep(clean, "final")))
        if grads:
            grad, logits, value = self._gradient_pass(batch, batch.clean, None, extra_hooks=hooks)
            clean_logprobs = logits.to(self.score_dtype).log_softmax(-1)
            clean_metric = value
        else:
            with torch.no_grad():
                logits = self._forward(batch.clean, hooks)
            clean_logprobs = logits.to(self.score_dtype).log_softmax(-1)
            clean_metric = self._metric(logits, batch, clean_logprobs)
            grad = None
        with torch.no_grad():
            corrupted_metric = self._metric(corr_logits, batch, clean_logprobs)
        return Run(
            clean_out=self._stack_sources(clean),
            corr_out=self._stack_sources(corr),
            clean_metric=clean_metric.detach(),
            corrupted_metric=corrupted_metric.detach(),
            clean_logprobs=clean_logprobs.detach(),
            resid_pre=[clean[("resid", layer)] for layer in range(self.L)] if resid else None,
            resid_final=clean["final"] if resid else None,
            grads=grad,
        )

    # --- gradients ---------------------------------------------------------------------------

    def _gradient_pass(self, batch: Batch, tokens, clean_logprobs, overrides=(), extra_hooks=()):
        """Receiver gradients ``[B, pos, slot, d_model]`` of the metric summed over rows.

        Each receiver hook adds a zero tensor ``z``; ``d metric / d z`` is the
        gradient with respect to exactly the additive patch ``exact`` applies
        (a hook's input can also feed other paths in some bridges). With
        ``clean_logprobs=None`` the run is the clean run and its own logits
        define the KL reference. ``overrides``: (hook name, constant tensor)
        replacing that hook's output.
        """
        B, P = tokens.shape
        D = self.model.cfg.d_model
        zeros = []
        hooks = list(extra_hooks)

        def add(z):
            def hook(x, hook):
                return x + z
            return hook

        for layer in range(self.L):
            for x in QKV:
                z = torch.zeros(B, P, self.H, D, device=self.device, dtype=self.dtype, requires_grad=True)
                zeros.append(z)
                hooks.append((f"blocks.{layer}.hook_{x}_input", add(z)))
            z = torch.zeros(B, P, D, device=self.device, dtype=self.dtype, requires_grad=True)
            zeros.append(z)
            hooks.append((f"blocks.{layer}.hook_mlp_in", add(z)))
        z = torch.zeros(B, P, D, device=self.device, dtype=self.dtype, requires_grad=True)
        zeros.append(z)
        hooks.append((f"blocks.{self.L - 1}.hook_resid_post", add(z)))
        for name, value in overrides:
            hooks.append((name, lambda x, hook, value=value: value))
        with torch.enable_grad():
            logits = self._forward(tokens, hooks)
            reference = logits.detach().to(self.score_dtype).log_softmax(-1) if clean_logprobs is None else clean_logprobs
            value = self._metric(logits, batch, reference)
            grads = torch.autograd.grad(value.sum(), zeros, allow_unused=True)
        grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grads, zeros)]  # cut off by an override
        parts = [g if g.ndim == 4 else g.unsqueeze(2) for g in grads]
        return torch.cat(parts, dim=2), logits.detach(), value.detach()

    def _edge_scores(self, diff: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """``[B, edge]``: ``diff[source] . grads[slot]`` summed over positions and d_model."""
        full = torch.einsum("bpsd,bprd->bsr", diff.to(self.score_dtype), grads.to(self.score_dtype))
        src = torch.as_tensor(self.edge_src, device=full.device)
        slot = torch.as_tensor(self.edge_slot, device=full.device)
        return full[:, src, slot]

    def gradient_scores(self, method: str, batch: Batch, run: Run, steps: int = 5) -> torch.Tensor:
        """Scores ``[B, edge]`` of one gradient method (see the module docstring)."""
        if method == schema.EAP:
            grads = run.grads if run.grads is not None else self._gradient_pass(batch, batch.clean, None)[0]
        elif method == schema.CLEAN_CORRUPTED:
            g_clean = run.grads if run.grads is not None else self._gradient_pass(batch, batch.clean, None)[0]
            g_corr = self._gradient_pass(batch, batch.corrupted, run.clean_logprobs)[0]
            grads = (g_clean + g_corr) / 2
        elif method == schema.EAP_IG_INPUTS:
            clean_e, corr_e = run.clean_out[:, :, 0], run.corr_out[:, :, 0]
            grads = 0
            for k in range(steps):
                embed = corr_e + (k / steps) * (clean_e - corr_e)
                grads = grads + self._gradient_pass(batch, batch.clean, run.clean_logprobs, [("hook_embed", embed)])[0]
            grads = grads / steps
        elif method == schema.EAP_IG_ACTIVATIONS:
            groups = [("hook_embed", slice(0, 1), True)]
            for layer in range(self.L):
                first = self.source_index[f"a{layer}.h0"]
                groups.append((f"blocks.{layer}.attn.hook_result", slice(first, first + self.H), False))
                groups.append((f"blocks.{layer}.hook_mlp_out", slice(first + self.H, first + self.H + 1), True))
            grads = 0
            for name, cols, squeeze in groups:
                clean_a, corr_a = run.clean_out[:, :, cols], run.corr_out[:, :, cols]
                for k in range(1, steps + 1):
                    value = (k / steps) * clean_a + (1 - k / steps) * corr_a
                    value = value[:, :, 0] if squeeze else value
                    grads = grads + self._gradient_pass(batch, batch.clean, run.clean_logprobs, [(name, value)])[0]
            grads = grads / (len(groups) * steps)
        else:
            raise ValueError(f"unknown gradient method {method!r}; choose one of {list(GRADIENT_METHODS)}")
        return self._edge_scores(run.diff, grads)

    # --- exact patching ------------------------------------------------------------------------

    def _blocks_from(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        for block in self.model.blocks[layer:]:
            out = block(resid)
            resid = out[0] if isinstance(out, tuple) else out
        return resid

    def _unembed_last(self, resid_last: torch.Tensor) -> torch.Tensor:
        logits = self.model.unembed(self.model.ln_final(resid_last.unsqueeze(1)))
        return logits[:, -1]

    def _check_direct(self, batch: Batch, run: Run) -> bool:
        """Whether running blocks one by one from the cached residual reproduces the clean logits."""
        if self._direct is None:
            try:
                with torch.no_grad():
                    logits = self._unembed_last(self._blocks_from(0, run.resid_pre[0][:1])[:, -1])
                self._direct = self._gives_clean_logits(logits, batch)
            except Exception:  # noqa: BLE001 - any failure means: use full forward passes
                self._direct = False
        return self._direct

    def _check_unembed(self, batch: Batch, run: Run) -> bool:
        """Whether ``ln_final`` and ``unembed`` of the last residual give the model's logits.

        Not where the model transforms logits after the unembedding (Gemma-2's
        final soft-capping, a logit scale); edges into ``logits`` are then
        scored with full forward passes.
        """
        if self._unembed is None:
            with torch.no_grad():
                logits = self._unembed_last(run.resid_final[:1, -1])
            self._unembed = self._gives_clean_logits(logits, batch)
        return self._unembed

    def _gives_clean_logits(self, logits: torch.Tensor, batch: Batch) -> bool:
        """Whether ``logits`` (of the batch's first input) match a full clean forward pass, up to rounding."""
        with torch.no_grad():
            ref = self._forward(batch.clean[:1], [])
        tol = 1e-4 if self.dtype == torch.float64 else 1e-2
        return bool(torch.allclose(logits, ref, atol=tol * max(1.0, float(ref.abs().max())), rtol=0))

    def exact_scores(self, batch: Batch, run: Run, rows: int = 256, progress: Callable[[int], None] | None = None
                     ) -> torch.Tensor:
        """Exact scores ``[B, edge]``: patched metric minus clean metric, ``rows`` patched runs per pass."""
        direct = self._check_direct(batch, run)
        unembed = self._check_unembed(batch, run)
        B = len(batch)
        out = torch.empty(B, len(self.edges), device=self.device, dtype=self.score_dtype)
        diff = run.diff
        for layer in range(self.L + 1):
            edge_ids = np.flatnonzero(self.edge_layer == layer)
            if not len(edge_ids):
                continue
            b_all = np.repeat(np.arange(B), len(edge_ids))
            e_all = np.tile(edge_ids, B)
            for sl in _chunks(len(b_all), rows):
                b_idx = torch.as_tensor(b_all[sl], device=self.device)
                e_idx = e_all[sl]
                delta = diff[b_idx, :, torch.as_tensor(self.edge_src[e_idx], device=self.device)]  # [R, pos, D]
                sub = batch.take(b_all[sl])
                with torch.no_grad():
                    if layer == self.L and unembed:
                        logits = self._unembed_last(run.resid_final[b_idx, -1] + delta[:, -1])
                    elif layer == self.L:
                        def add_final(act, hook, d=delta):
                            return act + d
                        logits = self._forward(sub.clean, [(f"blocks.{self.L - 1}.hook_resid_post", add_final)])
                    else:
                        hooks = self._patch_hooks(layer, self.edge_slot[e_idx], delta)
                        if direct:
                            with self.model.hooks(fwd_hooks=hooks):
                                resid = self._blocks_from(layer, run.resid_pre[layer][b_idx])
                            logits = self._unembed_last(resid[:, -1])
                        else:
                            logits = self._forward(sub.clean, hooks)
                    value = self._metric(logits, sub, run.clean_logprobs[b_idx])
                out[b_idx, torch.as_tensor(e_idx, device=self.device)] = value - run.clean_metric[b_idx]
                if progress is not None:
                    progress(sl.stop - sl.start)
        return out

    def _patch_hooks(self, layer: int, slots: np.ndarray, delta: torch.Tensor) -> list:
        """Hooks adding ``delta[row]`` at each row's receiver (all in block ``layer``)."""
        hooks = []
        for x in QKV:
            heads = [self.slot_index[(f"a{layer}.h{h}", x)] for h in range(self.H)]
            rows = np.flatnonzero(np.isin(slots, heads))
            if len(rows):
                head_of = {s: h for h, s in enumerate(heads)}
                r = torch.as_tensor(rows, device=self.device)
                h = torch.as_tensor([head_of[s] for s in slots[rows]], device=self.device)

                def add_heads(act, hook, r=r, h=h, d=delta[r]):
                    act = act.clone()
                    act[r, :, h] += d
                    return act
                hooks.append((f"blocks.{layer}.hook_{x}_input", add_heads))
        rows = np.flatnonzero(slots == self.slot_index[(f"m{layer}", None)])
        if len(rows):
            r = torch.as_tensor(rows, device=self.device)

            def add_mlp(act, hook, r=r, d=delta[r]):
                act = act.clone()
                act[r] += d
                return act
            hooks.append((f"blocks.{layer}.hook_mlp_in", add_mlp))
        return hooks

    # --- circuits ----------------------------------------------------------------------------------

    def circuit_masks(self, circuits: Sequence[Iterable[str]]) -> torch.Tensor:
        """``[C, source, slot]``: 1 where the edge is absent from the circuit (it carries the corrupted activation)."""
        absent = torch.zeros(len(circuits), len(self.sources), len(self.slots), device=self.device, dtype=self.dtype)
        absent[:, torch.as_tensor(self.edge_src), torch.as_tensor(self.edge_slot)] = 1
        known = set(self.edges)
        for c, circuit in enumerate(circuits):
            for edge in circuit:
                if edge not in known:
                    raise BayescircError(f"circuit {c}: edge {edge!r} is not an edge of this model's graph "
                                     f"({self.L} layers x {self.H} heads); e.g. {self.edges[0]!r}")
                info = parse_edge(edge)
                absent[c, self.source_index[info.source], self.slot_index[(info.receiver, info.qkv)]] = 0
        return absent

    def circuit_values(self, batch: Batch, run: Run, absent: torch.Tensor) -> torch.Tensor:
        """Metric ``[C, B]`` of the clean run where every edge absent from circuit c carries ``corr_out_u - cur_out_u``.

        ``cur_out_u`` is u's output in this very run (EAP-IG's ``evaluate_graph``):
        edges in the circuit carry whatever their source computes now.
        """
        C, B = absent.shape[0], len(batch)
        rows_c = torch.arange(C, device=self.device).repeat_interleave(B)
        rows_b = torch.arange(B, device=self.device).repeat(C)
        corr = run.corr_out[rows_b]  # [R, pos, S, D]
        current: dict = {}
        hooks = []

        def upstream_diff(n_src):
            parts = [current["embed"].unsqueeze(2)]
            for layer in range(self.L):
                if 1 + layer * (self.H + 1) >= n_src:
                    break
                parts.append(current[("attn", layer)])
                if 1 + layer * (self.H + 1) + self.H < n_src:
                    parts.append(current[("mlp", layer)].unsqueeze(2))
            cur = torch.cat(parts, dim=2)[:, :, :n_src]
            return corr[:, :, :n_src] - cur

        def receiver(slot_ids, n_src, per_head):
            mask = absent[rows_c][:, :n_src][:, :, slot_ids]  # [R, n_src, slots]

            def hook(x, hook):
                d = upstream_diff(n_src)
                update = torch.einsum("rsk,rpsd->rpkd", mask, d)
                return x + (update if per_head else update[:, :, 0])
            return hook

        hooks.append(("hook_embed", _keep(current, "embed")))
        for layer in range(self.L):
            n_attn = 1 + layer * (self.H + 1)
            for x in QKV:
                ids = [self.slot_index[(f"a{layer}.h{h}", x)] for h in range(self.H)]
                hooks.append((f"blocks.{layer}.hook_{x}_input", receiver(ids, n_attn, True)))
            hooks.append((f"blocks.{layer}.attn.hook_result", _keep(current, ("attn", layer))))
            hooks.append((f"blocks.{layer}.hook_mlp_in", receiver([self.slot_index[(f"m{layer}", None)]], n_attn + self.H, False)))
            hooks.append((f"blocks.{layer}.hook_mlp_out", _keep(current, ("mlp", layer))))
        hooks.append((f"blocks.{self.L - 1}.hook_resid_post", receiver([len(self.slots) - 1], len(self.sources), False)))
        sub = batch.take(rows_b.cpu().numpy())
        with torch.no_grad():
            logits = self._forward(sub.clean, hooks)
            value = self._metric(logits, sub, run.clean_logprobs[rows_b])
        return value.reshape(C, B)


# --- evaluate_circuits ---------------------------------------------------------------------------------


@dataclass
class CircuitScores:
    """Faithfulness runs: ``values[c, n]`` is the metric of circuit c on input n.

    ``clean`` and ``corrupted`` are the full model's metric on the clean and
    the corrupted prompt of each input (``input_ids`` are task row numbers).
    """

    input_ids: np.ndarray
    values: np.ndarray
    clean: np.ndarray
    corrupted: np.ndarray

    def normalized(self) -> np.ndarray:
        """``(values - corrupted) / (clean - corrupted)`` per circuit and input (1 = the full model)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return (self.values - self.corrupted) / (self.clean - self.corrupted)


def evaluate_circuits(model, task, circuits: Sequence[Iterable[str]], *, metric: str = "logit-diff", inputs=None,
                      device: str = "auto", dtype=None, batch_size: int | None = None, progress: bool = True
                      ) -> CircuitScores:
    """Metric of each circuit on each input, with every edge outside it carrying the corrupted activation.

    Parameters
    ----------
    model : path, hub name, HookedTransformer or TransformerBridge
    task : path or DataFrame (see :func:`bayescirc.tasks.read_task`)
    circuits : list of sets of edge names
        Edges in a circuit carry the activation their source computes in this
        run; every other edge carries the source's corrupted activation
        (EAP-IG's ``evaluate_graph`` with patching). Circuits are used as given:
        prune them first with :func:`bayescirc.graph.prune_to_paths` if wanted.
    metric : {"logit-diff", "prob-diff", "kl"}, default "logit-diff"
    inputs : sequence of int, optional
        Task rows to evaluate on (default all).
    batch_size : int, optional
        Patched runs (circuit x input rows) per forward pass; default automatic,
        halved on out-of-memory.

    Returns
    -------
    CircuitScores with ``values`` of shape (circuits, inputs).
    """
    from .bridge import load_model, scoring_mode
    from .collection import prepare_inputs

    circuits = [set(c) for c in circuits]
    loaded = load_model(model, device=device, dtype=dtype, progress=progress)
    with scoring_mode(loaded) as graph:
        engine = Engine(loaded, graph, metric)
        batches, _ = prepare_inputs(loaded, task, input_ids=inputs)
        absent = engine.circuit_masks(circuits)
        n_total = sum(len(b) for b in batches)
        ids, values, clean, corrupted = [], [], [], []
        size = batch_size or 64
        bar = _bar(progress, n_total * max(1, len(circuits)), "circuit runs")
        try:
            for batch in batches:
                per_pass = max(1, min(len(batch), size // max(1, len(circuits))))
                for start in range(0, len(batch), per_pass):
                    sub = batch.take(np.arange(start, min(len(batch), start + per_pass)))
                    run = engine.prepare(sub)

                    def evaluate(rows, sub=sub, run=run):
                        return _circuit_chunk(engine, sub, run, absent, rows)

                    vals, size = backoff(evaluate, size)
                    values.append(vals.cpu().double().numpy())
                    ids.append(sub.ids)
                    clean.append(run.clean_metric.cpu().double().numpy())
                    corrupted.append(run.corrupted_metric.cpu().double().numpy())
                    bar.update(len(sub) * len(circuits))
        finally:
            bar.close()
    order = np.argsort(np.concatenate(ids), kind="stable")
    return CircuitScores(
        input_ids=np.concatenate(ids)[order],
        values=np.concatenate(values, axis=1)[:, order],
        clean=np.concatenate(clean)[order],
        corrupted=np.concatenate(corrupted)[order],
    )


def _keep(store: dict, key) -> Callable:
    """A forward hook that stores the activation it sees (detached) under ``store[key]``."""
    def hook(x, hook):
        store[key] = x.detach()
    return hook


def _circuit_chunk(engine: Engine, batch: Batch, run: Run, absent: torch.Tensor, rows: int) -> torch.Tensor:
    """``[C, B]`` metric values, at most ``rows`` (circuit x input) runs per forward pass."""
    per = max(1, rows // len(batch))
    if absent.shape[0] == 0:
        return torch.zeros(0, len(batch), dtype=engine.dtype, device=engine.device)
    return torch.cat([engine.circuit_values(batch, run, absent[sl]) for sl in _chunks(absent.shape[0], per)], 0)


def _bar(progress: bool, total: int, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, disable=not progress, dynamic_ncols=True, leave=False)
