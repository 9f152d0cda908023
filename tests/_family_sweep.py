"""The family sweep (issue #19, item 5): every decoder-only causal LM of the installed transformers, tiny and
random, patched by fastsft and checked against the unpatched model.

For each model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` that is decoder-only (encoder-decoder and composite,
e.g. multimodal, configs are dropped, each with its reason), a tiny random fp32 config is built from the config
class's defaults with the sizes overridden generically (`SIZES`; per-layer lists cut to one layer of each kind,
so alternating families keep every kind of layer) plus a few per-type fixes (`PER_TYPE`). Then:

* reference: a deep copy of the UNPATCHED model runs each of 3 documents alone (HF's unshifted `labels`,
  `use_cache=False`, `num_items_in_batch` = the supervised tokens of all three), the losses summed and
  backward-ed: its gradients are those of the packed batch;
* patched: `fastsft.patch(copy)` runs the documents packed into one row [1, T] (`position_ids` restarting at 0
  per document, `shift_labels` with -100 at each document's last position and on a few prompt positions, the
  same `num_items_in_batch`), backward.

Outcomes: "exact" (loss and every parameter gradient match in fp32), "refused" (`fastsft.patch` or the patched
forward raised `fastsft.patch.UnsupportedModelError`), "unbuildable" (the tiny model could not be built: the
exception's first line) and the failures: "wrong" (a mismatch), "no loss" (loss None), "crash" (any other
exception). MoE configs with `output_router_logits` and `router_aux_loss_coef` get a second case, "router_aux"
(output_router_logits=True, coefficient ROUTER_AUX_LOSS_COEF): the reference loss is the per-document
cross-entropy plus the coefficient x HF's router loss (the model's own `load_balancing_loss_func`) over the router
logits of all the documents' tokens, i.e. over the real tokens of the packed row with no document seeing another.
(The unpatched model's own `aux_loss` on the packed row is not the reference: for some types, gpt_oss among
them, HF's packed forward lets documents see each other.) Each case runs single-threaded, in well under a
second; the whole sweep takes ~15 s on 2 cores.

`python tests/_family_sweep.py --markdown [--write-readme]` prints (and writes into README.md, between the
`family-support` markers) the support table; tests/test_family_sweep.py runs the same cases.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import itertools
import logging
import math
import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- family-support:start -->", "<!-- family-support:end -->"

VOCAB = 128
DOC_LENGTHS = (7, 1, 12)
PROMPT_POSITIONS = {0: (0, 1), 2: (0, 1, 2, 5)}  # per document: label positions masked as "prompt"
RTOL, ATOL = 1e-4, 1e-6
MAX_PARAMETERS = 2_000_000
# The router_aux cases' coefficient (defaults are ~1e-3): large enough that a patched model which dropped or
# miscomputed HF's router loss is far outside the tolerance.
ROUTER_AUX_LOSS_COEF = 0.1
SEED = 0

# Generic size overrides: applied to every config whose defaults have the attribute.
SIZES = {
    # widths and depth (the depth is set by the per-layer selection below)
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "intermediate_size": 96,
    "ffn_hidden_size": 96,
    "n_inner": 96,
    "ffn_dim": 96,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "n_positions": 256,
    # MoE
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "num_experts_per_token": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "first_dense_intermediate_size": 96,
    "intermediate_size_mlp": 96,
    "dense_intermediate_size": 96,
    "expert_ffn_hidden_size": 32,
    "zero_expert_num": 2,
    "n_group": 1,
    "topk_group": 1,
    "num_expert_group": 1,
    "first_k_dense_replace": 1,  # layer 0 dense, layer 1 MoE
    "num_dense_layers": 1,
    "decoder_sparse_step": 1,
    "rotary_dim": 8,
    # MLA (DeepSeek-style attention; head_dim is then left to the config: it derives it from these)
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "o_lora_rank": 16,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "index_topk": 8,
    # other attention shapes
    "swa_head_dim": 16,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "dim_head": 16,
    "dim_ff": 96,
    "dff": 96,
    "decoder_ffn_dim": 96,
    "decoder_attention_heads": 4,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    # local attention that bites inside the documents (the longest has 12 tokens); only where the default
    # has a window (None = no sliding window)
    "sliding_window": 5,
    "sliding_window_size": 5,
    "attention_window_size": 5,
    "local_attention_window_len": 5,
    "attention_chunk_size": 8,
    # embeddings of the odd ones
    "unpadded_vocab_size": VOCAB,
    "embedding_dim": 64,
    "encoder_hash_byte_group_vocab": 64,
    "pronunciation_embed_dim": 16,
    "pronunciation_vocab_size": 32,
    "shape_embed_dim": 16,
    "shape_vocab_size": 32,
    "position_bias_num_buckets": 32,
    "position_bias_max_distance": 64,
    "input_embedding_size": 32,
    "output_embedding_size": 64,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 16,
    "hidden_size_global": 64,
    "laurel_rank": 8,
    "d_inner": 96,
    "d_head": 16,
    "mlp_only_intermediate_size": 96,
    "shared_experts_intermediate_size": 32,
    # hybrids: layer 0 of one kind, layer 1 of the other
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    # linear attention / state space layers
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "mamba_d_state": 8,
    "mamba_expand": 2,
    "mamba_n_heads": 8,  # x mamba_d_head = mamba_expand x hidden_size
    "mamba_d_head": 16,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "mamba_n_groups": 1,
    "mamba_chunk_size": 8,
    "state_size": 8,
    "ssm_state_size": 8,
    # random weights large enough that a wrong model is visibly wrong
    "initializer_range": 0.1,
    "init_std": 0.1,
}

# Config attributes that make a training forward random, set to 0 wherever a default is not.
_RANDOM = re.compile(r"dropout|pdrop|drop_prob|jitter")

# SIZES entries set only where the default is not None (None switches the feature off).
_IF_SET = {
    "sliding_window",
    "sliding_window_size",
    "attention_window_size",
    "local_attention_window_len",
    "attention_chunk_size",
    "q_lora_rank",
    "rotary_dim",
    "n_shared_experts",
    "num_shared_experts",
    "moe_num_shared_experts",
}

# Per-type fixes, applied last (the odd ones whose defaults the generic table cannot reach).
PER_TYPE: dict[str, dict] = {
    "falcon_h1": {"mamba_d_ssm": 128},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "kolibri1_1": {
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "indexed_attention"],
        "kv_source_layers": [0, 1],
        "index_layers": [1],
        "mlp_only_layers": [0],
        "index_num_heads": 2,
    },
    "longcat_flash": {"head_dim": 8},  # = qk_rope_head_dim
    "lfm2": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "mamba2": {"num_heads": 8},  # x head_dim = expand x hidden_size
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 8,
        "indexer_compress_ratio": 2,
        "ngram_vocab_size_base": 256,
        "make_ngram_vocab_size_divisible_by": 8,
        "split_ngram_parts": 4,
        "hc_lowrank": 8,
        "ple_embed_dim": 16,
    },
    "zaya": {"num_experts_per_tok": 1},
    # options of family-table entries that their defaults leave off, on so the sweep checks fastsft's handling
    "phi3": {"partial_rotary_factor": 0.75},  # Phi-4-mini's partial rotary
    "cohere": {"use_qk_norm": True},  # Command-R+'s per-head q/k LayerNorms
    "olmoe": {"clip_qkv": 1.0},
    "gemma4_text": {  # K/V shared across layers, keys as values on full layers, MoE blocks, a final softcap
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "num_kv_shared_layers": 2,
        "attention_k_eq_v": True,
        "enable_moe_block": True,
        "top_k_experts": 2,
        "final_logit_softcapping": 30.0,
    },
    # the defaults cannot build a model (real checkpoints' configs carry what is missing)
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "attn_pdrop": 0.0, "clip_qkv": 8.0}},
    "dots1": {"n_shared_experts": 1},
    "dots3_note_text": {"head_dim": 16},  # = qk_nope_head_dim + qk_rope_head_dim on its sliding layers
    "reformer": {"axial_pos_embds_dim": [32, 32], "axial_pos_shape": [16, 16]},
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
}

# Sub-configs naming another model (a text model inside a multimodal one, an audio or vision encoder): composite.
# Others (DBRX's attn_config / ffn_config, MPT's attn_config, BLT's local encoder / decoder) are parts of one
# decoder-only model, which is swept.
_COMPOSITE = re.compile(r"text|vision|audio|image|speech|vq|depth")

# Per-type calls on the built model (method name, argument).
AFTER_BUILD = {"xmod": [("set_default_language", "en_XX")]}

_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


@dataclass
class Case:
    """One checked case: a model type and a variant ("" = the config's defaults, "router_aux" = with the MoE
    router auxiliary loss)."""

    model_type: str
    variant: str = ""
    outcome: str = ""
    detail: str = ""  # the refusal, the exception's first line or the mismatch
    max_error: float | None = None
    fused: str = ""  # what fastsft.patch swapped, e.g. "norm, rope, mlp, attention, loss"
    report: str = ""  # str(model.fastsft_report)
    seconds: float = 0.0
    where: str = ""  # a crash's innermost frames (file:line), for the CLI's report; not in the table

    @property
    def id(self) -> str:
        return self.model_type + (f"-{self.variant}" if self.variant else "")


# -------------------------------------------------------------------------------------------------------------
# Enumeration
# -------------------------------------------------------------------------------------------------------------


def enumerate_types() -> tuple[dict[str, str], dict[str, str]]:
    """({model_type: causal LM class name} kept, {model_type: why dropped}), both sorted by model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kept, dropped = {}, {}
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        try:
            config_class = CONFIG_MAPPING[model_type]
        except Exception:  # kept: building its tiny model says why it fails
            kept[model_type] = class_name
            continue
        sub_configs = sorted(getattr(config_class, "sub_configs", None) or {})
        if getattr(config_class, "is_encoder_decoder", False) or _default_encoder_decoder(config_class):
            dropped[model_type] = f"encoder-decoder ({class_name} is the decoder of a sequence-to-sequence model)"
        elif any(_COMPOSITE.search(name) for name in sub_configs):
            dropped[model_type] = f"composite (sub-configs: {', '.join(sub_configs)})"
        else:
            kept[model_type] = class_name
    return kept, dropped


