"""Training code: a few steps lower the loss; saved directories load through TransformerLens unchanged."""

import pytest

torch = pytest.importorskip("torch")

from bayescirc.training import (  # noqa: E402
    SPECIAL_TOKENS,
    build_model,
    build_tokenizer,
    encode_examples,
    logit_differences,
    save_model,
    sequence_loss,
    train,
)

pytestmark = pytest.mark.tl

WORDS = ["When", "Mary", "John", "Anna", "and", "went", "gave", "it", "to", ","]


def tiny(seed=0):
    tokenizer = build_tokenizer(WORDS, max_length=16)
    model = build_model(tokenizer, n_layer=1, n_head=2, n_embd=16, n_positions=16, seed=seed)
    return tokenizer, model


def test_tokenizer_is_word_level_with_special_tokens_first():
    tokenizer = build_tokenizer(WORDS)
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(4)] == list(SPECIAL_TOKENS.values())
    assert tokenizer.tokenize("When Mary and John went, John gave it to") == \
        ["When", "Mary", "and", "John", "went", ",", "John", "gave", "it", "to"]
    assert tokenizer.encode(" Mary", add_special_tokens=False) == tokenizer.encode("Mary", add_special_tokens=False)
    assert tokenizer.encode("Bob", add_special_tokens=False) == [tokenizer.unk_token_id]
    with pytest.raises(ValueError, match="whitespace"):
        build_tokenizer(["two words"])


def test_encode_marks_only_the_completion_as_target():
    tokenizer = build_tokenizer(WORDS)
    ex = encode_examples(tokenizer, ["When Mary and John went", "John gave it to"], [" Mary", " Anna"])
    assert ex.input_ids[0, 0] == tokenizer.bos_token_id and ex.input_ids.shape == (2, 7)
    assert ex.target_mask[0].tolist() == [False] * 6 + [True]
    assert ex.target_mask[1].tolist() == [False] * 5 + [True, False]  # padding is never a target
    assert ex.input_ids[1, 6] == tokenizer.pad_token_id
    everything = encode_examples(tokenizer, ["When Mary"], [" went"], loss="all")
    assert everything.target_mask[0].tolist() == [False, True, True, True]


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    tokenizer, model = tiny()
    prompts = ["When Mary and John went , John gave it to", "When John and Mary went , Mary gave it to",
               "When Anna and John went , John gave it to", "When John and Anna went , Anna gave it to"]
    examples = encode_examples(tokenizer, prompts, [" Mary", " John", " Anna", " John"])
    before = sequence_loss(model, examples).item()
    result = train(model, examples, steps=40, batch_size=4, lr=1e-2, warmup=5, seed=0)
    after = sequence_loss(model, examples).item()
    assert len(result.losses) == 40 and result.seconds > 0
    assert after < 0.5 * before
    # seeded: the same run gives the same losses
    _, again = tiny()
    assert train(again, examples, steps=40, batch_size=4, lr=1e-2, warmup=5, seed=0).losses == result.losses


def test_saved_directory_loads_offline_through_the_bridge_with_the_same_logits(tmp_path):
    from bayescirc.bridge import load_model

    tokenizer, model = tiny(seed=3)
    path = save_model(model, tokenizer, tmp_path / "m")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in path.iterdir()}
    bridge = load_model(path, device="cpu")
    prompt = "When Mary and John went , John gave it to"
    tokens = bridge.to_tokens(prompt)
    assert tokens[0].tolist() == [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    assert bridge.to_single_token(" Mary") == tokenizer.convert_tokens_to_ids("Mary")
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        got = bridge(tokens)
    # compatibility mode folds layer norms and centres the unembedding: same log-probabilities
    torch.testing.assert_close(got.log_softmax(-1), expected.log_softmax(-1), atol=1e-4, rtol=1e-4)
    import pandas as pd

    task = pd.DataFrame({"clean": [prompt], "corrupted": [prompt], "answer": [" Mary"], "distractor": [" John"]})
    diff = logit_differences(model, tokenizer, task)
    mary, john = (tokenizer.convert_tokens_to_ids(w) for w in ("Mary", "John"))
    assert diff[0] == pytest.approx(float(expected[0, -1, mary] - expected[0, -1, john]), abs=1e-5)
