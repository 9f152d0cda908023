"""Users' instruction data, read unchanged into one canonical `Record` type, with bad input reported precisely.

Six input formats, detected per source from the keys of its first record (or chosen with ``format=``):

    chat               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}
    sharegpt           {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}
    prompt_completion  {"prompt": "2+2=", "completion": "4"}       (or both as lists of chat messages)
    alpaca             {"instruction": "Add.", "input": "2+2", "output": "4", "system": "Be terse."}
    tokenized          {"input_ids": [1, 5, 9], "labels": [-100, 5, 9]}
    text               {"text": "Once upon a time"}

Sources: a path to a .jsonl, .json (a top-level list), .parquet file (.jsonl.gz / .json.gz too), an in-memory
iterable of dicts, or a `datasets.Dataset`. Records stream: a file is read line by line (Parquet in row
batches), so millions of records never sit in memory at once. Keys a format does not use are ignored.

A bad record raises `DataError` naming where it is and what is wrong with it
(``train.jsonl:12: field 'messages[2].role': unknown role 'bot' (...)``), or, with ``on_bad_record="skip"``,
is counted by reason in a `LoadReport` and left out.

>>> records, report = load_records([{"prompt": "2+2=", "completion": "4"}])
>>> records[0]
Record(kind='prompt_completion', location='records[0]', prompt='2+2=', completion='4')
>>> report.formats
{'records': 'prompt_completion'}
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from fastsft._constants import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")
# Other spellings seen in chat data: OpenAI's "developer", Gemma's "model", Llama-3.1's "ipython" tool results,
# the older OpenAI "function" results.
ROLE_ALIASES = {"developer": "system", "model": "assistant", "ipython": "tool", "function": "tool"}
# ShareGPT "from" names -> canonical roles (the names seen in the wild; "function_call" is the model calling a tool).
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
SUPPORTED_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
_PARQUET_BATCH_ROWS = 1024
_KIND_FIELDS = {  # Record kind -> the fields it sets (all others stay None); labels is optional for tokens
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "tokens": ("input_ids",),
}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class Record:
    """One training example in canonical form; `kind` says which fields are set.

    kind="messages":           messages (list of {"role", "content", ...}), first_trainable (index of the first
                               message whose assistant turns are trained; earlier ones are context), tools
                               (tool schemas for the chat template, or None)
    kind="prompt_completion":  prompt, completion (plain text, no chat template; only the completion is trained)
    kind="text":               text (every token trained)
    kind="tokens":             input_ids, labels (HF convention: unshifted, len(input_ids), each -100 or
                               input_ids[t]; None = every token trained)

    `location` says where the record came from, for messages: "train.jsonl:12", "train.json[3]",
    "train.parquet row 41", "records[3]", "dataset[3]".

    >>> Record(kind="text", location="records[0]", text="Hello")
    Record(kind='text', location='records[0]', text='Hello')
    """

    kind: str
    location: str
    messages: list[dict] | None = None
    first_trainable: int = 0
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    input_ids: list[int] | None = None
    labels: list[int] | None = None
    tools: list[dict] | None = None  # kind "messages": the tool schemas the chat template renders (`tools=`)

    def __post_init__(self):
        if self.kind not in _KIND_FIELDS:
            raise ValueError(f"unknown Record kind {self.kind!r} (known: {', '.join(_KIND_FIELDS)})")
        own = _KIND_FIELDS[self.kind] + (("labels",) if self.kind == "tokens" else ())
        for name in ("messages", "prompt", "completion", "text", "input_ids", "labels"):
            value = getattr(self, name)
            if name in _KIND_FIELDS[self.kind] and value is None:
                raise ValueError(f"a Record of kind {self.kind!r} needs {name!r}")
            if name not in own and value is not None:
                raise ValueError(f"a Record of kind {self.kind!r} has no {name!r}")
        if self.kind != "messages" and (self.first_trainable != 0 or self.tools is not None):
            raise ValueError("first_trainable and tools belong to kind 'messages'")

    def __repr__(self) -> str:
        shown = ["kind", "location", *_KIND_FIELDS[self.kind]]
        shown += ["first_trainable"] if self.kind == "messages" else ["labels"] if self.kind == "tokens" else []
        shown += ["tools"] if self.tools is not None else []
        return f"Record({', '.join(f'{name}={getattr(self, name)!r}' for name in shown)})"


class DataError(ValueError):
    """A bad record or source: `location` ("train.jsonl:12"), `field` inside the record ("messages[2].role", or
    None when the record as a whole is bad), `reason` (what is wrong), `category` (the short reason skipped
    records are counted under, e.g. "unknown role")."""

    def __init__(self, location: str, field: str | None, reason: str, category: str = "bad record"):
        self.location, self.field, self.reason, self.category = location, field, reason, category
        where = f"{location}: field {field!r}" if field is not None else location
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # picklable across DataLoader workers despite the multi-argument __init__
        return type(self), (self.location, self.field, self.reason, self.category)


@dataclasses.dataclass
class LoadReport:
    """What reading found, accumulated over every source read with it.

    records_read:  records yielded
    skipped:       Counter of skipped records by category ("unknown role", "no assistant turn", ...)
    examples:      category -> the first few skipped records' full error messages (location first)
    formats:       source name -> format name (detected or given)
    """

    records_read: int = 0
    skipped: Counter[str] = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    formats: dict[str, str] = dataclasses.field(default_factory=dict)
    max_examples: ClassVar[int] = 3

    @property
    def records_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skipped(self, error: DataError) -> None:
        self.skipped[error.category] += 1
        shown = self.examples.setdefault(error.category, [])
        if len(shown) < self.max_examples:
            shown.append(str(error))

    def summary(self) -> str:
        """One line, e.g. "read 990 records (train.jsonl: chat); skipped 10: 7 no assistant turn, 3 unknown role"."""
        sources = ", ".join(f"{name}: {fmt}" for name, fmt in self.formats.items())
        line = f"read {self.records_read} records ({sources})"
        return line + (f"; skipped {self.records_skipped}: {_counts(self.skipped)}" if self.skipped else "")


# --- the formats -----------------------------------------------------------------------------------------------


class _Invalid(Exception):
    """A bad record before its location is attached (the reading loop turns it into a DataError)."""

    def __init__(self, field: str | None, reason: str, category: str):
        super().__init__(reason)
        self.field, self.reason, self.category = field, reason, category


@dataclasses.dataclass(frozen=True)
class _Dialect:
    """How one format spells a message: its role and content keys and its role names."""

    role_key: str
    content_key: str
    roles: dict[str, str]  # name in the data -> canonical role
    known: str  # the names, as an error message lists them


_CHAT = _Dialect(
    "role",
    "content",
    {**{r: r for r in ROLES}, **ROLE_ALIASES},
    f"known: {', '.join(ROLES)}; aliases: {', '.join(ROLE_ALIASES)}",
)
_SHAREGPT = _Dialect("from", "value", SHAREGPT_ROLES, f"known: {', '.join(SHAREGPT_ROLES)}")


_JSON_TYPE_NAMES = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "a list",
    tuple: "a list",
    dict: "an object",
}


def _type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages ("expected a string, got a list")."""
    return _JSON_TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(field, f"expected a string, got {_type_name(value)}", "wrong type")
    return value