def _default_encoder_decoder(config_class) -> bool:
    with _quiet():
        try:
            return bool(getattr(config_class(), "is_encoder_decoder", False))
        except Exception:  # such a config is judged when its tiny model is built
            return False


@contextlib.contextmanager
def _quiet():
    """No transformers warnings / logging (configs and models complain about tiny sizes)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    root = logging.getLogger("transformers")
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(previous)
        hf_logging.set_verbosity(level)


# -------------------------------------------------------------------------------------------------------------
# The tiny config and model
# -------------------------------------------------------------------------------------------------------------


def has_router_aux(model_type: str) -> bool:
    """Whether the type's config has `output_router_logits` and `router_aux_loss_coef` (an MoE router auxiliary
    loss HF adds to the loss when asked)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with _quiet():
        try:
            config = CONFIG_MAPPING[model_type]()
            return hasattr(config, "output_router_logits") and hasattr(config, "router_aux_loss_coef")
        except Exception:  # an unbuildable config has no variant
            return False


def _is_index_list(value, layers: int) -> bool:
    """A list of layer indices (e.g. moe_layers, full_attn_idxs), not one value per layer."""
    ints = isinstance(value, (list, tuple)) and all(type(v) is int for v in value)
    return ints and all(0 <= v < layers for v in value) and all(a < b for a, b in itertools.pairwise(value))


