"""Train the small GPT-2-architecture models that bayescirc ships (and users can retrain).

The pieces are the ones a Hugging Face directory needs, so that
``TransformerBridge.boot_transformers(directory)`` loads the result offline:

- :func:`build_tokenizer` — a word-level tokenizer (whitespace and punctuation
  split, one token per word) with ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` and
  ``<|unk|>``. It adds no special tokens itself: TransformerLens prepends BOS
  (its default), and the training data is encoded the same way.
- :func:`build_model` — a ``GPT2LMHeadModel`` without dropout.
- :func:`encode_examples` — prompt/completion pairs to padded token ids and a
  mask of the positions whose next token is trained on: only the completion
  (``loss="completion"``, e.g. the indirect object of an IOI prompt, or the
  repeated half of an induction sequence) or every token (``loss="all"``).
- :func:`train` — seeded AdamW with linear warm-up and cosine decay.
- :func:`save_model` — config, ``model.safetensors`` and the tokenizer files.

Everything is deterministic given ``seed`` on one CPU thread.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "build_model", "Examples", "encode_examples", "TrainResult",
           "train", "sequence_loss", "save_model", "logit_differences"]

#: Special tokens of every shipped tokenizer, in vocabulary order (ids 0..3).
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}


def build_tokenizer(words: Sequence[str], max_length: int = 64):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (plus punctuation words such as ``","``).

    Text is split on whitespace and between word characters and punctuation
    (``"store,"`` -> ``"store"``, ``","``), so ``" Mary"`` with GPT-2's leading
    space is the single token ``Mary``. The special tokens take ids 0-3
    (``SPECIAL_TOKENS``); unknown words map to ``<|unk|>``. Duplicates in
    ``words`` are dropped; the order is sorted so the ids do not depend on
    how ``words`` was collected.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    vocab_words = sorted(set(words) - set(specials))
    bad = [w for w in vocab_words if not w or any(ch.isspace() for ch in w)]
    if bad:
        raise ValueError(f"tokenizer words must be non-empty and contain no whitespace; got {bad[:5]}")
    vocab = {token: i for i, token in enumerate(specials + vocab_words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=max_length, **SPECIAL_TOKENS)
    unsplit = [w for w in vocab_words if len(tokenizer.tokenize(w)) != 1]
    if unsplit:
        raise ValueError(f"words that the tokenizer would split into several tokens: {unsplit[:5]}; "
                         "use words of only letters/digits or only punctuation")
    return tokenizer


def build_model(tokenizer, *, n_layer: int = 2, n_head: int = 4, n_embd: int = 128, n_positions: int = 64,
                seed: int = 0):
    """A dropout-free ``GPT2LMHeadModel`` sized for ``tokenizer``, initialised from ``seed``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_inner=4 * n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