def _optional_string(row: dict, key: str) -> str:
    """An optional string field; absent or null (columnar sources fill absent fields with null) reads as ""."""
    value = row.get(key)
    return "" if value is None else _string(value, key)


def _nonblank(text: str, field: str, category: str = "empty text") -> str:
    if not text.strip():
        raise _Invalid(field, "empty" if not text else "whitespace only", category)
    return text


def _text_content(content: Any, field: str) -> str:
    """A message's content: a string, or a list of text parts [{"type": "text", "text": ...}] joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _Invalid(field, f"expected a string or a list of text parts, got {_type_name(content)}", "wrong type")
    return "".join(_text_part(part, f"{field}[{i}]") for i, part in enumerate(content))


def _text_part(part: Any, field: str) -> str:
    if not isinstance(part, dict):
        raise _Invalid(field, f"expected a content part object, got {_type_name(part)}", "wrong type")
    if part.get("type") != "text":
        reason = f"unsupported content part type {part.get('type')!r}: only text parts are supported (no images)"
        raise _Invalid(f"{field}.type", reason, "unsupported content")
    return _string(part.get("text"), f"{field}.text")


def _message(raw: Any, field: str, dialect: _Dialect) -> dict:
    """{"role", "content", **other keys}. Other keys (tool_calls, name, tool_call_id, ...) pass through for the
    chat template, except nulls: columnar sources (Parquet, datasets) give every message every key of the column."""
    if not isinstance(raw, dict):
        raise _Invalid(field, f"expected a message object, got {_type_name(raw)}", "wrong type")
    role_field, content_field = f"{field}.{dialect.role_key}", f"{field}.{dialect.content_key}"
    if dialect.role_key not in raw:
        raise _Invalid(role_field, "missing", "missing field")
    name = _string(raw[dialect.role_key], role_field)
    if name not in dialect.roles:
        raise _Invalid(role_field, f"unknown role {name!r} ({dialect.known})", "unknown role")
    role = dialect.roles[name]
    spelled = {dialect.role_key, dialect.content_key, "role", "content"}
    extra = {key: value for key, value in raw.items() if key not in spelled and value is not None}
    content = raw.get(dialect.content_key)
    if content is None and role == "assistant" and extra.get("tool_calls"):
        content = ""  # an assistant turn that only calls tools
    elif dialect.content_key not in raw:
        raise _Invalid(content_field, "missing", "missing field")
    return {"role": role, "content": _text_content(content, content_field), **extra}


def _conversation(raw: Any, field: str, dialect: _Dialect, allow_empty: bool = False) -> list[dict]:
    if not isinstance(raw, list):
        raise _Invalid(field, f"expected a list of messages, got {_type_name(raw)}", "wrong type")
    if not raw and not allow_empty:
        raise _Invalid(field, "empty conversation", "empty conversation")
    return [_message(message, f"{field}[{i}]", dialect) for i, message in enumerate(raw)]


def _require_assistant(messages: list[dict], field: str) -> None:
    if not any(message["role"] == "assistant" for message in messages):
        raise _Invalid(field, "no assistant message: nothing to train on", "no assistant turn")
    for i, message in enumerate(messages):
        # An empty reply would teach the model to end its turn at once.
        if message["role"] == "assistant" and not message["content"].strip() and not message.get("tool_calls"):
            raise _Invalid(f"{field}[{i}].content", "empty assistant reply", "empty reply")


def _tools(row: dict) -> list[dict] | None:
    """The record's tool schemas (OpenAI style: a list of objects; a JSON string as ShareGPT exports write it)."""
    tools = row.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise _Invalid("tools", f"not valid JSON: {exc}", "wrong type") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _Invalid("tools", f"expected a list of tool objects, got {_type_name(tools)}", "wrong type")
    return tools


