"""A built-in synthetic instruction dataset: short questions with one exact answer each, for the default job.

    records = synthetic_records(8000, seed=0)                  # [{"messages": [...]}, ...] (fastsft's chat format)
    items = exact_match_items(300, seed=1)                     # [(messages up to the last user turn, answer)]
    score_exact_match(predictions, [answer for _, answer in items])   # share of exact matches

Five task families, drawn with equal shares; each question phrased with one of three templates; answers short
and deterministic:

    arithmetic   add, sub      "What is 23 + 41?" -> "64"; "Compute 68 - 45." -> "23"
    reversal     reverse       "Spell backwards: tam." -> "mat"
    sorting      sort          "Sort ascending: 7 2 5." -> "2 5 7"
    counting     count_items   "Count the items: fig, lime, plum." -> "3"
    lookup       capital       "What is the capital of Peru?" -> "Lima"           (a fixed 20-row table)
                 color         "What color is the lime?" -> "green"               (a fixed 20-row table)

The inputs are chosen so that a tiny model can learn the rule, not just the examples, in a few minutes of CPU
training, and every held-out question is answerable from what training teaches:
    - add/sub: two-digit operands, no carry or borrow (and a two-digit difference). Each answer digit is a sum
      or difference of one column, and every column fact (at most 55 per operation) occurs in training, so a
      held-out pair of operands is a new combination of known facts. (With single-digit operands a held-out
      sum would be a fact never seen; without carries each answer digit depends on one column only.)
    - reverse: pronounceable three-letter words (consonant-vowel-consonant or vowel-consonant-vowel, ~2,000
      of them), always the last word of the question. Too many to memorise; reversal has to be learned.
    - sort: three digits 0-9, repeats allowed, at the end of the question; the answer space-separated.
    - count_items: 2-5 distinct fruit names.
Measured with fastsft.train.tiny's 2-layer model (2,000 AdamW steps of 1,024 packed tokens, lr 2e-3, about two
minutes on 2 CPU cores): held-out exact match 0.0 before training, 0.78-0.97 after (three seeds); each family
jumps at a seed-dependent step. Harder variants tried (four-letter words, counting a letter in a word) stayed
near chance within that budget, which is why they are not here.

Records have an optional system prompt (a quarter of the one-exchange ones), one exchange (user, assistant)
or, in a quarter of them, two (no system prompt then, to keep sequences short). Rendered with the tiny
tokenizer's ChatML template every record is at most MAX_TOKENS tokens (one character is one token there).

Held-out split, disjoint from train by construction. Every question has a canonical input, its `key` (the
operands, the word, the multiset of digits, the item list), and `split_of(task, key)` alone decides its
split, whatever the template, seed or dialogue it appears in:

    - add, sub, reverse, sort, count_items: held out when sha256("task|key") % 5 == 0 (a fifth of the
      inputs). A held-out input is never asked in training in any phrasing; for sort the key is the sorted
      multiset, so no training question even has a held-out answer.
    - capital, color: a fact that never appears in training cannot be answered, so here the key is
      "template:row" and the held-out questions are unseen phrasings of known facts: row i is held out
      under template i % 3 and trained under the other two.

Everything is a pure function of the arguments: `random.Random` seeded with a string (hashed with sha512,
stable across runs and platforms) for the choices, sha256 for the split (never Python's salted `hash`).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

SPLITS = ("train", "heldout")
FAMILIES = {
    "arithmetic": ("add", "sub"),
    "reversal": ("reverse",),
    "sorting": ("sort",),
    "counting": ("count_items",),
    "lookup": ("capital", "color"),
}
TASKS = tuple(task for tasks in FAMILIES.values() for task in tasks)
HELDOUT_MODULUS = 5  # hashed tasks: 1 in 5 inputs is held out
MAX_TOKENS = 128  # every record's length with the tiny tokenizer is at most this (tests check it)
# Two-exchange dialogues: questions + answers at most this many characters, so that with ChatML's 21 tokens of
# markup per exchange (and BOS) they stay within MAX_TOKENS: 1 + 2 * 21 + 84 = 127.
MULTI_TURN_CHARS = 84

TEMPLATES = {
    "add": ("What is {a} + {b}?", "Compute {a} + {b}.", "Calculate {a} + {b}."),
    "sub": ("What is {a} - {b}?", "Compute {a} - {b}.", "Calculate {a} - {b}."),
    "reverse": ("Reverse the word {w}.", "Spell backwards: {w}.", "Write in reverse: {w}."),
    "sort": ("Sort ascending: {xs}.", "Sort these digits: {xs}.", "Put in order: {xs}."),
    "count_items": ("How many items: {items}?", "Count the items: {items}.", "How many are listed: {items}?"),
    "capital": ("What is the capital of {x}?", "Name the capital of {x}.", "Capital of {x}?"),
    "color": ("What color is the {x}?", "Name the color of the {x}.", "Color of the {x}?"),
}

SYSTEM_PROMPTS = ("Be brief.", "Answer briefly.", "Reply with the answer only.")

CAPITALS = (
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Poland", "Warsaw"),
    ("Canada", "Ottawa"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Germany", "Berlin"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Portugal", "Lisbon"),
    ("Sweden", "Stockholm"),
)

COLORS = (
    ("banana", "yellow"),
    ("lemon", "yellow"),
    ("lime", "green"),
    ("pear", "green"),
    ("cucumber", "green"),
    ("apple", "red"),
    ("cherry", "red"),
    ("strawberry", "red"),
    ("tomato", "red"),
    ("orange", "orange"),
    ("carrot", "orange"),
    ("pumpkin", "orange"),
    ("grape", "purple"),
    ("plum", "purple"),
    ("eggplant", "purple"),
    ("blueberry", "blue"),
    ("coconut", "brown"),
    ("potato", "brown"),
    ("blackberry", "black"),
    ("snow pea", "green"),
)

ITEMS = ("fig", "kiwi", "plum", "pear", "lime", "apple", "grape", "lemon", "mango", "peach", "date", "melon")


@dataclass(frozen=True)
class Exchange:
    """One question and its answer. `key` is the canonical input that decides the split (module docstring)."""

    task: str
    key: str
    question: str
    answer: str


@dataclass(frozen=True)
class Dialogue:
    """A conversation of one or two exchanges, with an optional system prompt."""

    system: str | None
    exchanges: tuple[Exchange, ...]

    def messages(self) -> list[dict]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for ex in self.exchanges:
            messages += [{"role": "user", "content": ex.question}, {"role": "assistant", "content": ex.answer}]
        return messages

    def record(self) -> dict:
        return {"messages": self.messages()}


def split_of(task: str, key: str) -> str:
    """The split ("train" or "heldout") of a question of `task` with canonical input `key` (module docstring)."""
    if task in ("capital", "color"):
        template, row = (int(part) for part in key.split(":"))
        return "heldout" if template == row % len(TEMPLATES[task]) else "train"
    digest = hashlib.sha256(f"{task}|{key}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0 else "train"


CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"


def _pseudo_word(rng: random.Random) -> str:
    """A pronounceable three-letter lowercase word: consonant-vowel-consonant or vowel-consonant-vowel."""
    pattern = rng.choice(("cvc", "vcv"))
    return "".join(rng.choice(CONSONANTS if p == "c" else VOWELS) for p in pattern)


def _draw(rng: random.Random, task: str) -> tuple[str, int, dict, str]:
    """A random (key, template index, template fields, answer) for `task`, from either split."""
    t = rng.randrange(len(TEMPLATES[task]))
    if task == "add":  # two-digit operands, no carry (module docstring)
        while True:
            a, b = rng.randrange(10, 90), rng.randrange(10, 90)
            if a // 10 + b // 10 <= 9 and a % 10 + b % 10 <= 9:
                return f"{a}+{b}", t, {"a": a, "b": b}, str(a + b)
    if task == "sub":  # two-digit operands and result, no borrow
        while True:
            a, b = rng.randrange(10, 100), rng.randrange(10, 100)
            if a // 10 > b // 10 and a % 10 >= b % 10:
                return f"{a}-{b}", t, {"a": a, "b": b}, str(a - b)
    if task == "reverse":
        w = _pseudo_word(rng)
        return w, t, {"w": w}, w[::-1]
    if task == "sort":
        xs = [rng.randrange(10) for _ in range(3)]
        ordered = " ".join(map(str, sorted(xs)))
        return ordered, t, {"xs": " ".join(map(str, xs))}, ordered
    if task == "count_items":
        items = rng.sample(ITEMS, rng.randint(2, 5))
        return ",".join(items), t, {"items": ", ".join(items)}, str(len(items))
    if task in ("capital", "color"):
        table = CAPITALS if task == "capital" else COLORS
        row = rng.randrange(len(table))
        return f"{t}:{row}", t, {"x": table[row][0]}, table[row][1]
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def sample_exchange(rng: random.Random, task: str, split: str = "train") -> Exchange:
    """A random question of `task` whose input belongs to `split` (drawn until one does: every task's split
    holds at least a fifth of its inputs, so this takes a few draws)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        key, t, fields, answer = _draw(rng, task)
        if task in ("capital", "color") and split == "heldout":
            # Choose the template so the question lands in the held-out split directly.
            row = int(key.split(":")[1])
            t = row % len(TEMPLATES[task])
            key = f"{t}:{row}"
        if split_of(task, key) == split:
            return Exchange(task, key, TEMPLATES[task][t].format(**fields), answer)


