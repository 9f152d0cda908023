"""Pure-PyTorch versions of every fastsft op: the CPU fallback and the test oracle.

Two kinds of function live here:

* Differentiable forwards (`cross_entropy`, `fused_linear_cross_entropy`): plain torch code whose
  gradients come from autograd. Tests use them, in float64, as the oracle; nothing here shares code with
  the Triton kernels.
* Loss-and-gradient helpers (`*_with_grads`): the same math with the gradient written out by hand,
  which the `reference` backend runs inside fastsft's custom ops (autograd does not record inside a
  custom op's implementation). Tests check them against autograd of the differentiable forwards.

Computation happens in float32 for half-precision inputs and in float64 for float64 inputs.

Loss of one supervised row with target y, logits x, z = softcap(x) = c * tanh(x / c) (or z = x):
    lse  = logsumexp(z)
    loss = lse - (1 - eps) * z_y - eps * mean(z) + zl * lse^2
which is PyTorch's label-smoothed cross-entropy plus a z-loss term. Rows labelled ignore_index
contribute 0. reduction="mean" divides by the number of supervised rows (0 of them gives a loss of 0,
never NaN), "sum" does not divide, "none" returns one loss per row.
"""

from __future__ import annotations

import itertools

import torch

# Rows of logits materialised at once by the reference helpers: bounds CPU memory at ~256 MiB of fp32
# for a 128k vocabulary.
_REFERENCE_CHUNK_ELEMENTS = 1 << 26


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half and single precision, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _softcapped(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _reduce(row_losses: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_losses
    total = row_losses.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def _row_losses(logits, labels, ignore_index, label_smoothing, z_loss, softcap):
    """(row_losses [N], z [N, V], lse [N], valid [N], safe_labels [N]) in compute dtype; 0 on ignored rows."""
    z = _softcapped(logits.to(compute_dtype(logits.dtype)), softcap)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).long()
    lse = torch.logsumexp(z, dim=-1)
    z_target = z.gather(1, safe_labels.unsqueeze(1)).squeeze(1)
    row_losses = lse - (1.0 - label_smoothing) * z_target + z_loss * lse * lse
    if label_smoothing > 0.0:  # only then: a -inf logit (a masked token) would make 0 * -inf = NaN
        row_losses = row_losses - label_smoothing * z.mean(dim=-1)
    row_losses = torch.where(valid, row_losses, torch.zeros_like(row_losses))
    return row_losses, z, lse, valid, safe_labels


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Differentiable cross-entropy. logits [N, V] float, labels [N] integer -> scalar (or [N] for "none"),
    in compute_dtype(logits.dtype)."""
    row_losses, _, _, valid, _ = _row_losses(logits, labels, ignore_index, label_smoothing, z_loss, softcap)
    return _reduce(row_losses, valid, reduction)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Differentiable linear + cross-entropy: hidden [N, H], weight [V, H], bias [V] or None, labels [N].
    Materialises all [N, V] logits (oracle only)."""
    dtype = compute_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return cross_entropy(
        logits,
        labels,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )


def cross_entropy_rows_with_grads(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_scale: torch.Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row losses [N] and, when row_scale is given (0-dim or [N]), the gradient of
    sum_r row_scale[r] * loss_r with respect to logits [N, V] (in compute dtype; zero on ignored rows)."""
    row_losses, z, lse, valid, safe_labels = _row_losses(logits, labels, ignore_index, label_smoothing, z_loss, softcap)
    if row_scale is None:
        return row_losses, None
    n_vocab = z.shape[-1]
    dz = torch.exp(z - lse.unsqueeze(1)) * (1.0 + 2.0 * z_loss * lse).unsqueeze(1) - label_smoothing / n_vocab
    dz.scatter_add_(1, safe_labels.unsqueeze(1), torch.full_like(lse, label_smoothing - 1.0).unsqueeze(1))
    if softcap is not None:
        dz = dz * (1.0 - (z / softcap) ** 2)
    scale = row_scale.to(z.dtype)
    scale = scale.unsqueeze(1) if scale.dim() == 1 else scale
    dz = torch.where(valid.unsqueeze(1), dz * scale, torch.zeros_like(dz))
    return row_losses, dz


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """Differentiable oracle of fastsft.ops.fused_linear_logprobs: log_softmax(hidden @ weight.T + bias) at each
    row's label, 0 on rows labelled ignore_index; [N] in compute dtype. Materialises all [N, V] logits."""
    dtype = compute_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    supervised = labels != ignore_index
    targets = torch.where(supervised, labels, torch.zeros_like(labels)).long()
    picked = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return torch.where(supervised, picked, torch.zeros_like(picked))


def per_sequence_sum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Oracle of fastsft.ops.per_sequence_sum: one slice sum per sequence, in a Python loop."""
    bounds = [int(b) for b in cu_seqlens]
    sums = [values[start:end].sum() for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.stack(sums) if sums else values.new_zeros(0)


def fused_linear_cross_entropy_with_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    row_scale: torch.Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-row losses [N] and the gradients of sum_r row_scale[r] * loss_r (each in compute dtype, or
    None when not asked for). Only supervised rows are multiplied with the weight, in row chunks that
    keep the logits under ~_REFERENCE_CHUNK_ELEMENTS elements."""
    dtype = compute_dtype(hidden.dtype)
    n_rows, n_vocab = hidden.shape[0], weight.shape[0]
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    row_losses = torch.zeros(n_rows, dtype=dtype, device=hidden.device)
    grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_grad_hidden else None
    grad_weight = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_grad_weight else None
    grad_bias = torch.zeros(n_vocab, dtype=dtype, device=w.device) if need_grad_bias else None
    want_grads = row_scale is not None and (need_grad_hidden or need_grad_weight or need_grad_bias)

    supervised = (labels != ignore_index).nonzero().squeeze(1)  # host sync: fine for the reference
    step = max(1, _REFERENCE_CHUNK_ELEMENTS // max(n_vocab, 1))
    for start in range(0, supervised.numel(), step):
        rows = supervised[start : start + step]
        h = hidden[rows].to(dtype)
        logits = h @ w.T
        if b is not None:
            logits = logits + b
        scale = None
        if want_grads:
            scale = row_scale[rows] if row_scale.dim() == 1 else row_scale
        losses, dz = cross_entropy_rows_with_grads(
            logits,
            labels[rows],
            scale,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
        row_losses[rows] = losses
        if dz is None:
            continue
        if grad_hidden is not None:
            grad_hidden[rows] = dz @ w
        if grad_weight is not None:
            grad_weight += dz.T @ h
        if grad_bias is not None:
            grad_bias += dz.sum(dim=0)
    return row_losses, grad_hidden, grad_weight, grad_bias


# --------------------------------------------------------------------------------------------------
# RoPE, RMSNorm, gated activations
# --------------------------------------------------------------------------------------------------


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """HF rotate_half RoPE on x [..., T, H, D] with cos/sin [..., T, R] (R even, R <= D; dims R.. pass
    through): y = x * cos + rotate_half(x) * sin, or with inverse=True its transpose (the backward).
    Computed in compute_dtype, returned in x's dtype. Differentiable."""
    dtype = compute_dtype(x.dtype)
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    x_rot = x[..., :rotary_dim].to(dtype)
    c = cos.to(dtype).unsqueeze(-2)  # [..., T, 1, R]: broadcast over heads
    s = sin.to(dtype).unsqueeze(-2)
    x1, x2 = x_rot[..., :half], x_rot[..., half:]
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    if inverse:
        y = torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), dim=-1)
    else:
        y = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)
    return torch.cat((y.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def apply_rope(q, k, cos, sin):
    """Differentiable RoPE of q [T, Hq, D] and k [T, Hk, D] with cos/sin [T, R]."""
    return rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0) -> torch.Tensor:
    """Differentiable RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * (offset + weight), in
    compute_dtype, returned in x's dtype."""
    dtype = compute_dtype(x.dtype)
    xf = x.to(dtype)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * (offset + weight.to(dtype))).to(x.dtype)


def add_rms_norm(x, residual, weight, eps=1e-6, *, offset=0.0):
    """Differentiable residual add + RMSNorm: s = x + residual (rounded to x's dtype, as torch's add),
    returns (rms_norm(s), s)."""
    summed = x + residual
    return rms_norm(summed, weight, eps, offset=offset), summed


def rms_norm_rows_with_grads(grad_y, x, weight, rstd, *, offset, grad_summed=None, need_grad_weight=True):
    """Hand-written RMSNorm backward on rows x [N, H] with rstd [N] (compute dtype):
    (grad_x [N, H], grad_weight [H] or None), both in compute dtype."""
    dtype = compute_dtype(x.dtype)
    x_hat = x.to(dtype) * rstd.to(dtype).unsqueeze(1)
    g = grad_y.to(dtype) * (offset + weight.to(dtype))
    grad_x = rstd.to(dtype).unsqueeze(1) * (g - x_hat * (g * x_hat).mean(dim=1, keepdim=True))
    if grad_summed is not None:
        grad_x = grad_x + grad_summed.to(dtype)
    grad_weight = (grad_y.to(dtype) * x_hat).sum(dim=0) if need_grad_weight else None
    return grad_x, grad_weight


def rms_norm_rows_forward(x, weight, *, eps, offset):
    """Rows x [N, H] -> (y [N, H] in x's dtype, rstd [N] in compute dtype)."""
    dtype = compute_dtype(x.dtype)
    xf = x.to(dtype)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=1) + eps)
    return (xf * rstd.unsqueeze(1) * (offset + weight.to(dtype))).to(x.dtype), rstd