def _from_chat(row: dict) -> dict:
    messages = _conversation(row["messages"], "messages", _CHAT)
    _require_assistant(messages, "messages")
    return {"kind": "messages", "messages": messages, "tools": _tools(row)}


def _from_sharegpt(row: dict) -> dict:
    """ShareGPT, including the common top-level "system" prompt and "tools" fields."""
    messages = _conversation(row["conversations"], "conversations", _SHAREGPT)
    _require_assistant(messages, "conversations")
    system = _optional_string(row, "system")
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return {"kind": "messages", "messages": messages, "tools": _tools(row)}


def _from_prompt_completion(row: dict) -> dict:
    """Both strings -> plain prompt/completion; both message lists -> a conversation whose prompt is context."""
    prompt, completion = row["prompt"], row["completion"]
    for key, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str | list):
            raise _Invalid(key, f"expected a string or a list of messages, got {_type_name(value)}", "wrong type")
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"kind": "prompt_completion", "prompt": prompt, "completion": _nonblank(completion, "completion")}
    if isinstance(prompt, list) and isinstance(completion, list):
        context = _conversation(prompt, "prompt", _CHAT, allow_empty=True)
        answer = _conversation(completion, "completion", _CHAT)
        _require_assistant(answer, "completion")
        return {"kind": "messages", "messages": context + answer, "first_trainable": len(context), "tools": _tools(row)}
    reason = f"{_type_name(completion)} but prompt is {_type_name(prompt)}: both must be strings or both message lists"
    raise _Invalid("completion", reason, "wrong type")


