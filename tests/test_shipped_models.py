"""The shipped models load offline through TransformerLens, solve their held-out tasks, and their
model cards' mechanism claims hold (mean-ablating the named heads drops accuracy to chance)."""

import fnmatch
import json
import re

import pytest

from bayescirc.bridge import SHIPPED_MODELS, shipped_model
from bayescirc.tasks import read_task

PACKAGE_DATA = ["*/*.json", "*/*.safetensors", "*/*.md", "*/*.jsonl", "*/*.txt", "*.md", "*.py"]

# The heads each MODEL_CARD.md names (layer, head), grouped as the card groups them.
CLAIMED = {
    "ioi-toy": [[(0, 0), (0, 1), (0, 2), (0, 3)], [(1, 0), (1, 1), (1, 2), (1, 3)]],
    "induction": [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(1, 0), (1, 1), (1, 2), (1, 3)]],
}


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_shipped_directory_is_complete_small_and_packaged(name):
    path = shipped_model(name)
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "task.jsonl",
            "MODEL_CARD.md"} <= files
    assert (path / "model.safetensors").stat().st_size <= 5 * 2**20
    for file in files:  # every file ships with the wheel
        assert any(fnmatch.fnmatch(f"{name}/{file}", pattern) for pattern in PACKAGE_DATA), file
    assert len(read_task(path / "task.jsonl")) >= 500
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == 2


@pytest.mark.parametrize("name, kind", [("ioi-toy", "ioi"), ("induction", "induction")])
@pytest.mark.parametrize("source", ["task.jsonl", "fresh toy rows"])
def test_toy_words_and_answers_are_single_tokens_of_the_model(name, kind, source):
    from tokenizers import Tokenizer

    from bayescirc.taskgen import make_task

    tokenizer = Tokenizer.from_file(str(shipped_model(name) / "tokenizer.json"))
    unk = tokenizer.token_to_id("<|unk|>")
    task = read_task(shipped_model(name) / "task.jsonl") if source == "task.jsonl" else make_task(kind, 300, seed=9)
    for row in task.itertuples():
        clean, corrupted = tokenizer.encode(row.clean).ids, tokenizer.encode(row.corrupted).ids
        assert len(clean) == len(corrupted) and unk not in clean and unk not in corrupted
        for word in (row.answer, row.distractor):
            assert len(tokenizer.encode(word).ids) == 1 and tokenizer.encode(word).ids != [unk]


@pytest.fixture(scope="module")
def loaded():
    pytest.importorskip("transformer_lens")
    import torch

    from bayescirc.bridge import load_model

    torch.set_num_threads(1)
    return {name: load_model(shipped_model(name), device="cpu") for name in SHIPPED_MODELS}


@pytest.mark.tl
@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_held_out_accuracy_through_transformer_lens(loaded, name):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from bayescirc.ablation import logit_diffs
    from bayescirc.training import logit_differences

    task = read_task(shipped_model(name) / "task.jsonl").sample(120, random_state=0).reset_index(drop=True)
    diff = logit_diffs(loaded[name], task)
    assert (diff > 0).mean() >= 0.9
    # the same numbers as the Hugging Face model itself (the bridge only re-centres the logits)
    hf = GPT2LMHeadModel.from_pretrained(shipped_model(name))
    reference = logit_differences(hf, AutoTokenizer.from_pretrained(shipped_model(name)), task)
    assert diff == pytest.approx(reference, abs=1e-3)


@pytest.mark.tl
@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_mean_ablating_the_named_heads_drops_accuracy_to_chance(loaded, name):
    from bayescirc.ablation import ablation_table

    task = read_task(shipped_model(name) / "task.jsonl", n_inputs=120)
    model = loaded[name]
    heads = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    named = [h for group in CLAIMED[name] for h in group]
    groups = {"none": [], **{f"named {i}": group for i, group in enumerate(CLAIMED[name])}}
    others = [h for h in heads if h not in named]
    if others:
        groups["others"] = others
    table = ablation_table(model, task, groups).set_index("ablated")
    full = table.loc["none", "mean_logit_diff"]
    for i in range(len(CLAIMED[name])):  # each named group is necessary: near chance, most of the effect gone
        assert table.loc[f"named {i}", "accuracy"] <= 0.75
        assert table.loc[f"named {i}", "mean_logit_diff"] <= 0.2 * full
    if others:
        assert table.loc["others", "accuracy"] >= 0.85


@pytest.mark.parametrize("name, kind", [("ioi-toy", "ioi"), ("induction", "induction")])
def test_task_file_is_what_the_generator_makes(name, kind):
    from bayescirc.taskgen import make_task

    shipped = read_task(shipped_model(name) / "task.jsonl")[["clean", "corrupted", "answer", "distractor"]]
    assert shipped.equals(make_task(kind, len(shipped), seed=0))


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_model_card_states_accuracy_mechanism_and_recipe(name):
    card = (shipped_model(name) / "MODEL_CARD.md").read_text()
    for needle in ("Architecture", "Data", "Recipe", "seed", "accuracy", "logit difference", "Mechanism",
                   "ablat", "Training time"):
        assert needle.lower() in card.lower(), needle
    for layer, head in (h for group in CLAIMED[name] for h in group):
        assert re.search(rf"a{layer}\.h{head}\b", card)


