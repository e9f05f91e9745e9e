"""Loading TransformerLens models and switching on the hooks edge scoring needs.

The one module (with the collector's engine) that imports TransformerLens:
its API moves between lines (``HookedTransformer`` in 3.x, ``TransformerBridge``
in 3.x and 4.x). Supported: TransformerLens >= 3.9 and 4.x; a model given as

- a local Hugging Face directory (GPT-2 architecture is what ``models/`` ships),
- a hub name (needs network access), or
- an already-loaded ``HookedTransformer`` or ``TransformerBridge``.

Directories and hub names load with ``TransformerBridge.boot_transformers``
followed by ``enable_compatibility_mode()`` (HookedTransformer-equivalent
hooks). Scoring needs the per-head hooks of :func:`bayescirc.graph.required_hooks`;
:func:`scoring_mode` switches them on, puts the model in eval mode and
restores both afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ModelError
from .graph import Graph, required_hooks

__all__ = ["load_model", "model_graph", "check_hooks", "scoring_mode", "shipped_model", "resolve_device",
           "check_load_options", "SHIPPED_MODELS"]

SHIPPED_MODELS = ("ioi-toy", "induction")
DEFAULT_MODEL = "ioi-toy"

_HOOK_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")


def shipped_model(name: str = DEFAULT_MODEL) -> Path:
    """Directory of a model shipped with bayescirc (``ioi-toy`` or ``induction``)."""
    candidates = []
    try:
        from importlib.resources import files

        candidates.append(Path(str(files("bayescirc._models"))) / name)
    except (ModuleNotFoundError, TypeError):
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "models" / name)
    for path in candidates:
        if (path / "config.json").exists():
            return path
    raise ModelError(f"shipped model {name!r} not found (looked in {', '.join(map(str, candidates))}); "
                     f"shipped models are {list(SHIPPED_MODELS)}.")


def resolve_device(device: str | None = "auto") -> str:
    """``auto`` picks ``cuda`` when a GPU is visible, else ``cpu``; other values are checked.

    Raises :class:`ModelError` naming the value for a string torch cannot parse
    (``bogus``), a CUDA device without CUDA or beyond the visible GPUs
    (``cuda:5`` on a one-GPU machine), and a backend that is not available.
    """
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    text = str(device).strip()
    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ModelError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N (e.g. cuda:0).") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(f"device {device!r} requested but torch sees no CUDA GPU; use --device cpu or auto.")
        if parsed.index is not None and parsed.index >= count:
            raise ModelError(f"device {device!r} requested but torch sees {count} CUDA GPU(s) "
                             f"(cuda:0..cuda:{count - 1}); use one of those, or --device auto.")
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None)
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            raise ModelError(f"device {device!r} is not available here; use auto, cpu or cuda.")
    return text


def _torch_dtype(dtype: Any):
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
             "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ModelError(f"dtype {dtype} is not a floating-point dtype; choose one of {sorted(names)}.")
        return dtype
    if str(dtype) not in names:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {sorted(names)}.")
    return names[str(dtype)]


def _first_parameter(model: Any):
    try:
        return next(iter(model.parameters()), None)
    except (AttributeError, TypeError):
        return None


def check_load_options(model: Any, device: str | None = "auto", dtype: Any = None) -> None:
    """Check ``device`` and ``dtype`` before anything loads; raise :class:`ModelError` naming a bad value.

    For an already-loaded model neither is applied (the model stays where and
    how it is), so a ``device`` other than ``auto`` or a ``dtype`` that differs
    from the model's is refused rather than silently ignored.
    """
    import torch

    wanted_dtype = _torch_dtype(dtype)
    wanted_device = None if device in (None, "auto") else torch.device(resolve_device(device))
    if not _is_loaded_model(model):
        return
    param = _first_parameter(model)
    if param is None:
        return
    if wanted_device is not None and (wanted_device.type != param.device.type or (
            wanted_device.index is not None and wanted_device.index != param.device.index)):
        raise ModelError(f"device {device!r} given, but the model is already loaded on {param.device}; a loaded model "
                         f"is not moved: call model.to({str(device)!r}) first, or leave device at 'auto'.")
    if dtype is not None and wanted_dtype != param.dtype:
        have = str(param.dtype).replace("torch.", "")
        raise ModelError(f"dtype {dtype!r} given, but the model is already loaded in {have}; a loaded model is not "
                         f"converted: convert it first (model.to(torch.{str(wanted_dtype).replace('torch.', '')})) "
                         "or leave dtype unset.")


def _is_loaded_model(model: Any) -> bool:
    return hasattr(model, "run_with_hooks") and hasattr(model, "cfg")


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local directory rather than a hub name (``gpt2``, ``org/model``)."""
    return name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1