def _layer_selection(default) -> tuple[str | None, list[int], dict[str, list]]:
    """(name of the layer-count attribute, default layer indices kept, {per-layer attribute: its value for the
    kept layers}): one layer of each kind, i.e. the first of each distinct combination of the per-layer lists
    (layer_types x mlp_layer_types x ...) and the layer-index lists (moe_layers, full_attn_idxs, ...), at least
    two layers. Index lists are renumbered to the kept layers."""
    count_name = None
    for name in _LAYER_COUNTS:
        with contextlib.suppress(Exception):
            if isinstance(getattr(default, name, None), int):
                count_name = name
                break
    if count_name is None:
        return None, [0, 1], {}
    layers = getattr(default, count_name)
    values = sorted(default.to_dict().items())
    index_lists = {
        name: list(value)
        for name, value in values
        if re.search(r"layer|idx", name) and value and _is_index_list(value, layers)
    }
    per_layer = {
        name: list(value)
        for name, value in values
        if isinstance(value, (list, tuple))
        and len(value) == layers > 1
        and not name.startswith("_")
        and name not in index_lists
    }
    kinds: dict[tuple, int] = {}
    for i in range(layers):
        kind = tuple(repr(v[i]) for v in per_layer.values()) + tuple(i in v for v in index_lists.values())
        kinds.setdefault(kind, i)
    keep = sorted(kinds.values())
    if len(keep) < 2:
        keep = list(range(min(2, layers)))
    selected = {name: [SIZES.get(name, v[i]) for i in keep] for name, v in per_layer.items()}
    selected.update({name: [new for new, old in enumerate(keep) if old in v] for name, v in index_lists.items()})
    return count_name, keep, selected


