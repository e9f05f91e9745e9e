"""A tiny random GPT-2 saved as a Hugging Face directory, made offline for tests.

Word-level tokenizer (``tokenizers``) over a small vocabulary, saved as a
``PreTrainedTokenizerFast`` with bos/eos/pad tokens, and a 2-layer GPT-2 with
d_model 32 and random weights: everything the collector reads from a real
model directory, in well under a second.
"""

from __future__ import annotations

from pathlib import Path

NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Anna", "Kate", "Paul"]
WORDS = ["When", "and", "went", "to", "the", "store", "park", "gave", "a", "drink", "book", "then", "said",
         "hello", "ball", "dog", "cat", "ran", "home", "is", "was", "here", "there", ","]
SPECIAL = ["<|endoftext|>", "<unk>", "<pad>"]


def make_tiny_model(path: str | Path, n_layers: int = 2, n_heads: int = 4, d_model: int = 32, seed: int = 0,
                    vocab_size: int | None = None, n_positions: int = 64) -> Path:
    """Write a random GPT-2 (``n_layers`` x ``n_heads``, ``d_model``) and its tokenizer to ``path``.

    ``vocab_size`` larger than the tokenizer's vocabulary gives the model unused
    rows (e.g. 50257 to cost what GPT-2's embedding and unembedding cost).
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    vocab = _save_tokenizer(path)
    config = GPT2Config(vocab_size=max(len(vocab), vocab_size or 0), n_positions=n_positions, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                        bos_token_id=0, eos_token_id=0, pad_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # larger random weights than GPT-2's init, so effects are not tiny
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.3 * (32 / d_model) ** 0.5)
            elif "ln" not in name:
                param.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return path


def _save_tokenizer(path: Path) -> dict[str, int]:
    """The word-level tokenizer of the tiny models, saved to ``path``; returns its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIAL + NAMES + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(path)
    return vocab


def _decoder(path, config_cls, model_cls, n_layers, n_heads, n_key_value_heads, d_model, seed):
    """A random Hugging Face decoder with the test tokenizer, unsaved: ``(model, path)``."""
    import torch

    path = Path(path)
    vocab = _save_tokenizer(path)
    config = config_cls(vocab_size=len(vocab), hidden_size=d_model, intermediate_size=2 * d_model,
                        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_key_value_heads,
                        max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=2)
    torch.manual_seed(seed)
    return model_cls(config), path


def make_tiny_llama(path: str | Path, n_layers: int = 2, n_heads: int = 4, n_key_value_heads: int = 2,
                    d_model: int = 32, seed: int = 0) -> Path:
    """Write a random Llama with grouped-query attention (``n_key_value_heads`` < ``n_heads``) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model, path = _decoder(path, LlamaConfig, LlamaForCausalLM, n_layers, n_heads, n_key_value_heads, d_model, seed)
    model.save_pretrained(path)
    return path


def make_tiny_olmo2(path: str | Path, n_layers: int = 2, n_heads: int = 4, d_model: int = 32, seed: int = 0) -> Path:
    """Write a random OLMo-2 (RMS norms *after* attention and the MLP, not before) to ``path``."""
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    model, path = _decoder(path, Olmo2Config, Olmo2ForCausalLM, n_layers, n_heads, n_heads, d_model, seed)
    with torch.no_grad():  # norm weights away from 1 so the post-norms visibly rescale each write
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.3)
    model.save_pretrained(path)
    return path


def tiny_task_rows() -> list[dict]:
    """Prompt pairs of two lengths with single-token answers (IOI-like)."""
    rows = []
    pairs = [("Mary", "John"), ("Alice", "Bob"), ("Tom", "Anna"), ("Kate", "Paul"), ("John", "Alice"), ("Bob", "Mary")]
    for i, (a, b) in enumerate(pairs):
        place = "store" if i % 2 else "park"
        obj = "drink" if i % 3 else "book"
        rows.append({"clean": f"When {a} and {b} went to the {place} , {b} gave a {obj} to",
                     "corrupted": f"When {a} and {b} went to the {place} , {a} gave a {obj} to",
                     "answer": a, "distractor": b})
        rows.append({"clean": f"{a} and {b} ran home , {b} said hello to",
                     "corrupted": f"{a} and {b} ran home , {a} said hello to", "answer": a, "distractor": b})
    return rows
