"""fastsft.data: instruction data in, packed micro-batches out, nothing padded.

    from fastsft.data import prepare_dataset, PackedLoader

    data = prepare_dataset("train.jsonl", tokenizer, max_seq_len=4096)   # tokenized once, cached on disk
    print(data.report.summary())                                         # kept / dropped / trained share
    loader = PackedLoader(data, max_tokens=16384, grad_accum=4)
    for step in loader.steps(epoch=0):
        for mb in step:          # mb.input_ids [1, T], mb.position_ids, mb.cu_seqlens, mb.labels (shifted)
            ...

Layers: formats (records in any supported layout -> Record) -> templates (chat template + token-exact
response mask) -> dataset (tokenize once, memory-mapped cache) -> packing (best-fit decreasing, dealing to
ranks) -> batches (one packed row per micro-batch) -> loader (all of it per epoch and rank).
"""

from .batches import IGNORE_INDEX, MicroBatch, build_micro_batch
from .dataset import TokenizedDataset, TokenizeReport, default_cache_dir, prepare_dataset
from .formats import DataError, LoadReport, Record, iter_records, load_records
from .loader import PackedLoader
from .packing import Packing, Schedule, deal_to_ranks, pack_documents
from .preference import (
    PreferenceDataset,
    PreferencePair,
    PreferenceReport,
    iter_preference_records,
    load_preference_records,
    prepare_preference_dataset,
)
from .templates import CHATML_TEMPLATE, MaskOptions, ResponseMasker

__all__ = [
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "DataError",
    "LoadReport",
    "MaskOptions",
    "MicroBatch",
    "PackedLoader",
    "Packing",
    "PreferenceDataset",
    "PreferencePair",
    "PreferenceReport",
    "Record",
    "ResponseMasker",
    "Schedule",
    "TokenizeReport",
    "TokenizedDataset",
    "build_micro_batch",
    "deal_to_ranks",
    "default_cache_dir",
    "iter_preference_records",
    "iter_records",
    "load_preference_records",
    "load_records",
    "pack_documents",
    "prepare_dataset",
    "prepare_preference_dataset",
]
