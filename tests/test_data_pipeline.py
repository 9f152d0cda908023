"""Tokenize-once cache, truncation and drop policy, packed micro-batches and the loader, end to end."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _chat_tokenizers import make_tokenizer

from fastsft.data import (
    IGNORE_INDEX,
    DataError,
    PackedLoader,
    ResponseMasker,
    build_micro_batch,
    load_records,
    prepare_dataset,
)
from fastsft.data import templates as templates_module

USER = "What is the capital of France?"
REPLY = "The capital of France is Paris."


def conversation(k: int) -> dict:
    """k user/assistant exchanges of varied length."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for j in range(k):
        messages.append({"role": "user", "content": f"{USER} {j}" * (1 + j % 3)})
        messages.append({"role": "assistant", "content": f"{REPLY} {j}" * (1 + (j * 7) % 4)})
    return {"messages": messages}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tokenizer():
    return make_tokenizer("chatml")


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [conversation(1 + i % 4) for i in range(23)])


def test_dataset_holds_exactly_what_the_masker_produces(tmp_path, tokenizer, data_file):
    data = prepare_dataset(data_file, tokenizer, max_seq_len=4096, cache_dir=tmp_path / "cache")
    records, _ = load_records(data_file)
    expected = ResponseMasker(tokenizer).encode(records)
    assert len(data) == len(expected) == 23
    for i, (ids, trained) in enumerate(expected):
        got_ids, got_trained = data[i]
        assert got_ids.tolist() == ids.tolist() and got_trained.tolist() == trained.tolist()
    assert data.report.examples == 23 and data.report.records == 23
    assert data.report.tokens == sum(len(ids) for ids, _ in expected) == data.num_tokens
    assert data.report.trained_tokens == sum(int(t[1:].sum()) for _, t in expected)
    assert 0 < data.report.trained_share < 1
    assert data.lengths.dtype == np.int64 and data.lengths.tolist() == [len(ids) for ids, _ in expected]


def _count_encodes(monkeypatch):
    calls = []
    original = templates_module.ResponseMasker.encode

    def counting(self, records):
        calls.append(len(records))
        return original(self, records)

    monkeypatch.setattr(templates_module.ResponseMasker, "encode", counting)
    return calls


def test_second_run_maps_the_cache_without_tokenizing(tmp_path, tokenizer, data_file, monkeypatch):
    calls = _count_encodes(monkeypatch)
    first = prepare_dataset(data_file, tokenizer, max_seq_len=4096, cache_dir=tmp_path / "cache")
    assert calls, "the first run must tokenize"
    calls.clear()
    second = prepare_dataset(data_file, make_tokenizer("chatml"), max_seq_len=4096, cache_dir=tmp_path / "cache")
    assert calls == [] and second.path == first.path
    assert isinstance(second.tokens, np.memmap)
    assert second.tokens.tolist() == first.tokens.tolist()


@pytest.mark.parametrize(
    "change",
    ["data", "max_seq_len", "template", "tokenizer", "train_on_inputs", "assistant_turns", "truncation"],
)
def test_any_input_change_misses_the_cache(tmp_path, tokenizer, data_file, monkeypatch, change):
    cache = tmp_path / "cache"
    base = prepare_dataset(data_file, tokenizer, max_seq_len=4096, cache_dir=cache)
    kwargs = {"max_seq_len": 4096, "cache_dir": cache}
    if change == "data":
        write_jsonl(data_file, [conversation(2)] * 5)
    elif change == "max_seq_len":
        kwargs["max_seq_len"] = 4095
    elif change == "template":
        kwargs["chat_template"] = tokenizer.chat_template.replace("helpful", "useful")
    elif change == "tokenizer":
        tokenizer = make_tokenizer("chatml")
        tokenizer.add_tokens(["<extra>"])
    elif change == "train_on_inputs":
        kwargs["train_on_inputs"] = True
    elif change == "assistant_turns":
        kwargs["assistant_turns"] = "last"
    else:
        kwargs["truncation"] = "drop"
    calls = _count_encodes(monkeypatch)
    other = prepare_dataset(data_file, tokenizer, **kwargs)
    assert calls and other.path != base.path


