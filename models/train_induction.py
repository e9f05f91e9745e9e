"""Train models/induction: a 2-layer GPT-2 that continues repeated spans of random words.

Reproduce (about 5 minutes on one CPU thread):

    PYTHONPATH=. python models/train_induction.py [--out models/induction]

Data: sequences of distinct random words from ``taskgen.INDUCTION_WORDS``: an
unrepeated prefix of 0-5 words, a span of 4-12 words, 0-6 other words, then
the span again (random lengths everywhere, so that only the previous occurrence
of the current word tells what comes next);
the loss is next-word cross-entropy on the repeated span after its first word
(the only words predictable from context, and only by copying: induction).
The evaluation task (``task.jsonl``) is ``make_task("induction", 600, seed=0)``:
new random spans, cut after 1..span-1 repeated words.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bayescirc.taskgen import INDUCTION_GAP, INDUCTION_PREFIX, INDUCTION_SPAN, INDUCTION_WORDS, make_task
from bayescirc.tasks import write_task
from bayescirc.training import build_model, build_tokenizer, encode_examples, logit_differences, save_model, train

SEED = 0
ARCH = {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 64}
RECIPE = {"steps": 3000, "batch_size": 64, "lr": 3e-3, "weight_decay": 0.01, "warmup": 200}
N_TRAIN = 20000
N_EVAL = 600


def training_sequences(n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` (prompt, completion) pairs: prefix + span + gap + first span word, then the rest of the span."""
    rng = np.random.default_rng([seed, 99])
    prompts, completions = [], []
    for _ in range(n):
        span = int(rng.integers(INDUCTION_SPAN[0], INDUCTION_SPAN[1] + 1))
        prefix = int(rng.integers(INDUCTION_PREFIX[0], INDUCTION_PREFIX[1] + 1))
        gap = int(rng.integers(INDUCTION_GAP[0], INDUCTION_GAP[1] + 1))
        words = [INDUCTION_WORDS[i] for i in rng.choice(len(INDUCTION_WORDS), size=prefix + span + gap, replace=False)]
        noise, seq, filler = words[:prefix], words[prefix:prefix + span], words[prefix + span:]
        prompts.append(" ".join(noise + seq + filler + seq[:1]))
        completions.append(" " + " ".join(seq[1:]))
    return prompts, completions


def main(out: Path) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    tokenizer = build_tokenizer(INDUCTION_WORDS, max_length=ARCH["n_positions"])
    examples = encode_examples(tokenizer, *training_sequences(N_TRAIN, SEED))
    model = build_model(tokenizer, seed=SEED, **ARCH)
    result = train(model, examples, seed=SEED, log_every=250, **RECIPE)
    task = make_task("induction", N_EVAL, seed=SEED)
    diff = logit_differences(model, tokenizer, task)
    save_model(model, tokenizer, out)
    write_task(task, out / "task.jsonl")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params}  training {result.seconds:.0f}s  total {time.perf_counter() - start:.0f}s")
    print(f"held-out accuracy {(diff > 0).mean():.4f}  mean logit diff {diff.mean():.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "induction")
    main(parser.parse_args().out)
