"""Tokenize once: records -> (token ids, response mask) per example, cached on disk as memory-mapped arrays.

    data = prepare_dataset("train.jsonl", tokenizer, max_seq_len=4096)
    data.report            # examples kept / dropped / truncated, share of trained tokens
    ids, trained = data[3] # int32 [n], bool [n] views into the memory-mapped cache

The cache lives in `<cache_dir>/<key>/` (default `$FASTSFT_CACHE_DIR`, else `~/.cache/fastsft/tokenized`).
The key hashes everything the result depends on: the data's bytes, the tokenizer (its full serialized
state), the chat template, the options and this module's format version; a second run with the same inputs
maps the arrays instead of tokenizing again. Files:

    tokens.bin    int32 [total tokens]   all examples' ids, back to back
    trained.bin   uint8 [total tokens]   1 where the token is a response token (a loss target)
    offsets.bin   int64 [examples + 1]   example i is tokens[offsets[i]:offsets[i + 1]]
    meta.json     counts, options, the report

A cache is written under a temporary name and renamed into place only when complete, so an interrupted run
never leaves a half-written cache that a later run would trust.

Preference pairs (fastsft.data.preference) use the same cache: their objective is part of the key, their
examples come two per pair (chosen, rejected) and their meta.json says `"pairs": true`.

Truncation policy (`truncation=`): "right" (default) keeps an example's first `max_seq_len` tokens (the
prompt and the start of the reply: what a model sees first is what it conditions on); "drop" drops examples
longer than `max_seq_len`. Either way an example left with no trained target is dropped and counted, and a
dataset left with no examples at all is an error, never a zero-step run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fastsft._durable import fsync_path, fsync_tree, retire

from .formats import DataError, LoadReport, Record, iter_records
from .templates import MaskOptions, ResponseMasker

# Bump whenever what is written to the cache (or how it is derived) changes: old caches are then ignored.
CACHE_FORMAT_VERSION = 1
TRUNCATION_POLICIES = ("right", "drop")
TOKEN_DTYPE = np.int32  # vocabularies are < 2**31 tokens; half the bytes of int64


@dataclass
class TokenizeReport:
    """What tokenization kept and dropped. `trained_tokens` counts loss targets (a document's first token
    is never one: nothing precedes it)."""

    records: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_response: int = 0
    skipped_bad_records: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def summary(self) -> str:
        parts = [
            f"{self.examples:,} examples ({self.tokens:,} tokens, {self.trained_share:.1%} trained) "
            f"from {self.records:,} records"
        ]
        if self.truncated:
            parts.append(f"{self.truncated:,} truncated")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long:,} dropped as too long")
        if self.dropped_no_response:
            parts.append(f"{self.dropped_no_response:,} dropped with no response tokens left")
        if self.skipped_bad_records:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped_reasons.items(), key=lambda x: -x[1]))
            parts.append(f"{self.skipped_bad_records:,} bad records skipped ({reasons})")
        return "; ".join(parts)

    def _count_dropped(self, reasons: list[tuple[int, str]]) -> None:
        """One unit (an example; a preference pair) dropped whole; `reasons` = (index of the sequence within the
        unit, "too long" or "no response") for each sequence that did not fit."""
        if any(why == "too long" for _, why in reasons):
            self.dropped_too_long += 1
        else:
            self.dropped_no_response += 1


class DamagedCacheError(DataError):
    """A cache folder whose files do not match its meta.json (prepare_dataset rebuilds such a cache)."""


class TokenizedDataset:
    """Examples as memory-mapped arrays: `len(data)`, `data[i] -> (ids int32 [n], trained bool [n])`,
    `data.lengths` (int64 [N]), `data.report`, `data.path` (the cache directory)."""

    report_type: ClassVar[type[TokenizeReport]] = TokenizeReport  # a subclass's report (pairs) has more fields

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        if meta.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(f"{self.path}: cache format {meta.get('format_version')} != {CACHE_FORMAT_VERSION}")
        self.meta = meta
        known = {f.name for f in fields(self.report_type)}
        self.report = self.report_type(**{name: value for name, value in meta["report"].items() if name in known})
        n_tokens, n_examples = meta["tokens"], meta["examples"]
        _check_sizes(self.path, n_tokens, n_examples)
        self.offsets = _map(self.path / "offsets.bin", np.int64, n_examples + 1)
        self.tokens = _map(self.path / "tokens.bin", TOKEN_DTYPE, n_tokens)
        self.trained = _map(self.path / "trained.bin", np.uint8, n_tokens)
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"example {index} out of range for {n} examples")
        index %= n
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.tokens[lo:hi], self.trained[lo:hi].view(bool)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path}: {self.report.summary()})"


def _check_sizes(path: Path, n_tokens: int, n_examples: int) -> None:
    """The cache's arrays have the sizes meta.json promises; a file cut short (or changed) from outside is a
    damaged cache, named, never mapped (numpy would fail with "mmap length is greater than file size")."""
    expected = {
        "offsets.bin": (n_examples + 1) * 8,
        "tokens.bin": n_tokens * np.dtype(TOKEN_DTYPE).itemsize,
        "trained.bin": n_tokens,
    }
    for name, size in expected.items():
        file = path / name
        actual = file.stat().st_size if file.is_file() else None
        if size and actual != size:
            found = "missing" if actual is None else f"{actual:,} bytes"
            raise DamagedCacheError(
                str(path),
                None,
                f"damaged cache: {name} is {found}, expected {size:,} bytes (delete this folder to rebuild it)",
                "damaged cache",
            )


def _map(path: Path, dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


# --------------------------------------------------------------------------------------------------
# Cache key
# --------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about the tokenizer that changes token ids: for a fast tokenizer its whole
    serialized state (vocab, merges, normalizer, pre-tokenizer, added tokens); else its vocabulary. Plus the
    class, the special tokens and the BOS/EOS settings."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        vocab = tokenizer.get_vocab()
        h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    specials = {
        "special_tokens_map": getattr(tokenizer, "special_tokens_map", {}),
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
    }
    h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return h.hexdigest()


def source_fingerprint(source) -> str:
    """A hash of the data's content: a file's bytes; an in-memory list's records; a datasets.Dataset's own
    fingerprint (datasets hashes its content and transforms)."""
    h = hashlib.sha256()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data file not found: {path}")
        if not path.is_file():
            raise DataError(str(path), None, "not a file (a directory?): give the path of one data file", "not a file")
        h.update(b"file:" + "".join(path.suffixes).encode())
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
        except OSError as error:
            reason = f"cannot read the file: {error.strerror or error}"
            raise DataError(str(path), None, reason, "unreadable file") from None
        return h.hexdigest()
    fingerprint = getattr(source, "_fingerprint", None)
    if fingerprint is not None:  # datasets.Dataset
        h.update(b"dataset:" + str(fingerprint).encode())
        return h.hexdigest()
    h.update(b"records:")
    for record in source:
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=_hashable).encode())
        h.update(b"\n")
    return h.hexdigest()


def _hashable(value):
    """JSON stand-in for values json cannot write, exact for arrays (repr abbreviates long ones)."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return {"dtype": str(value.dtype), "shape": value.shape, "sha256": hashlib.sha256(value.tobytes()).hexdigest()}
    if isinstance(value, np.generic):
        return value.item()
    return f"{type(value).__qualname__}:{value!r}"