def test_interrupted_build_leaves_no_cache_behind(tmp_path, tokenizer, data_file, monkeypatch):
    original = templates_module.ResponseMasker.encode
    seen = []

    def failing(self, records):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return original(self, records)

    monkeypatch.setattr(templates_module.ResponseMasker, "encode", failing)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(data_file, tokenizer, max_seq_len=4096, cache_dir=cache, chunk_size=4)
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(templates_module.ResponseMasker, "encode", original)
    assert len(prepare_dataset(data_file, tokenizer, max_seq_len=4096, cache_dir=cache, chunk_size=4)) == 23


def test_right_truncation_keeps_the_start_and_drops_examples_left_without_a_reply(tmp_path, tokenizer):
    rows = [
        conversation(1),
        conversation(4),
        {"messages": [{"role": "user", "content": USER * 20}, {"role": "assistant", "content": REPLY}]},
    ]
    full = ResponseMasker(tokenizer).encode(load_records(rows)[0])
    limit = len(full[0][0]) + 2  # the short conversation fits, the long ones do not
    data = prepare_dataset(rows, tokenizer, max_seq_len=limit, cache_dir=tmp_path)
    long_prompt_first_target = int(np.flatnonzero(full[2][1])[0])
    assert long_prompt_first_target >= limit  # so the third example has no reply left
    assert len(data) == 2
    assert data.report.truncated == 1 and data.report.dropped_no_response == 1
    assert data.lengths.tolist() == [len(full[0][0]), limit]
    ids, trained = data[1]
    assert ids.tolist() == full[1][0][:limit].tolist() and trained.tolist() == full[1][1][:limit].tolist()


def test_drop_policy_drops_long_examples(tmp_path, tokenizer):
    rows = [conversation(1), conversation(4)]
    limit = len(ResponseMasker(tokenizer).encode(load_records(rows[:1])[0])[0][0])
    data = prepare_dataset(rows, tokenizer, max_seq_len=limit, truncation="drop", cache_dir=tmp_path)
    assert len(data) == 1 and data.report.dropped_too_long == 1 and data.report.truncated == 0


def test_nothing_left_is_an_error_not_a_zero_step_run(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": USER * 20}, {"role": "assistant", "content": REPLY}]}]
    with pytest.raises(DataError, match="no examples left"):
        prepare_dataset(rows, tokenizer, max_seq_len=8, cache_dir=tmp_path)


def test_skip_mode_counts_bad_records_from_reading_and_from_the_template(tmp_path):
    tokenizer = make_tokenizer("mistral")  # its template rejects non-alternating roles
    path = tmp_path / "mixed.jsonl"
    good = {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}]}
    not_alternating = {"messages": [{"role": "user", "content": USER}] * 2 + [{"role": "assistant", "content": REPLY}]}
    lines = [json.dumps(good), "{not json", json.dumps(not_alternating), json.dumps(good)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"mixed.jsonl:2"):
        prepare_dataset(path, tokenizer, cache_dir=tmp_path / "c1")
    data = prepare_dataset(path, tokenizer, on_bad_record="skip", cache_dir=tmp_path / "c2")
    assert len(data) == 2 and data.report.records == 4 and data.report.skipped_bad_records == 2
    assert sum(data.report.skipped_reasons.values()) == 2 and "chat template error" in data.report.skipped_reasons
    assert "bad records skipped" in data.report.summary()


def test_pretokenized_ids_outside_the_vocabulary_are_named(tmp_path, tokenizer):
    rows = [{"input_ids": [1, 2, 3]}, {"input_ids": [1, len(tokenizer) + 5, 3]}]
    with pytest.raises(DataError, match=r"records\[1\].*input_ids\[1\].*outside the tokenizer's vocabulary"):
        prepare_dataset(rows, tokenizer, cache_dir=tmp_path)


