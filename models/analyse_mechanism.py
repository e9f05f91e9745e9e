"""Evidence for the mechanisms named in the model cards: attention patterns and mean-ablations.

    PYTHONPATH=. python models/analyse_mechanism.py ioi-toy [--n 600]
    PYTHONPATH=. python models/analyse_mechanism.py induction

Loads the shipped model through TransformerLens (``bridge.load_model``), reads
its ``task.jsonl`` and prints

0. accuracy and mean logit difference on the clean and the corrupted prompts;
1. per head, the mean attention from the key query positions to the positions
   the mechanism is about (IOI: from the last token to the indirect object IO
   and the subject S1/S2, from S2 to S1, and in the ABC prompt from the last
   token to the third name C that replaced S2; induction: from the last token
   to the previous occurrence q of the current word, to the copied word q+1 and
   to the position j the layer-1 heads attend most, and from j to q and q+1);
2. each head's direct effect on the answer and distractor logits;
3. accuracy and mean logit difference with heads mean-ablated (means over the
   task's corrupted prompts, at every position after BOS): none, each head
   alone, the heads the card names, and all the other heads; then each named
   group ablated at one position only (IOI: the last token or S2; induction:
   the last token or j).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from bayescirc.ablation import ablation_table, attention_to, direct_logit_attribution, head_means, logit_diffs
from bayescirc.bridge import load_model, shipped_model
from bayescirc.tasks import read_task

# The heads each card names, as (layer, head).
CLAIMED = {
    "ioi-toy": {"other-name heads (layer 0)": [(0, 0), (0, 1), (0, 2), (0, 3)],
                "name movers (layer 1)": [(1, 0), (1, 1), (1, 2), (1, 3)]},
    "induction": {"match heads (layer 0)": [(0, 0), (0, 1)],
                  "copy-source heads (layer 0)": [(0, 2), (0, 3)],
                  "induction heads (layer 1)": [(1, 0), (1, 1), (1, 2), (1, 3)]},
}


# Query positions at which each claimed group is ablated alone (keys of _positions).
QUERIES = {"ioi-toy": ["end", "S2"], "induction": ["end", "j"]}


def _markdown(frame: pd.DataFrame) -> str:
    """A pipe table for the model card (pandas' to_markdown needs tabulate, not a dependency)."""
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _positions(model, task: pd.DataFrame, name: str) -> dict[str, tuple[list[int], dict[str, list[int]]]]:
    """Per query label: the query position of each prompt and labelled key positions (BOS = 0)."""
    if name == "ioi-toy":
        end, io, s1, s2 = [], [], [], []
        for clean, answer, distractor in zip(task.clean, task.answer, task.distractor):
            toks = model.to_str_tokens(clean)
            s_pos = [i for i, t in enumerate(toks) if t == distractor.strip()]
            end.append(len(toks) - 1)
            io.append(toks.index(answer.strip()))
            s1.append(s_pos[0])
            s2.append(s_pos[-1])
        zeros = [0] * len(end)
        return {"end": (end, {"end->IO": io, "end->S1": s1, "end->S2": s2}),
                "end (ABC)": (end, {"ABC: end->C": s2}),
                "S2": (s2, {"S2->S1": s1, "S2->IO": io, "S2->prev": [p - 1 for p in s2], "S2->BOS": zeros})}
    # induction: the clean prompt ends with word q's repeat; the answer is word q + 1 (the copied word).
    # j: where the layer-1 heads look from the end (argmax of their mean attention), found by running the model.
    end, q, copied, j = [], [], [], []
    for clean, answer in zip(task.clean, task.answer):
        toks = model.to_str_tokens(clean)
        end.append(len(toks) - 1)
        copied.append(toks.index(answer.strip()))
        q.append(copied[-1] - 1)
        _, cache = model.run_with_cache(model.to_tokens(clean), names_filter=["blocks.1.attn.hook_pattern"])
        j.append(int(cache["blocks.1.attn.hook_pattern"][0, :, -1].mean(0).argmax()))
    return {"end": (end, {"end->q": q, "end->q+1": copied, "end->j": j}),
            "j": (j, {"j->q": q, "j->q+1": copied})}


def main(name: str, n: int | None) -> None:
    torch.set_num_threads(1)
    model = load_model(shipped_model(name), device="cpu")
    task = read_task(shipped_model(name) / "task.jsonl", n_inputs=n)
    prompts = list(task.clean)
    clean = logit_diffs(model, task)
    corrupted = logit_diffs(model, task.assign(clean=task.corrupted))
    print(f"## {name}: task.jsonl through TransformerLens ({len(task)} rows)\n")
    print(f"clean prompts: accuracy {(clean > 0).mean():.3f}, mean logit difference {clean.mean():.3f}")
    print(f"corrupted prompts: accuracy {(corrupted > 0).mean():.3f}, mean logit difference {corrupted.mean():.3f}\n")
    where = _positions(model, task, name)
    tables = [attention_to(model, list(task.corrupted) if "ABC" in label else prompts, query, keys)
              for label, (query, keys) in where.items()]
    attention = tables[0]
    for extra in tables[1:]:
        attention = attention.merge(extra, on=["layer", "head"])
    print(f"## {name}: mean attention ({len(task)} prompts of task.jsonl)\n")
    print(_markdown(attention))
    if name == "induction":
        offsets = pd.Series(np.subtract(where["j"][0], where["end"][1]["end->q"])).value_counts().sort_index()
        print("\nj - q (how far after the previous occurrence q the layer-1 heads look):",
              ", ".join(f"{k}: {v}" for k, v in offsets.items()))
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
    means = head_means(model, list(task.corrupted))
    rows = []
    for label, group in claimed.items():
        for query in QUERIES[name]:
            diff = logit_diffs(model, task, ablate=group, means=means, positions=where[query][0])
            rows.append({"ablated": label, "only at": query, "accuracy": float((diff > 0).mean()),
                         "mean_logit_diff": float(diff.mean())})
    print(f"\n## {name}: mean-ablation at one position only\n")
    print(_markdown(pd.DataFrame(rows)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(CLAIMED))
    parser.add_argument("--n", type=int, default=None, help="use the first N rows of task.jsonl [default: all]")
    args = parser.parse_args()
    main(args.name, args.n)