def _settable(probe, values: dict, name: str) -> bool:
    """Whether `name` is a config attribute that can be set (not a read-only property, not xlnet's
    max_position_embeddings); `probe` is a throwaway config, `values` its to_dict()."""
    try:
        setattr(probe, name, values[name] if name in values else getattr(probe, name))
    except Exception:  # any refusal means: leave it alone
        return False
    return True


def _shrink(values: dict) -> dict:
    """The sizes among `values` (a sub-config's or one layer's) made tiny: `SIZES`, at most 2 layers."""
    out = {}
    for name, value in values.items():
        if name in SIZES and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = type(value)(SIZES[name])
        elif name in _LAYER_COUNTS and isinstance(value, int):
            out[name] = min(value, 2)
    if values.get("num_key_value_heads") == values.get("num_attention_heads") and "num_key_value_heads" in out:
        out["num_key_value_heads"] = out["num_attention_heads"]  # MHA stays MHA (MLA layers require it)
    return out


def _shrink_layer(values: dict) -> dict:
    """One heterogeneous layer's overrides, tiny; head_dim 32 (twice the global one, so the layer still differs),
    kept equal to qk_nope_head_dim + qk_rope_head_dim where it was (MLA)."""
    out = {**values, **_shrink(values)}
    if "head_dim" in values:
        out["head_dim"] = 32
        nope, rope = values.get("qk_nope_head_dim"), values.get("qk_rope_head_dim")
        if nope is not None and rope is not None and nope + rope == values["head_dim"]:
            out["qk_nope_head_dim"] = 32 - out["qk_rope_head_dim"]
    return out


