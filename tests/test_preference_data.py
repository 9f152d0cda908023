"""Preference pairs: TRL's four formats split into prompt and completions, token-exact masks on every side,
pairs stored two examples each and dropped whole, bad records named by file:line and field, the cache.

Expected splits and replies are written out by hand (and the implicit split is also compared with TRL's own
extract_prompt when trl is installed); the masks are checked by decoding the trained tokens.
"""

import json
import re
from collections import Counter

import numpy as np
import pytest
from _chat_tokenizers import STYLES, make_tokenizer

from fastsft.data import templates as templates_module
from fastsft.data.dataset import TokenizedDataset, prepare_dataset
from fastsft.data.formats import DataError
from fastsft.data.preference import (
    PreferenceDataset,
    PreferencePair,
    iter_preference_records,
    load_preference_records,
    prepare_preference_dataset,
)
from fastsft.data.templates import ResponseMasker

try:
    import pyarrow
    import pyarrow.parquet as pq
except ImportError:
    pq = None
try:
    import datasets
except ImportError:
    datasets = None

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is the capital of France?"}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# name -> (record, expected prompt, expected chosen completion, expected rejected completion)
FORMS = {
    "explicit-text": (
        {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " hello world"},
        "What is the capital of France?",
        " Paris.",
        " hello world",
    ),
    "explicit-conversational": (
        {
            "prompt": [SYSTEM, USER],
            "chosen": [assistant("The capital of France is Paris.")],
            "rejected": [assistant("Summarize this paragraph."), user("thanks!"), assistant("Sure - here you go.")],
        },
        [SYSTEM, USER],
        [assistant("The capital of France is Paris.")],
        [assistant("Summarize this paragraph."), user("thanks!"), assistant("Sure - here you go.")],
    ),
    "implicit-conversational": (
        {
            "chosen": [
                SYSTEM,
                USER,
                assistant("Paris."),
                user("Write Python code to sort a list."),
                assistant("sorted(xs)"),
            ],
            "rejected": [SYSTEM, USER, assistant("Paris."), user("Write Python code to sort a list."), assistant("10")],
        },
        [SYSTEM, USER, assistant("Paris."), user("Write Python code to sort a list.")],  # its reply is context
        [assistant("sorted(xs)")],
        [assistant("10")],
    ),
    "implicit-text": (
        {
            "chosen": "The weather tool says it is sunny and 21 degrees.",
            "rejected": "The weather tool says it is 10 degrees.",
        },
        "The weather tool says it is",  # TRL moves the space before the first difference into the replies
        " sunny and 21 degrees.",
        " 10 degrees.",
    ),
}


def sides_of(record) -> tuple:
    """(prompt, completion) as a Record holds them."""
    if record.kind == "messages":
        return record.messages[: record.first_trainable], record.messages[record.first_trainable :]
    return record.prompt, record.completion


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_format_splits_into_prompt_and_completions(form):
    row, prompt, chosen, rejected = FORMS[form]
    (pair,), report = load_preference_records([row])
    assert isinstance(pair, PreferencePair) and pair.location == "records[0]"
    assert pair.implicit_prompt == form.startswith("implicit")
    kind = "prompt_completion" if isinstance(prompt, str) else "messages"
    assert pair.chosen.kind == pair.rejected.kind == kind
    assert sides_of(pair.chosen) == (prompt, chosen)
    assert sides_of(pair.rejected) == (prompt, rejected)
    assert report.records_read == 1 and report.formats == {"records": "preference"}


@pytest.mark.parametrize(
    "chosen, rejected",
    [
        ("The sky is blue.", "The sky is green."),
        ("abc", "abcd"),  # one a prefix of the other: its last character goes back to both replies
        ("Paris", "London"),  # nothing shared: an empty prompt
        ("2 + 2 = 4", "2 + 2 = 5"),
        ([USER, assistant("Paris.")], [USER, assistant("London.")]),
        ([USER, assistant("Paris.")], [USER, assistant("Paris."), user("thanks!"), assistant("Sure")]),
    ],
)
def test_implicit_split_is_trls(chosen, rejected):
    data_utils = pytest.importorskip("trl.data_utils")
    trl = data_utils.extract_prompt({"chosen": chosen, "rejected": rejected})
    (pair,), _ = load_preference_records([{"chosen": chosen, "rejected": rejected}])
    assert sides_of(pair.chosen) == (trl["prompt"], trl["chosen"])
    assert sides_of(pair.rejected) == (trl["prompt"], trl["rejected"])