def _from_alpaca(row: dict) -> dict:
    """[system?, user: instruction + "\\n\\n" + input (when given), assistant: output]."""
    instruction, user_input = _string(row["instruction"], "instruction"), _optional_string(row, "input")
    output = _nonblank(_string(row["output"], "output"), "output", category="no assistant turn")
    system = _optional_string(row, "system")
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": instruction + (f"\n\n{user_input}" if user_input else "")})
    messages.append({"role": "assistant", "content": output})
    return {"kind": "messages", "messages": messages}


def _from_text(row: dict) -> dict:
    return {"kind": "text", "text": _nonblank(_string(row["text"], "text"), "text")}


def _token_list(value: Any, field: str) -> list[int]:
    if hasattr(value, "tolist") and not isinstance(value, list):  # numpy / torch rows of a formatted Dataset
        value = value.tolist()
    if not isinstance(value, list):
        raise _Invalid(field, f"expected a list of integers, got {_type_name(value)}", "wrong type")
    if not all(type(token) is int for token in value):  # the fast path for the common case; bool is no token
        t = next(t for t, token in enumerate(value) if type(token) is not int)
        raise _Invalid(f"{field}[{t}]", f"expected an integer, got {_type_name(value[t])}", "wrong type")
    return value


def _from_tokenized(row: dict) -> dict:
    input_ids = _token_list(row["input_ids"], "input_ids")
    if not input_ids:
        raise _Invalid("input_ids", "empty", "empty input_ids")
    if min(input_ids) < 0:
        t = next(t for t, token in enumerate(input_ids) if token < 0)
        raise _Invalid(f"input_ids[{t}]", f"negative token id {input_ids[t]}", "negative token id")
    if row.get("labels") is None:
        return {"kind": "tokens", "input_ids": input_ids, "labels": None}
    labels = _token_list(row["labels"], "labels")
    if len(labels) != len(input_ids):
        reason = f"{len(labels)} labels for {len(input_ids)} input_ids (they must have the same length)"
        raise _Invalid("labels", reason, "labels length mismatch")
    for t, (label, token) in enumerate(zip(labels, input_ids, strict=True)):
        if label != IGNORE_INDEX and label != token:
            reason = f"{label} is neither {IGNORE_INDEX} nor input_ids[{t}] = {token} (labels are unshifted)"
            raise _Invalid(f"labels[{t}]", reason, "bad label")
    if all(label == IGNORE_INDEX for label in labels):
        raise _Invalid("labels", f"every label is {IGNORE_INDEX}: nothing to train on", "no trained tokens")
    return {"kind": "tokens", "input_ids": input_ids, "labels": labels}


@dataclasses.dataclass(frozen=True)
class _Format:
    name: str
    keys: tuple[str, ...]  # the keys that identify it; all must be present
    convert: Callable[[dict], dict]  # a record with those keys -> Record fields (raises _Invalid)


# In detection order: the first format whose keys a record has wins. Tokenized comes before text because
# tokenized datasets often keep the text they came from.
FORMATS = (
    _Format("chat", ("messages",), _from_chat),
    _Format("sharegpt", ("conversations",), _from_sharegpt),
    _Format("prompt_completion", ("prompt", "completion"), _from_prompt_completion),
    _Format("alpaca", ("instruction", "output"), _from_alpaca),
    _Format("tokenized", ("input_ids",), _from_tokenized),
    _Format("text", ("text",), _from_text),
)
FORMAT_NAMES = tuple(fmt.name for fmt in FORMATS)
_FORMAT_BY_NAME = {fmt.name: fmt for fmt in FORMATS}


def _format_keys() -> str:
    return "; ".join(f"{fmt.name} {{{', '.join(fmt.keys)}}}" for fmt in FORMATS)


def _detect(row: dict, location: str) -> _Format:
    for fmt in FORMATS:
        if all(key in row for key in fmt.keys):
            return fmt
    reason = f"cannot detect the format from the keys {sorted(row)}; formats and their keys: {_format_keys()} "
    raise DataError(location, None, reason + "(or pass format=)", "unknown format")


def _convert(row: dict, fmt: _Format, origin: str, location: str) -> Record:
    for key in fmt.keys:
        if key not in row:
            raise _Invalid(key, f"missing (format {fmt.name}, {origin})", "missing field")
    return Record(location=location, **fmt.convert(row))