@pytest.mark.tl
def test_ablation_hooks_replace_exactly_the_chosen_heads_and_positions(loaded):
    import numpy as np

    from bayescirc.ablation import logit_diffs

    model = loaded["ioi-toy"]
    task = read_task(shipped_model("ioi-toy") / "task.jsonl", n_inputs=1)
    base = logit_diffs(model, task)
    _, cache = model.run_with_cache(model.to_tokens(task.clean[0]))
    own = {layer: cache[f"blocks.{layer}.attn.hook_z"][0, -1].numpy() for layer in range(2)}  # [head, d_head]
    heads = [(0, 1), (1, 2)]
    # putting back a head's own output at the last position changes nothing ...
    same = logit_diffs(model, task, ablate=heads, means=own, positions=[-1])
    assert same == pytest.approx(base, abs=1e-4)
    # ... a layer-1 head's output anywhere but the last position cannot reach the last logits ...
    zeros = {layer: np.zeros_like(own[layer]) for layer in range(2)}
    assert logit_diffs(model, task, ablate=[(1, 2)], means=zeros, positions=[3]) == pytest.approx(base, abs=1e-4)
    # ... and zeroing the name movers at the last position does change the answer's margin
    movers = [(1, h) for h in range(4)]
    assert abs(logit_diffs(model, task, ablate=movers, means=zeros, positions=[-1])[0] - base[0]) > 1.0


@pytest.mark.tl
def test_direct_logit_attribution_matches_the_hugging_face_model_on_raw_and_processed_weights(loaded):
    """Each head's direct effect on the logit difference is its output at the last position through the final
    LayerNorm (scale frozen: centred, / scale, x weight) and the unembedding, whether or not TransformerLens folded
    the norm's weight into W_U (a user's own bridge is loaded without weight processing). Processing also folds
    the values' constant part (value bias, and the layer norm's bias through W_V) into the attention output bias,
    so there a head's output is without it."""
    import numpy as np
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from bayescirc.ablation import direct_logit_attribution
    from bayescirc.bridge import load_model

    path = shipped_model("ioi-toy")
    task = read_task(path / "task.jsonl", n_inputs=6)
    hf, tok = GPT2LMHeadModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    L, H, D = hf.config.n_layer, hf.config.n_head, hf.config.n_embd
    d_head = D // H
    heads_in, final = {}, {}
    hooks = [hf.transformer.h[layer].attn.c_proj.register_forward_hook(
        lambda mod, args, out, layer=layer: heads_in.__setitem__(layer, args[0][0, -1])) for layer in range(L)]
    hooks.append(hf.transformer.ln_f.register_forward_hook(lambda mod, args, out: final.__setitem__("x", args[0][0, -1])))
    with_bias, without_bias = np.zeros((L, H)), np.zeros((L, H))
    with torch.no_grad():
        for row in task.itertuples():
            hf(torch.tensor([[tok.bos_token_id] + tok.encode(row.clean, add_special_tokens=False)]))
            x = final["x"]
            scale = torch.sqrt(x.var(unbiased=False) + hf.transformer.ln_f.eps)
            answer, distractor = (tok.encode(w, add_special_tokens=False)[0] for w in (row.answer, row.distractor))
            readout = hf.lm_head.weight[answer] - hf.lm_head.weight[distractor]
            for layer in range(L):
                attn = hf.transformer.h[layer].attn
                ln_bias = hf.transformer.h[layer].ln_1.bias  # what a head's values hold whatever the input
                value_bias = (ln_bias @ attn.c_attn.weight + attn.c_attn.bias)[2 * D:]  # patterns sum to 1: z carries it
                for h in range(H):
                    cols = slice(h * d_head, (h + 1) * d_head)
                    for table, z in ((with_bias, heads_in[layer][cols]), (without_bias, (heads_in[layer] - value_bias)[cols])):
                        out = z @ attn.c_proj.weight[cols]  # Conv1D: [d_model in, d_model out]
                        table[layer, h] += float(((out - out.mean()) / scale * hf.transformer.ln_f.weight) @ readout)
    for hook in hooks:
        hook.remove()
    raw = load_model(TransformerBridge.boot_transformers(str(path), device="cpu"))
    for model, reference in ((loaded["ioi-toy"], without_bias), (raw, with_bias)):
        table = direct_logit_attribution(model, task)
        assert table.to_diff.to_numpy().reshape(L, H) == pytest.approx(reference / len(task), abs=1e-3)
