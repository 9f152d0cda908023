"""Shared builders for the loss tests: random inputs and torch's own low-precision pipelines."""

import torch
import torch.nn.functional as F

from fastsft.ops import reference

# Every loss option alone and all together.
OPTION_SETS = {
    "plain": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 4.0},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 4.0},
}


def make_labels(n_rows: int, n_vocab: int, ignored_fraction: float, device, ignore_index: int = -100):
    """Random targets with round(ignored_fraction * n_rows) rows (at random positions) set to ignore_index."""
    labels = torch.randint(0, n_vocab, (n_rows,), device=device)
    n_ignored = round(ignored_fraction * n_rows)
    labels[torch.randperm(n_rows, device=device)[:n_ignored]] = ignore_index
    return labels


def make_linear_inputs(n_rows, hidden_size, n_vocab, dtype, device, with_bias=False, logit_scale=3.0):
    """hidden [N, H], weight [V, H] (and bias [V]) scaled so the logits have std ~logit_scale, as a trained
    lm_head's do; all require grad."""
    hidden = torch.randn(n_rows, hidden_size, device=device)
    weight = torch.randn(n_vocab, hidden_size, device=device) * (logit_scale / hidden_size**0.5)
    tensors = [hidden, weight] + ([torch.randn(n_vocab, device=device)] if with_bias else [])
    return [t.to(dtype).requires_grad_() for t in tensors]


def exact_copies(*tensors):
    """float64 leaves with the same values, for the oracle."""
    return [t.detach().double().requires_grad_() if t is not None else None for t in tensors]


def torch_lowp_cross_entropy(
    logits, labels, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None
):
    """Torch's own computation entirely in the logits' (low) precision: what a user gets without fastsft."""
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(z, dim=-1)
        loss = loss + torch.where(labels != ignore_index, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / (labels != ignore_index).sum().clamp(min=1)


def torch_lowp_linear_cross_entropy(hidden, weight, labels, *, bias=None, **options):
    """Hugging Face's convention in low precision: logits from a bf16/fp16 matmul, upcast to fp32 for the
    loss (so the rounding of the logits and of their gradient is torch's)."""
    logits = F.linear(hidden, weight, bias)
    return reference.cross_entropy(logits.float(), labels, **options)


def loss_and_grads(fn, tensors, grad_out=None, **kwargs):
    """Run fn(*tensors, **kwargs), backprop (sum-weighted by grad_out for "none"), return loss and grads."""
    for t in tensors:
        if t is not None:
            t.grad = None
    loss = fn(*tensors, **kwargs)
    if grad_out is None:
        loss.backward()
    else:
        loss.backward(grad_out.to(loss.dtype))
    return loss.detach(), [t.grad if t is not None else None for t in tensors]