def trained_runs(trained: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of True."""
    padded = np.concatenate([[False], trained, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def check_sequence(style_name, tokenizer, prompt, completion, ids, trained):
    """The sequence is exactly the tokenization of prompt + completion, and its trained tokens decode to the
    completion's replies (each with its end-of-turn token) and nothing else."""
    style = STYLES[style_name]
    ids = ids.tolist()
    runs = trained_runs(trained)
    if isinstance(prompt, str):
        assert ids == tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
        ((a, b),) = runs
        assert b == len(ids)
        assert tokenizer.decode(ids[:a], skip_special_tokens=True) == prompt
        assert tokenizer.decode(ids[a:]) == completion + tokenizer.eos_token
        return
    rendered = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    replies = [m["content"] for m in completion if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for (a, b), reply in zip(runs, replies, strict=True):
        before = tokenizer.decode(ids[:a])
        assert before.endswith(style.reply_header)
        assert tokenizer.decode(ids[:b]) == before + style.reply_text(reply)


STYLE_FORMS = [(style, form) for form in sorted(FORMS) if "conversational" in form for style in sorted(STYLES)]
# Plain text through the byte-level tokenizers (a metaspace tokenizer decodes a mid-text span without its space).
STYLE_FORMS += [(style, form) for form in sorted(FORMS) if "text" in form for style in ("chatml", "llama3")]


@pytest.mark.parametrize("style, form", STYLE_FORMS)
def test_masks_are_token_exact_on_both_sides(tmp_path, style, form):
    row, prompt, chosen, rejected = FORMS[form]
    tokenizer = make_tokenizer(style)
    data = prepare_preference_dataset([row], tokenizer, cache_dir=tmp_path)
    assert isinstance(data, PreferenceDataset) and len(data) == 2 and data.num_pairs == 1
    check_sequence(style, tokenizer, prompt, chosen, *data[0])
    check_sequence(style, tokenizer, prompt, rejected, *data[1])


def test_examples_come_in_pairs_chosen_then_rejected(tmp_path):
    tokenizer = make_tokenizer("chatml")
    rows = [FORMS[form][0] for form in sorted(FORMS)] * 3
    pairs, _ = load_preference_records(rows)
    masker = ResponseMasker(tokenizer)
    expected = masker.encode([record for pair in pairs for record in (pair.chosen, pair.rejected)])
    data = prepare_preference_dataset(rows, tokenizer, cache_dir=tmp_path / "a")
    small_chunks = prepare_preference_dataset(rows, tokenizer, cache_dir=tmp_path / "b", chunk_size=1)
    assert len(data) == 2 * len(rows) and data.num_pairs == data.report.pairs == len(rows)
    for i, (ids, trained) in enumerate(expected):  # example 2i: pair i's chosen, 2i + 1: its rejected
        for dataset in (data, small_chunks):
            assert dataset[i][0].tolist() == ids.tolist() and dataset[i][1].tolist() == trained.tolist()
    for i in range(len(rows)):
        chosen, rejected = data.pair(i)
        assert chosen[0].tolist() == expected[2 * i][0].tolist()
        assert rejected[0].tolist() == expected[2 * i + 1][0].tolist()
    with pytest.raises(IndexError):
        data.pair(len(rows))
    assert data.lengths.tolist() == [len(ids) for ids, _ in expected]
    assert data.report.records == len(rows) and data.report.examples == 2 * len(rows)
    assert data.report.trained_tokens == sum(int(t[1:].sum()) for _, t in expected)
    assert data.meta["pairs"] is True
    assert data.report.summary().startswith(f"{len(rows)} pairs ({2 * len(rows)} sequences")


def explicit(reply_chosen, reply_rejected, prompt=(USER,)):
    return {"prompt": list(prompt), "chosen": [assistant(reply_chosen)], "rejected": [assistant(reply_rejected)]}


def test_a_pair_with_one_side_too_long_is_dropped_whole(tmp_path):
    tokenizer = make_tokenizer("chatml")
    rows = [
        explicit("Paris.", "London."),
        explicit("Paris.", "The capital of France is Paris. " * 20),  # only its rejected side is too long
        explicit("The capital of France is Paris.", "hello world"),
    ]
    pairs, _ = load_preference_records(rows)
    encoded = ResponseMasker(tokenizer).encode([r for p in pairs for r in (p.chosen, p.rejected)])
    limit = max(len(encoded[k][0]) for k in (0, 1, 2, 4, 5))
    assert len(encoded[3][0]) > limit
    data = prepare_preference_dataset(rows, tokenizer, max_seq_len=limit, truncation="drop", cache_dir=tmp_path)
    assert data.num_pairs == 2 and data.report.records == 3
    assert [ids.tolist() for ids, _ in (data[0], data[1], data[2], data[3])] == [
        encoded[k][0].tolist()
        for k in (0, 1, 4, 5)  # pair 1 is gone, both sides
    ]
    report = data.report
    assert report.dropped_too_long == 1 and report.dropped_no_response == 0 and report.truncated == 0
    assert report.dropped_sides == {"rejected too long": 1}
    assert "1 pairs dropped as too long (1 rejected)" in report.summary()

    # The same data truncated on the right keeps the pair, its long side cut to the limit.
    kept = prepare_preference_dataset(rows, tokenizer, max_seq_len=limit, cache_dir=tmp_path)
    assert kept.num_pairs == 3 and kept.report.truncated == 1 and kept.report.dropped_too_long == 0
    ids, trained = kept[3]
    assert ids.tolist() == encoded[3][0][:limit].tolist() and trained.tolist() == encoded[3][1][:limit].tolist()


def test_a_pair_with_one_side_left_without_a_reply_is_dropped_whole(tmp_path):
    tokenizer = make_tokenizer("chatml")
    # The rejected completion opens with a long user turn, so its reply starts far later than the chosen one.
    long_turn = {
        "prompt": [USER],
        "chosen": [assistant("Paris.")],
        "rejected": [user("thanks! " * 40), assistant("Sure")],
    }
    rows = [explicit("Paris.", "London."), long_turn]
    pairs, _ = load_preference_records(rows)
    encoded = ResponseMasker(tokenizer).encode([r for p in pairs for r in (p.chosen, p.rejected)])
    limit = max(len(encoded[k][0]) for k in (0, 1, 2))
    assert int(np.flatnonzero(encoded[3][1])[0]) >= limit  # nothing of the rejected reply fits
    data = prepare_preference_dataset(rows, tokenizer, max_seq_len=limit, cache_dir=tmp_path)
    assert data.num_pairs == 1 and data[1][0].tolist() == encoded[1][0].tolist()
    assert data.report.dropped_no_response == 1 and data.report.dropped_sides == {"rejected no response": 1}
    assert "1 pairs dropped with no response tokens left (1 rejected)" in data.report.summary()


def test_nothing_left_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no examples left"):
        prepare_preference_dataset(
            [explicit("Paris.", "London.")], make_tokenizer("chatml"), max_seq_len=4, cache_dir=tmp_path
        )


GOOD = explicit("Paris.", "London.")
# name -> (bad record, field named, category, reason pattern)
BAD = {
    "identical-text": (
        {"prompt": "Q", "chosen": " A", "rejected": " A"},
        "rejected",
        "identical",
        "identical to chosen",
    ),
    "identical-conversations": (
        {"chosen": [USER, assistant("A")], "rejected": [USER, assistant("A")]},
        "rejected",
        "identical",
        "identical to chosen",
    ),
    "empty-chosen-text": (
        {"prompt": "Q", "chosen": "  ", "rejected": " A"},
        "chosen",
        "empty completion",
        "whitespace",
    ),
    "empty-rejected-list": (
        {"prompt": [USER], "chosen": [assistant("A")], "rejected": []},
        "rejected",
        "empty completion",
        "empty",
    ),
    "empty-implicit-text-reply": ({"chosen": "abc ", "rejected": "abc x"}, "chosen", "empty completion", "shared"),
    "no-assistant-turn": (
        {"prompt": [SYSTEM], "chosen": [USER], "rejected": [assistant("A")]},
        "chosen",
        "no assistant turn",
        "no assistant message",
    ),
    "empty-reply": (
        {"prompt": [USER], "chosen": [assistant("A")], "rejected": [assistant(" ")]},
        "rejected[0].content",
        "empty reply",
        "empty assistant reply",
    ),
    "prompt-differs": (
        {"chosen": [user("A?"), assistant("X")], "rejected": [user("B?"), assistant("Y")]},
        "chosen[0]",
        "prompt differs",
        "the prompt differs between chosen and rejected",
    ),
    "system-differs": (
        {"chosen": [SYSTEM, USER, assistant("X")], "rejected": [user("B?"), USER, assistant("Y")]},
        "chosen[0]",
        "prompt differs",
        "the prompt differs between chosen and rejected",
    ),
    "conversation-cut-before-its-reply": (
        {"chosen": [USER, assistant("A"), user("B?")], "rejected": [USER, assistant("A"), user("B?"), assistant("C")]},
        "chosen",
        "no assistant turn",
        "the start of rejected, ending before a reply",
    ),
    "string-and-list": ({"chosen": "A", "rejected": [USER, assistant("A")]}, "rejected", "wrong type", "both must be"),
    "list-prompt-string-replies": (
        {"prompt": [USER], "chosen": "A", "rejected": "B"},
        "prompt",
        "wrong type",
        "all three",
    ),
    "string-prompt-lost": (
        {"prompt": "Q", "chosen": [assistant("A")], "rejected": [assistant("B")]},
        "prompt",
        "wrong type",
        "would be lost",
    ),
    "number": ({"prompt": "Q", "chosen": 4, "rejected": "5"}, "chosen", "wrong type", "got a number"),
    "bad-role": (
        {"prompt": [USER], "chosen": [{"role": "bot", "content": "A"}], "rejected": [assistant("B")]},
        "chosen[0].role",
        "unknown role",
        "unknown role 'bot'",
    ),
    "missing-rejected": ({"prompt": "Q", "chosen": " A"}, "rejected", "missing field", "missing"),
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_records_name_file_line_and_field_and_are_counted_when_skipped(tmp_path, case):
    bad, field, category, reason = BAD[case]
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as raised:
        load_preference_records(path)
    error = raised.value
    assert error.location == f"{path}:2" and error.field == field and error.category == category
    assert re.search(reason, error.reason), error.reason
    assert str(error).startswith(f"{path}:2: field '{field}': ")

    pairs, report = load_preference_records(path, on_bad_record="skip")
    assert [pair.location for pair in pairs] == [f"{path}:1", f"{path}:3"]
    assert report.skipped == Counter({category: 1}) and report.records_read == 2
    assert report.examples[category] == [str(error)]


def test_skipped_pairs_are_counted_in_the_tokenized_report(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD, BAD["identical-text"][0], BAD["prompt-differs"][0], GOOD])
    data = prepare_preference_dataset(path, make_tokenizer("chatml"), on_bad_record="skip", cache_dir=tmp_path)
    assert data.num_pairs == 2 and data.report.records == 4 and data.report.skipped_bad_records == 2
    assert data.report.skipped_reasons == {"identical": 1, "prompt differs": 1}
    assert "2 bad records skipped" in data.report.summary()


@pytest.mark.parametrize(
    "row, field",
    [
        (explicit("<|im_end|>", "Paris."), "chosen[0]"),
        (explicit("Paris.", "<|im_end|>", prompt=(SYSTEM, USER)), "rejected[0]"),
        ({"chosen": [USER, assistant("<|im_end|>")], "rejected": [USER, assistant("Paris.")]}, "chosen[1]"),
    ],
    ids=["explicit-chosen", "explicit-rejected", "implicit"],
)
def test_masking_errors_name_the_side_and_its_message(tmp_path, row, field):
    """A reply that renders to nothing but an end-of-turn token fails in the masker, which numbers the messages
    of the rendered conversation (prompt + completion): the error names the field as the record spells it."""
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD, row, GOOD])
    tokenizer = make_tokenizer("chatml")
    with pytest.raises(DataError) as raised:
        prepare_preference_dataset(path, tokenizer, cache_dir=tmp_path / "c1")
    assert raised.value.location == f"{path}:2" and raised.value.field == field
    assert raised.value.category == "empty reply"
    data = prepare_preference_dataset(path, tokenizer, on_bad_record="skip", cache_dir=tmp_path / "c2")
    assert data.num_pairs == 2 and data.report.records == 3 and data.report.skipped_reasons == {"empty reply": 1}