def refuse_missing_directory(model: Any) -> None:
    """Raise :class:`ModelError` when ``model`` names a local directory that does not exist (with close matches).

    A hub name (``gpt2``, ``org/model``) or a loaded model passes: only loading can tell about those."""
    if not isinstance(model, (str, os.PathLike)):
        return
    name = str(model)
    local = Path(name).expanduser()
    if not local.exists() and _looks_like_path(name):
        raise ModelError(f"{name}: no such model directory.{_similar_directories(local)}")


def load_model(model: Any, device: str | None = "auto", dtype: Any = None, progress: bool = True) -> Any:
    """Return a TransformerLens model for ``model`` (path, hub name or loaded model).

    A loaded ``TransformerBridge`` that is not in compatibility mode gets it
    switched on without weight processing (``no_processing=True``), so the
    caller's weights are not rewritten; the hook names then match
    HookedTransformer's. ``progress=False`` also silences the Hugging Face
    loader's "Loading weights" bar. Raises :class:`ModelError` with what to do when the
    model cannot be loaded, and for a loaded model when ``device`` or ``dtype`` asks for
    something else than the model is (it is neither moved nor converted; see
    :func:`check_load_options`).
    """
    if _is_loaded_model(model):
        check_load_options(model, device=device, dtype=dtype)
        if hasattr(model, "enable_compatibility_mode") and not getattr(model, "compatibility_mode", False):
            model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(f"cannot load a model from {type(model).__name__}; pass a directory, a hub name, "
                         "or a HookedTransformer / TransformerBridge.")
    from transformer_lens.model_bridge import TransformerBridge

    refuse_missing_directory(model)
    name = str(model)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelError(f"{local}: not a Hugging Face model directory (no config.json). "
                             "Point --model at a directory saved with save_pretrained, or at a hub name.")
        name = str(local)
    try:
        with _hf_progress(progress):
            bridge = TransformerBridge.boot_transformers(name, device=resolve_device(device), dtype=_torch_dtype(dtype))
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split()).rstrip(". ") or type(exc).__name__
        hint = ""
        if not local.exists():
            if "/" in name or os.sep in name:
                hint += f" There is no local directory {name!r} either.{_similar_directories(local)}"
            hint += (" If this is a hub name, this machine may be offline (HF_HUB_OFFLINE): download the model "
                     "elsewhere and pass its directory.")
        raise ModelError(f"could not load model {name!r}: {reason}.{hint}") from None
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


def _similar_directories(path: Path) -> str:
    """`` Did you mean models/ioi-toy?`` for a mistyped directory whose parent exists, else ``""``."""
    import difflib

    parent = path.parent
    try:
        siblings = [p.name for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=3)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(str(parent / c)) for c in close) + "?"


