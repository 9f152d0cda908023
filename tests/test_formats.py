"""fastsft.data.formats: every format from every source kind, aliases, overrides, and every bad input reported
with its file, line and field (error mode) or counted by reason (skip mode)."""

import gzip
import json
import sys
from collections import Counter

import pytest

from fastsft.data.formats import FORMAT_NAMES, DataError, LoadReport, Record, iter_records, load_records

# Parquet and datasets.Dataset sources are optional extras of fastsft: their tests skip without the library.
try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None
try:
    import datasets
except ImportError:
    datasets = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed")
needs_datasets = pytest.mark.skipif(datasets is None, reason="datasets is not installed")

# --- one good example per format: the rows as users write them, and the records they must become -------------

CASES = {
    "chat": (
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                ]
            },
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "id": 7},
        ],
        [
            {
                "kind": "messages",
                "first_trainable": 0,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                ],
            },
            {
                "kind": "messages",
                "first_trainable": 0,
                "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            },
        ],
    ),
    "sharegpt": (
        [
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {
                "conversations": [
                    {"from": "system", "value": "Sys"},
                    {"from": "user", "value": "Q"},
                    {"from": "assistant", "value": "A"},
                ]
            },
        ],
        [
            {
                "kind": "messages",
                "first_trainable": 0,
                "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            },
            {
                "kind": "messages",
                "first_trainable": 0,
                "messages": [
                    {"role": "system", "content": "Sys"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ],
            },
        ],
    ),
    "prompt_completion": (
        [{"prompt": "2+2=", "completion": "4"}, {"prompt": "", "completion": " five", "source": "x"}],
        [
            {"kind": "prompt_completion", "prompt": "2+2=", "completion": "4"},
            {"kind": "prompt_completion", "prompt": "", "completion": " five"},
        ],
    ),
    "alpaca": (
        [
            {"instruction": "Add.", "input": "2+2", "output": "4", "system": "Be terse."},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        ],
        [
            {
                "kind": "messages",
                "first_trainable": 0,
                "messages": [
                    {"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "Add.\n\n2+2"},
                    {"role": "assistant", "content": "4"},
                ],
            },
            {
                "kind": "messages",
                "first_trainable": 0,
                "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
            },
        ],
    ),
    "text": (
        [{"text": "Once upon a time"}, {"text": "  indented\n", "meta": "m"}],
        [{"kind": "text", "text": "Once upon a time"}, {"kind": "text", "text": "  indented\n"}],
    ),
    "tokenized": (
        [{"input_ids": [1, 5, 9, 0], "labels": [-100, -100, 9, 0]}, {"input_ids": [3, 4], "labels": None}],
        [
            {"kind": "tokens", "input_ids": [1, 5, 9, 0], "labels": [-100, -100, 9, 0]},
            {"kind": "tokens", "input_ids": [3, 4], "labels": None},
        ],
    ),
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def make_source(kind, tmp_path, rows):
    """(source, location of row i) for each source kind."""
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "train.jsonl", rows)
        return path, lambda i: f"{path}:{i + 1}"
    if kind == "jsonl.gz":
        path = tmp_path / "train.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))
        return path, lambda i: f"{path}:{i + 1}"
    if kind == "json":
        path = tmp_path / "train.json"
        path.write_text(json.dumps(rows))
        return str(path), lambda i: f"{path}[{i}]"
    if kind == "parquet":
        path = tmp_path / "train.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path, lambda i: f"{path} row {i}"
    if kind == "list":
        return rows, lambda i: f"records[{i}]"
    if kind == "dataset":
        return datasets.Dataset.from_list(rows), lambda i: f"dataset[{i}]"
    raise AssertionError(kind)


SOURCE_KINDS = [
    "jsonl",
    "jsonl.gz",
    "json",
    pytest.param("parquet", marks=needs_pyarrow),
    "list",
    pytest.param("dataset", marks=needs_datasets),
]


@pytest.mark.parametrize("source_kind", SOURCE_KINDS)
@pytest.mark.parametrize("format_name", list(CASES))
def test_every_format_from_every_source(tmp_path, format_name, source_kind):
    rows, expected = CASES[format_name]
    source, location = make_source(source_kind, tmp_path, rows)
    records, report = load_records(source)
    assert [Record(location=location(i), **fields) for i, fields in enumerate(expected)] == records
    assert report.records_read == len(rows) and report.records_skipped == 0
    assert list(report.formats.values()) == [format_name]


def test_format_names_are_the_documented_ones():
    assert set(FORMAT_NAMES) == set(CASES)


def test_report_accumulates_over_sources(tmp_path):
    report = LoadReport()
    path = write_jsonl(tmp_path / "a.jsonl", CASES["chat"][0])
    list(iter_records(path, report=report))
    list(iter_records(CASES["text"][0], report=report))
    assert report.records_read == 4
    assert report.formats == {str(path): "chat", "records": "text"}
    assert report.summary() == f"read 4 records ({path}: chat, records: text)"


# --- messages: aliases, content parts, tool calls, prompt/completion lists ------------------------------------


def chat(*messages, **extra):
    return {"messages": list(messages), **extra}


def test_developer_role_is_system():
    [record], _ = load_records([chat({"role": "developer", "content": "D"}, {"role": "assistant", "content": "A"})])
    assert record.messages == [{"role": "system", "content": "D"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize(
    "name, role",
    [
        ("human", "user"),
        ("user", "user"),
        ("gpt", "assistant"),
        ("assistant", "assistant"),
        ("chatgpt", "assistant"),
        ("model", "assistant"),
        ("function_call", "assistant"),
        ("system", "system"),
        ("tool", "tool"),
        ("function", "tool"),
        ("observation", "tool"),
    ],
)
def test_sharegpt_role_aliases(name, role):
    turns = [{"from": name, "value": "x"}, {"from": "gpt", "value": "y"}]
    [record], _ = load_records([{"conversations": turns}])
    assert record.messages[0] == {"role": role, "content": "x"}


def test_text_parts_are_joined():
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    [record], _ = load_records([chat({"role": "user", "content": parts}, {"role": "assistant", "content": "Hi"})])
    assert record.messages[0] == {"role": "user", "content": "Hello, world"}


def test_tool_calls_pass_through_and_null_content_becomes_empty():
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]
    row = chat(
        {"role": "user", "content": "1+?"},
        {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "content": "1", "tool_call_id": "c1", "name": "add"},
        {"role": "assistant", "tool_calls": call},
    )
    [record], _ = load_records([row])
    assert record.messages[1] == {"role": "assistant", "content": "", "tool_calls": call}
    assert record.messages[2] == {"role": "tool", "content": "1", "tool_call_id": "c1", "name": "add"}
    assert record.messages[3] == {"role": "assistant", "content": "", "tool_calls": call}


@needs_pyarrow
def test_columnar_nulls_are_not_passed_through(tmp_path):
    # Parquet gives every message every key of the column: the user message gets name=None.
    rows = [chat({"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "name": "bot"})]
    source, _ = make_source("parquet", tmp_path, rows)
    [record], _ = load_records(source)
    assert record.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "name": "bot"}]


def test_prompt_completion_as_messages_marks_first_trainable():
    prompt = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    completion = [{"role": "assistant", "content": "A2"}]
    [record], report = load_records([{"prompt": prompt, "completion": completion}])
    assert record.kind == "messages" and record.first_trainable == 4
    assert record.messages == prompt + completion
    assert report.formats == {"records": "prompt_completion"}


def test_empty_prompt_list_trains_from_the_start():
    [record], _ = load_records([{"prompt": [], "completion": [{"role": "assistant", "content": "A"}]}])
    assert record.first_trainable == 0 and record.messages == [{"role": "assistant", "content": "A"}]


def test_tokens_without_labels_field():
    [record], _ = load_records([{"input_ids": [7, 8]}])
    assert record == Record(kind="tokens", location="records[0]", input_ids=[7, 8], labels=None)


def test_record_checks_its_kind():
    with pytest.raises(ValueError, match="kind 'text' needs 'text'"):
        Record(kind="text", location="x")
    with pytest.raises(ValueError, match="has no 'prompt'"):
        Record(kind="text", location="x", text="a", prompt="b")
    with pytest.raises(ValueError, match="unknown Record kind"):
        Record(kind="chat", location="x")


# --- format detection and override ----------------------------------------------------------------------------


def test_detection_prefers_the_more_specific_format():
    both = {"messages": [{"role": "assistant", "content": "A"}], "text": "T", "input_ids": [1]}
    [record], report = load_records([both])
    assert record.kind == "messages" and report.formats == {"records": "chat"}
    [record], _ = load_records([{"text": "T", "input_ids": [1]}])
    assert record.kind == "tokens"


def test_format_override():
    both = {"messages": [{"role": "assistant", "content": "A"}], "text": "T"}
    [record], report = load_records([both], format="text")
    assert record == Record(kind="text", location="records[0]", text="T")
    assert report.formats == {"records": "text"}


def test_format_override_missing_field_names_the_override(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": []}])
    with pytest.raises(DataError) as caught:
        load_records(path, format="text")
    assert str(caught.value) == f"{path}:1: field 'text': missing (format text, given as format='text')"


def test_unknown_format_lists_the_formats():
    with pytest.raises(ValueError, match="unknown format 'openai'.*chat, sharegpt, prompt_completion, alpaca"):
        iter_records([{"text": "a"}], format="openai")


def test_unknown_on_bad_record():
    with pytest.raises(ValueError, match="on_bad_record must be 'error' or 'skip', got 'warn'"):
        iter_records([{"text": "a"}], on_bad_record="warn")


def test_detection_failure_lists_keys_seen_and_formats(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as caught:
        load_records(path, on_bad_record="skip")  # not skippable: the file's format is unknown
    message = str(caught.value)
    assert message.startswith(f"{path}:1: cannot detect the format from the keys ['answer', 'question']")
    for keys in (
        "chat {messages}",
        "sharegpt {conversations}",
        "prompt_completion {prompt, completion}",
        "alpaca {instruction, output}",
        "tokenized {input_ids}",
        "text {text}",
        "format=",
    ):
        assert keys in message


def test_detection_uses_the_first_object_when_earlier_lines_are_skipped(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ["{broken", "[1]", json.dumps({"text": "a"})])
    records, report = load_records(path, on_bad_record="skip")
    assert [r.text for r in records] == ["a"] and report.formats == {str(path): "text"}


# --- sources ----------------------------------------------------------------------------------------------------


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"train\.csv: unsupported file extension \(supported: .jsonl, .*parquet"):
        iter_records(path)


def test_missing_file_is_reported_at_the_call(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        iter_records(tmp_path / "nope.jsonl")


def test_json_must_be_a_top_level_list(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"data": [{"text": "a"}]}))
    with pytest.raises(DataError, match=r"t\.json: expected a top-level JSON list of records, got an object"):
        load_records(path)


def test_json_lines_in_a_json_file_gets_a_hint(tmp_path):
    path = write_jsonl(tmp_path / "t.json", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"invalid JSON at line 2 column 1: Extra data; .*name the file \.jsonl"):
        load_records(path)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes `import pyarrow.parquet` fail
    with pytest.raises(ImportError, match="reading .parquet files needs pyarrow: pip install pyarrow"):
        load_records(path)


@needs_pyarrow
def test_unreadable_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"t\.parquet: cannot read as Parquet"):
        load_records(path)


def test_unsupported_source_type():
    with pytest.raises(TypeError, match="unsupported data source int"):
        iter_records(3)
    with pytest.raises(TypeError, match="unsupported data source dict"):
        iter_records({"text": "a"})  # one record, not a list of them


# --- bad records: error mode names file, line and field; skip mode counts by reason -----------------------------

GOOD_FIRST = {
    "chat": chat({"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}),
    "sharegpt": {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    "prompt_completion": {"prompt": "Q", "completion": "A"},
    "alpaca": {"instruction": "Q", "output": "A"},
    "text": {"text": "T"},
    "tokenized": {"input_ids": [1, 2]},
}
USER = {"role": "user", "content": "Q"}
ASSISTANT = {"role": "assistant", "content": "A"}

# (format of the file, the bad line, field, reason (exact), category)
BAD_RECORDS = {
    "invalid JSON": ("chat", '{"messages": [', None, "invalid JSON: Expecting value (column 15)", "invalid JSON"),
    "not an object": ("chat", "[1, 2]", None, "expected a JSON object, got a list", "not an object"),
    "missing field": (
        "chat",
        json.dumps({"text": "T"}),
        "messages",
        "missing (format chat, detected from {path}:1)",
        "missing field",
    ),
    "messages not a list": (
        "chat",
        json.dumps({"messages": "hi"}),
        "messages",
        "expected a list of messages, got a string",
        "wrong type",
    ),
    "message not an object": (
        "chat",
        json.dumps(chat(USER, "A")),
        "messages[1]",
        "expected a message object, got a string",
        "wrong type",
    ),
    "role missing": (
        "chat",
        json.dumps(chat({"content": "Q"}, ASSISTANT)),
        "messages[0].role",
        "missing",
        "missing field",
    ),
    "role not a string": (
        "chat",
        json.dumps(chat({"role": 1, "content": "Q"}, ASSISTANT)),
        "messages[0].role",
        "expected a string, got a number",
        "wrong type",
    ),
    "content missing": (
        "chat",
        json.dumps(chat(USER, {"role": "assistant"})),
        "messages[1].content",
        "missing",
        "missing field",
    ),
    "content null": (
        "chat",
        json.dumps(chat(USER, {"role": "assistant", "content": None})),
        "messages[1].content",
        "expected a string or a list of text parts, got null",
        "wrong type",
    ),
    "content a number": (
        "chat",
        json.dumps(chat(USER, {"role": "assistant", "content": 4})),
        "messages[1].content",
        "expected a string or a list of text parts, got a number",
        "wrong type",
    ),
    "unknown role": (
        "chat",
        json.dumps(chat(USER, ASSISTANT, {"role": "bot", "content": "x"})),
        "messages[2].role",
        "unknown role 'bot' (known: system, user, assistant, tool; aliases: developer, model, ipython, function)",
        "unknown role",
    ),
    "image part": (
        "chat",
        json.dumps(chat({"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}, ASSISTANT)),
        "messages[0].content[0].type",
        "unsupported content part type 'image_url': only text parts are supported (no images)",
        "unsupported content",
    ),
    "text part without text": (
        "chat",
        json.dumps(chat({"role": "user", "content": [{"type": "text"}]}, ASSISTANT)),
        "messages[0].content[0].text",
        "expected a string, got null",
        "wrong type",
    ),
    "empty conversation": ("chat", json.dumps(chat()), "messages", "empty conversation", "empty conversation"),
    "no assistant turn": (
        "chat",
        json.dumps(chat(USER)),
        "messages",
        "no assistant message: nothing to train on",
        "no assistant turn",
    ),
    "sharegpt unknown from": (
        "sharegpt",
        json.dumps({"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}),
        "conversations[1].from",
        "unknown role 'bot' (known: human, user, gpt, assistant, chatgpt, model, function_call, system, tool, "
        "function, observation)",
        "unknown role",
    ),
    "sharegpt no assistant": (
        "sharegpt",
        json.dumps({"conversations": [{"from": "human", "value": "Q"}]}),
        "conversations",
        "no assistant message: nothing to train on",
        "no assistant turn",
    ),
    "sharegpt value missing": (
        "sharegpt",
        json.dumps({"conversations": [{"from": "gpt"}]}),
        "conversations[0].value",
        "missing",
        "missing field",
    ),
    "prompt_completion mixed": (
        "prompt_completion",
        json.dumps({"prompt": "Q", "completion": [ASSISTANT]}),
        "completion",
        "a list but prompt is a string: both must be strings or both message lists",
        "wrong type",
    ),
    "prompt_completion number": (
        "prompt_completion",
        json.dumps({"prompt": 3, "completion": "A"}),
        "prompt",
        "expected a string or a list of messages, got a number",
        "wrong type",
    ),
    "prompt_completion empty completion": (
        "prompt_completion",
        json.dumps({"prompt": "Q", "completion": ""}),
        "completion",
        "empty",
        "empty text",
    ),
    "prompt_completion no assistant": (
        "prompt_completion",
        json.dumps({"prompt": [USER], "completion": [USER]}),
        "completion",
        "no assistant message: nothing to train on",
        "no assistant turn",
    ),
    "prompt_completion bad prompt role": (
        "prompt_completion",
        json.dumps({"prompt": [{"role": "bot", "content": "Q"}], "completion": [ASSISTANT]}),
        "prompt[0].role",
        "unknown role 'bot' (known: system, user, assistant, tool; aliases: developer, model, ipython, function)",
        "unknown role",
    ),
    "alpaca missing output": (
        "alpaca",
        json.dumps({"instruction": "Q"}),
        "output",
        "missing (format alpaca, detected from {path}:1)",
        "missing field",
    ),
    "alpaca empty output": (
        "alpaca",
        json.dumps({"instruction": "Q", "output": " "}),
        "output",
        "whitespace only",
        "no assistant turn",
    ),
    "alpaca input a list": (
        "alpaca",
        json.dumps({"instruction": "Q", "input": ["x"], "output": "A"}),
        "input",
        "expected a string, got a list",
        "wrong type",
    ),
    "empty text": ("text", json.dumps({"text": ""}), "text", "empty", "empty text"),
    "text not a string": ("text", json.dumps({"text": ["a"]}), "text", "expected a string, got a list", "wrong type"),
    "negative token id": (
        "tokenized",
        json.dumps({"input_ids": [1, -2, 3]}),
        "input_ids[1]",
        "negative token id -2",
        "negative token id",
    ),
    "float token": (
        "tokenized",
        json.dumps({"input_ids": [1, 2.5]}),
        "input_ids[1]",
        "expected an integer, got a number",
        "wrong type",
    ),
    "bool token": (
        "tokenized",
        json.dumps({"input_ids": [1, True]}),
        "input_ids[1]",
        "expected an integer, got a boolean",
        "wrong type",
    ),
    "empty input_ids": ("tokenized", json.dumps({"input_ids": []}), "input_ids", "empty", "empty input_ids"),
    "labels length": (
        "tokenized",
        json.dumps({"input_ids": [1, 2, 3], "labels": [1, 2]}),
        "labels",
        "2 labels for 3 input_ids (they must have the same length)",
        "labels length mismatch",
    ),
    "shifted label": (
        "tokenized",
        json.dumps({"input_ids": [1, 2, 3], "labels": [2, 3, -100]}),
        "labels[0]",
        "2 is neither -100 nor input_ids[0] = 1 (labels are unshifted)",
        "bad label",
    ),
    "all labels ignored": (
        "tokenized",
        json.dumps({"input_ids": [1, 2], "labels": [-100, -100]}),
        "labels",
        "every label is -100: nothing to train on",
        "no trained tokens",
    ),
}


def bad_file(tmp_path, case):
    """Line 1 good, line 2 blank (skipped silently, still counted as a line), line 3 bad, line 4 good."""
    format_name, bad_line, *_ = BAD_RECORDS[case]
    good = json.dumps(GOOD_FIRST[format_name])
    return write_lines(tmp_path / "train.jsonl", [good, "", bad_line, good])


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_error_names_file_line_and_field(tmp_path, case):
    _, _, field, reason, category = BAD_RECORDS[case]
    path = bad_file(tmp_path, case)
    records = iter_records(path)
    assert next(records).location == f"{path}:1"
    with pytest.raises(DataError) as caught:
        next(records)
    error, reason = caught.value, reason.format(path=path)
    assert (error.location, error.field, error.reason, error.category) == (f"{path}:3", field, reason, category)
    where = f"{path}:3: field '{field}'" if field else f"{path}:3"
    assert str(error) == f"{where}: {reason}"


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_skip_counts_the_reason(tmp_path, case):
    *_, category = BAD_RECORDS[case]
    path = bad_file(tmp_path, case)
    records, report = load_records(path, on_bad_record="skip")
    assert [r.location for r in records] == [f"{path}:1", f"{path}:4"]
    assert report.records_read == 2 and report.skipped == Counter({category: 1})
    [example] = report.examples[category]
    assert example.startswith(f"{path}:3: ")


def test_error_message_matches_the_documented_shape(tmp_path):
    lines = [json.dumps(GOOD_FIRST["chat"])] * 11 + [json.dumps(chat(USER, ASSISTANT, {"role": "bot", "content": ""}))]
    path = write_lines(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert str(caught.value) == (
        f"{path}:12: field 'messages[2].role': unknown role 'bot' (known: system, user, assistant, tool; "
        "aliases: developer, model, ipython, function)"
    )
    assert isinstance(caught.value, ValueError)


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: invalid UTF-8"):
        load_records(path)


def test_skip_mode_counts_many_reasons_and_keeps_few_examples(tmp_path):
    good = json.dumps(GOOD_FIRST["chat"])
    no_assistant = json.dumps(chat(USER))
    unknown_role = json.dumps(chat({"role": "bot", "content": "x"}, ASSISTANT))
    lines = [good] + [no_assistant] * 5 + [unknown_role, "not json", good]
    path = write_lines(tmp_path / "t.jsonl", lines)
    records, report = load_records(path, on_bad_record="skip")
    assert len(records) == 2
    assert report.skipped == Counter({"no assistant turn": 5, "unknown role": 1, "invalid JSON": 1})
    assert report.records_skipped == 7
    assert [e.split(": ")[0] for e in report.examples["no assistant turn"]] == [f"{path}:{n}" for n in (2, 3, 4)]
    assert report.summary().endswith("; skipped 7: 5 no assistant turn, 1 unknown role, 1 invalid JSON")


@needs_pyarrow
@needs_datasets
def test_skip_in_parquet_and_dataset_names_rows(tmp_path):
    rows = [{"text": "a"}, {"text": ""}, {"text": "c"}]
    for kind, where in (("parquet", "row 1"), ("dataset", "dataset[1]")):
        source, _ = make_source(kind, tmp_path, rows)
        records, report = load_records(source, on_bad_record="skip")
        assert [r.text for r in records] == ["a", "c"] and report.skipped == Counter({"empty text": 1})
        assert where in report.examples["empty text"][0]


# --- empty sources --------------------------------------------------------------------------------------------


def empty_parquet(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    return path


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda tmp: write_lines(tmp / "empty.jsonl", []), "empty.jsonl"),
        (lambda tmp: write_lines(tmp / "blank.jsonl", ["", "  ", ""]), "blank.jsonl"),
        (lambda tmp: write_lines(tmp / "empty.json", ["[]"]), "empty.json"),
        pytest.param(empty_parquet, "empty.parquet", marks=needs_pyarrow),
        (lambda tmp: [], "records"),
        pytest.param(lambda tmp: datasets.Dataset.from_dict({"text": []}), "dataset", marks=needs_datasets),
    ],
)
def test_empty_source_is_an_error(tmp_path, make, name):
    source = make(tmp_path)
    with pytest.raises(DataError) as caught:
        load_records(source)
    assert caught.value.location.endswith(name)
    assert str(caught.value).endswith(f"{name}: no records: the source is empty")


def test_all_records_skipped_is_an_error_with_counts(tmp_path):
    no_assistant = json.dumps(chat(USER))
    lines = [no_assistant] * 7 + [json.dumps(chat({"role": "bot", "content": "x"}, ASSISTANT))] * 3
    path = write_lines(tmp_path / "train.jsonl", lines)
    report = LoadReport()
    with pytest.raises(DataError) as caught:
        list(iter_records(path, on_bad_record="skip", report=report))
    assert str(caught.value) == f"{path}: all 10 records were skipped: 7 no assistant turn, 3 unknown role"
    assert report.skipped == Counter({"no assistant turn": 7, "unknown role": 3})


# --- streaming ----------------------------------------------------------------------------------------------------


def test_jsonl_yields_records_before_a_bad_line(tmp_path):
    lines = [json.dumps({"text": f"record {i}"}) for i in range(999)] + ['{"text": ']
    path = write_lines(tmp_path / "big.jsonl", lines)
    seen = []
    with pytest.raises(DataError, match=r"big\.jsonl:1000: invalid JSON"):
        for record in iter_records(path):
            seen.append(record.text)
    assert seen == [f"record {i}" for i in range(999)]


def test_jsonl_is_read_as_consumed(tmp_path):
    # 1000 lines of ~200 bytes: far beyond one read buffer. Corrupting the last line after the first record was
    # yielded must still be seen, which only a reader that has not yet read that far can do.
    lines = [json.dumps({"text": f"{i:04d}" + "x" * 190}) for i in range(1000)]
    path = write_lines(tmp_path / "big.jsonl", lines)
    records = iter_records(path)
    assert next(records).text.startswith("0000")
    with open(path, "r+b") as file:
        file.seek(-len(lines[-1]) - 1, 2)
        file.write(b"{" + b" " * (len(lines[-1]) - 1))
    seen = 1
    with pytest.raises(DataError, match=r"big\.jsonl:1000: invalid JSON"):
        for _ in records:
            seen += 1
    assert seen == 999


def test_iterable_source_is_pulled_one_record_at_a_time():
    pulled = []

    def rows():
        for i in range(1_000_000):
            pulled.append(i)
            yield {"text": str(i)}

    records = iter_records(rows())
    assert pulled == []  # nothing read at the call
    assert next(records).text == "0" and next(records).text == "1"
    assert pulled == [0, 1]


@needs_pyarrow
def test_parquet_streams_in_batches(tmp_path):
    path = tmp_path / "big.parquet"
    texts = [f"t{i}" for i in range(5000)]
    texts[4500] = ""
    pq.write_table(pa.table({"text": texts}), path, row_group_size=1000)
    seen = []
    with pytest.raises(DataError) as caught:
        for record in iter_records(path):
            seen.append(record.text)
    assert len(seen) == 4500 and seen[-1] == "t4499"
    assert str(caught.value) == f"{path} row 4500: field 'text': empty"
