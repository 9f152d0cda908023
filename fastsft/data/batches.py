"""Micro-batches: packed documents as one row with nothing padded.

For documents d_0 .. d_{B-1} of lengths s_0 .. s_{B-1} (T = sum s_i):

    input_ids    int64 [1, T]   the documents back to back
    position_ids int64 [1, T]   0 .. s_i - 1 within each document (RoPE positions restart per document)
    cu_seqlens   int32 [B + 1]  document starts: 0, s_0, s_0 + s_1, ..., T (varlen_attention's boundaries)
    max_seqlen   int            max s_i (a host int: the attention launch grid needs it without a sync)
    labels       int64 [1, T]   already shifted: labels[t] = input_ids[t + 1] when token t + 1 is a response
                                token of the same document, else -100 (prompt tokens, and every document's
                                last position: nothing is predicted across a document boundary)
    num_supervised int          number of labels != -100

The labels are what `fused_linear_cross_entropy` takes (labels[i] is the target of row i); HF's own loss wants
unshifted labels, so a caller feeding an HF model directly passes `shift_labels=labels` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastsft._constants import IGNORE_INDEX  # shared with fastsft.patch; fastsft.data re-exports it from here


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    labels: torch.Tensor
    num_supervised: int
    doc_ids: np.ndarray  # the dataset indices packed here, in row order

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_documents(self) -> int:
        return len(self.cu_seqlens) - 1

    def to(self, device, non_blocking: bool = True) -> MicroBatch:
        """The tensors on `device` (pinned-memory host tensors copy asynchronously)."""
        move = lambda t: t.to(device, non_blocking=non_blocking)
        return MicroBatch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.cu_seqlens),
            self.max_seqlen,
            move(self.labels),
            self.num_supervised,
            self.doc_ids,
        )

    def model_inputs(self) -> dict:
        """Keyword arguments for a Hugging Face causal LM forward over this packed row (HF builds the
        block-diagonal mask from position_ids when attention_mask is None and no cache is used)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}


def build_micro_batch(dataset, doc_ids: Sequence[int] | np.ndarray, *, pin_memory: bool = False) -> MicroBatch:
    """Pack `dataset[i]` for i in doc_ids into one MicroBatch (see the module docstring for the layout).

    dataset: anything with `offsets` (int64 [N + 1]), `tokens` (int [total]) and `trained` (bool/uint8
    [total]) arrays, such as TokenizedDataset.
    """
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    if doc_ids.ndim != 1 or len(doc_ids) == 0:
        raise ValueError(f"doc_ids must be a non-empty 1-D list of example indices, got shape {doc_ids.shape}")
    offsets = dataset.offsets
    if doc_ids.min() < 0 or doc_ids.max() >= len(offsets) - 1:
        raise IndexError(f"doc_ids out of range [0, {len(offsets) - 1})")
    starts = np.asarray(offsets[doc_ids], dtype=np.int64)
    lengths = np.asarray(offsets[doc_ids + 1], dtype=np.int64) - starts
    cu = np.zeros(len(doc_ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    total = int(cu[-1])
    if total >= 2**31:
        raise ValueError(f"a micro-batch of {total} tokens does not fit int32 cu_seqlens")

    # Source index of every packed token: its document's start in the cache plus its position in the document.
    doc_of_token = np.repeat(np.arange(len(doc_ids)), lengths)
    positions = np.arange(total, dtype=np.int64) - cu[:-1][doc_of_token]
    source = starts[doc_of_token] + positions
    ids = np.asarray(dataset.tokens[source], dtype=np.int64)
    trained = np.asarray(dataset.trained[source], dtype=bool)

    # labels[t] = ids[t + 1] where token t + 1 is trained and in the same document; -100 elsewhere.
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    supervised = np.zeros(total, dtype=bool)
    supervised[:-1] = trained[1:]
    supervised[cu[1:] - 1] = False  # a document's last position predicts nothing
    labels[supervised] = ids[1:][supervised[:-1]]

    tensor = lambda a: torch.from_numpy(a).unsqueeze(0)
    batch = MicroBatch(
        input_ids=tensor(ids),
        position_ids=tensor(positions),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(lengths.max()),
        labels=tensor(labels),
        num_supervised=int(supervised.sum()),
        doc_ids=doc_ids,
    )
    if pin_memory:
        batch.input_ids, batch.position_ids = batch.input_ids.pin_memory(), batch.position_ids.pin_memory()
        batch.cu_seqlens, batch.labels = batch.cu_seqlens.pin_memory(), batch.labels.pin_memory()
    return batch