def test_template_errors_name_the_side(tmp_path):
    tokenizer = make_tokenizer("mistral")  # its template rejects non-alternating roles
    row = {"prompt": [USER, USER], "chosen": [assistant("A")], "rejected": [assistant("B")]}
    with pytest.raises(DataError, match=r"records\[0\]: field 'chosen': the chat template failed"):
        prepare_preference_dataset([row], tokenizer, cache_dir=tmp_path)


def test_arguments_and_source_are_checked_at_the_call():
    with pytest.raises(ValueError, match="on_bad_record"):
        iter_preference_records([GOOD], on_bad_record="ignore")
    with pytest.raises(TypeError, match="unsupported data source dict"):
        iter_preference_records(GOOD)
    with pytest.raises(DataError, match="all 1 records were skipped: 1 identical"):
        load_preference_records([BAD["identical-text"][0]], on_bad_record="skip")
    with pytest.raises(DataError, match="no records: the source is empty"):
        load_preference_records([])


def count_encodes(monkeypatch):
    calls = []
    original = templates_module.ResponseMasker.encode

    def counting(self, records):
        calls.append(len(records))
        return original(self, records)

    monkeypatch.setattr(templates_module.ResponseMasker, "encode", counting)
    return calls


def test_cache_is_reused_and_not_the_sft_cache_of_the_same_file(tmp_path, monkeypatch):
    # Records that are both SFT prompt/completion data and preference data: the same file, two objectives.
    rows = [{"prompt": f"Q{i}: What is 2 + 2?", "completion": " 4", "chosen": " 4", "rejected": " 5"} for i in range(5)]
    path = write_jsonl(tmp_path / "both.jsonl", rows)
    cache = tmp_path / "cache"
    calls = count_encodes(monkeypatch)
    first = prepare_preference_dataset(path, make_tokenizer("chatml"), cache_dir=cache)
    assert calls == [10], "one batched call, both sides of five pairs"
    calls.clear()
    second = prepare_preference_dataset(path, make_tokenizer("chatml"), cache_dir=cache)
    assert calls == [] and second.path == first.path and isinstance(second, PreferenceDataset)
    assert isinstance(second.tokens, np.memmap) and second.tokens.tolist() == first.tokens.tolist()
    assert second.report == first.report

    sft = prepare_dataset(path, make_tokenizer("chatml"), cache_dir=cache)
    assert calls == [5] and sft.path != first.path and len(sft) == 5
    assert "pairs" not in sft.meta and first.meta["pairs"] is True
    assert first.meta["settings"]["objective"] == "preference" and "objective" not in sft.meta["settings"]
    with pytest.raises(ValueError, match="not a preference cache"):
        PreferenceDataset(sft.path)
    assert TokenizedDataset(first.path).meta["pairs"] is True  # a plain loader can see what it holds

    calls.clear()
    prepare_preference_dataset(path, make_tokenizer("chatml"), cache_dir=cache, truncation="drop")
    assert calls, "another option is another cache"