def _task_chooser(tasks: Sequence[str]):
    """Draws a family uniformly (among those with a task in `tasks`), then one of its tasks: each family gets
    the same share of the data, however many tasks it has."""
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks!r}")
    groups = [[t for t in family if t in tasks] for family in FAMILIES.values()]
    groups = [g for g in groups if g]
    return lambda rng: rng.choice(rng.choice(groups))


def synthetic_dialogues(
    n: int, *, seed: int, split: str = "train", tasks: Sequence[str] = TASKS, multi_turn: float = 0.25
) -> list[Dialogue]:
    """`n` random dialogues from `split`. Families are drawn uniformly, then a task of the family; a
    `multi_turn` share of the dialogues holds two exchanges (no system prompt; the second is redrawn until
    both questions and answers total at most MULTI_TURN_CHARS characters), the rest one exchange (with a
    system prompt in a quarter of them)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    choose = _task_chooser(tasks)
    rng = random.Random(f"fastsft-synthetic:{seed}:{split}")  # a str seed is hashed with sha512: stable
    dialogues = []
    for _ in range(n):
        first = sample_exchange(rng, choose(rng), split)
        if rng.random() < multi_turn:
            budget = MULTI_TURN_CHARS - len(first.question) - len(first.answer)
            while True:
                second = sample_exchange(rng, choose(rng), split)
                if len(second.question) + len(second.answer) <= budget:
                    break
            dialogues.append(Dialogue(None, (first, second)))
        else:
            system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.25 else None
            dialogues.append(Dialogue(system, (first,)))
    return dialogues


def synthetic_records(n: int, *, seed: int, split: str = "train", **kwargs) -> list[dict]:
    """`n` chat records `{"messages": [...]}` from `split` ("train" or "heldout"); same arguments, same records.
    kwargs: `tasks`, `multi_turn` (synthetic_dialogues)."""
    return [d.record() for d in synthetic_dialogues(n, seed=seed, split=split, **kwargs)]


def exact_match_items(n: int, seed: int, **kwargs) -> list[tuple[list[dict], str]]:
    """`n` held-out evaluation items: (the dialogue's messages without its final assistant reply, that reply).
    Generate after `apply_chat_template(messages, add_generation_prompt=True)` and compare with
    `score_exact_match`. In two-exchange items the first answer is given (correct) and the second is asked."""
    items = []
    for d in synthetic_dialogues(n, seed=seed, split="heldout", **kwargs):
        messages = d.messages()
        items.append((messages[:-1], messages[-1]["content"]))
    return items


def near_miss(exchange: Exchange, rng: random.Random) -> str:
    """A subtly wrong answer to `exchange` (for preference pairs: the correct answer is chosen, this rejected):
    one digit of a sum or difference off by one, two letters of a reversal or two digits of a sort swapped, a
    count off by one, another row's capital or color. Never equal to the correct answer."""
    answer, task = exchange.answer, exchange.task
    if task in ("add", "sub"):
        position = rng.randrange(len(answer))
        digit = int(answer[position])
        options = [d for d in (digit - 1, digit + 1) if 0 <= d <= 9 and not (position == 0 and d == 0)]
        return answer[:position] + str(rng.choice(options)) + answer[position + 1 :]
    if task == "count_items":
        count = int(answer)
        return str(count + 1 if count == 2 or rng.random() < 0.5 else count - 1)
    if task in ("reverse", "sort"):
        parts = answer.split(" ") if task == "sort" else list(answer)
        swaps = [i for i in range(len(parts) - 1) if parts[i] != parts[i + 1]]
        if swaps:
            i = rng.choice(swaps)
            parts[i], parts[i + 1] = parts[i + 1], parts[i]
        elif task == "sort":  # all digits equal: one of them off by one
            parts[-1] = str((int(parts[-1]) + 1) % 10)
        else:  # a word of one repeated letter (never drawn, but total): a different last letter
            parts[-1] = "a" if parts[-1] != "a" else "e"
        return (" " if task == "sort" else "").join(parts)
    table = CAPITALS if task == "capital" else COLORS
    return rng.choice(sorted({value for _, value in table} - {answer}))


def synthetic_preference_records(n: int, *, seed: int, split: str = "train", **kwargs) -> list[dict]:
    """`n` preference pairs in TRL's conversational form `{"prompt": [...], "chosen": [...], "rejected": [...]}`:
    a dialogue from `split` up to its last question, its correct answer (chosen) and a near miss (rejected).
    kwargs: `tasks`, `multi_turn` (synthetic_dialogues)."""
    rng = random.Random(f"fastsft-synthetic-preference:{seed}:{split}")
    records = []
    for dialogue in synthetic_dialogues(n, seed=seed, split=split, **kwargs):
        messages = dialogue.messages()
        wrong = near_miss(dialogue.exchanges[-1], rng)
        records.append(
            {
                "prompt": messages[:-1],
                "chosen": [messages[-1]],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return records


def normalize_answer(text: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped."""
    return re.sub(r"\s+", " ", text).strip()


def score_exact_match(predictions: Sequence[str], expected: Sequence[str]) -> float:
    """Share of predictions equal to their expected answer after `normalize_answer` (0.0 for no items)."""
    if len(predictions) != len(expected):
        raise ValueError(f"{len(predictions)} predictions for {len(expected)} expected answers")
    if not expected:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(e) for p, e in zip(predictions, expected, strict=True))
    return hits / len(expected)
