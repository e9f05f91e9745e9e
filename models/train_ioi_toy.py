"""Train models/ioi-toy: a 2-layer GPT-2 that completes IOI prompts with the indirect object.

Reproduce (about 5 minutes on one CPU thread):

    PYTHONPATH=. python models/train_ioi_toy.py [--out models/ioi-toy]

Data: toy IOI prompts of the *training* split of ``bayescirc.taskgen`` (12
templates, 75% of the 780 name pairs); the loss is the cross-entropy of the
indirect object at the last position. The evaluation task (``task.jsonl``)
uses the 4 held-out templates and the 25% held-out name pairs only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bayescirc.taskgen import make_task, toy_words
from bayescirc.tasks import write_task
from bayescirc.training import build_model, build_tokenizer, encode_examples, logit_differences, save_model, train

SEED = 0
ARCH = {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 64}
RECIPE = {"steps": 3000, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.01, "warmup": 200}
N_TRAIN = 20000
N_EVAL = 600


def main(out: Path) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    tokenizer = build_tokenizer(toy_words("ioi"), max_length=ARCH["n_positions"])
    train_rows = make_task("ioi", N_TRAIN, seed=SEED, split="train")
    examples = encode_examples(tokenizer, list(train_rows.clean), list(train_rows.answer))
    model = build_model(tokenizer, seed=SEED, **ARCH)
    result = train(model, examples, seed=SEED, log_every=250, **RECIPE)
    task = make_task("ioi", N_EVAL, seed=SEED, split="eval")
    diff = logit_differences(model, tokenizer, task)
    held_in = logit_differences(model, tokenizer, make_task("ioi", N_EVAL, seed=SEED + 1, split="train"))
    save_model(model, tokenizer, out)
    write_task(task, out / "task.jsonl")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params}  training {result.seconds:.0f}s  total {time.perf_counter() - start:.0f}s")
    print(f"held-out (eval split) accuracy {(diff > 0).mean():.4f}  mean logit diff {diff.mean():.3f}")
    print(f"training-split accuracy {(held_in > 0).mean():.4f}  mean logit diff {held_in.mean():.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "ioi-toy")
    main(parser.parse_args().out)
