"""Packed-sequence attention for patched Hugging Face models.

Three pieces:

* `VarlenPlan` and `plan_varlen`: where the documents of a forward pass start and end. Computed ONCE per
  forward by the patched decoder's forward (fastsft batches pass `cu_seq_lens_q`; DataCollatorWithFlattening
  passes `cu_seq_lens_q` / `max_length_q`; HF-style packing passes `position_ids` restarting at 0 per document;
  padded batches pass an `attention_mask` with zeros) and handed to every layer through the forward's
  kwargs, so no layer recomputes it or syncs with the host.
* `attention_forward`: the attention module's forward for the families in `families.FAMILIES`: projections
  (+ per-head q/k RMSNorm), RoPE and varlen attention on [tokens, heads, head_dim] rows, never transposed
  to [B, H, S, D] and never padded.
* `fastsft_attention`: the same kernel behind transformers' `AttentionInterface` under the name "fastsft",
  for models outside the family table (their own forward, our attention).

Whose kernels run the varlen attention is the patch's `attention=` choice (fastsft.ops.attention's
ATTENTION_IMPLEMENTATIONS): "fastsft" (ours), "torch" or "flash_attn"; each has its own interface name
(`attention_interface_name`), so two models patched with different choices keep them.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from dataclasses import dataclass, field

import torch

from fastsft.ops import apply_rope, varlen_attention
from fastsft.ops.reference import rope_rotate

from .binding import original_forward
from .families import UnsupportedModelError, applies_rope, attention_softcap, has_qk_norm, sliding_window

ATTENTION_NAME = "fastsft"
PLAN_KWARG = "fastsft_varlen_plan"


# No name may contain "flash": transformers takes any implementation name containing it for FlashAttention
# (utils.generic.is_flash_attention_requested) and changes its masks and padding handling accordingly.
_INTERFACE_NAMES = {"fastsft": ATTENTION_NAME, "torch": f"{ATTENTION_NAME}_torch", "flash_attn": f"{ATTENTION_NAME}_fa"}


def attention_interface_name(implementation: str) -> str:
    """The transformers AttentionInterface name of fastsft's attention run by `implementation`."""
    return _INTERFACE_NAMES[implementation]