@contextlib.contextmanager
def _hf_progress(progress: bool) -> Iterator[None]:
    """Hugging Face's progress bars on or off for the block, restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def model_graph(model: Any) -> Graph:
    """The EAP-IG graph of a loaded model, from its config."""
    cfg = model.cfg
    return Graph(int(cfg.n_layers), int(cfg.n_heads), bool(getattr(cfg, "parallel_attn_mlp", False)))


def check_hooks(model: Any) -> Graph:
    """Check that ``model`` (in :func:`scoring_mode`) exposes every hook scoring needs.

    Raises :class:`ModelError` naming the missing hooks, e.g. for
    architectures whose bridge lacks per-head attention hooks.
    """
    graph = model_graph(model)
    available = set(getattr(model, "hook_dict", {}) or {})
    missing = [h for h in required_hooks(graph) if h not in available]
    if missing:
        arch = getattr(model.cfg, "original_architecture", None) or type(model).__name__
        raise ModelError(
            f"model ({arch}) lacks {len(missing)} hook(s) that per-edge scoring needs, e.g. {missing[:4]}. "
            "Edge scores need per-head attention outputs (attn.hook_result), separate q/k/v inputs "
            "(hook_q_input/hook_k_input/hook_v_input) and hook_mlp_in; load the model with "
            "TransformerBridge.boot_transformers(...) and enable_compatibility_mode() "
            "(boot_native bridges and some architectures do not provide them)."
        )
    return graph


@contextlib.contextmanager
def scoring_mode(model: Any) -> Iterator[Graph]:
    """Eval mode plus the per-head hook flags, restored on exit; yields the graph.

    Dropout would make identical inputs score differently, so scoring always
    runs in eval mode; the flags the caller had are put back afterwards.
    Grouped-query attention is ungrouped for the block where the model can
    (``set_ungroup_grouped_query_attention``, HookedTransformer), so the k/v
    hooks are per query head; other GQA models and attention-only models
    raise :class:`ModelError` before anything is switched.
    """
    cfg = model.cfg
    if getattr(cfg, "attn_only", False):
        raise ModelError(f"{_model_name(model)}: attention-only models are not supported: the EAP-IG graph has MLP "
                         "nodes (m0, m1, ...) that an attention-only model lacks.")
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None)
    ungroup = getattr(model, "set_ungroup_grouped_query_attention", None)
    grouped = n_kv is not None and int(n_kv) != n_heads
    if grouped and ungroup is None:
        raise ModelError(f"{_model_name(model)}: grouped-query attention models are not supported "
                         f"(n_key_value_heads={int(n_kv)}, n_heads={n_heads}): the per-head key and value hooks have "
                         f"{int(n_kv)} heads, not {n_heads}. A HookedTransformer (TransformerLens 3.x) can be scored: "
                         "its keys and values are then ungrouped per query head.")
    was_training = bool(getattr(model, "training", False))
    before = {flag: bool(getattr(cfg, flag, False)) for flag in _HOOK_FLAGS}
    was_ungrouped = bool(getattr(cfg, "ungroup_grouped_query_attention", False))
    try:
        model.eval()
        if grouped:  # k/v hooks per query head, so every head's <k> and <v> edge is its own
            ungroup(True)
        for flag in _HOOK_FLAGS:
            setter = getattr(model, f"set_{flag}", None)
            if setter is None:
                raise ModelError(f"{type(model).__name__} has no set_{flag}(); it cannot expose per-head hooks. "
                                 "Use a HookedTransformer or a TransformerBridge in compatibility mode.")
            try:
                setter(True)
            except (ValueError, NotImplementedError, RuntimeError) as exc:
                raise ModelError(f"{type(model).__name__}: cannot switch on {flag} ({exc}); this architecture "
                                 "does not expose the per-head hooks edge scoring needs.") from None
        yield check_hooks(model)
    finally:
        for flag, value in before.items():
            setter = getattr(model, f"set_{flag}", None)
            if setter is not None:
                with contextlib.suppress(Exception):
                    setter(value)
        if grouped:
            ungroup(was_ungrouped)
        model.train(was_training)


def _model_name(model: Any) -> str:
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or getattr(cfg, "original_architecture", None) or type(model).__name__)