def tiny_config(model_type: str):
    """The type's config class with its defaults, tiny: `SIZES` where the defaults have the attribute (and it
    is not None, for the `_IF_SET` ones), one layer of each kind, token ids inside the vocabulary,
    `PER_TYPE[model_type]` last; fp32."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    probe, values = copy.deepcopy(default), default.to_dict()
    present = {name for name in set(values) | set(SIZES) if _settable(probe, values, name)}
    kwargs = {
        name: value
        for name, value in SIZES.items()
        if name in present and (name not in _IF_SET or values.get(name, getattr(default, name, None)) is not None)
    }
    for name, value in values.items():  # every dropout (and router jitter) off: the comparison is deterministic
        if _RANDOM.search(name) and isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            kwargs[name] = type(value)(0)
    if "qk_rope_head_dim" in kwargs:  # MLA: head_dim is the rope part or nope + rope, as in the defaults; no GQA
        kwargs.pop("head_dim", None)
        head_dim, rope, nope = (values.get(n) for n in ("head_dim", "qk_rope_head_dim", "qk_nope_head_dim"))
        if head_dim is not None and head_dim == rope:
            kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
        elif head_dim is not None and nope is not None and head_dim == rope + nope:
            kwargs["head_dim"] = kwargs["qk_rope_head_dim"] + kwargs.get("qk_nope_head_dim", nope)
        if "num_key_value_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    count_name, keep, per_layer = _layer_selection(default)
    if count_name is not None:
        kwargs[count_name] = len(keep)
        layers = getattr(default, count_name)
        for other in _LAYER_COUNTS:  # e.g. LongCat's num_layers (blocks of two layers) beside num_hidden_layers
            if other != count_name and isinstance(values.get(other), int) and layers:
                kwargs[other] = max(1, round(len(keep) * values[other] / layers))
        kwargs.update({name: values for name, values in per_layer.items() if name in present})
    for name in sorted(present):
        if name.endswith("_token_id"):
            value = values.get(name)
            if isinstance(value, int) and value >= VOCAB:
                kwargs[name] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(name, 2)
            elif isinstance(value, (list, tuple)) and any(isinstance(v, int) and v >= VOCAB for v in value):
                kwargs[name] = 2
    if hasattr(default, "is_decoder") and _settable(probe, values, "is_decoder"):
        kwargs["is_decoder"] = True  # encoder architectures run as causal decoders (the *ForCausalLM's use)
    for name in getattr(config_class, "sub_configs", None) or {}:  # parts of one decoder (DBRX, MPT, BLT)
        sub = getattr(default, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[name] = _shrink(sub.to_dict())
    kwargs.update(PER_TYPE.get(model_type, {}))
    config = config_class(**kwargs)
    per_layer_config = config.to_dict().get("per_layer_config")
    if (
        isinstance(per_layer_config, dict)
        and per_layer_config
        and "per_layer_config" not in PER_TYPE.get(model_type, {})
    ):
        # heterogeneous layers (Gemma-4's wide full-attention layers, ...): their own sizes, tiny
        shrunk = {layer: _shrink_layer(v) for layer, v in per_layer_config.items()}
        config = config_class(**kwargs, per_layer_config=shrunk)
    return config


def build_model(model_type: str, class_name: str, *, router_aux: bool = False):
    """A tiny random fp32 model (sdpa attention, eager where the class has no sdpa), in train mode, with its
    RMSNorm weights moved off their initial values (Gemma's start at 0: scale 1 + w)."""
    import transformers

    model_class = getattr(transformers, class_name)
    config = tiny_config(model_type)
    if router_aux:
        config.output_router_logits = True
        config.router_aux_loss_coef = ROUTER_AUX_LOSS_COEF
    with torch.device("meta"):  # count first: a size the tables miss must not allocate gigabytes
        count = sum(p.numel() for p in model_class._from_config(config).parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still has {count:,} parameters (sizes SIZES / PER_TYPE do not reach)")
    model = None
    for implementation in ("sdpa", "eager"):
        torch.manual_seed(SEED)
        try:
            model = model_class._from_config(config, attn_implementation=implementation, dtype=torch.float32)
            break
        except (ValueError, ImportError) as error:
            message = str(error).lower()
            if implementation == "eager" or ("sdpa" not in message and "scaled_dot_product" not in message):
                raise
    model = model.float().train()
    for method, argument in AFTER_BUILD.get(model_type, ()):
        getattr(model, method)(argument)
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


# -------------------------------------------------------------------------------------------------------------
# The comparison
# -------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    documents: list[torch.Tensor]  # [n] token ids per document
    labels: list[torch.Tensor]  # [n] HF's unshifted labels per document (-100 on the prompt)
    row: torch.Tensor  # [1, T] the documents packed
    position_ids: torch.Tensor  # [1, T] restarting at 0 per document
    shift_labels: torch.Tensor  # [1, T] target of t = token t + 1 of the same document; -100 at each end
    num_items: int  # supervised tokens


def make_batch(lengths=DOC_LENGTHS, seed=SEED) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    documents, labels, shifted = [], [], []
    for d, n in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (n,), generator=generator)
        lab = ids.clone()
        for p in PROMPT_POSITIONS.get(d, ()):
            if p < n:
                lab[p] = -100
        documents.append(ids)
        labels.append(lab)
        shifted.append(torch.cat([lab[1:], torch.tensor([-100])]))
    shift_labels = torch.cat(shifted)[None]
    return Batch(
        documents=documents,
        labels=labels,
        row=torch.cat(documents)[None],
        position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
        shift_labels=shift_labels,
        num_items=int((shift_labels != -100).sum()),
    )


def _accepts(model, name: str) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _no_cache(model) -> dict:
    return {"use_cache": False} if _accepts(model, "use_cache") else {}


def reference_loss(model, batch: Batch, *, router_aux: bool) -> torch.Tensor:
    """The unpatched model on each document alone, the losses summed. router_aux: each document's loss
    without its own router loss, plus the coefficient x HF's router loss (the model's own
    `load_balancing_loss_func`) over the router logits of all the documents' tokens, i.e. over the real tokens
    of the packed row with no document seeing another."""
    total, router_logits = None, []
    for ids, labels in zip(batch.documents, batch.labels, strict=True):
        out = model(input_ids=ids[None], labels=labels[None], num_items_in_batch=batch.num_items, **_no_cache(model))
        if out.loss is None:
            raise _HarnessError("the unpatched model returns no loss with labels")
        loss = out.loss
        if router_aux and getattr(out, "aux_loss", None) is not None:
            loss = loss - _aux_coefficient(model) * out.aux_loss
            router_logits.append(out.router_logits)
        total = loss if total is None else total + loss
    if router_logits:
        layers = [torch.cat(per_layer, dim=0) for per_layer in zip(*router_logits, strict=True)]
        aux_function = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
        if aux_function is None:
            raise _HarnessError("the model's module has no load_balancing_loss_func")
        aux = aux_function(tuple(layers), model.num_experts, model.num_experts_per_tok, None)
        total = total + _aux_coefficient(model) * aux
    return total


def _aux_coefficient(model) -> float:
    coefficient = getattr(model, "router_aux_loss_coef", None)
    return model.config.router_aux_loss_coef if coefficient is None else coefficient


class _HarnessError(Exception):
    """The reference cannot be computed for this type (reported as unbuildable)."""


def _fused(report) -> str:
    names = {"rms_norm": "norm", "rope": "rope", "swiglu": "mlp", "attention": "attention", "cross_entropy": "loss"}
    done = [short for name, short in names.items() if report.patched.get(name)]
    return ", ".join(done) if done else "nothing"


def _first_line(error: BaseException) -> str:
    """The exception's first line (with the next one when the first only announces it, e.g. "...:")."""
    text = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    line = text[0] if text else ""
    if line.endswith(":") and len(text) > 1:
        line = f"{line} {text[1]}"
    line = re.sub(r" at 0x[0-9a-f]+", "", line)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)[-2:]
    return " <- ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters()}