_GELU_TANH_CUBIC = 0.044715
_SQRT_2_OVER_PI = 0.7978845608028654


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Differentiable act(gate) * up with act = silu or gelu_tanh, in compute_dtype, returned in gate's dtype."""
    dtype = compute_dtype(gate.dtype)
    g = gate.to(dtype)
    act = torch.nn.functional.silu(g) if activation == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
    return (act * up.to(dtype)).to(gate.dtype)


def swiglu(gate, up):
    return gated_activation(gate, up, "silu")


def geglu(gate, up):
    return gated_activation(gate, up, "gelu_tanh")


def gated_activation_with_grads(grad_out, gate, up, activation):
    """Hand-written backward of act(gate) * up: (grad_gate, grad_up) in compute dtype."""
    dtype = compute_dtype(gate.dtype)
    g = gate.to(dtype)
    if activation == "silu":
        s = torch.sigmoid(g)
        act, derivative = g * s, s * (1.0 + g * (1.0 - s))
    else:
        u = _SQRT_2_OVER_PI * g * (1.0 + _GELU_TANH_CUBIC * g * g)
        s = torch.sigmoid(2.0 * u)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * g * g)
        act, derivative = g * s, s + g * s * (1.0 - s) * 2.0 * du
    dout = grad_out.to(dtype)
    return dout * up.to(dtype) * derivative, dout * act