# --- the sources: each yields (location, row); a row that could not be parsed is an _Invalid ---------------------


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _parse_json_line(line: bytes) -> Any:
    try:
        return json.loads(line.rstrip(b"\r\n"))  # without the newline, an error's column is on this line
    except json.JSONDecodeError as error:
        return _Invalid(None, f"invalid JSON: {error.msg} (column {error.colno})", "invalid JSON")
    except RecursionError:  # e.g. 100,000 nested brackets: a bad record like any other
        return _Invalid(None, "invalid JSON: nested too deeply to parse", "invalid JSON")
    except UnicodeDecodeError as error:
        return _Invalid(None, f"invalid UTF-8 at byte {error.start}", "invalid UTF-8")


# What reading a file (not parsing one record) can raise: no permission, a .gz that is not gzip or is cut short.
_UNREADABLE = (OSError, EOFError, zlib.error)


def _unreadable(name: str, error: BaseException, where: str = "") -> DataError:
    """A file-level read error as a DataError naming the file: it is no bad record, so skip mode cannot help."""
    if isinstance(error, gzip.BadGzipFile):
        reason = f"not a gzip file ({error}); name it without .gz if it is plain text"
    elif isinstance(error, (EOFError, zlib.error)):
        reason = f"the gzip stream is truncated or damaged{where} ({type(error).__name__}: {error})"
    else:
        reason = f"cannot read the file: {getattr(error, 'strerror', None) or error}"
    return DataError(name, None, reason, "unreadable file")