def _library_versions() -> str:
    """Versions of the code that turns records into tokens: a new fastsft, transformers (templates,
    tokenizer wrappers), tokenizers or jinja2 may tokenize or render differently, so a cache is theirs."""
    import importlib.metadata

    versions = []
    for name in ("fastsft", "transformers", "tokenizers", "jinja2"):
        try:
            versions.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name}==absent")
    return ",".join(versions)


def _cache_key(source, tokenizer, chat_template: str, settings: dict) -> str:
    h = hashlib.sha256()
    for part in (
        f"fastsft-tokenized-v{CACHE_FORMAT_VERSION}",
        _library_versions(),
        source_fingerprint(source),
        tokenizer_fingerprint(tokenizer),
        chat_template,
        json.dumps(settings, sort_keys=True),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    env = os.environ.get("FASTSFT_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastsft" / "tokenized"


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def prepare_dataset(
    source,
    tokenizer,
    *,
    max_seq_len: int = 4096,
    format: str = "auto",
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    train_on_inputs: bool = False,
    assistant_turns: str = "all",
    mask_method: str = "auto",
    truncation: str = "right",
    on_bad_record: str = "error",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> TokenizedDataset:
    """Read, mask, tokenize and cache a dataset (or map the cache of an identical earlier run).

    source: a .jsonl / .json / .parquet path, a list of dicts, or a datasets.Dataset (formats in
    fastsft.data.formats). tokenizer: a Hugging Face tokenizer.
    max_seq_len, truncation: see the module docstring. format: "auto" or a format name.
    chat_template: a Jinja template to use instead of the tokenizer's own; chat_template_kwargs: extra
    template variables (e.g. {"enable_thinking": False}). train_on_inputs, assistant_turns, mask_method: see
    MaskOptions. on_bad_record: "error" or "skip". cache_dir / use_cache: where the cache lives, and
    whether an existing one may be used. chunk_size: records per batched tokenizer call. progress: a
    progress bar on stderr (default: when stderr is a terminal).

    Several processes (e.g. the ranks of one job) may call this at once with the same inputs: each builds,
    the first to finish publishes and the others use its cache. Better: let one rank prepare first.
    """
    _check_length_options(max_seq_len, truncation)
    options = MaskOptions(train_on_inputs=train_on_inputs, assistant_turns=assistant_turns, mask_method=mask_method)
    masker = ResponseMasker(
        tokenizer, chat_template=chat_template, options=options, chat_template_kwargs=chat_template_kwargs
    )
    settings = {
        "chat_template_kwargs": json.dumps(chat_template_kwargs or {}, sort_keys=True, default=repr),
        "max_seq_len": max_seq_len,
        "format": format,
        "truncation": truncation,
        "on_bad_record": on_bad_record,
        **asdict(options),
    }

    def build(directory: Path, source) -> None:
        _write_cache(directory, source, masker, settings, chunk_size, progress)

    return _build_or_map(source, masker, settings, build, cache_dir=cache_dir, use_cache=use_cache)


def _check_length_options(max_seq_len: int, truncation: str) -> None:
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")


def _build_or_map(
    source,
    masker: ResponseMasker,
    settings: dict,
    build: Callable[[Path, Any], None],
    *,
    cache_dir: str | os.PathLike | None,
    use_cache: bool,
    dataset_type: type[TokenizedDataset] = TokenizedDataset,
) -> TokenizedDataset:
    """The cache of (source, tokenizer, template, settings): mapped when it exists, else `build(staging, source)`
    writes it into a staging folder that is then published atomically. `settings` must hold everything the
    examples depend on besides those (objective, lengths, masking options): it is hashed into the key."""
    if not isinstance(source, (str, os.PathLike, list, tuple)) and iter(source) is source:
        source = list(source)  # a one-shot iterator: hashing it for the cache key would consume it
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(source, masker.tokenizer, masker.chat_template, settings)
    final = root / key
    if use_cache and (final / "meta.json").is_file():
        try:
            return dataset_type(final)
        except DamagedCacheError as error:
            warnings.warn(f"{error}; rebuilding it", stacklevel=3)
            use_cache = False  # build it again and swap the damaged one out

    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(root, key)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.partial-{os.getpid()}-", dir=root))
    try:
        build(staging, source)
        _publish(staging, final, replace=not use_cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was published
    return dataset_type(final)


def _remove_abandoned_staging(root: Path, key: str) -> None:
    """Delete this key's half-written caches whose writer process is gone (a killed run)."""
    for partial in root.glob(f".{key}.partial-*"):
        try:
            pid = int(partial.name.split(".partial-")[1].split("-")[0])
            os.kill(pid, 0)  # raises when no such process
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _publish(staging: Path, final: Path, *, replace: bool) -> None:
    """Move a finished cache into place with a rename, so readers see all of it or none of it.

    Several processes (e.g. the ranks of one job) may build the same key at once: the first rename wins and
    the others keep its copy (same key, same content) instead of deleting a cache another process is already
    reading. `replace=True` (use_cache=False) swaps an existing cache out first."""
    if replace and final.exists():
        retire(final)
    fsync_tree(staging)  # on disk before the rename makes it the cache (a crash must not leave a cut one)
    try:
        os.replace(staging, final)
    except OSError:
        if not (final / "meta.json").is_file():  # not a lost race: a real failure
            raise
    fsync_path(final.parent)


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _progress_bar(enabled: bool | None, description: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(desc=description, unit=" records", file=sys.stderr)


def _write_cache(directory: Path, source, masker: ResponseMasker, settings: dict, chunk_size: int, progress):
    """SFT: one example per record."""
    load_report = LoadReport()
    records = iter_records(
        source, format=settings["format"], on_bad_record=settings["on_bad_record"], report=load_report
    )

    def encode(chunk: list[Record]) -> list[list[tuple[np.ndarray, np.ndarray]] | DataError]:
        out = []
        for record, encoded in zip(chunk, masker.encode(chunk), strict=True):
            if not isinstance(encoded, DataError):
                encoded = _check_token_ids(record, *encoded, len(masker.tokenizer))
            out.append(encoded if isinstance(encoded, DataError) else [encoded])
        return out

    report = TokenizeReport()
    _write_examples(
        directory, source, records, encode, masker.chat_template, settings, report, load_report, chunk_size, progress
    )


def _write_examples(
    directory: Path,
    source,
    units: Iterable,
    encode: Callable[[list], Sequence[list[tuple[np.ndarray, np.ndarray]] | DataError]],
    chat_template: str,
    settings: dict,
    report: TokenizeReport,
    load_report: LoadReport,
    chunk_size: int,
    progress,
    meta_extra: dict | None = None,
) -> None:
    """Tokenize `units` (records; preference pairs) chunk by chunk into the cache files in `directory`.

    `encode(chunk)` gives, per unit, its sequences [(ids int64 [n], trained bool [n]), ...] in the order they
    are stored, or a DataError (a bad unit: raised, or skipped and counted in `load_report`). A unit is kept
    or dropped whole: when one of its sequences is too long (truncation "drop") or has no trained target left
    (after truncation "right"), none of them is written, so a pair never loses one side.
    """
    skipped_while_masking = 0
    max_seq_len, truncation = settings["max_seq_len"], settings["truncation"]
    skip_bad = settings["on_bad_record"] == "skip"
    lengths: list[int] = []
    bar = _progress_bar(progress, "tokenizing")
    with open(directory / "tokens.bin", "wb") as tokens_file, open(directory / "trained.bin", "wb") as trained_file:
        for chunk in _chunks(units, chunk_size):
            for encoded in encode(chunk):
                if isinstance(encoded, DataError):
                    if not skip_bad:
                        raise encoded
                    load_report.add_skipped(encoded)
                    skipped_while_masking += 1
                    continue
                fitted = [_fit(ids, trained, max_seq_len, truncation) for ids, trained in encoded]
                reasons = [(i, why) for i, why in enumerate(fitted) if isinstance(why, str)]
                if reasons:
                    report._count_dropped(reasons)
                    continue
                for (ids, trained, targets), (full_ids, _) in zip(fitted, encoded, strict=True):
                    report.truncated += int(len(ids) < len(full_ids))  # counts kept examples only
                    tokens_file.write(ids.astype(TOKEN_DTYPE).tobytes())
                    trained_file.write(trained.astype(np.uint8).tobytes())
                    lengths.append(len(ids))
                    report.tokens += len(ids)
                    report.trained_tokens += targets
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()

    report.examples = len(lengths)
    report.records = load_report.records_read + load_report.records_skipped - skipped_while_masking
    report.skipped_bad_records = load_report.records_skipped
    report.skipped_reasons = dict(load_report.skipped)
    report.skipped_examples = {k: list(v) for k, v in load_report.examples.items()}
    report.formats = {str(k): str(v) for k, v in load_report.formats.items()}
    if report.examples == 0:
        raise DataError(
            _describe(source),
            None,
            f"no examples left to train on: {report.summary()}. Check max_seq_len ({max_seq_len}), the "
            "record format and whether the data has assistant replies.",
        )
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    offsets.tofile(directory / "offsets.bin")
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "examples": report.examples,
        "tokens": report.tokens,
        "settings": settings,
        "chat_template": chat_template,
        "source": _describe(source),
        "report": asdict(report),
        **(meta_extra or {}),
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))


def _fit(ids: np.ndarray, trained: np.ndarray, max_seq_len: int, truncation: str):
    """(ids, trained, number of trained targets) within `max_seq_len`, or why the sequence cannot be kept:
    "too long" (truncation "drop") or "no response" (no trained target left; the first token never is one)."""
    if len(ids) > max_seq_len:
        if truncation == "drop":
            return "too long"
        ids, trained = ids[:max_seq_len], trained[:max_seq_len]
    targets = int(trained[1:].sum())
    return (ids, trained, targets) if targets else "no response"


def _check_token_ids(record: Record, ids: np.ndarray, trained: np.ndarray, vocab_size: int):
    """Pre-tokenized records may carry ids the tokenizer (and so the model's embedding) does not have."""
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        at = int(np.flatnonzero((ids < 0) | (ids >= vocab_size))[0])
        return DataError(
            record.location,
            f"input_ids[{at}]",
            f"token id {int(ids[at])} is outside the tokenizer's vocabulary [0, {vocab_size})",
            "token id out of vocabulary",
        )
    return ids, trained


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if getattr(source, "_fingerprint", None) is not None:
        return "dataset"
    return "records"
