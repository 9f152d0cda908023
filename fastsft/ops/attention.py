"""varlen_attention: causal attention over packed documents as torch custom ops (Triton or reference).

The forward op returns (out, lse); the backward is its own op that recomputes the probabilities from lse
(FlashAttention-2), so autograd saves q, k, v, out and the fp32 lse [Hq, T] (and the sinks [Hq] when given)
and nothing of size T x T.

`implementation=` picks whose kernels run the same math (ATTENTION_IMPLEMENTATIONS): fastsft's own
(Triton on CUDA, or FASTSFT_BACKEND's choice), torch's `varlen_attn` (FlashAttention-2 kernels inside
torch) or flash-attn's varlen function (FlashAttention-3's interface on Hopper when it is installed, else
FlashAttention-2). The last two are CUDA-only, fp16/bf16-only and bring their own autograd; an option one
of them does not implement is an error, never ignored.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math

import torch

from . import reference
from ._backend import check_float, debug_checks, describe, select_backend

_OP = "varlen_attention"


def _unit_dim_stride(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any token/head strides (views of a fused qkv projection, HF's transposed
    # [B, H, S, D] tensors) but need unit stride along D; under torch.compile a grad may arrive expanded.
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("fastsft::varlen_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
    window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [T, Hq, D] in q's dtype, lse [Hq, T] float32 (float64 for float64 inputs), natural log;
    with sinks, lse includes the sink: logaddexp(logsumexp(s), sink))."""
    if select_backend(_OP, q) == "reference":
        work = reference.compute_dtype(q.dtype)
        out, lse = reference.varlen_attention(
            q.to(work),
            k.to(work),
            v.to(work),
            cu_seqlens,
            causal=causal,
            softmax_scale=scale,
            window=window,
            softcap=softcap,
            sinks=None if sinks is None else sinks.to(work),
            return_lse=True,
        )
        return out.to(q.dtype).contiguous(), lse.contiguous()
    from fastsft.kernels.attention import attention_forward

    q, k, v = _unit_dim_stride(q), _unit_dim_stride(k), _unit_dim_stride(v)
    cu_seqlens = cu_seqlens.contiguous()  # the kernels index it as a dense array (a strided view reads garbage)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    attention_forward(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen=max_seqlen,
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap,
        sinks=_fp32_sinks(sinks),
        out=out,
        lse=lse,
    )
    return out, lse


def _fp32_sinks(sinks: torch.Tensor | None) -> torch.Tensor | None:
    # The kernels read the sink logits as a dense fp32 [Hq] array (the softmax statistics are fp32).
    return None if sinks is None else sinks.to(torch.float32).contiguous()


@_attention_op.register_fake
def _attention_fake(q, k, v, cu_seqlens, max_seqlen, causal, scale, window, softcap, sinks=None):
    lse_dtype = reference.compute_dtype(q.dtype)
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