def test_one_shot_iterator_source(tmp_path):
    rows = [FORMS["implicit-conversational"][0], FORMS["explicit-text"][0]]
    data = prepare_preference_dataset(iter(rows), make_tokenizer("chatml"), cache_dir=tmp_path)
    assert data.num_pairs == 2


@pytest.mark.skipif(pq is None, reason="pyarrow is not installed")
def test_parquet_source(tmp_path):
    rows = [FORMS["explicit-conversational"][0], explicit("Paris.", "London."), explicit("A", "A")]
    path = tmp_path / "prefs.parquet"
    pq.write_table(pyarrow.Table.from_pylist(rows), path)
    tokenizer = make_tokenizer("chatml")
    with pytest.raises(DataError, match=r"prefs\.parquet row 2: field 'rejected': identical"):
        prepare_preference_dataset(path, tokenizer, cache_dir=tmp_path)
    data = prepare_preference_dataset(path, tokenizer, on_bad_record="skip", cache_dir=tmp_path)
    from_list = prepare_preference_dataset(rows[:2], tokenizer, cache_dir=tmp_path)
    assert data.num_pairs == 2 and data.tokens.tolist() == from_list.tokens.tolist()
    assert data.trained.tolist() == from_list.trained.tolist()


@pytest.mark.skipif(datasets is None, reason="datasets is not installed")
def test_datasets_source(tmp_path):
    rows = [FORMS["implicit-conversational"][0], FORMS["implicit-conversational"][0]]
    rows[1] = {
        "chosen": rows[1]["chosen"][:2] + [assistant("Paris.")],
        "rejected": rows[1]["chosen"][:2] + [assistant("London.")],
    }
    tokenizer = make_tokenizer("chatml")
    data = prepare_preference_dataset(datasets.Dataset.from_list(rows), tokenizer, cache_dir=tmp_path)
    from_list = prepare_preference_dataset(rows, tokenizer, cache_dir=tmp_path)
    assert data.num_pairs == 2 and data.tokens.tolist() == from_list.tokens.tolist()
    (pair, _), _ = load_preference_records(datasets.Dataset.from_list(rows))
    assert pair.location == "dataset[0]" and pair.implicit_prompt