def compare(reference, patched, ref_loss, loss) -> tuple[bool, float, str]:
    """(exact, max abs error over the loss and every parameter gradient, the first tensor that differs).

    fp32 parity as the suite defines it (tests/conftest.py's assert_close_fp32): per tensor, the max abs error
    is within RTOL of the tensor's largest exact magnitude, plus ATOL. Packing sums in another order than the
    per-document runs, so single small elements differ by fp32 rounding (~1e-5 of the tensor's scale); a
    document that leaks into another moves them by 1e-2 to 1e0."""
    g_ref, g_patched = _grads(reference), _grads(patched)
    if g_ref.keys() != g_patched.keys():
        return False, math.inf, "the patched model's parameters differ"
    pairs = [("loss", loss.detach(), ref_loss.detach())]
    for name, expected in g_ref.items():
        actual = g_patched[name]
        if expected is None and actual is None:
            continue
        if expected is None or actual is None:
            like = actual if expected is None else expected
            expected = torch.zeros_like(like) if expected is None else expected
            actual = torch.zeros_like(like) if actual is None else actual
        pairs.append((f"{name}.grad", actual, expected))
    worst, first = 0.0, ""
    for name, actual, expected in pairs:
        if actual.shape != expected.shape:
            return False, math.inf, name
        if not expected.numel():
            continue
        error = (actual.double() - expected.double()).abs().max().item()
        scale = expected.double().abs().max().item()
        worst = max(worst, error) if math.isfinite(error) else math.inf
        if not (error <= RTOL * scale + ATOL) and not first:
            first = name
    return not first, worst, first