@dataclass
class VarlenPlan:
    """Documents of one forward pass, over the flattened [B * S] token rows.

    cu_seqlens: int32 [N + 1], document boundaries over the kept rows (varlen_attention's cu_seqlens).
    max_seqlen: the longest document (a host int: the kernel's launch grid needs it).
    keep: int64 [T] indices of the rows that are real tokens when the batch is padded, else None (all rows).
    rows: B * S.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    keep: torch.Tensor | None
    rows: int


def plan_varlen(
    batch: int,
    seq_len: int,
    device: torch.device,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | torch.Tensor | None = None,
) -> VarlenPlan:
    """Document boundaries from whichever form the caller used (see the module docstring).

    Host syncs: none for plain [B, S] batches and for explicit cu_seqlens with a max length; one for
    position_ids packing or a padding mask (finding the boundaries), once per forward pass.
    """
    rows = batch * seq_len
    if cu_seq_lens_q is not None:
        cu = cu_seq_lens_q.to(device=device, dtype=torch.int32)
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q describes one packed row, but the batch has {batch} rows")
        if max_length_q is None:
            max_length_q = (cu[1:] - cu[:-1]).max()
        return VarlenPlan(cu, int(max_length_q), None, rows)
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        real = attention_mask.to(device=device, dtype=torch.bool)
        lengths = real.sum(dim=1, dtype=torch.int32)
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
        torch.cumsum(lengths, 0, out=cu[1:])
        keep = real.reshape(-1).nonzero().squeeze(1)
        return VarlenPlan(cu, int(lengths.max()), keep, rows)
    if position_ids is not None:
        positions = position_ids.to(device).expand(batch, -1).reshape(batch, seq_len)
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = (positions[:, 1:] - positions[:, :-1]) != 1  # HF's rule: a position that does not step by 1
        if bool(starts[:, 1:].any()):
            first = starts.reshape(-1).nonzero().squeeze(1).to(torch.int32)
            cu = torch.cat([first, torch.tensor([rows], dtype=torch.int32, device=device)])
            return VarlenPlan(cu, int((cu[1:] - cu[:-1]).max()), None, rows)
    cu = torch.arange(0, rows + 1, seq_len, dtype=torch.int32, device=device)
    return VarlenPlan(cu, seq_len, None, rows)


def _gather(rows: torch.Tensor, plan: VarlenPlan) -> torch.Tensor:
    return rows if plan.keep is None else rows.index_select(0, plan.keep)


def _scatter(out: torch.Tensor, plan: VarlenPlan) -> torch.Tensor:
    """Back to all B * S rows; padding rows get zeros (they carry no loss and feed no real token)."""
    if plan.keep is None:
        return out
    full = out.new_zeros((plan.rows, *out.shape[1:]))
    return full.index_copy(0, plan.keep, out)


@dataclass(frozen=True)
class RopeLayout:
    """How a model's own apply_rotary_pos_emb reads its (cos, sin) table of width W, in the terms of
    fastsft.ops.apply_rope (HF's rotate_half rotation of the first R dims of each head, cos/sin [T, R]).

    table: "as_is" (R = W: Llama; partial rotary when W < D: Phi-4-mini), "doubled" (a half-width table
        whose angle i turns dims (i, i + W): gpt-oss; R = 2W), "first_half" (angle i = table[..., i], i < W/2,
        turning dims (2i, 2i + 1): GLM), "pairs" (entries 2i and 2i + 1 of the table serve dims 2i and 2i + 1:
        Cohere; fastsft reads the table permuted like q and k).
    interleaved: dims (2i, 2i + 1) rotate together. fastsft then permutes the first W dims of q and k alike
        (evens, then odds), which turns the rotation into the rotate_half one and leaves every q . k product,
        and so the attention, unchanged (v is not permuted).
    """

    table: str
    interleaved: bool

    def rotary_dim(self, width: int) -> int:
        return 2 * width if self.table == "doubled" else width

    def convert(self, table: torch.Tensor) -> torch.Tensor:
        """The model's cos or sin table [..., W] -> fastsft's [..., R]."""
        if self.table == "doubled":
            return torch.cat((table, table), dim=-1)
        if self.table == "first_half":
            half = table[..., : table.shape[-1] // 2]
            return torch.cat((half, half), dim=-1)
        if self.table == "pairs":
            return torch.cat((table[..., 0::2], table[..., 1::2]), dim=-1)
        return table

    def permutation(self, width: int, head_dim: int, device) -> torch.Tensor | None:
        if not self.interleaved:
            return None
        return torch.cat(
            (
                torch.arange(0, width, 2, device=device),
                torch.arange(1, width, 2, device=device),
                torch.arange(width, head_dim, device=device),
            )
        )


_ROPE_LAYOUTS = (
    RopeLayout("as_is", False),
    RopeLayout("doubled", False),
    RopeLayout("first_half", True),
    RopeLayout("pairs", True),
)


def probe_rope_layout(apply_rotary_pos_emb, width: int, head_dim: int) -> RopeLayout | None:
    """The RopeLayout under which fastsft's rotation equals `apply_rotary_pos_emb(q, k, cos, sin)` (a model's
    own function, q/k [B, H, S, D], cos/sin [B, S, W]) on random q, k and random tables (so no two layouts
    agree by accident: a wrong one is off by O(1), hence the loose fp32 tolerance, which also admits models
    that compute their rotation in fp32 whatever the input dtype); None when no layout matches (the model's
    rotation is then left to its own function)."""
    generator = torch.Generator().manual_seed(0)
    random = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float32)
    q, k = random(1, 2, 5, head_dim), random(1, 1, 5, head_dim)
    cos, sin = random(1, 5, width), random(1, 5, width)
    try:
        with torch.no_grad():
            expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - a function that cannot take these shapes is not one fastsft can mirror
        return None
    for layout in _ROPE_LAYOUTS:
        rotary_dim = layout.rotary_dim(width)
        if rotary_dim > head_dim or rotary_dim % 2:
            continue
        perm = layout.permutation(width, head_dim, q.device)
        c, s = layout.convert(cos), layout.convert(sin)
        matches = True
        for x, expected in ((q, expected_q), (k, expected_k)):
            x, expected = x.transpose(1, 2), expected.transpose(1, 2).float()  # [B, S, H, D]
            if perm is not None:
                x, expected = x[..., perm], expected[..., perm]
            ours = rope_rotate(x, c, s)
            matches = matches and ours.shape == expected.shape and torch.allclose(ours, expected, rtol=1e-4, atol=1e-4)
        if matches:
            return layout
    return None


@dataclass
class AttentionState:
    """A patched attention module's settings: its family's facts, which parts run fastsft's kernels, whose
    kernels run the varlen attention (`implementation`, see fastsft.ops.varlen_attention) and the rope layouts
    measured so far (one dict shared by the model's modules: table width -> RopeLayout or None)."""

    family: object
    rope: bool
    attention: bool
    implementation: str = "fastsft"
    rope_layouts: dict = field(default_factory=dict)


def _modeling(module):
    """The module's own modeling file (its apply_rotary_pos_emb and eager_attention_forward)."""
    return sys.modules[type(module).__module__]


def _project(self, family, hidden_states: torch.Tensor, rows: int):
    """q [rows, Hq, D], k and v [rows, Hk, D] as the family's forward computes them before RoPE: separate or
    fused (qkv_proj: q, k, v side by side) projections, q/k norms (over the whole projection or per head,
    from the norm weight's width), clipping."""
    head_dim = self.head_dim
    if isinstance(getattr(self, "qkv_proj", None), torch.nn.Module):
        qkv = self.qkv_proj(hidden_states)
        q_width = self.config.num_attention_heads * head_dim
        kv_width = (qkv.shape[-1] - q_width) // 2
        q, k, v = qkv.split((q_width, kv_width, kv_width), dim=-1)
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    norms = has_qk_norm(family, self)
    per_head = norms and self.q_norm.weight.shape[-1] == head_dim
    if norms and not per_head:  # OLMo-2: one norm over all heads' dims
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (t.reshape(rows, -1, head_dim) for t in (q, k, v))
    if per_head:
        q, k = self.q_norm(q), self.k_norm(k)
    clip = getattr(self.config, "clip_qkv", None) if family.clip_qkv else None
    if clip is not None:
        q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
    return q, k, v


def _rotate(self, state: AttentionState, q, k, cos, sin, batch: int, seq_len: int):
    """RoPE of q, k [rows, H, D] with the model's cos/sin [B or 1, S, W], by fastsft's kernel when the model's
    rotation is one of the RopeLayouts (measured once per table width), else by the model's own function."""
    rows, head_dim = q.shape[0], q.shape[-1]
    width = cos.shape[-1]
    layout = state.rope_layouts.get(width, ...) if state.rope else None
    if layout is ...:
        layout = state.rope_layouts[width] = probe_rope_layout(_modeling(self).apply_rotary_pos_emb, width, head_dim)
    if layout is None:
        as_bhsd = lambda t: t.view(batch, seq_len, -1, head_dim).transpose(1, 2)
        q, k = _modeling(self).apply_rotary_pos_emb(as_bhsd(q), as_bhsd(k), cos, sin)
        return q.transpose(1, 2).reshape(rows, -1, head_dim), k.transpose(1, 2).reshape(rows, -1, head_dim)
    perm = layout.permutation(width, head_dim, q.device)
    if perm is not None:
        q, k = q.index_select(-1, perm), k.index_select(-1, perm)
    # cos/sin are [B or 1, S, W]: one row per token after broadcasting over the batch.
    cos = layout.convert(cos).expand(batch, seq_len, -1).reshape(rows, -1)
    sin = layout.convert(sin).expand(batch, seq_len, -1).reshape(rows, -1)
    return apply_rope(q, k, cos, sin)


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """Forward of a patched attention module (`self._fastsft` holds its settings).

    hidden_states [B, S, H] -> ([B, S, H], None). Generation with a KV cache, or a call without a plan (e.g.
    output_attentions, a 4-D mask), goes to the module's original forward, which then calls the "fastsft"
    attention interface (that handles those cases with a plain PyTorch path)."""
    state = self._fastsft
    family = state.family
    plan = kwargs.get(PLAN_KWARG)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None or position_embeddings is None or (state.attention and plan is None):
        return original_forward(self)(hidden_states, position_embeddings, attention_mask, *args, **kwargs)

    batch, seq_len = hidden_states.shape[:2]
    q, k, v = _project(self, family, hidden_states, batch * seq_len)
    if applies_rope(family, self):
        cos, sin = position_embeddings
        q, k = _rotate(self, state, q, k, cos, sin, batch, seq_len)

    if not state.attention:  # rope (and q/k norms) patched, attention left to the model's own implementation
        return _hf_attention(self, state, q, k, v, batch, seq_len, attention_mask, kwargs)
    out = varlen_attention(
        _gather(q, plan),
        _gather(k, plan),
        _gather(v, plan),
        plan.cu_seqlens,
        plan.max_seqlen,
        causal=bool(getattr(self, "is_causal", True)),
        softmax_scale=self.scaling,
        window=sliding_window(family, self),
        softcap=attention_softcap(family, self),
        sinks=self.sinks if family.sinks else None,
        implementation=state.implementation,
    )
    out = _scatter(out, plan).reshape(batch, seq_len, -1)
    return self.o_proj(out), None


def _hf_attention(self, state, q, k, v, batch, seq_len, attention_mask, kwargs):
    """The model's configured attention implementation, called the way HF's own forward calls it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    as_bhsd = lambda t: t.view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
    eager = getattr(_modeling(self), "eager_attention_forward", None)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    options = {"sliding_window": sliding_window(state.family, self)} if state.family.window else {}
    if state.family.attention_softcap:
        options["softcap"] = attention_softcap(state.family, self)
    if state.family.sinks:
        options["s_aux"] = self.sinks
    kwargs = {k: v for k, v in kwargs.items() if k != PLAN_KWARG}
    out, _ = interface(
        self,
        as_bhsd(q),
        as_bhsd(k),
        as_bhsd(v),
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **options,
        **kwargs,
    )
    return self.o_proj(out.reshape(batch, seq_len, -1).contiguous()), None


# Tensor arguments an attention implementation may receive that fastsft accounts for. Any other tensor
# (e.g. gpt-oss's attention sinks `s_aux`) would be silently ignored, so it is an error; flags pass.
_HARMLESS_KWARGS = {
    PLAN_KWARG,
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "use_cache",
    "cache_position",
    "output_attentions",
    "is_causal",
    "cache",
    "past_key_values",
    "layer_idx",
    "position_embeddings",
    "return_dict",
    "output_hidden_states",
    # The loss's arguments: a model whose loss fastsft does not compute passes them down with the rest of its
    # **kwargs (as HF's own attention functions ignore them, so does fastsft's).
    "num_items_in_batch",
    "shift_labels",
}


def fastsft_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    sliding_window=None,
    softcap=None,
    *,
    implementation="fastsft",
    **kwargs,
):
    """transformers AttentionInterface function "fastsft": query [B, Hq, S, D], key/value [B, Hk, S_kv, D]
    (GQA not repeated) -> (out [B, S, Hq, D], attention weights or None). `implementation` is bound per
    interface name (`attention_interface_name`).

    Uses the forward's VarlenPlan when the patched decoder passed one, else derives one from the kwargs
    (cu_seq_lens_q / position_ids) or the 2-D padding mask. Cached generation (a 4-D mask from the mask
    function, S != S_kv) and output_attentions run a plain masked softmax in PyTorch: correct, not fast
    (fastsft accelerates training)."""
    if dropout:
        raise UnsupportedModelError("fastsft attention has no dropout; set config.attention_dropout = 0")
    # gpt-oss's attention sinks: a learned logit per query head in every softmax denominator.
    sinks = kwargs.pop("s_aux", None)
    unknown = sorted(k for k, v in kwargs.items() if torch.is_tensor(v) and k not in _HARMLESS_KWARGS)
    if unknown:
        raise UnsupportedModelError(
            f"fastsft attention does not implement {', '.join(unknown)} ({type(module).__name__}); "
            "patch this model with fastsft.patch(model, attention=False)"
        )
    batch, _, seq_len, head_dim = query.shape
    dense = key.shape[2] != seq_len or (attention_mask is not None and attention_mask.dim() != 2)
    if dense or kwargs.get("output_attentions"):
        return _dense_attention(query, key, value, attention_mask, scaling, sliding_window, softcap, module, sinks)
    plan = kwargs.get(PLAN_KWARG)
    if plan is None:
        plan = plan_varlen(
            batch,
            seq_len,
            query.device,
            attention_mask=attention_mask,
            position_ids=kwargs.get("position_ids"),
            cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
            max_length_q=kwargs.get("max_length_q"),
        )
    rows = lambda t: _gather(t.transpose(1, 2).reshape(batch * seq_len, t.shape[1], head_dim), plan)
    out = varlen_attention(
        rows(query),
        rows(key),
        rows(value),
        plan.cu_seqlens,
        plan.max_seqlen,
        causal=bool(getattr(module, "is_causal", True)),
        softmax_scale=scaling,
        window=int(sliding_window) if sliding_window else None,
        softcap=float(softcap) if softcap else None,
        sinks=sinks,
        implementation=implementation,
    )
    return _scatter(out, plan).view(batch, seq_len, -1, head_dim), None


def _dense_attention(query, key, value, attention_mask, scaling, window, softcap, module, sinks=None):
    """Plain attention for the cases varlen rows do not cover. attention_mask: a 4-D boolean mask (True =
    attend) from the "fastsft" mask function when a cache is in use; else queries are the last S positions of
    S_kv keys, with an optional 2-D padding mask."""
    batch, num_heads, seq_len, head_dim = query.shape
    kv_len = key.shape[2]
    groups = num_heads // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * (scaling or head_dim**-0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None and attention_mask.dim() == 4:
        allowed = attention_mask[..., :kv_len]
        if allowed.dtype != torch.bool and bool(
            ((allowed != 0) & (allowed > torch.finfo(allowed.dtype).min / 2)).any()
        ):
            # An additive mask carrying values (e.g. Doge's dynamic mask), not just attend / do not attend.
            raise UnsupportedModelError(
                f"{type(module).__name__} passes an additive attention mask with values other than 0 and -inf; "
                "fastsft attention keeps only which keys are allowed. Patch with attention=False"
            )
        allowed = allowed.to(torch.bool) if allowed.dtype == torch.bool else allowed == 0  # additive masks: 0 = attend
    else:
        q_pos = torch.arange(kv_len - seq_len, kv_len, device=query.device)[:, None]
        k_pos = torch.arange(kv_len, device=query.device)[None, :]
        causal = getattr(module, "is_causal", True)
        allowed = k_pos <= q_pos if causal else torch.ones_like(k_pos, dtype=torch.bool)
        if window:
            allowed = allowed & (k_pos > q_pos - window)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -kv_len:].to(torch.bool)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # one more softmax column per head with no value: its share of the mass is dropped
        sink = sinks.float().reshape(1, -1, 1, 1).expand(batch, num_heads, seq_len, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, probs.to(query.dtype)


def fastsft_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """transformers AttentionMaskInterface function "fastsft": without a cache (training) FlashAttention's
    convention, None or the 2-D padding mask (never an [S, S] mask); with a cache (q_length != kv_length or an
    offset: generation, static caches) the full 4-D boolean mask, which the dense path applies."""
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    if q_length == kv_length and not _nonzero(q_offset) and not _nonzero(kv_offset):
        return flash_attention_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs
        )
    kwargs["allow_is_causal_skip"] = False  # the dense path needs the explicit mask
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)


def _nonzero(offset) -> bool:
    return bool(offset != 0) if torch.is_tensor(offset) else offset != 0


def register_attention(implementation: str = "fastsft") -> str:
    """Register fastsft's attention run by `implementation` with transformers' attention and mask interfaces
    (idempotent); returns its name (`attention_interface_name`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = attention_interface_name(implementation)
    function = fastsft_attention
    if implementation != "fastsft":
        function = functools.partial(fastsft_attention, implementation=implementation)
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, fastsft_mask)
    return name


@functools.lru_cache(maxsize=64)
def _signature(function) -> inspect.Signature:
    return inspect.signature(function)


def _bound_call(self, args, kwargs):
    """(original forward, its signature, the bound arguments, their **kwargs) of a patched decoder's call."""
    original = original_forward(self)
    signature = _signature(original.__func__) if isinstance(original, types.MethodType) else inspect.signature(original)
    bound = signature.bind_partial(self, *args, **kwargs) if isinstance(original, types.MethodType) else None
    arguments = bound.arguments if bound is not None else signature.bind_partial(*args, **kwargs).arguments
    return original, signature, arguments, arguments.get("kwargs", {})


def packing_guard_forward(self, *args, **kwargs):
    """Forward of the base decoder of a model that cannot keep packed documents apart (`_fastsft_packing`
    says why): a row holding several documents (position_ids restarting, cu_seq_lens_q) is refused; one
    document per row (plain or padded batches) runs the model's own forward."""
    original, _, arguments, extra = _bound_call(self, args, kwargs)
    refuse_packed_call(self, arguments, extra)
    return original(*args, **kwargs)


def refuse_packed_call(decoder, arguments: dict, extra: dict) -> None:
    """refuse_packed_rows for a forward call's bound arguments (of the decoder, or of the causal LM around it:
    some causal LMs drop position_ids before their decoder sees them)."""
    if not decoder.__dict__.get("_fastsft_packing"):
        return
    tokens = _given(arguments, extra, "input_ids")
    if tokens is None:
        tokens = _given(arguments, extra, "inputs_embeds")
    if tokens is None or tokens.dim() < 2:
        return
    mask = _given(arguments, extra, "attention_mask")
    plan = plan_varlen(
        tokens.shape[0],
        tokens.shape[1],
        tokens.device,
        attention_mask=mask if _is_2d(mask) else None,
        position_ids=_given(arguments, extra, "position_ids"),
        cu_seq_lens_q=extra.get("cu_seq_lens_q"),
        max_length_q=extra.get("max_length_q"),
    )
    refuse_packed_rows(decoder, plan, tokens.shape[0])


def _given(arguments: dict, extra: dict, name: str):
    """A forward's argument, named in its signature or passed through its **kwargs (a decoder without a
    position_ids parameter still receives the caller's packed positions there)."""
    value = arguments.get(name)
    return value if value is not None else extra.get(name)


def _is_2d(mask) -> bool:
    return mask is not None and mask.dim() == 2


def refuse_packed_rows(decoder, plan: VarlenPlan, batch: int) -> None:
    """UnsupportedModelError when `plan` puts more than one document in a row and the decoder's model cannot
    keep them apart (its `_fastsft_packing` reason is set)."""
    reason = decoder.__dict__.get("_fastsft_packing")
    if reason and plan.cu_seqlens.numel() - 1 > batch:
        raise UnsupportedModelError(
            f"{type(decoder).__name__} was given packed documents (several per row), but {reason}: they would "
            "attend to each other. Give one document per row (padding, or a batch of 1), or a model fastsft "
            "keeps documents apart for (see fastsft_report)"
        )


def decoder_forward(self, *args, **kwargs):
    """Forward of the patched base decoder: work out the documents once, then run the model's own forward
    with the plan in its kwargs (HF passes them down to every attention module).

    A training forward without a cache also gets use_cache=False: a cache built during training would send
    every layer to the slow cached path (and HF only packs by position_ids without a cache)."""
    original, signature, arguments, extra = _bound_call(self, args, kwargs)
    names = ("cache", "past_key_values")
    if any(arguments.get(n) is not None or extra.get(n) is not None for n in names) or extra.get("output_attentions"):
        return original(*args, **kwargs)
    mask = arguments.get("attention_mask")
    if mask is not None and mask.dim() != 2:  # a custom 4-D mask: the model's own mask semantics apply
        return original(*args, **kwargs)
    if self.training and "use_cache" in signature.parameters and arguments.get("use_cache") is None:
        kwargs["use_cache"] = False
    tokens = arguments.get("input_ids")
    if tokens is None:
        tokens = arguments.get("inputs_embeds")
    if tokens is None or tokens.dim() < 2:
        return original(*args, **kwargs)
    kwargs[PLAN_KWARG] = plan = plan_varlen(
        tokens.shape[0],
        tokens.shape[1],
        tokens.device,
        attention_mask=mask,
        position_ids=_given(arguments, extra, "position_ids"),
        cu_seq_lens_q=extra.get("cu_seq_lens_q"),
        max_length_q=extra.get("max_length_q"),
    )
    refuse_packed_rows(self, plan, tokens.shape[0])
    return original(*args, **kwargs)
