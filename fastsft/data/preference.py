"""Preference pairs (DPO, SimPO, ORPO): TRL's preference formats read into two trainable Records per pair, and
tokenized once into a cache whose examples come in pairs.

Formats, per record (TRL's, unchanged):

    explicit prompt, plain text     {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
    explicit prompt, conversational {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
                                     "rejected": [{"role": "assistant", ...}]}
    implicit prompt, conversational {"chosen": [user, assistant X], "rejected": [user, assistant Y]}
    implicit prompt, plain text     {"chosen": "The sky is blue.", "rejected": "The sky is green."}

An implicit prompt is what the two share at the start, split as TRL's `extract_prompt` splits it: at the first
element (message, or character) where they differ; for text, a space right before that point goes to the
replies ("The sky is" + " blue." / " green."); when one is a prefix of the other, its last element goes back to
the replies so that neither is empty. Conversations must differ at an assistant message: a pair whose
conversations differ earlier (another user turn, system prompt or tool result) has no prompt in common and is
an error, never a pair of unrelated conversations. A string "prompt" next to conversational chosen/rejected is
ignored and the prompt extracted from the conversations, as TRL does (such datasets repeat the prompt in both).

Each side becomes a complete `Record` of the existing kinds, prompt included: "prompt_completion" for text
(only the completion and the EOS are trained), "messages" for conversations (`first_trainable` = the prompt's
length: the prompt is context, every assistant turn of the completion is trained). So the SFT masker gives
each sequence its token-exact trained mask (for text split inside a word, the token spanning the split is
trained, as for any prompt_completion record).

`prepare_preference_dataset` tokenizes pairs once into the same memory-mapped cache as `prepare_dataset`:

    data = prepare_preference_dataset("prefs.jsonl", tokenizer, max_seq_len=2048)
    data[2 * i]        # pair i's chosen sequence (prompt + chosen completion): ids int32 [n], trained bool [n]
    data[2 * i + 1]    # pair i's rejected sequence
    data.report        # pairs kept, pairs dropped and why (PreferenceReport)

A pair stays whole: when either sequence is too long (truncation="drop") or is left with no trained token
(after truncation="right"), both are dropped and the pair is counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import (
    TokenizedDataset,
    TokenizeReport,
    _build_or_map,
    _check_length_options,
    _write_examples,
)
from .formats import (
    _CHAT,
    DataError,
    LoadReport,
    Record,
    _conversation,
    _Invalid,
    _no_records_error,
    _source_rows,
    _tools,
    _type_name,
)
from .templates import MaskOptions, ResponseMasker

SIDES = ("chosen", "rejected")  # the order of a pair's sequences in the cache: example 2i, 2i + 1


@dataclass(frozen=True)
class PreferencePair:
    """One preference: two complete trainable Records with the same prompt.

    location:         where the record came from ("prefs.jsonl:12", "records[3]", ...)
    chosen, rejected: Records of kind "prompt_completion" (plain text) or "messages" (conversations), each
                      with the prompt, so the SFT masker trains exactly its completion
    implicit_prompt:  True when the prompt was extracted from chosen/rejected (TRL's implicit form); error
                      fields then index the whole conversations ("chosen[3]"), else the completion lists
    """

    location: str
    chosen: Record
    rejected: Record
    implicit_prompt: bool = False


# --- the formats -----------------------------------------------------------------------------------------------


def _prompt_end(chosen: Sequence, rejected: Sequence) -> int:
    """Where the shared prompt ends (TRL's extract_prompt): the first index where chosen and rejected differ,
    moved before a space there (text); when one is a prefix of the other, the last index of the shorter one, so
    both replies keep at least one element. Both must be non-empty and different."""
    n = min(len(chosen), len(rejected))
    end = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if end is None:
        return n - 1
    if end > 0 and isinstance(chosen, str) and chosen[end - 1] == " ":  # " blue" / " green": words, not "blue"
        end -= 1
    return end


def _nonblank_completion(text: str, field: str, after: str = "") -> str:
    if not text.strip():
        reason = ("empty" if not text else "whitespace only") + after + ": nothing to train on"
        raise _Invalid(field, reason, "empty completion")
    return text


def _completion_messages(raw: list, field: str) -> list[dict]:
    if not raw:
        raise _Invalid(field, "empty list of messages: nothing to train on", "empty completion")
    return _conversation(raw, field, _CHAT)


def _check_replies(messages: list[dict], start: int, field: str) -> None:
    """messages[start:] must hold an assistant reply and no empty one (an empty reply would teach the model to
    end its turn at once)."""
    if not any(m["role"] == "assistant" for m in messages[start:]):
        raise _Invalid(field, "no assistant message: nothing to train on", "no assistant turn")
    for i in range(start, len(messages)):
        message = messages[i]
        if message["role"] == "assistant" and not message["content"].strip() and not message.get("tool_calls"):
            raise _Invalid(f"{field}[{i}].content", "empty assistant reply", "empty reply")


def _identical(chosen, rejected) -> None:
    if chosen == rejected:
        raise _Invalid("rejected", "identical to chosen: a preference pair must differ", "identical")


def _explicit_text(prompt: str, chosen: str, rejected: str) -> tuple[dict, dict]:
    _nonblank_completion(chosen, "chosen")
    _nonblank_completion(rejected, "rejected")
    _identical(chosen, rejected)
    return tuple({"kind": "prompt_completion", "prompt": prompt, "completion": text} for text in (chosen, rejected))


def _explicit_messages(row: dict) -> tuple[dict, dict]:
    context = _conversation(row["prompt"], "prompt", _CHAT, allow_empty=True)
    sides = []
    for key in SIDES:
        answer = _completion_messages(row[key], key)
        _check_replies(answer, 0, key)
        sides.append(answer)
    _identical(*sides)
    tools = _tools(row)
    return tuple(
        {"kind": "messages", "messages": context + answer, "first_trainable": len(context), "tools": tools}
        for answer in sides
    )


def _implicit_text(chosen: str, rejected: str) -> tuple[dict, dict]:
    _nonblank_completion(chosen, "chosen")
    _nonblank_completion(rejected, "rejected")
    _identical(chosen, rejected)
    end = _prompt_end(chosen, rejected)
    after = f" after the {end:,} characters shared with the other side"
    replies = [
        _nonblank_completion(text[end:], key, after) for key, text in zip(SIDES, (chosen, rejected), strict=True)
    ]
    return tuple({"kind": "prompt_completion", "prompt": chosen[:end], "completion": reply} for reply in replies)


def _implicit_messages(row: dict, given_prompt: str | None) -> tuple[dict, dict]:
    chosen, rejected = (_completion_messages(row[key], key) for key in SIDES)
    _identical(chosen, rejected)
    end = _prompt_end(chosen, rejected)
    n = min(len(chosen), len(rejected))
    for key, messages in zip(SIDES, (chosen, rejected), strict=True):
        role = messages[end]["role"]
        if role != "assistant" and len(messages) == n and chosen[:n] == rejected[:n]:
            other = SIDES[1 - SIDES.index(key)]
            reason = f"the start of {other}, ending before a reply of its own: nothing to train on"
            raise _Invalid(key, reason, "no assistant turn")
        if role != "assistant":
            reason = (
                f"the prompt differs between chosen and rejected: the conversations differ at message {end} "
                f"(a {role} message), before the replies; a pair compares two replies to one prompt"
            )
            raise _Invalid(f"{key}[{end}]", reason, "prompt differs")
        _check_replies(messages, end, key)
    if given_prompt is not None and given_prompt.strip() and end == 0:
        reason = (
            "a string, but chosen and rejected are conversations that share no prompt messages, so the prompt "
            "would be lost; give it as a list of messages (or put it in both conversations)"
        )
        raise _Invalid("prompt", reason, "wrong type")
    tools = _tools(row)
    return tuple(
        {"kind": "messages", "messages": messages, "first_trainable": end, "tools": tools}
        for messages in (chosen, rejected)
    )


def _pair(row: dict, location: str) -> PreferencePair:
    for key in SIDES:
        if key not in row:
            formats = "{prompt, chosen, rejected} or {chosen, rejected}"
            reason = f"missing (preference records are {formats}; the record's keys: {sorted(row)})"
            raise _Invalid(key, reason, "missing field")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    given = {"chosen": chosen, "rejected": rejected} | ({"prompt": prompt} if prompt is not None else {})
    for key, value in given.items():
        if not isinstance(value, str | list):
            raise _Invalid(key, f"expected a string or a list of messages, got {_type_name(value)}", "wrong type")
    if isinstance(chosen, str) != isinstance(rejected, str):
        reason = (
            f"{_type_name(rejected)} but chosen is {_type_name(chosen)}: both must be strings or both message lists"
        )
        raise _Invalid("rejected", reason, "wrong type")
    conversational = isinstance(chosen, list)
    implicit = prompt is None or (isinstance(prompt, str) and conversational)  # TRL ignores a str prompt then
    if implicit:
        sides = _implicit_messages(row, prompt) if conversational else _implicit_text(chosen, rejected)
    elif isinstance(prompt, list) != conversational:
        reason = (
            f"{_type_name(prompt)}, but chosen and rejected are each {_type_name(chosen)}: give all three as "
            "strings or all three as message lists"
        )
        raise _Invalid("prompt", reason, "wrong type")
    else:
        sides = _explicit_messages(row) if conversational else _explicit_text(prompt, chosen, rejected)
    chosen_record, rejected_record = (Record(location=location, **fields) for fields in sides)
    return PreferencePair(location, chosen_record, rejected_record, implicit_prompt=implicit)


# --- reading ---------------------------------------------------------------------------------------------------


def iter_preference_records(
    source: Any, *, on_bad_record: str = "error", report: LoadReport | None = None
) -> Iterator[PreferencePair]:
    """Stream `source`'s preference records as `PreferencePair`s.

    source:         path to a .jsonl / .jsonl.gz / .json / .json.gz / .parquet file, an iterable of dicts, or a
                    datasets.Dataset (as iter_records)
    on_bad_record:  "error" raises DataError at the first bad record ("prefs.jsonl:12: field 'rejected':
                    identical to chosen ..."); "skip" leaves it out and counts it in `report` by category
                    ("identical", "empty completion", "no assistant turn", "empty reply", "prompt differs",
                    "wrong type", "missing field", ...)
    report:         a LoadReport to accumulate into (records read = pairs yielded; the format is "preference")

    The arguments and the source itself are checked at the call; records are read as the iterator is consumed.
    A source that yields no pair (empty, or every record skipped) raises DataError once exhausted.

    >>> [pair.chosen.completion for pair in iter_preference_records([{"chosen": "Sky: blue", "rejected": "Sky: red"}])]
    [' blue']
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    name, rows = _source_rows(source)
    report = report if report is not None else LoadReport()
    return _pairs(name, rows, on_bad_record == "skip", report)


def _pairs(name: str, rows: Iterator, skip: bool, report: LoadReport) -> Iterator[PreferencePair]:
    report.formats[name] = "preference"
    read, skipped = 0, Counter()
    for location, row in rows:
        try:
            if isinstance(row, _Invalid):
                raise row
            if not isinstance(row, dict):
                raise _Invalid(None, f"expected a JSON object, got {_type_name(row)}", "not an object")
            pair = _pair(row, location)
        except _Invalid as bad:
            error = DataError(location, bad.field, bad.reason, bad.category)
            if not skip:
                raise error from None
            report.add_skipped(error)
            skipped[error.category] += 1
            continue
        read += 1
        report.records_read += 1
        yield pair
    if read == 0:
        raise _no_records_error(name, skipped)


def load_preference_records(source: Any, *, on_bad_record: str = "error") -> tuple[list[PreferencePair], LoadReport]:
    """Every pair of `source` in a list, with the LoadReport (see iter_preference_records for the arguments).

    >>> rows = [{"prompt": "2+2=", "chosen": "4", "rejected": "4"}, {"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    >>> pairs, report = load_preference_records(rows, on_bad_record="skip")
    >>> len(pairs), report.skipped
    (1, Counter({'identical': 1}))
    """
    report = LoadReport()
    pairs = list(iter_preference_records(source, on_bad_record=on_bad_record, report=report))
    return pairs, report


# --- tokenized pairs -------------------------------------------------------------------------------------------


@dataclass
class PreferenceReport(TokenizeReport):
    """TokenizeReport of a pair cache. `records`: pairs read; `examples`: sequences kept (two per pair);
    `tokens`, `trained_tokens`, `truncated`: over those sequences; `dropped_too_long`, `dropped_no_response`:
    PAIRS dropped (either sequence too long under truncation "drop" / left with no trained token);
    `dropped_sides`: which sequence did not fit, e.g. {"chosen too long": 2, "rejected no response": 1} (a pair
    whose two sequences both failed counts under both); `skipped_*`: bad pairs."""

    dropped_sides: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def pairs(self) -> int:
        return self.examples // 2

    def _count_dropped(self, reasons: list[tuple[int, str]]) -> None:
        super()._count_dropped(reasons)
        for side, why in reasons:
            label = f"{SIDES[side]} {why}"
            self.dropped_sides[label] = self.dropped_sides.get(label, 0) + 1

    def summary(self) -> str:
        parts = [
            f"{self.pairs:,} pairs ({self.examples:,} sequences, {self.tokens:,} tokens, {self.trained_share:.1%} "
            f"trained) from {self.records:,} records"
        ]
        sides = lambda why: ", ".join(f"{n} {s}" for s in SIDES if (n := self.dropped_sides.get(f"{s} {why}", 0)))
        if self.truncated:
            parts.append(f"{self.truncated:,} sequences truncated")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long:,} pairs dropped as too long ({sides('too long')})")
        if self.dropped_no_response:
            parts.append(
                f"{self.dropped_no_response:,} pairs dropped with no response tokens left ({sides('no response')})"
            )
        if self.skipped_bad_records:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped_reasons.items(), key=lambda x: -x[1]))
            parts.append(f"{self.skipped_bad_records:,} bad records skipped ({reasons})")
        return "; ".join(parts)