@torch.library.custom_op("fastsft::varlen_attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
    window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq [T, Hq, D], dk [T, Hk, D], dv [T, Hk, D]) in the inputs' dtype, and dsinks: [Hq] in sinks'
    dtype, or an empty float32 [0] without sinks (a custom op cannot return None)."""
    if select_backend(_OP, q) == "reference":
        dq, dk, dv, dsinks = reference.varlen_attention_with_grads(
            grad_out,
            q,
            k,
            v,
            cu_seqlens,
            causal=causal,
            softmax_scale=scale,
            window=window,
            softcap=softcap,
            sinks=sinks,
        )
        dsinks = _no_sinks_grad(q) if dsinks is None else dsinks
        return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsinks.contiguous()
    from fastsft.kernels.attention import attention_backward

    grad_out, q, k, v, out = (_unit_dim_stride(t) for t in (grad_out, q, k, v, out))
    cu_seqlens = cu_seqlens.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dsinks = attention_backward(
        grad_out,
        q,
        k,
        v,
        out,
        lse.contiguous(),
        cu_seqlens,
        max_seqlen=max_seqlen,
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap,
        sinks=_fp32_sinks(sinks),
        dq=dq,
        dk=dk,
        dv=dv,
    )
    if sinks is None:
        return dq, dk, dv, _no_sinks_grad(q)
    return dq, dk, dv, dsinks.to(sinks.dtype)


def _no_sinks_grad(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,), dtype=torch.float32)


@_attention_backward_op.register_fake
def _attention_backward_fake(
    grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale, window, softcap, sinks=None
):
    dsinks = _no_sinks_grad(q) if sinks is None else sinks.new_empty(sinks.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _attention_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, scale, window, softcap, sinks = inputs
    out, lse = output
    ctx.has_sinks = sinks is not None
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, *((sinks,) if ctx.has_sinks else ()))
    ctx.options = (max_seqlen, causal, scale, window, softcap)


def _attention_backward(ctx, grad_out, grad_lse):
    # lse is an internal output (never returned by varlen_attention), so its gradient is always None/0.
    q, k, v, out, lse, cu_seqlens, *sinks = ctx.saved_tensors
    sinks = sinks[0] if ctx.has_sinks else None
    dq, dk, dv, dsinks = _attention_backward_op(grad_out, q, k, v, out, lse, cu_seqlens, *ctx.options, sinks)
    return dq, dk, dv, None, None, None, None, None, None, dsinks if ctx.has_sinks else None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def _fail_double_backward(ctx, *grads):
    raise RuntimeError(f"fastsft {_OP}: double backward (differentiating its gradient) is not supported")


_attention_backward_op.register_autograd(_fail_double_backward, setup_context=lambda ctx, inputs, output: None)


def _check_cu_seqlens_values(cu_seqlens: torch.Tensor, n_tokens: int, max_seqlen: int) -> None:
    """The checks that read cu_seqlens' values: always on CPU tensors, on CUDA only with FASTSFT_DEBUG=1
    (each costs a host sync), never while torch.compile traces."""
    if torch.compiler.is_compiling() or (cu_seqlens.is_cuda and not debug_checks()):
        return
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{_OP}: cu_seqlens must start at 0, got cu_seqlens[0] = {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:], strict=True)]
    for index, length in enumerate(lengths):
        if length < 0:
            raise ValueError(
                f"{_OP}: cu_seqlens must be non-decreasing, got cu_seqlens[{index}] = {values[index]} > "
                f"cu_seqlens[{index + 1}] = {values[index + 1]}"
            )
    if values[-1] != n_tokens:
        raise ValueError(
            f"{_OP}: cu_seqlens[-1] = {values[-1]} must equal the number of tokens T = {n_tokens} (q.shape[0])"
        )
    longest = max(lengths)
    if longest > max_seqlen:
        raise ValueError(
            f"{_OP}: max_seqlen = {max_seqlen} is less than the longest document ({longest} tokens, "
            f"document {lengths.index(longest)})"
        )


def _check_sinks(sinks, q: torch.Tensor, implementation: str) -> None:
    """sinks: None, or a float tensor [Hq] on q's device; only fastsft's own kernels implement them."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"{_OP}: sinks must be None or a float tensor [Hq], got {type(sinks).__name__}")
    if sinks.dim() != 1 or sinks.shape[0] != q.shape[1]:
        raise ValueError(
            f"{_OP}: sinks must be [Hq] = [{q.shape[1]}] (one sink logit per q head), got {describe(sinks)}"
        )
    if not sinks.is_floating_point():
        raise TypeError(f"{_OP}: sinks must be a floating-point tensor [Hq], got {describe(sinks)}")
    if sinks.device != q.device:
        raise ValueError(f"{_OP}: sinks is on {sinks.device} but q is on {q.device}; sinks: {describe(sinks)}")
    if implementation != "fastsft":
        raise NotImplementedError(
            f"{_OP}(implementation={implementation!r}): attention sinks (sinks=, gpt_oss's per-head learned "
            f"logit) are not implemented by {implementation!r}'s kernels; use 'fastsft' (the default)"
        )