def _jsonl_rows(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """One record per line, location "name:LINE" (1-based); blank lines are skipped silently."""
    line_number = 0
    try:
        with _open_binary(path) as lines:
            for line_number, line in enumerate(lines, start=1):
                if line.strip():
                    yield f"{name}:{line_number}", _parse_json_line(line)
    except _UNREADABLE as error:
        raise _unreadable(name, error, f" after line {line_number}") from None


def _json_rows(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """A top-level JSON list of records, location "name[INDEX]" (read whole: JSON cannot stream)."""
    try:
        with _open_binary(path) as file:
            data = json.load(file)
    except UnicodeDecodeError as error:
        raise DataError(name, None, f"invalid UTF-8 at byte {error.start}", "invalid UTF-8") from None
    except RecursionError:
        raise DataError(name, None, "JSON nested too deeply to parse", "invalid JSON") from None
    except json.JSONDecodeError as error:
        hint = "; one record per line is JSON Lines: name the file .jsonl" if error.msg == "Extra data" else ""
        reason = f"invalid JSON at line {error.lineno} column {error.colno}: {error.msg}{hint}"
        raise DataError(name, None, reason, "invalid JSON") from None
    except _UNREADABLE as error:
        raise _unreadable(name, error) from None
    if not isinstance(data, list):
        keys = f" with keys {sorted(data)}" if isinstance(data, dict) else ""
        reason = f"expected a top-level JSON list of records, got {_type_name(data)}{keys}"
        raise DataError(name, None, reason, "not a list")
    for index, row in enumerate(data):
        yield f"{name}[{index}]", row


def _parquet_rows(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """Rows read in batches (big files stream), location "name row INDEX" (0-based)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS)
    except Exception as error:  # pyarrow raises ArrowInvalid and OSError subclasses for unreadable files
        raise DataError(name, None, f"cannot read as Parquet: {error}", "unreadable file") from None
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{name} row {index}", row
            index += 1


_READERS = {
    ".jsonl": _jsonl_rows,
    ".jsonl.gz": _jsonl_rows,
    ".json": _json_rows,
    ".json.gz": _json_rows,
    ".parquet": _parquet_rows,
}


def _file_rows(path: Path) -> tuple[str, Iterator[tuple[str, Any]]]:
    name = str(path)
    reader = next((read for ext, read in _READERS.items() if name.lower().endswith(ext)), None)
    if reader is None:
        supported = ", ".join(SUPPORTED_EXTENSIONS)
        raise DataError(name, None, f"unsupported file extension (supported: {supported})", "unsupported file")
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such file")
    if not path.is_file():
        raise DataError(name, None, "not a file (a directory?): give the path of one data file", "not a file")
    return name, reader(path, name)


def _indexed_rows(rows: Iterable, name: str) -> Iterator[tuple[str, Any]]:
    for index, row in enumerate(rows):
        yield f"{name}[{index}]", row


def _is_hf_dataset(source: Any) -> bool:
    # Without importing datasets: a Dataset can only exist if the user already imported the library.
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, datasets.Dataset | datasets.IterableDataset)


def _source_rows(source: Any) -> tuple[str, Iterator[tuple[str, Any]]]:
    """(the source's name for messages, its rows as (location, row)); checks the source itself eagerly."""
    if isinstance(source, str | os.PathLike):
        return _file_rows(Path(source))
    if _is_hf_dataset(source):
        return "dataset", _indexed_rows(source, "dataset")
    if isinstance(source, Iterable) and not isinstance(source, dict | bytes):
        return "records", _indexed_rows(source, "records")
    hint = " (one record, or a DatasetDict? pass a list of records or one split)" if isinstance(source, dict) else ""
    raise TypeError(
        f"unsupported data source {type(source).__name__}{hint}: pass a path ({', '.join(SUPPORTED_EXTENSIONS)}), "
        "an iterable of dicts, or a datasets.Dataset"
    )


# --- reading ---------------------------------------------------------------------------------------------------


def iter_records(
    source: Any, *, format: str = "auto", on_bad_record: str = "error", report: LoadReport | None = None
) -> Iterator[Record]:
    """Stream `source`'s records as `Record`s.

    source:         path to a .jsonl / .jsonl.gz / .json / .json.gz / .parquet file, an iterable of dicts, or a
                    datasets.Dataset
    format:         "auto" (detected from the first record's keys) or one of FORMAT_NAMES
    on_bad_record:  "error" raises DataError at the first bad record; "skip" leaves it out and counts it in
                    `report` by reason
    report:         a LoadReport to accumulate into (records read, skipped by reason, format per source)

    The arguments and the source itself (extension, existence) are checked at the call; records are read only
    as the iterator is consumed. A source that yields no record (empty, or every record skipped) raises
    DataError once exhausted.

    >>> [r.messages[0] for r in iter_records([{"conversations": [{"from": "gpt", "value": "Hi"}]}])]
    [{'role': 'assistant', 'content': 'Hi'}]
    """
    if format != "auto" and format not in _FORMAT_BY_NAME:
        raise ValueError(f"unknown format {format!r} (known: auto, {', '.join(FORMAT_NAMES)})")
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    name, rows = _source_rows(source)
    report = report if report is not None else LoadReport()
    return _records(name, rows, format, on_bad_record == "skip", report)


def _records(name: str, rows: Iterator, format: str, skip: bool, report: LoadReport) -> Iterator[Record]:
    fmt, origin = (None, "") if format == "auto" else (_FORMAT_BY_NAME[format], f"given as format={format!r}")
    if fmt is not None:
        report.formats[name] = fmt.name
    read, skipped = 0, Counter()
    for location, row in rows:
        try:
            if isinstance(row, _Invalid):
                raise row
            if not isinstance(row, dict):
                raise _Invalid(None, f"expected a JSON object, got {_type_name(row)}", "not an object")
            if fmt is None:  # the first record that is an object decides the whole source's format
                fmt, origin = _detect(row, location), f"detected from {location}"
                report.formats[name] = fmt.name
            record = _convert(row, fmt, origin, location)
        except _Invalid as bad:
            error = DataError(location, bad.field, bad.reason, bad.category)
            if not skip:
                raise error from None
            report.add_skipped(error)
            skipped[error.category] += 1
            continue
        read += 1
        report.records_read += 1
        yield record
    if read == 0:
        raise _no_records_error(name, skipped)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{count} {category}" for category, count in counter.most_common())


def _no_records_error(name: str, skipped: Counter) -> DataError:
    if not skipped:
        return DataError(name, None, "no records: the source is empty", "empty source")
    total = sum(skipped.values())
    return DataError(name, None, f"all {total} records were skipped: {_counts(skipped)}", "all records skipped")


def load_records(source: Any, *, format: str = "auto", on_bad_record: str = "error") -> tuple[list[Record], LoadReport]:
    """Every record of `source` in a list, with the LoadReport (see iter_records for the arguments).

    >>> records, report = load_records([{"text": "a"}, {"text": ""}], on_bad_record="skip")
    >>> len(records), report.skipped
    (1, Counter({'empty text': 1}))
    """
    report = LoadReport()
    records = list(iter_records(source, format=format, on_bad_record=on_bad_record, report=report))
    return records, report