def test_cache_dir_from_environment(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("FASTSFT_CACHE_DIR", str(tmp_path / "env-cache"))
    data = prepare_dataset([conversation(1)], tokenizer)
    assert data.path.parent == tmp_path / "env-cache"


# --------------------------------------------------------------------------------------------------
# Micro-batches
# --------------------------------------------------------------------------------------------------


def expected_row(data, doc_ids):
    """The packed row built the slow way, one document and one position at a time."""
    ids, positions, labels, starts = [], [], [], [0]
    for d in doc_ids:
        doc_ids_, trained = data[d]
        for t in range(len(doc_ids_)):
            ids.append(int(doc_ids_[t]))
            positions.append(t)
            nxt = t + 1
            labels.append(int(doc_ids_[nxt]) if nxt < len(doc_ids_) and trained[nxt] else IGNORE_INDEX)
        starts.append(starts[-1] + len(doc_ids_))
    return ids, positions, labels, starts


def test_micro_batch_layout(tmp_path, tokenizer):
    rows = [conversation(1 + i % 3) for i in range(6)] + [{"text": "hi"}]
    data = prepare_dataset(rows[:6], tokenizer, cache_dir=tmp_path)
    doc_ids = [4, 0, 5, 2]
    mb = build_micro_batch(data, doc_ids)
    ids, positions, labels, starts = expected_row(data, doc_ids)
    assert mb.input_ids.shape == (1, len(ids)) and mb.input_ids.dtype == torch.int64
    assert mb.input_ids[0].tolist() == ids and mb.position_ids[0].tolist() == positions
    assert mb.labels[0].tolist() == labels
    assert mb.cu_seqlens.dtype == torch.int32 and mb.cu_seqlens.tolist() == starts
    assert mb.max_seqlen == max(b - a for a, b in zip(starts, starts[1:], strict=False))
    assert mb.num_supervised == sum(label != IGNORE_INDEX for label in labels) > 0
    # Every document's last position predicts nothing.
    assert all(mb.labels[0, end - 1].item() == IGNORE_INDEX for end in starts[1:])


def test_one_token_documents(tmp_path, tokenizer):
    data = prepare_dataset(
        [{"input_ids": [7]}, {"input_ids": [3, 4, 5]}, {"input_ids": [9, 8]}],
        tokenizer,
        max_seq_len=8,
        cache_dir=tmp_path,
    )
    # A one-token document has no target (nothing precedes its only token), so it is dropped.
    assert len(data) == 2 and data.report.dropped_no_response == 1
    mb = build_micro_batch(data, [0, 1])
    assert mb.labels[0].tolist() == [4, 5, IGNORE_INDEX, 8, IGNORE_INDEX]
    assert mb.position_ids[0].tolist() == [0, 1, 2, 0, 1]


@pytest.mark.parametrize("world_size,grad_accum", [(1, 1), (1, 3), (2, 2), (3, 1)])
def test_loader_deals_every_example_once_per_epoch(tmp_path, tokenizer, world_size, grad_accum):
    rows = [conversation(1 + (i * 5) % 6) for i in range(40)]
    data = prepare_dataset(rows, tokenizer, cache_dir=tmp_path)
    max_tokens = int(data.lengths.max()) + 40
    loaders = [
        PackedLoader(data, max_tokens=max_tokens, seed=3, world_size=world_size, rank=r, grad_accum=grad_accum)
        for r in range(world_size)
    ]
    for epoch in (0, 1):
        seen, supervised = [], 0
        per_rank = [list(loader.steps(epoch)) for loader in loaders]
        assert len({len(steps) for steps in per_rank}) == 1  # same number of steps on every rank
        for step_index in range(len(per_rank[0])):
            counts = {len(steps[step_index]) for steps in per_rank}
            assert len(counts) == 1 and 1 <= counts.pop() <= grad_accum
            for steps in per_rank:
                for mb in steps[step_index]:
                    assert mb.num_tokens <= max_tokens
                    seen.extend(mb.doc_ids.tolist())
                    supervised += mb.num_supervised
        assert sorted(seen) == list(range(len(data)))
        assert supervised == data.report.trained_tokens


def test_epochs_repack_differently(tmp_path, tokenizer):
    data = prepare_dataset([conversation(1 + i % 5) for i in range(60)], tokenizer, cache_dir=tmp_path)
    loader = PackedLoader(data, max_tokens=int(data.lengths.max()) * 2, seed=0)
    epoch0 = [mb.doc_ids.tolist() for step in loader.steps(0) for mb in step]
    epoch1 = [mb.doc_ids.tolist() for step in loader.steps(1) for mb in step]
    assert epoch0 != epoch1
    assert epoch0 == [mb.doc_ids.tolist() for step in loader.steps(0) for mb in step]  # reproducible


def test_loader_rejects_a_budget_below_the_longest_example(tmp_path, tokenizer):
    data = prepare_dataset([conversation(3), conversation(1)], tokenizer, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_tokens"):
        PackedLoader(data, max_tokens=int(data.lengths.max()) - 1)


def test_packed_labels_give_hf_per_document_loss(tmp_path, tokenizer):
    """The packed row (position_ids restarting per document, shifted labels) gives the same summed loss as
    running HF's model and HF's own label shifting on each document alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = [conversation(1 + i % 3) for i in range(5)]
    data = prepare_dataset(rows, tokenizer, cache_dir=tmp_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config).eval()
    mb = build_micro_batch(data, [3, 1, 4])
    with torch.no_grad():
        logits = model(**mb.model_inputs()).logits[0].float()
        packed = torch.nn.functional.cross_entropy(logits, mb.labels[0], ignore_index=IGNORE_INDEX, reduction="sum")
        alone = 0.0
        for d in (3, 1, 4):
            ids, trained = data[d]
            ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64))[None]
            hf_labels = torch.where(torch.from_numpy(np.array(trained)), ids_t[0], IGNORE_INDEX)[None]
            out = model(input_ids=ids_t, labels=hf_labels, use_cache=False)
            alone += out.loss * int(trained[1:].sum())
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_cache_files_are_memory_mapped_and_sized(tmp_path, tokenizer):
    data = prepare_dataset([conversation(2)] * 3, tokenizer, cache_dir=tmp_path)
    assert os.path.getsize(data.path / "tokens.bin") == 4 * data.num_tokens
    assert os.path.getsize(data.path / "trained.bin") == data.num_tokens
    assert os.path.getsize(data.path / "offsets.bin") == 8 * (len(data) + 1)


def test_generator_source_is_read_once_for_key_and_data(tmp_path, tokenizer):
    data = prepare_dataset((conversation(1 + i % 2) for i in range(4)), tokenizer, cache_dir=tmp_path)
    assert len(data) == 4


def test_a_finished_cache_survives_a_concurrent_builder(tmp_path, tokenizer, data_file):
    """A second process finishing the same key later keeps the first one's cache (which may be in use)."""
    from fastsft.data import dataset as dataset_module

    first = prepare_dataset(data_file, tokenizer, cache_dir=tmp_path)
    in_use = first.tokens  # memory-mapped by a "reader"
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "meta.json").write_text("{}")
    dataset_module._publish(staging, first.path, replace=False)
    assert first.path.is_dir() and (first.path / "tokens.bin").is_file()
    assert prepare_dataset(data_file, tokenizer, cache_dir=tmp_path).tokens.tolist() == in_use.tolist()


def test_use_cache_false_rebuilds(tmp_path, tokenizer, data_file, monkeypatch):
    cache = tmp_path / "cache"
    prepare_dataset(data_file, tokenizer, cache_dir=cache)
    calls = _count_encodes(monkeypatch)
    again = prepare_dataset(data_file, tokenizer, cache_dir=cache, use_cache=False)
    assert calls and len(again) == 23
    assert [p.name for p in cache.iterdir()] == [again.path.name]  # no staging or retired copies left


def test_cache_key_sees_every_element_of_array_records(tmp_path, tokenizer):
    """numpy's repr abbreviates long arrays; two datasets differing past element 1000 must not share a cache."""
    ids = np.full(3000, 7, dtype=np.int64)
    other = ids.copy()
    other[2500] = 8
    first = prepare_dataset([{"input_ids": ids}], tokenizer, max_seq_len=4096, cache_dir=tmp_path)
    second = prepare_dataset([{"input_ids": other}], tokenizer, max_seq_len=4096, cache_dir=tmp_path)
    assert first.path != second.path and int(second[0][0][2500]) == 8


@pytest.mark.parametrize(
    "change",
    [
        {"format": "chat"},
        {"on_bad_record": "skip"},
        {"mask_method": "prefix"},
        {"chat_template_kwargs": {"enable_thinking": False}},
    ],
)
def test_more_options_miss_the_cache(tmp_path, tokenizer, data_file, change):
    base = prepare_dataset(data_file, tokenizer, cache_dir=tmp_path)
    assert prepare_dataset(data_file, tokenizer, cache_dir=tmp_path, **change).path != base.path


def test_negative_and_out_of_range_indices(tmp_path, tokenizer, data_file):
    data = prepare_dataset(data_file, tokenizer, cache_dir=tmp_path)
    assert data[-1][0].tolist() == data[len(data) - 1][0].tolist() and len(data[-1][0]) > 0
    with pytest.raises(IndexError, match="out of range"):
        data[len(data)]


def test_abandoned_staging_of_a_dead_process_is_removed(tmp_path, tokenizer, data_file):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    data = prepare_dataset(data_file, tokenizer, cache_dir=tmp_path)
    key = data.path.name
    abandoned = tmp_path / f".{key}.partial-{int(dead.stdout)}-xyz"
    abandoned.mkdir()
    alive = tmp_path / f".{key}.partial-{os.getpid()}-abc"  # this process: still writing, must stay
    alive.mkdir()
    prepare_dataset(data_file, tokenizer, cache_dir=tmp_path, use_cache=False)
    assert not abandoned.exists() and alive.exists()


def test_a_cache_cut_short_from_outside_is_named_and_rebuilt(tmp_path, tokenizer, data_file):
    from fastsft.data.dataset import DamagedCacheError, TokenizedDataset

    cache = tmp_path / "cache"
    first = prepare_dataset(data_file, tokenizer, max_seq_len=4096, cache_dir=cache)
    expected = [(ids.copy(), trained.copy()) for ids, trained in (first[i] for i in range(len(first)))]
    tokens = first.path / "tokens.bin"
    size = tokens.stat().st_size
    del first
    with open(tokens, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DamagedCacheError, match=rf"{tokens.parent}: damaged cache: tokens.bin is {size // 2:,} bytes"):
        TokenizedDataset(tokens.parent)
    with pytest.warns(UserWarning, match=r"damaged cache: tokens.bin .*; rebuilding it"):
        again = prepare_dataset(data_file, tokenizer, max_seq_len=4096, cache_dir=cache)
    assert again.path == tokens.parent and tokens.stat().st_size == size
    for i, (ids, trained) in enumerate(expected):
        assert np.array_equal(again[i][0], ids) and np.array_equal(again[i][1], trained)


def test_the_cache_is_on_disk_before_it_is_published(tmp_path, tokenizer, data_file, monkeypatch):
    """Like a checkpoint: every file and the folder flushed, then the rename, then the rename flushed."""
    from fastsft.data import dataset

    events = []
    monkeypatch.setattr(dataset, "fsync_tree", lambda path: events.append(("tree", path.name)))
    monkeypatch.setattr(dataset, "fsync_path", lambda path: events.append(("dir", path.name)))
    real_replace = os.replace
    monkeypatch.setattr(
        dataset.os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), real_replace(a, b))[1]
    )
    data = prepare_dataset(data_file, tokenizer, max_seq_len=4096, cache_dir=tmp_path / "cache")
    assert [kind for kind, _ in events] == ["tree", "rename", "dir"]
    assert events[0][1].startswith(f".{data.path.name}.partial-") and events[1][1] == data.path.name
