"""Evidence for the mechanisms named in the model cards: attention patterns and mean-ablations.

    PYTHONPATH=. python models/analyse_mechanism.py ioi-toy [--n 600]
    PYTHONPATH=. python models/analyse_mechanism.py induction

Loads the shipped model through TransformerLens (``bridge.load_model``), reads
its ``task.jsonl`` and prints

1. per head, the mean attention from the key query positions to the positions
   the mechanism is about (IOI: from the last token to the indirect object IO
   and the subject S1/S2, from S2 to S1, and in the ABC prompt from the last
   token to the third name C that replaced S2; induction: from the last token
   to the token after the previous occurrence of the current one, and from
   that token to its predecessor);
2. each head's direct effect on the answer and distractor logits;
3. accuracy and mean logit difference with heads mean-ablated (means over the
   task's corrupted prompts, at every position after BOS): none, each head
   alone, the heads the card names, and all the other heads.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from bayescirc.ablation import ablation_table, attention_to, direct_logit_attribution
from bayescirc.bridge import load_model, shipped_model
from bayescirc.tasks import read_task

# The heads each card names, as (layer, head).
CLAIMED = {
    "ioi-toy": {"candidate copiers (layer 0)": [(0, 0), (0, 1), (0, 2), (0, 3)],
                "subject inhibitors (layer 1)": [(1, 0), (1, 1), (1, 2), (1, 3)]},
    "induction": {},
}


def _markdown(frame: pd.DataFrame) -> str:
    """A pipe table for the model card (pandas' to_markdown needs tabulate, not a dependency)."""
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _positions(model, task: pd.DataFrame, name: str):
    query, keys = [], {}
    if name == "ioi-toy":
        keys = {"end->IO": [], "end->S1": [], "end->S2": [], "S2->S1": []}
        s2_query = []
        for clean, answer, distractor in zip(task.clean, task.answer, task.distractor):
            toks = model.to_str_tokens(clean)
            io, s = answer.strip(), distractor.strip()
            s_pos = [i for i, t in enumerate(toks) if t == s]
            query.append(len(toks) - 1)
            keys["end->IO"].append(toks.index(io))
            keys["end->S1"].append(s_pos[0])
            keys["end->S2"].append(s_pos[-1])
            keys["S2->S1"].append(s_pos[0])
            s2_query.append(s_pos[-1])
        return {"end": (query, {k: v for k, v in keys.items() if k.startswith("end")}),
                "end (ABC)": (query, {"ABC: end->C": keys["end->S2"]}),
                "S2": (s2_query, {"S2->S1": keys["S2->S1"]})}
    # induction: the clean prompt is prefix + seq + seq[:k]; the answer seq[k] followed seq[k-1] before.
    ans_query, ans_key, prev_key = [], [], []
    for clean, answer in zip(task.clean, task.answer):
        toks = model.to_str_tokens(clean)
        first = toks.index(answer.strip())
        query.append(len(toks) - 1)
        ans_key.append(first)
        ans_query.append(first)
        prev_key.append(first - 1)
    return {"end": (query, {"end->copied token": ans_key}),
            "copied": (ans_query, {"copied->previous": prev_key})}


def main(name: str, n: int | None) -> None:
    torch.set_num_threads(1)
    model = load_model(shipped_model(name), device="cpu")
    task = read_task(shipped_model(name) / "task.jsonl", n_inputs=n)
    prompts = list(task.clean)
    tables = [attention_to(model, list(task.corrupted) if "ABC" in label else prompts, query, keys)
              for label, (query, keys) in _positions(model, task, name).items()]
    attention = tables[0]
    for extra in tables[1:]:
        attention = attention.merge(extra, on=["layer", "head"])
    print(f"## {name}: mean attention ({len(task)} prompts of task.jsonl)\n")
    print(_markdown(attention))
    heads = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    claimed = CLAIMED[name]
    named = [h for group in claimed.values() for h in group]
    groups = {"none": []}
    groups.update({f"a{layer}.h{head}": [(layer, head)] for layer, head in heads})
    groups.update(claimed)
    others = [h for h in heads if h not in named]
    if named and others:
        groups["all named heads"] = named
        groups["all other heads"] = others
    print(f"\n## {name}: direct logit attribution at the last position (mean over prompts)\n")
    print(_markdown(direct_logit_attribution(model, task)))
    print(f"\n## {name}: mean-ablation (chance accuracy = 0.5)\n")
    print(_markdown(ablation_table(model, task, groups)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(CLAIMED))
    parser.add_argument("--n", type=int, default=None, help="use the first N rows of task.jsonl [default: all]")
    args = parser.parse_args()
    main(args.name, args.n)
