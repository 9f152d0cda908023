"""The default job's data, tokenizer and model: fastsft.train.synthetic and fastsft.train.tiny.

Answers are checked by parsing the question text with this file's own patterns and recomputing them, not by
calling the generator's code; the lookup tables are checked against facts written out here.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from fastsft.data import PackedLoader, prepare_dataset
from fastsft.train.synthetic import (
    FAMILIES,
    MAX_TOKENS,
    TASKS,
    exact_match_items,
    score_exact_match,
    split_of,
    synthetic_dialogues,
    synthetic_records,
)
from fastsft.train.tiny import (
    BOS_ID,
    IM_END_ID,
    PAD_ID,
    VOCAB_SIZE,
    tiny_model,
    tiny_model_config,
    tiny_tokenizer,
)

# What each task's question must look like; the groups are its input.
QUESTION = {
    "add": re.compile(r"(?:What is|Compute|Calculate) (\d+) \+ (\d+)[?.]"),
    "sub": re.compile(r"(?:What is|Compute|Calculate) (\d+) - (\d+)[?.]"),
    "reverse": re.compile(r"(?:Reverse the word|Spell backwards:|Write in reverse:) ([a-z]+)\."),
    "sort": re.compile(r"(?:Sort ascending|Sort these digits|Put in order): (\d(?: \d)+)\."),
    "count_items": re.compile(r"(?:How many items|Count the items|How many are listed): ([a-z]+(?:, [a-z]+)+)[?.]"),
    "capital": re.compile(r"(?:What is the capital of|Name the capital of|Capital of) ([A-Z][a-z]+)[?.]"),
    "color": re.compile(r"(?:What color is the|Name the color of the|Color of the) ([a-z ]+)[?.]"),
}
KNOWN_FACTS = {
    "capital": {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Norway": "Oslo", "Egypt": "Cairo"},
    "color": {"banana": "yellow", "lime": "green", "cherry": "red", "grape": "purple", "blueberry": "blue"},
}


def parse(task: str, question: str) -> tuple:
    match = QUESTION[task].fullmatch(question)
    assert match, f"{task}: unexpected question {question!r}"
    return match.groups()


def expected_answer(task: str, question: str) -> str | None:
    """The answer recomputed from the question (None for lookups: those are checked against KNOWN_FACTS)."""
    groups = parse(task, question)
    if task == "add":
        return str(int(groups[0]) + int(groups[1]))
    if task == "sub":
        return str(int(groups[0]) - int(groups[1]))
    if task == "reverse":
        return groups[0][::-1]
    if task == "sort":
        return " ".join(sorted(groups[0].split(), key=int))
    if task == "count_items":
        return str(len(groups[0].split(", ")))
    return None


def canonical_input(task: str, question: str):
    """The input a held-out question must not share with any training question (lookups: the phrasing too)."""
    groups = parse(task, question)
    if task in ("add", "sub"):
        return tuple(int(g) for g in groups)
    if task == "sort":
        return tuple(sorted(groups[0].split()))  # the multiset: held-out sort answers are never trained
    if task == "count_items":
        return tuple(groups[0].split(", "))
    if task in ("capital", "color"):
        return question
    return groups[0]


@pytest.fixture(scope="module")
def train():
    return synthetic_dialogues(4000, seed=0)


@pytest.fixture(scope="module")
def heldout():
    return synthetic_dialogues(2000, seed=1, split="heldout")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def exchanges(dialogues):
    return [ex for d in dialogues for ex in d.exchanges]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def test_records_are_deterministic():
    a = synthetic_records(300, seed=3)
    assert a == synthetic_records(300, seed=3)
    assert a != synthetic_records(300, seed=4)
    assert a != synthetic_records(300, seed=3, split="heldout")
    assert synthetic_records(100, seed=3) == a[:100]  # a longer run extends a shorter one
    assert exact_match_items(50, seed=2) == exact_match_items(50, seed=2)


def test_records_are_chat_records(train):
    records = [d.record() for d in train]
    for record in records:
        assert set(record) == {"messages"}
        roles = [m["role"] for m in record["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"], ["user", "assistant"] * 2)
        assert all(isinstance(m["content"], str) and m["content"] for m in record["messages"])
    shape = Counter(len(r["messages"]) for r in records)
    assert 0.15 < shape[4] / len(records) < 0.35  # two exchanges
    assert 0.1 < shape[3] / len(records) < 0.3  # a system prompt


def test_every_family_is_present_with_correct_answers(train, heldout):
    for dialogues in (train, heldout):
        seen = Counter(ex.task for ex in exchanges(dialogues))
        assert set(seen) == set(TASKS)
        for family, tasks in FAMILIES.items():  # families get equal shares
            share = sum(seen[t] for t in tasks) / sum(seen.values())
            assert 0.15 < share < 0.25, (family, share)
        facts = defaultdict(set)
        for ex in exchanges(dialogues):
            want = expected_answer(ex.task, ex.question)
            if want is not None:
                assert ex.answer == want, ex
            else:
                entity = parse(ex.task, ex.question)[0]
                facts[ex.task, entity].add(ex.answer)
                assert KNOWN_FACTS[ex.task].get(entity, ex.answer) == ex.answer, ex
        assert all(len(answers) == 1 for answers in facts.values())  # one answer per entity, all phrasings
    for task, table in KNOWN_FACTS.items():  # the checked facts are actually asked
        assert {entity for t, entity in facts if t == task} >= set(table)


def test_heldout_is_disjoint_from_train(train, heldout):
    train_inputs = {(ex.task, canonical_input(ex.task, ex.question)) for ex in exchanges(train)}
    held = {(ex.task, canonical_input(ex.task, ex.question)) for ex in exchanges(heldout)}
    assert not train_inputs & held
    assert not {ex.question for ex in exchanges(train)} & {ex.question for ex in exchanges(heldout)}
    assert {task for task, _ in held} == set(TASKS)
    for split, dialogues in (("train", train), ("heldout", heldout)):
        assert all(split_of(ex.task, ex.key) == split for ex in exchanges(dialogues))
    # Hashed tasks hold out about a fifth of their inputs: count over every add/sub input there is.
    adds = [f"{a}+{b}" for a in range(10, 90) for b in range(10, 90) if a // 10 + b // 10 <= 9 and a % 10 + b % 10 <= 9]
    assert 0.15 < sum(split_of("add", k) == "heldout" for k in adds) / len(adds) < 0.25


def test_heldout_questions_are_answerable_from_train(train, heldout):
    """A held-out lookup is a known fact in a new phrasing; a held-out sum or difference combines column facts
    that training teaches."""
    train_ex, held_ex = exchanges(train), exchanges(heldout)
    for task in ("capital", "color"):
        trained = {parse(task, ex.question)[0] for ex in train_ex if ex.task == task}
        assert {parse(task, ex.question)[0] for ex in held_ex if ex.task == task} <= trained
    for task in ("add", "sub"):

        def columns(exs, task=task):
            pairs = [tuple(int(g) for g in parse(task, ex.question)) for ex in exs if ex.task == task]
            return {(a // 10, b // 10) for a, b in pairs} | {(a % 10, b % 10) for a, b in pairs}

        assert columns(held_ex) <= columns(train_ex)


def test_exact_match_items(heldout):
    items = exact_match_items(400, seed=1)
    assert len(items) == 400
    for (messages, answer), dialogue in zip(items, heldout[:400], strict=True):
        assert messages == dialogue.messages()[:-1] and messages[-1]["role"] == "user"
        last = dialogue.exchanges[-1]
        assert answer == last.answer and split_of(last.task, last.key) == "heldout"
        if len(dialogue.exchanges) == 2:  # the first reply is given, the second asked
            assert messages[1] == {"role": "assistant", "content": dialogue.exchanges[0].answer}


def test_score_exact_match():
    assert score_exact_match(["12", " a  b ", "x"], ["12", "a b", "y"]) == pytest.approx(2 / 3)
    assert score_exact_match(["Paris\n"], ["Paris"]) == 1.0
    assert score_exact_match(["paris"], ["Paris"]) == 0.0  # exact: case matters
    assert score_exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        score_exact_match(["1"], ["1", "2"])


def test_bad_arguments():
    with pytest.raises(ValueError):
        synthetic_records(3, seed=0, split="test")
    with pytest.raises(ValueError):
        synthetic_records(3, seed=0, tasks=["multiply"])
    assert {ex.task for d in synthetic_dialogues(50, seed=0, tasks=["sort"]) for ex in d.exchanges} == {"sort"}


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def test_tokenizer_is_deterministic_and_fresh():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a is not b
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.get_vocab() == b.get_vocab() and len(a) == VOCAB_SIZE
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (PAD_ID, BOS_ID, IM_END_ID)
    assert a.eos_token == "<|im_end|>" and a.convert_tokens_to_ids("<|im_start|>") not in (a.unk_token_id, None)
    a.add_tokens(["<|mine|>"])  # a caller's change does not leak into the next call
    assert len(tiny_tokenizer()) == VOCAB_SIZE


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of Peru?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not tokenizer.apply_chat_template(messages, tokenize=False).endswith("assistant\n")


def test_tokenizer_round_trips_every_record(tokenizer, train, heldout):
    specials = re.compile(r"<\|(?:bos|im_start|im_end)\|>")
    for dialogue in train + heldout:
        text = tokenizer.apply_chat_template(dialogue.messages(), tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id not in ids
        n_specials = len(specials.findall(text))
        assert len(ids) == len(specials.sub("", text)) + n_specials  # one token per character
        for message in dialogue.messages():
            content = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(content) == message["content"]
    assert tokenizer.decode(tokenizer("a  b .\n!", add_special_tokens=False)["input_ids"]) == "a  b .\n!"


# --------------------------------------------------------------------------------------------------
# fastsft.data
# --------------------------------------------------------------------------------------------------


def test_prepared_dataset_trains_exactly_the_answers(tmp_path, tokenizer):
    records = synthetic_records(1500, seed=0) + synthetic_records(500, seed=0, split="heldout")
    data = prepare_dataset(records, tokenizer, max_seq_len=MAX_TOKENS, cache_dir=tmp_path)
    report = data.report
    assert len(data) == len(records)
    assert report.truncated == report.dropped_too_long == report.dropped_no_response == 0
    assert int(data.lengths.max()) <= MAX_TOKENS  # the stated bound
    assert 40 < data.lengths.mean() < 90
    for i, record in enumerate(records):
        ids, trained = data[i]
        expected_ids = tokenizer.apply_chat_template(record["messages"], tokenize=True)["input_ids"]
        assert ids.tolist() == expected_ids
        # Each contiguous trained span is one assistant reply followed by <|im_end|>, and nothing else.
        edges = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(np.int8), [0]])))
        spans = [tokenizer.decode(ids[lo:hi]) for lo, hi in zip(edges[::2], edges[1::2], strict=True)]
        replies = [m["content"] + "<|im_end|>" for m in record["messages"] if m["role"] == "assistant"]
        assert spans == replies, (record, spans)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def test_tiny_model_size_and_config():
    """382,208 parameters: embeddings 101 x 128 (tied with the head) + 2 layers x (attention 49,152 +
    SwiGLU MLP 135,168 + norms 256) + the final norm 128."""
    model = tiny_model()
    n = sum(p.numel() for p in model.parameters())
    assert n == 382_208
    assert 300_000 < n < 500_000
    config = tiny_model_config(VOCAB_SIZE)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 128, 4)
    assert config.num_key_value_heads == 2 and config.tie_word_embeddings
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (IM_END_ID, PAD_ID)
    assert tiny_model(dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_tiny_model_forward_on_a_packed_batch(tmp_path, tokenizer):
    data = prepare_dataset(synthetic_records(64, seed=0), tokenizer, max_seq_len=MAX_TOKENS, cache_dir=tmp_path)
    step = next(PackedLoader(data, max_tokens=1024).steps(0))
    mb = step[0]
    model = tiny_model()
    logits = model(**mb.model_inputs()).logits
    assert logits.shape == (1, mb.num_tokens, VOCAB_SIZE)
    keep = mb.labels[0] != -100
    loss = torch.nn.functional.cross_entropy(logits[0][keep], mb.labels[0][keep])
    assert torch.isfinite(loss) and abs(loss.item() - math.log(VOCAB_SIZE)) < 0.5  # ~uniform at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_tiny_model_generates_until_im_end(tokenizer):
    messages, _ = exact_match_items(1, seed=0)[0]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = tiny_model().generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= prompt["input_ids"].shape[1] + 4
    assert isinstance(tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True), str)