@dataclass
class Examples:
    """Padded training sequences: ``input_ids`` (N, T) and ``target_mask`` (N, T).

    ``target_mask[i, t]`` is true when token ``t`` of row ``i`` is predicted
    (from position ``t - 1``) in the loss; padding is never a target.
    """

    input_ids: Any
    target_mask: Any

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def encode_examples(tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
                    loss: str = "completion") -> Examples:
    """Encode ``<|bos|> prompt completion`` rows for :func:`train`.

    Parameters
    ----------
    tokenizer : the word-level tokenizer of :func:`build_tokenizer`.
    prompts, completions : sequences of str, same length
        The completion follows the prompt (a leading space is ignored by the
        word-level tokenizer).
    loss : {"completion", "all"}, default "completion"
        Train on the completion's tokens only, or on every token after BOS.
    """
    import torch

    if loss not in ("completion", "all"):
        raise ValueError(f"loss must be 'completion' or 'all', got {loss!r}")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    rows, masks = [], []
    unk = tokenizer.unk_token_id
    for prompt, completion in zip(prompts, completions):
        head = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
        tail = tokenizer.encode(completion, add_special_tokens=False)
        ids = head + tail
        if unk in ids:
            raise ValueError(f"words outside the tokenizer's vocabulary in {prompt!r} / {completion!r}")
        rows.append(ids)
        masks.append([False] * len(head) + [True] * len(tail) if loss == "completion" else [False] + [True] * (len(ids) - 1))
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(zip(rows, masks)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        target_mask[i, : len(mask)] = torch.tensor(mask)
    return Examples(input_ids, target_mask)


def sequence_loss(model, examples: Examples):
    """Mean cross-entropy of the masked next-token targets (a scalar tensor)."""
    import torch.nn.functional as F

    # Right padding: real tokens never attend to it, the mask only tells transformers so.
    attention_mask = (examples.input_ids != model.config.pad_token_id).long()
    logits = model(input_ids=examples.input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = examples.input_ids[:, 1:]
    mask = examples.target_mask[:, 1:]
    return F.cross_entropy(logits[mask], targets[mask])


@dataclass
class TrainResult:
    """What :func:`train` did: the loss of every step and the wall time in seconds."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train(model, examples: Examples, *, steps: int, batch_size: int = 64, lr: float = 3e-3,
          weight_decay: float = 0.01, warmup: int = 100, seed: int = 0, log_every: int = 0,
          log=print) -> TrainResult:
    """Train ``model`` in place on random minibatches of ``examples`` (seeded AdamW).

    The learning rate warms up linearly over ``warmup`` steps and decays to a
    tenth along a cosine. Batches are drawn with replacement by a
    ``torch.Generator`` seeded with ``seed``, so a run is reproducible on one
    thread. Every ``log_every`` steps (0: never) ``log`` gets a progress line.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    result = TrainResult()
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(len(examples), (batch_size,), generator=generator)
        batch = Examples(examples.input_ids[index], examples.target_mask[index])
        # Trim padding columns that no row of this batch uses.
        width = int(batch.target_mask.any(dim=0).nonzero().max()) + 1
        batch = Examples(batch.input_ids[:, :width], batch.target_mask[:, :width])
        loss = sequence_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        result.losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = result.losses[-log_every:]
            log(f"step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  {time.perf_counter() - start:.0f}s")
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


def save_model(model, tokenizer, directory: str | os.PathLike) -> Path:
    """Save a Hugging Face directory: ``config.json``, ``model.safetensors``, tokenizer files.

    Written atomically (a failure leaves any existing directory as it was);
    other files already in ``directory`` (model card, task file) are kept.
    """
    import shutil

    from ._io import atomic_dir

    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        if directory.exists():
            for item in directory.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return directory


def logit_differences(model, tokenizer, task, batch_size: int = 256):
    """Per row of ``task``: logit of ``answer`` minus logit of ``distractor`` after ``<|bos|> clean``.

    A quick check with the Hugging Face model (the tests check the same
    through TransformerLens). Rows are batched by prompt length, so no padding
    enters the forward pass. Returns a float numpy array in the task's order.
    """
    import numpy as np
    import torch

    prompts = [[tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False) for p in task["clean"]]
    answers = [tokenizer.encode(a, add_special_tokens=False) for a in task["answer"]]
    distractors = [tokenizer.encode(d, add_special_tokens=False) for d in task["distractor"]]
    bad = [i for i, (a, d) in enumerate(zip(answers, distractors)) if len(a) != 1 or len(d) != 1]
    if bad:
        raise ValueError(f"row {bad[0]}: answer and distractor must be single tokens of the tokenizer")
    out = np.empty(len(prompts))
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    model.eval()
    with torch.no_grad():
        for rows in by_length.values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                logits = model(input_ids=torch.tensor([prompts[i] for i in chunk])).logits[:, -1]
                a = torch.tensor([answers[i][0] for i in chunk])
                d = torch.tensor([distractors[i][0] for i in chunk])
                diff = logits.gather(1, a[:, None]) - logits.gather(1, d[:, None])
                out[chunk] = diff[:, 0].numpy()
    return out