def run_case(model_type: str, class_name: str, *, router_aux: bool = False) -> Case:
    """Build, run the reference and the patched model, and classify (see the module docstring)."""
    import fastsft
    from fastsft.patch import UnsupportedModelError

    case = Case(model_type, "router_aux" if router_aux else "")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # One thread: these tensors are tiny, and on a busy machine (2 cores, other test processes) torch's
    # intra-op threads spin for far longer than the work takes (the sweep runs ~8x faster).
    torch.set_num_threads(1)
    try:
        with _quiet():
            try:
                base = build_model(model_type, class_name, router_aux=router_aux)
            except Exception as error:  # the outcome says why
                case.outcome, case.detail = "unbuildable", _first_line(error)
                return case
            batch = make_batch()
            reference = copy.deepcopy(base)
            patched = copy.deepcopy(base)
            del base
            try:
                ref_loss = reference_loss(reference, batch, router_aux=router_aux)
                ref_loss.backward()
            except Exception as error:  # the unpatched model cannot run the reference
                case.outcome = "unbuildable"
                case.detail = "the unpatched reference fails: " + _first_line(error)
                return case
            try:
                fastsft.patch(patched)
                report = getattr(patched, "fastsft_report", None)
                case.fused = _fused(report) if report is not None else "nothing"
                case.report = str(report)
                out = patched(
                    input_ids=batch.row,
                    position_ids=batch.position_ids,
                    shift_labels=batch.shift_labels,
                    num_items_in_batch=batch.num_items,
                    use_cache=False,
                )
                loss = out.loss if hasattr(out, "loss") else None
                if loss is None:
                    case.outcome, case.detail = "no loss", "the patched forward returned loss=None"
                    return case
                loss.backward()
            except UnsupportedModelError as error:
                case.outcome, case.detail = "refused", _first_line(error).removeprefix("UnsupportedModelError: ")
                return case
            except Exception as error:  # any other exception is a failure
                case.outcome, case.detail = "crash", _first_line(error)
                case.where = _where(error)
                return case
            exact, case.max_error, first = compare(reference, patched, ref_loss, loss)
            case.outcome = "exact" if exact else "wrong"
            if not exact:
                case.detail = f"{first} differs (max abs error {case.max_error:.1e})"
            return case
    finally:
        torch.set_num_threads(threads)
        case.seconds = time.perf_counter() - start


def cases_to_run(kept: dict[str, str]) -> list[tuple[str, str, bool]]:
    """(model_type, class name, router_aux) of every case, sorted by model type."""
    out = []
    for model_type, class_name in kept.items():
        out.append((model_type, class_name, False))
        if has_router_aux(model_type):
            out.append((model_type, class_name, True))
    return out


def sweep(types: list[str] | None = None, *, progress=None) -> tuple[list[Case], dict[str, str]]:
    kept, dropped = enumerate_types()
    if types:
        kept = {t: c for t, c in kept.items() if t in types}
    cases = []
    for model_type, class_name, router_aux in cases_to_run(kept):
        case = run_case(model_type, class_name, router_aux=router_aux)
        cases.append(case)
        if progress is not None:
            progress(case)
    return cases, dropped


# -------------------------------------------------------------------------------------------------------------
# The support table
# -------------------------------------------------------------------------------------------------------------