def attention_allowed(n_queries: int, n_keys: int, *, causal: bool, window: int | None, device=None) -> torch.Tensor:
    """Bool [n_queries, n_keys]: may query i attend to key j, within one document (i, j are positions in
    it). causal: j <= i. window W (left context, Hugging Face's `sliding_window`): i - j < W, so each
    query sees at most W keys, itself included."""
    i = torch.arange(n_queries, device=device).unsqueeze(1)
    j = torch.arange(n_keys, device=device).unsqueeze(0)
    allowed = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= i - j < window
    return allowed


def attention_scores(q, k, *, scale: float, softcap: float | None) -> torch.Tensor:
    """q [S, Hq, D], k [S, Hq, D] -> scores [Hq, S, S] = softcap(scale * q k^T), in q's dtype."""
    return _softcapped(torch.einsum("qhd,khd->hqk", q, k) * scale, softcap)


def _documents(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) row ranges of the non-empty documents."""
    bounds = [int(b) for b in cu_seqlens.tolist()]
    return [(start, end) for start, end in itertools.pairwise(bounds) if end > start]


def _with_sink_column(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """scores [H, S, S] -> [H, S, S + 1] with the per-head sink logit as a last column (no value)."""
    if sinks is None:
        return scores
    column = sinks.to(scores.dtype).view(-1, 1, 1).expand(-1, scores.shape[1], 1)
    return torch.cat([scores, column], dim=-1)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    eager_softmax: bool = False,
):
    """Plain attention run document by document: the oracle for fastsft.ops.varlen_attention.

    q [T, Hq, D], k/v [T, Hk, D] (Hq % Hk == 0: each k/v head serves Hq / Hk consecutive q heads),
    cu_seqlens [B+1] with document b at rows cu_seqlens[b]:cu_seqlens[b+1]. For each document and head:
        s = softcap(scale * q k^T)  (softcap(x) = c * tanh(x / c), or x), masked by `attention_allowed`
        out = softmax(s) v,  lse = logsumexp(s) per query
    sinks [Hq] (gpt_oss's attention sinks): the sink logit of head h joins every softmax of that head as
    one more column without a value, as Hugging Face's gpt_oss eager attention computes it:
        out = softmax([s, sink_h])[:, :-1] v,  lse = logsumexp([s, sink_h])
    Differentiable (autograd, sinks included). Computes in q's dtype, like torch's own attention in that
    dtype, except: eager_softmax=True does the softmax in fp32 and casts the probabilities back, as Hugging
    Face's eager attention does (the "torch's own low precision" baseline of the tests). max_seqlen is not
    needed here.

    Returns out [T, Hq, D] (and lse [Hq, T] in float32 or float64 when return_lse).
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for start, end in _documents(cu_seqlens):
        q_doc = q[start:end]
        k_doc = k[start:end].repeat_interleave(group, dim=1)
        v_doc = v[start:end].repeat_interleave(group, dim=1)
        scores = attention_scores(q_doc, k_doc, scale=scale, softcap=softcap)
        allowed = attention_allowed(end - start, end - start, causal=causal, window=window, device=q.device)
        scores = _with_sink_column(scores.masked_fill(~allowed, float("-inf")), sinks)
        if eager_softmax:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            probs = torch.softmax(scores, dim=-1)
        if sinks is not None:
            probs = probs[..., :-1]  # the sink's probability mass multiplies no value: dropped
        outs.append(torch.einsum("hqk,khd->qhd", probs, v_doc))
        if return_lse:
            lses.append(torch.logsumexp(scores.to(compute_dtype(q.dtype)), dim=-1))
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros((q.shape[1], 0), dtype=compute_dtype(q.dtype))
    return out, lse


def varlen_attention_with_grads(
    grad_out, q, k, v, cu_seqlens, *, causal=True, softmax_scale=None, window=None, softcap=None, sinks=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dsinks) of `varlen_attention` for the incoming gradient grad_out [T, Hq, D], written
    out: per document, with s = softcap(scale * q k^T) masked, t = tanh(scale * q k^T / c) and
    [P, P_sink] = softmax([s, sink]) (P = softmax(s) without sinks):
        dv = P^T dO,  dP = dO v^T,  delta = rowsum(dP * P) = rowsum(dO * out)
        dS = P * (dP - delta) [* (1 - t^2) with softcap]
        dq = scale * dS k,  dk = scale * dS^T q
        dsinks[h] = -sum over the tokens t of head h of P_sink[t] * delta[t]   (None without sinks)
    (the sink's column carries no value, so its dP is 0 and its dS is -P_sink * delta), with dk, dv summed
    over the q heads that share a k/v head. Computed in `compute_dtype`; returned in the input dtypes. (The
    reference backend's backward: autograd does not record inside a custom op.)"""
    work = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    group = q.shape[1] // k.shape[1]
    dq = torch.zeros(q.shape, dtype=work, device=q.device)
    dk = torch.zeros(k.shape, dtype=work, device=q.device)
    dv = torch.zeros(v.shape, dtype=work, device=q.device)
    dsinks = None if sinks is None else torch.zeros(sinks.shape, dtype=work, device=q.device)
    for start, end in _documents(cu_seqlens):
        q_doc, d_out = q[start:end].to(work), grad_out[start:end].to(work)
        k_doc = k[start:end].to(work).repeat_interleave(group, dim=1)
        v_doc = v[start:end].to(work).repeat_interleave(group, dim=1)
        raw = torch.einsum("qhd,khd->hqk", q_doc, k_doc) * scale
        scores = _softcapped(raw, softcap)
        allowed = attention_allowed(end - start, end - start, causal=causal, window=window, device=q.device)
        probs = torch.softmax(_with_sink_column(scores.masked_fill(~allowed, float("-inf")), sinks), dim=-1)
        if sinks is not None:
            sink_probs, probs = probs[..., -1:], probs[..., :-1]  # [H, S, 1] and [H, S, S]
        d_probs = torch.einsum("qhd,khd->hqk", d_out, v_doc)
        delta = (d_probs * probs).sum(-1, keepdim=True)
        d_scores = probs * (d_probs - delta)
        if softcap is not None:
            d_scores = d_scores * (1 - torch.tanh(raw / softcap) ** 2)
        if dsinks is not None:
            dsinks -= (sink_probs * delta).sum((1, 2))
        dq[start:end] = scale * torch.einsum("hqk,khd->qhd", d_scores, k_doc)
        heads = (end - start, k.shape[1], group, k.shape[2])
        dk[start:end] = (scale * torch.einsum("hqk,qhd->khd", d_scores, q_doc)).view(heads).sum(2)
        dv[start:end] = torch.einsum("hqk,qhd->khd", probs, d_out).view(heads).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dsinks is None else dsinks.to(sinks.dtype)