class PreferenceDataset(TokenizedDataset):
    """A TokenizedDataset of pairs: example 2i is pair i's chosen sequence, 2i + 1 its rejected one (each
    `data[k] -> (ids int32 [n], trained bool [n])`); `num_pairs`, `pair(i)` -> (chosen, rejected); `report` is
    a PreferenceReport. Its meta.json says `"pairs": true`."""

    report_type = PreferenceReport

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        if self.meta.get("pairs") is not True or len(self) % 2:
            raise ValueError(f'{self.path}: not a preference cache (its meta.json has no "pairs": true)')

    @property
    def num_pairs(self) -> int:
        return len(self) // 2

    def pair(self, index: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        n = self.num_pairs
        if not -n <= index < n:
            raise IndexError(f"pair {index} out of range for {n} pairs")
        index %= n
        return self[2 * index], self[2 * index + 1]


def prepare_preference_dataset(
    source,
    tokenizer,
    *,
    max_seq_len: int = 4096,
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    truncation: str = "right",
    on_bad_record: str = "error",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> PreferenceDataset:
    """Read, mask, tokenize and cache preference pairs (or map the cache of an identical earlier run).

    Example 2i of the result is pair i's chosen sequence (prompt + chosen completion), 2i + 1 its rejected
    one; each trained mask covers exactly its completion (and end-of-turn token), as prepare_dataset's masks
    do. The arguments are prepare_dataset's (module docstring of fastsft.data.dataset); chunk_size counts
    pairs (two sequences each per batched tokenizer call). A pair is kept or dropped whole (PreferenceReport
    counts the dropped pairs and which side did not fit). The cache key includes the objective
    ("preference"), so it never collides with an SFT cache of the same file.
    """
    _check_length_options(max_seq_len, truncation)
    options = MaskOptions()  # every assistant turn of a completion is trained; the prompt never is
    masker = ResponseMasker(
        tokenizer, chat_template=chat_template, options=options, chat_template_kwargs=chat_template_kwargs
    )
    settings = {
        "objective": "preference",
        "chat_template_kwargs": json.dumps(chat_template_kwargs or {}, sort_keys=True, default=repr),
        "max_seq_len": max_seq_len,
        "truncation": truncation,
        "on_bad_record": on_bad_record,
        **asdict(options),
    }

    def build(directory: Path, source) -> None:
        load_report = LoadReport()
        pairs = iter_preference_records(source, on_bad_record=on_bad_record, report=load_report)
        encode = lambda chunk: _encode_pairs(masker, chunk)
        report = PreferenceReport()
        _write_examples(
            directory,
            source,
            pairs,
            encode,
            masker.chat_template,
            settings,
            report,
            load_report,
            chunk_size,
            progress,
            meta_extra={"pairs": True},
        )

    return _build_or_map(
        source, masker, settings, build, cache_dir=cache_dir, use_cache=use_cache, dataset_type=PreferenceDataset
    )


def _encode_pairs(masker: ResponseMasker, pairs: list[PreferencePair]) -> list[list[tuple] | DataError]:
    """Both sides of every pair in one batched masker call -> per pair [chosen, rejected] or its first error."""
    encoded = masker.encode([record for pair in pairs for record in (pair.chosen, pair.rejected)])
    out: list[list[tuple] | DataError] = []
    for k, pair in enumerate(pairs):
        sides = encoded[2 * k : 2 * k + 2]
        error = next(((s, e) for s, e in enumerate(sides) if isinstance(e, DataError)), None)
        out.append(sides if error is None else _side_error(pair, *error))
    return out


def _side_error(pair: PreferencePair, side: int, error: DataError) -> DataError:
    """The masker names fields of the rendered conversation ("messages[3]"); name them as the record spells
    them: "chosen[3]" for an implicit prompt, "prompt[i]" / "rejected[j]" for an explicit one."""
    key, record = SIDES[side], (pair.chosen, pair.rejected)[side]
    field = error.field
    if field == "messages":
        field = key
    elif field is not None and field.startswith("messages["):
        index, rest = field[len("messages[") :].split("]", 1)
        i = int(index)
        if pair.implicit_prompt:
            field = f"{key}[{i}]{rest}"
        elif i < record.first_trainable:
            field = f"prompt[{i}]{rest}"
        else:
            field = f"{key}[{i - record.first_trainable}]{rest}"
    return DataError(error.location, field, error.reason, error.category)