def _check(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap, implementation) -> int:
    """Validate every argument (clear errors naming the tensor, shape and dtype); returns max_seqlen."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        choices = ", ".join(map(repr, ATTENTION_IMPLEMENTATIONS))
        raise ValueError(f"{_OP}: implementation must be one of {choices}, got {implementation!r}")
    check_float(_OP, "q", q, 3, "[T, Hq, D]")
    check_float(_OP, "k", k, 3, "[T, Hk, D]")
    check_float(_OP, "v", v, 3, "[T, Hk, D]")
    n_tokens, n_q_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != n_tokens or k.shape[2] != head_dim:
        raise ValueError(
            f"{_OP}: k and v must both be [T, Hk, D] = [{n_tokens}, Hk, {head_dim}] like q; "
            f"q: {describe(q)}; k: {describe(k)}; v: {describe(v)}"
        )
    if k.shape[1] == 0 or n_q_heads % k.shape[1]:
        raise ValueError(
            f"{_OP}: the q heads (Hq = {n_q_heads}) must be a multiple of the k/v heads "
            f"(Hk = {k.shape[1]}) for grouped-query attention"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{_OP}: q, k and v must share dtype and device; q: {describe(q)}; {name}: {describe(t)}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{_OP}: cu_seqlens must be an int32 tensor [B+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise TypeError(
            f"{_OP}: cu_seqlens must be a 1-D int32 tensor [B+1] with B >= 1 (document b = rows "
            f"cu_seqlens[b]:cu_seqlens[b+1]), got {describe(cu_seqlens)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"{_OP}: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if isinstance(max_seqlen, torch.Tensor):
        max_seqlen = int(max_seqlen)  # flash-attn accepts a 0-d tensor too; costs one sync
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{_OP}: max_seqlen must be a non-negative int (the longest document), got {max_seqlen!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"{_OP}: causal must be a bool, got {causal!r}")
    if softmax_scale is not None and not (math.isfinite(float(softmax_scale)) and float(softmax_scale) > 0):
        raise ValueError(f"{_OP}: softmax_scale must be None (1/sqrt(D)) or a finite float > 0, got {softmax_scale}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(
                f"{_OP}: window must be None or an int >= 1 (keys per query, itself included), got {window!r}"
            )
        if not causal:
            raise ValueError(f"{_OP}: window (left context) needs causal=True")
    if softcap is not None and not (math.isfinite(float(softcap)) and float(softcap) > 0):
        raise ValueError(f"{_OP}: softcap must be None or a finite float > 0, got {softcap}")
    if head_dim > 256 and implementation == "fastsft" and select_backend(_OP, q) == "triton":
        raise ValueError(f"{_OP}: the Triton kernels take head dims up to 256, got D = {head_dim}")
    _check_cu_seqlens_values(cu_seqlens, n_tokens, max_seqlen)
    return max_seqlen


ATTENTION_IMPLEMENTATIONS = ("fastsft", "torch", "flash_attn")


def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        raise ImportError(
            f"attention implementation 'torch' needs torch.nn.attention.varlen.varlen_attn (torch >= 2.11); "
            f"torch {torch.__version__} has none. Use 'fastsft' (the default)."
        ) from exc
    return varlen_attn


def _flash_attn_varlen(prefer_hopper: bool):
    """flash-attn's varlen function: FlashAttention-3's (`flash_attn_interface`, Hopper only) when asked for
    and installed, else FlashAttention-2's (`flash_attn`)."""
    names = (("flash_attn_interface",) if prefer_hopper else ()) + ("flash_attn",)
    for name in names:
        try:
            return importlib.import_module(name).flash_attn_varlen_func
        except (ImportError, AttributeError):
            continue
    raise ImportError(
        "attention implementation 'flash_attn' needs the flash-attn package (FlashAttention-2: `pip install "
        "flash-attn`; FlashAttention-3 on Hopper: `flash_attn_interface`, built from flash-attention's hopper/ "
        "folder), and neither `flash_attn` nor `flash_attn_interface` can be imported. Use 'fastsft' (the default)."
    )


def check_attention_implementation(implementation) -> str:
    """The implementation's name for `fastsft.patch(model, attention=...)`: True -> "fastsft"; "torch" and
    "flash_attn" must be importable here (ImportError naming what is missing); anything else is a ValueError."""
    if implementation is True:
        return "fastsft"
    if not isinstance(implementation, str) or implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention must be True, False or one of {', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))}; "
            f"got {implementation!r}"
        )
    if implementation == "torch":
        _torch_varlen_attn()
    elif implementation == "flash_attn":
        _flash_attn_varlen(prefer_hopper=True)
    return implementation


@functools.lru_cache(maxsize=4)
def _parameters(function) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)


def _check_flash_inputs(where: str, q: torch.Tensor) -> None:
    """What the FlashAttention kernels of torch and flash-attn accept: CUDA tensors in float16 / bfloat16."""
    if not q.is_cuda:
        raise ValueError(f"{where} runs FlashAttention CUDA kernels; q is on {q.device} (use 'fastsft' there)")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{where} takes float16 / bfloat16 (FlashAttention kernels), got q: {describe(q)}")