FAILURES = ("wrong", "no loss", "crash")


def _cell(text: str, limit: int = 200) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def outcome_text(case: Case) -> str:
    """The table's outcome: deterministic (no timings, no error values)."""
    if case.outcome == "exact":
        return "exact"
    if case.outcome == "wrong":
        where = case.detail.split(" differs")[0]
        return "**wrong**: " + ("the loss differs" if where == "loss" else "gradients differ (loss matches)")
    if case.outcome in FAILURES:
        return f"**{case.outcome}**" + (f": {_cell(case.detail)}" if case.detail else "")
    return f"{case.outcome}: {_cell(case.detail)}"


def markdown(cases: list[Case], dropped: dict[str, str]) -> str:
    import transformers

    by_type: dict[str, list[Case]] = {}
    for case in cases:
        by_type.setdefault(case.model_type, []).append(case)
    counts: dict[str, int] = {}
    for case in cases:
        if not case.variant:
            counts[case.outcome] = counts.get(case.outcome, 0) + 1
    summary = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    lines = [
        f"Generated with transformers {transformers.__version__}: {len(by_type)} decoder-only model types "
        f"({summary}); {len(dropped)} dropped (below).",
        "",
        "| model type | fused by `fastsft.patch` | outcome |",
        "|---|---|---|",
    ]
    for model_type in sorted(by_type):
        rows = sorted(by_type[model_type], key=lambda c: c.variant)
        main = rows[0]
        outcome = outcome_text(main)
        for extra in rows[1:]:
            same = outcome_text(extra) == outcome
            outcome += (
                " (the same with `output_router_logits=True`)"
                if same
                else f"; with `output_router_logits=True`: {outcome_text(extra)}"
            )
        fused = main.fused if main.outcome != "unbuildable" else ""
        lines.append(f"| `{model_type}` | {fused or '-'} | {outcome} |")
    groups: dict[str, list[str]] = {}
    for model_type, why in sorted(dropped.items()):
        kind, _, rest = why.partition(" (")
        detail = rest.rstrip(")").removeprefix("sub-configs: ") if kind.startswith("composite") else ""
        groups.setdefault(kind, []).append(f"`{model_type}`" + (f" ({detail})" if detail else ""))
    lines.append("")
    lines += [f"Not swept, {kind}: {', '.join(names)}." for kind, names in sorted(groups.items())]
    return "\n".join(lines) + "\n"


def write_readme(table: str, readme: Path = README) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}{END}{tail}")


def readme_table(readme: Path = README) -> str | None:
    text = readme.read_text()
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].lstrip("\n")


def readme_version(readme: Path = README) -> str | None:
    table = readme_table(readme)
    match = re.search(r"Generated with transformers (\S+?):", table or "")
    return match.group(1) if match else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("types", nargs="*", help="model types to run (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print the README's support table")
    parser.add_argument("--write-readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    if args.write_readme and args.types:
        parser.error("--write-readme writes the table of every model type: give no types")
    os.environ.setdefault("FASTSFT_BACKEND", "reference")
    start = time.perf_counter()

    def progress(case: Case) -> None:
        if args.markdown and not args.write_readme:
            return
        error = f" max error {case.max_error:.1e}" if case.max_error is not None else ""
        where = f" (at {case.where})" if case.where else ""
        print(f"{case.id:32s} {case.outcome:12s} {case.seconds:5.2f}s{error} [{case.fused}] {case.detail}{where}")
        sys.stdout.flush()

    cases, dropped = sweep(args.types or None, progress=progress)
    table = markdown(cases, dropped)
    if args.write_readme:
        write_readme(table)
    if args.markdown and not args.write_readme:
        print(table, end="")
    else:
        for t, why in dropped.items():
            print(f"dropped {t}: {why}")
        print(f"{len(cases)} cases in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    failures = [c for c in cases if c.outcome in FAILURES]
    return 1 if failures and not args.markdown else 0


if __name__ == "__main__":
    sys.exit(main())
