"""Generate task files: clean/corrupted prompt pairs with the answer and the distractor.

Three kinds, each with the corruption the literature uses:

- ``ioi`` (indirect-object identification, Wang et al. 2022): "When Mary and
  John went to the store, John gave a drink to" -> answer " Mary" (the
  indirect object), distractor " John" (the repeated subject). Corrupted:
  the standard ABC prompt, the repeated subject replaced by a third name
  ("..., Kate gave a drink to"), so no name is repeated and nothing points to
  the answer.
- ``induction``: a random span of distinct words, a few other words, then the
  span again up to some word;
  answer: the word that followed it the first time. Corrupted: that first
  occurrence replaced by another word, which is the distractor (what an
  induction head copies in the corrupted run).
- ``greater-than`` (Hanna et al. 2023): "The war lasted from the year 1732 to
  the year 17" -> answer a later year ("45"), distractor an earlier or equal
  one ("12"). Corrupted: the start year 1701 (the 01-year corruption).

Vocabularies: ``toy`` uses the words of the shipped models (``models/ioi-toy``,
``models/induction``) and, for IOI, only the held-out evaluation split
(name pairs and templates never seen in training); ``english`` uses plain
English names and words meant for real models such as GPT-2, all templates.
Whether each answer is a single token of a real model's tokenizer is checked
by the collector against that tokenizer. Clean and corrupted prompts of one
row always have the same words except one, so the same number of words.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pandas as pd

from .errors import TaskError
from .tasks import TASK_COLUMNS

__all__ = ["TASK_KINDS", "VOCABULARIES", "make_task", "IOI_TEMPLATES", "IOI_NAMES", "ioi_split", "toy_words"]

TASK_KINDS = ("ioi", "induction", "greater-than")
VOCABULARIES = ("toy", "english")
SPLITS = ("eval", "train")

# --- IOI ----------------------------------------------------------------------------------------
# [A] and [B] are the indirect object and the subject in either order; [S] is the subject again.
IOI_TEMPLATES = (
    "Then, [A] and [B] went to the [PLACE]. [S] gave a [OBJECT] to",
    "Then, [A] and [B] had a lot of fun at the [PLACE]. [S] gave a [OBJECT] to",
    "Then, [A] and [B] were working at the [PLACE]. [S] decided to give a [OBJECT] to",
    "Then, [A] and [B] were thinking about going to the [PLACE]. [S] wanted to give a [OBJECT] to",
    "Then, [A] and [B] had a long argument. Afterwards [S] said to",
    "After [A] and [B] went to the [PLACE], [S] gave a [OBJECT] to",
    "When [A] and [B] got a [OBJECT] at the [PLACE], [S] decided to give the [OBJECT] to",
    "While [A] and [B] were commuting to the [PLACE], [S] gave a [OBJECT] to",
    "After the lunch, [A] and [B] went to the [PLACE]. [S] gave a [OBJECT] to",
    "Afterwards, [A] and [B] went to the [PLACE]. [S] gave a [OBJECT] to",
    "When [A] and [B] had a lot of fun at the [PLACE], [S] wanted to give a [OBJECT] to",
    "The [PLACE] was where [A] and [B] found a [OBJECT]. [S] gave it to",
    # held out of training (every word of these occurs in the training templates above):
    "While [A] and [B] were working at the [PLACE], [S] gave a [OBJECT] to",
    "After [A] and [B] had a long argument, [S] said to",
    "When [A] and [B] got a [OBJECT] at the [PLACE], [S] decided to give it to",
    "Afterwards, [A] and [B] were thinking about the [OBJECT]. [S] wanted to give it to",
)
_IOI_HELD_OUT_TEMPLATES = 4  # the last four templates are the evaluation split

IOI_NAMES = (
    "Mary", "John", "Tom", "James", "David", "Michael", "Paul", "Mark", "Sarah", "Lisa",
    "Kevin", "Daniel", "Emily", "Alice", "Bob", "Peter", "Jack", "Ryan", "Adam", "Eric",
    "Steve", "Chris", "Amy", "Kate", "Jane", "Laura", "Rachel", "Andrew", "Matt", "Joe",
    "Mike", "Sam", "Ben", "Dan", "Tim", "Max", "George", "Henry", "Anna", "Emma",
)
_ENGLISH_EXTRA_NAMES = (
    "Jessica", "William", "Robert", "Richard", "Thomas", "Charles", "Jason", "Brian", "Scott", "Jeff",
    "Kelly", "Lucy", "Grace", "Alex", "Frank", "Harry", "Victoria", "Jennifer", "Edward", "Charlie",
)
IOI_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "station", "house", "park",
              "library", "beach", "market")
IOI_OBJECTS = ("drink", "ring", "kiss", "bone", "basketball", "computer", "necklace", "snack", "apple", "book",
               "letter", "gift")
_IOI_HELD_OUT_PAIR_SHARE = 0.25
_SPLIT_SEED = 20240917  # fixes which name pairs are held out, independently of any task seed

# --- induction ----------------------------------------------------------------------------------
INDUCTION_WORDS = (
    "apple", "arm", "baby", "bag", "ball", "bank", "bed", "bell", "bird", "boat", "body", "bone", "book",
    "box", "boy", "bread", "bridge", "brother", "cake", "camera", "car", "card", "cat", "chair", "child",
    "church", "city", "clock", "cloud", "coat", "coffee", "corn", "cow", "cup", "desk", "dog", "door",
    "dream", "dress", "drink", "ear", "egg", "eye", "face", "farm", "father", "field", "fire", "fish",
    "flag", "floor", "flower", "food", "foot", "forest", "friend", "game", "garden", "girl", "glass",
    "gold", "grass", "hair", "hand", "hat", "head", "heart", "hill", "horse", "hospital", "hotel",
    "house", "ice", "island", "jacket", "key", "king", "kitchen", "lake", "lamp", "leg", "letter", "light",
    "lion", "map", "market", "milk", "money", "moon", "mother", "mountain", "mouse", "music", "name",
    "night", "nose", "ocean", "office", "paper", "park", "pen", "phone", "piano", "picture", "plane",
    "plant", "queen", "rain", "river", "road", "rock", "room", "school", "sea", "sheep", "shirt", "shoe",
    "shop", "sister", "sky", "snow", "song", "star", "station", "stone", "street", "sun", "table", "tea",
    "teacher", "tiger", "town", "train", "tree", "truck", "wall", "water", "window", "wine", "wolf", "wood",
)
INDUCTION_SPAN = (4, 12)   # span lengths (inclusive)
INDUCTION_PREFIX = (0, 5)  # unrepeated words before the span (inclusive)
INDUCTION_GAP = (0, 6)     # unrepeated words between the span and its repeat (inclusive): with random
#                            prefix, span and gap lengths, only the previous occurrence of the current
#                            word locates the answer (no positional shortcut)

# --- greater-than -------------------------------------------------------------------------------
GREATER_THAN_NOUNS = ("war", "expedition", "project", "drought", "famine", "reign", "dynasty", "siege",
                      "voyage", "journey", "occupation", "rebellion", "crisis", "plague", "construction")
GREATER_THAN_TEMPLATE = "The {noun} lasted from the year {century}{start:02d} to the year {century}"
GREATER_THAN_CENTURY = 17


def _words(text: str) -> list[str]:
    """The words and punctuation marks of ``text``, as the toy tokenizers split it."""
    return re.findall(r"\w+|[^\w\s]+", text)


def _fill(template: str, **slots: str) -> str:
    return re.sub(r"\[([A-Z]+)\]", lambda m: slots[m.group(1)], template)


def ioi_split(split: str) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    """Templates and unordered name pairs of an IOI split of the toy vocabulary.

    ``"train"`` and ``"eval"`` share no template and no name pair (every name
    occurs in both); the assignment is fixed, whatever the task's seed.
    """
    if split not in SPLITS:
        raise TaskError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    pairs = list(itertools.combinations(IOI_NAMES, 2))
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(pairs))
    n_held = int(round(_IOI_HELD_OUT_PAIR_SHARE * len(pairs)))
    held = sorted(order[:n_held])
    kept = sorted(order[n_held:])
    if split == "eval":
        return IOI_TEMPLATES[-_IOI_HELD_OUT_TEMPLATES:], [pairs[i] for i in held]
    return IOI_TEMPLATES[:-_IOI_HELD_OUT_TEMPLATES], [pairs[i] for i in kept]


def _ioi(n: int, rng: np.random.Generator, vocabulary: str, split: str) -> pd.DataFrame:
    if vocabulary == "toy":
        templates, pairs = ioi_split(split)
        names = IOI_NAMES
    else:
        templates = IOI_TEMPLATES
        names = IOI_NAMES + _ENGLISH_EXTRA_NAMES
        pairs = list(itertools.combinations(names, 2))
    rows = []
    for _ in range(n):
        template = templates[rng.integers(len(templates))]
        pair = pairs[rng.integers(len(pairs))]
        io, s = pair if rng.random() < 0.5 else pair[::-1]
        c = names[rng.choice([i for i, name in enumerate(names) if name not in (io, s)])]
        a, b = (io, s) if rng.random() < 0.5 else (s, io)
        place = IOI_PLACES[rng.integers(len(IOI_PLACES))]
        obj = IOI_OBJECTS[rng.integers(len(IOI_OBJECTS))]
        slots = {"A": a, "B": b, "PLACE": place, "OBJECT": obj}
        rows.append({"clean": _fill(template, S=s, **slots), "corrupted": _fill(template, S=c, **slots),
                     "answer": f" {io}", "distractor": f" {s}"})
    return pd.DataFrame(rows, columns=list(TASK_COLUMNS))


def _induction(n: int, rng: np.random.Generator, vocabulary: str, split: str) -> pd.DataFrame:
    words = INDUCTION_WORDS
    rows = []
    for _ in range(n):
        span = int(rng.integers(INDUCTION_SPAN[0], INDUCTION_SPAN[1] + 1))
        prefix = int(rng.integers(INDUCTION_PREFIX[0], INDUCTION_PREFIX[1] + 1))
        gap = int(rng.integers(INDUCTION_GAP[0], INDUCTION_GAP[1] + 1))
        drawn = [words[i] for i in rng.choice(len(words), size=prefix + span + gap + 1, replace=False)]
        noise, seq, filler, other = drawn[:prefix], drawn[prefix:prefix + span], drawn[prefix + span:-1], drawn[-1]
        k = int(rng.integers(1, span))  # repeat seq[:k]; the answer is seq[k]
        clean = noise + seq + filler + seq[:k]
        corrupted = noise + seq[:k] + [other] + seq[k + 1:] + filler + seq[:k]
        rows.append({"clean": " ".join(clean), "corrupted": " ".join(corrupted),
                     "answer": f" {seq[k]}", "distractor": f" {other}"})
    return pd.DataFrame(rows, columns=list(TASK_COLUMNS))


def _greater_than(n: int, rng: np.random.Generator, vocabulary: str, split: str) -> pd.DataFrame:
    if vocabulary == "toy":
        raise TaskError("greater-than has no toy vocabulary: no shipped model reads years. "
                        "Use vocabulary 'english' (--vocabulary english) with a real model such as gpt2.")
    rows = []
    for _ in range(n):
        noun = GREATER_THAN_NOUNS[rng.integers(len(GREATER_THAN_NOUNS))]
        start = int(rng.integers(2, 99))  # 02..98, so that both a later and an earlier-or-equal year exist
        later = int(rng.integers(start + 1, 100))
        earlier = int(rng.integers(1, start + 1))
        c = GREATER_THAN_CENTURY
        rows.append({"clean": GREATER_THAN_TEMPLATE.format(noun=noun, century=c, start=start),
                     "corrupted": GREATER_THAN_TEMPLATE.format(noun=noun, century=c, start=1),
                     "answer": f"{later:02d}", "distractor": f"{earlier:02d}"})
    return pd.DataFrame(rows, columns=list(TASK_COLUMNS))


_GENERATORS = {"ioi": _ioi, "induction": _induction, "greater-than": _greater_than}


def make_task(kind: str, n: int, seed: int = 0, vocabulary: str = "toy", *, split: str = "eval") -> pd.DataFrame:
    """Generate ``n`` clean/corrupted prompt pairs of a task kind, in the task-file layout.

    Parameters
    ----------
    kind : {"ioi", "induction", "greater-than"}
    n : int
        Number of rows (>= 1).
    seed : int, default 0
        Same seed, same rows.
    vocabulary : {"toy", "english"}, default "toy"
        ``toy``: the shipped models' words (IOI: 40 names, held-out templates
        and name pairs); ``english``: plain English names and words for real
        models (IOI: 60 names, all templates). Induction uses the same 141
        common nouns in both; ``greater-than`` needs ``english``.
    split : {"eval", "train"}, default "eval"
        For toy IOI, the evaluation split (what task files hold) or the
        disjoint training split (what ``models/train_ioi_toy.py`` trains on).
        Induction and greater-than rows are random draws; the split is ignored.

    Returns
    -------
    DataFrame with columns ``clean``, ``corrupted``, ``answer``, ``distractor``
    (answers with GPT-2's leading space for IOI and induction, e.g. ``" Mary"``).
    """
    if kind not in _GENERATORS:
        raise TaskError(f"unknown task kind {kind!r}; choose one of {list(TASK_KINDS)}.")
    if vocabulary not in VOCABULARIES:
        raise TaskError(f"unknown vocabulary {vocabulary!r}; choose one of {list(VOCABULARIES)}.")
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; choose one of {list(SPLITS)}.")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise TaskError(f"n must be a positive integer (the number of prompt pairs), got {n!r}.")
    rng = np.random.default_rng([seed, TASK_KINDS.index(kind), SPLITS.index(split)])
    return _GENERATORS[kind](int(n), rng, vocabulary, split)


def toy_words(kind: str) -> list[str]:
    """Every word a toy-vocabulary task of ``kind`` can contain (the shipped tokenizer's vocabulary)."""
    if kind == "ioi":
        words = set(IOI_NAMES) | set(IOI_PLACES) | set(IOI_OBJECTS)
        for template in IOI_TEMPLATES:
            words |= {w for w in _words(re.sub(r"\[[A-Z]+\]", " ", template))}
        return sorted(words)
    if kind == "induction":
        return sorted(INDUCTION_WORDS)
    raise TaskError(f"{kind!r} has no toy vocabulary; toy tasks are {['ioi', 'induction']}.")