def _external_attention(implementation, q, k, v, cu_seqlens, max_seqlen, causal, scale, window, softcap):
    """torch's varlen_attn or flash-attn's varlen function on the same arguments as fastsft's kernels.

    Window convention: fastsft's `window` W counts the keys a query sees, itself included; FlashAttention's
    window_size=(left, right) counts the keys besides it, so left = W - 1, right = 0 (causal)."""
    where = f"{_OP}(implementation={implementation!r})"
    _check_flash_inputs(where, q)
    window_size = ((-1 if window is None else window - 1), 0) if causal else (-1, -1)
    if implementation == "torch":
        varlen_attn = _torch_varlen_attn()
        params = _parameters(varlen_attn)
        if softcap is not None:
            raise NotImplementedError(
                f"{where}: torch's varlen_attn has no logit soft-capping (softcap={softcap}, Gemma-2); use "
                "'fastsft' or 'flash_attn'"
            )
        kwargs = {"scale": scale}
        if "window_size" in params:
            kwargs["window_size"] = window_size
        elif window is None and "is_causal" in params:  # torch 2.11's early signature
            kwargs["is_causal"] = causal
        else:
            raise NotImplementedError(
                f"{where}: this torch's varlen_attn{inspect.signature(varlen_attn)} takes no "
                f"window (window={window}); use 'fastsft'"
            )
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                kwargs["enable_gqa"] = True
            else:  # no native GQA in this torch: k/v heads repeated (autograd sums their gradients back)
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    hopper = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9
    flash = _flash_attn_varlen(prefer_hopper=hopper)
    out = flash(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        softmax_scale=scale,
        causal=causal,
        window_size=window_size,
        softcap=0.0 if softcap is None else float(softcap),
    )
    return out[0] if isinstance(out, tuple) else out  # some FlashAttention-3 builds also return the lse


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    implementation: str = "fastsft",
) -> torch.Tensor:
    """Attention over packed documents: no query attends across a document boundary, nothing is padded.

    Args:
        q: [T, Hq, D] float16 / bfloat16 / float32 (float64: reference backend). Any token and head strides
            with unit stride along D, so views of a fused qkv projection are read in place. D <= 256.
        k, v: [T, Hk, D], same dtype and device; Hq % Hk == 0 (grouped-query attention: q head h uses k/v
            head h // (Hq / Hk); k/v are never repeated in memory).
        cu_seqlens: int32 [B+1], 0 = cu_seqlens[0] <= ... <= cu_seqlens[B] = T; document b is rows
            cu_seqlens[b]:cu_seqlens[b+1] (empty documents are allowed).
        max_seqlen: int >= the longest document (as flash-attn takes it); picks block sizes.
        causal: key j of a document is visible to its query i only when j <= i.
        softmax_scale: defaults to 1 / sqrt(D).
        window: sliding-window left context W (Hugging Face's `sliding_window`, Mistral / Gemma):
            query i sees keys j with i - j < W, itself included. Needs causal=True.
        softcap: Gemma-2 logit soft-capping c: scores become c * tanh(scale * q.k / c).
        sinks: attention sinks (gpt_oss's learned `sinks` / `s_aux`): a float tensor [Hq] (any float dtype,
            on q's device; the math in fp32), the sink logit of each q head. It joins every softmax of its
            head as one more column that has no value: p_j = exp(s_j) / (exp(sink_h) + sum_k exp(s_k)), so a
            query may attend to "nothing". Differentiable (its gradient is summed over the tokens). Only
            implementation="fastsft" has them; the others raise NotImplementedError.
        implementation: whose kernels: "fastsft" (ours), "torch" (torch.nn.attention.varlen.varlen_attn,
            no softcap) or "flash_attn" (flash-attn; FlashAttention-3's interface on Hopper when installed).
            The last two need CUDA and float16 / bfloat16.

    Returns:
        out [T, Hq, D] in q's dtype, contiguous: per document and head, softmax(s) v with
        s = softcap(scale * q k^T) masked as above (with sinks: softmax([s, sink_h])[:, :-1] v). Softmax
        statistics in fp32 (online, log-sum-exp saved for the backward); products on tensor cores in the
        input dtype with fp32 accumulation.

    Differentiable in q, k, v and sinks (FlashAttention-2 backward, deterministic: no atomics).
    Checks of cu_seqlens' values (starts at 0, non-decreasing, ends at T, max_seqlen large enough) need a
    host sync: they run on CPU tensors always and on CUDA tensors with FASTSFT_DEBUG=1.
    """
    max_seqlen = _check(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap, implementation)
    _check_sinks(sinks, q, implementation)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    softcap = None if softcap is None else float(softcap)
    if implementation != "fastsft":
        return _external_attention(implementation, q, k, v, cu_seqlens, max_seqlen, causal, scale, window, softcap)
    out, _ = _attention_op(q, k, v, cu_seqlens, max_seqlen, causal, scale, window, softcap, sinks)
    return out
