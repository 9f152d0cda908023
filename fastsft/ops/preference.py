"""Preference losses (DPO / IPO, SimPO, ORPO) on per-pair sequence log-probabilities.

Plain PyTorch: autograd gives the gradients, nothing syncs with the host, and torch.compile traces every
function. The per-token log-probs come from fastsft's fused kernels elsewhere; each function here takes one
value per (chosen, rejected) pair, [P] tensors, and returns a PreferenceLoss of [P] tensors. Nothing is
reduced here: a caller divides the sum of `losses` by its global pair count (across ranks and accumulation
steps), exactly as the supervised loss divides by the global token count.

Computation happens in float32 for half-precision inputs and in float64 for float64 inputs (the tests'
oracle); inputs of mixed float dtypes are promoted together first. P may be 0 (empty tensors out).

Rewards are the implicit rewards the papers (and TRL's logging) report, detached: they are metrics, never
part of the loss. PreferenceLoss.accuracies is (chosen_reward > rejected_reward) per pair, as TRL logs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DPO_KINDS = ("sigmoid", "ipo")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class PreferenceLoss:
    """Per-pair results of a preference loss; P pairs.

    losses:           [P] float32 (float64 for float64 inputs), differentiable; the caller reduces them.
    chosen_rewards:   [P] same dtype, detached: the implicit reward of each chosen completion.
    rejected_rewards: [P] same dtype, detached: the implicit reward of each rejected completion.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        """[P] chosen_rewards - rejected_rewards (detached)."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> torch.Tensor:
        """[P] 1.0 where the chosen reward is strictly above the rejected one, else 0.0 (a tie counts as wrong)."""
        return (self.chosen_rewards > self.rejected_rewards).to(self.chosen_rewards.dtype)


# --------------------------------------------------------------------------------------------------
# Validation and helpers
# --------------------------------------------------------------------------------------------------


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}, device {value.device}"
    return f"a {type(value).__name__}"


def _pair_tensors(op: str, **named: torch.Tensor) -> list[torch.Tensor]:
    """Check that every argument is a 1-D float tensor [P] with the first one's P and device; return them
    converted to their common compute dtype (float32, or float64 when any input is float64)."""
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{op}: {name} must be a float tensor [P] (float16, bfloat16, float32 or float64), got {_describe(t)}"
            )
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D [P] (one value per pair), got {_describe(t)}")
    for name, t in named.items():
        if t.shape != first.shape:
            raise ValueError(
                f"{op}: {name} has {_describe(t)} but {first_name} has {_describe(first)}; "
                "every input must be [P] with the same P"
            )
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
    dtype = torch.float32
    for t in named.values():
        dtype = torch.promote_types(dtype, t.dtype)
    # .to is a no-op (same tensor, same autograd node) when the dtype already matches.
    return [t.to(dtype) for t in named.values()]


def _check_positive(op: str, name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):  # also false for nan
        raise ValueError(f"{op}: {name} must be a finite float > 0, got {value}")
    return value


def _check_label_smoothing(op: str, label_smoothing: float) -> float:
    eps = float(label_smoothing)
    # Above 0.5 the smoothed loss prefers the rejected completion: that is a flipped label, not smoothing.
    if not 0.0 <= eps <= 0.5:  # also false for nan
        raise ValueError(f"{op}: label_smoothing must be in [0, 0.5], got {label_smoothing}")
    return eps


def _smoothed_logistic(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) * logsigmoid(logits) - eps * logsigmoid(-logits), elementwise.

    logsigmoid is computed stably by torch for any finite argument (no exp overflow at |logits| = 1e4).
    The eps term is added only when eps > 0 so that eps = 0 is exactly the unsmoothed loss (and costs nothing).
    """
    losses = -F.logsigmoid(logits)
    if eps > 0.0:
        losses = (1.0 - eps) * losses - eps * F.logsigmoid(-logits)
    return losses


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate and with finite gradients over the whole range.

    Two forms of the same value, chosen at x = -log 2 (Maechler, "Accurately computing log(1 - exp(-|a|))",
    2012): near 0, 1 - exp(x) cancels, so log(-expm1(x)) is used (expm1 is exact for small |x|); far below 0,
    expm1(x) rounds to -1, so log1p(-exp(x)) is used (log1p keeps the small exp(x)). torch.where differentiates
    both forms at every x, and the log1p form evaluated near 0 is log1p(-1) = -inf in float32 (exp(-1e-8)
    rounds to 1): its masked-out zero gradient would become 0 * inf = NaN (TRL 1.16's log1mexp has exactly this
    NaN). So that form gets its input clamped into its own branch. The expm1 form is finite with a finite
    gradient for every x < 0 and needs no such guard.

    x >= 0 is not a log-probability of a non-empty completion, but a mean log-prob of exactly 0 does occur
    (float32 log_softmax returns 0 for a token the model is certain of). log(1 - exp(0)) = -inf would make the
    loss and its gradient inf/NaN, so x is first clamped to at most -tiny (the smallest normal float of its
    dtype): the value stays finite (about -87 in float32), the gradient through the clamp is 0 there, and any
    x < -tiny is untouched.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    split = -math.log(2.0)
    near_zero = x > split
    from_expm1 = torch.log(-torch.expm1(x))
    from_log1p = torch.log1p(-torch.exp(torch.where(near_zero, split, x)))
    return torch.where(near_zero, from_expm1, from_log1p)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    kind: str = "sigmoid",
) -> PreferenceLoss:
    """DPO (kind="sigmoid", with optional label smoothing) or IPO (kind="ipo") per pair.

    Inputs, each [P] float (float16/bfloat16/float32/float64), on one device: the log-probability of each
    pair's chosen / rejected completion under the policy and under the frozen reference model.
      kind="sigmoid": sums of the completion tokens' log-probs, log pi(y | x).
      kind="ipo":     per-token MEANS of the completion tokens' log-probs (sum / completion length), as TRL
                      and the IPO authors' implementation do; with sums, the squared loss grows with the
                      completion length and the target margin 1 / (2 beta) means something different for
                      every length.

    With z = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected) and eps =
    label_smoothing:
      sigmoid: loss = -(1 - eps) * logsigmoid(beta * z) - eps * logsigmoid(-beta * z)
               (DPO, Rafailov et al. 2023, eq. 7; eps > 0 is conservative DPO (Mitchell, "A note on DPO with
               noisy preferences", 2023): the preference label is taken to be flipped with probability eps.)
      ipo:     loss = (z - 1 / (2 * beta)) ** 2
               (IPO, Azar et al. 2023, eq. 17, beta being the paper's tau; no label smoothing.)
    rewards: chosen = beta * (policy_chosen - reference_chosen), rejected likewise, detached.

    beta > 0, finite; label_smoothing in [0, 0.5] (nonzero only with kind="sigmoid").
    Returns a PreferenceLoss of [P] tensors in float32 (float64 if any input is float64).
    """
    op = "dpo_loss"
    if kind not in DPO_KINDS:
        raise ValueError(f"{op}: kind must be one of {', '.join(map(repr, DPO_KINDS))}, got {kind!r}")
    beta = _check_positive(op, "beta", beta)
    eps = _check_label_smoothing(op, label_smoothing)
    if kind == "ipo" and eps > 0.0:
        # Silently ignoring it would train something other than what was asked for.
        raise ValueError(f"{op}: label_smoothing applies to kind='sigmoid' only, got {label_smoothing} with 'ipo'")
    pc, pr, rc, rr = _pair_tensors(
        op,
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        reference_chosen=reference_chosen,
        reference_rejected=reference_rejected,
    )
    # z as the difference of the two log-ratios (the same value as (pc - pr) - (rc - rr)): the log-ratios are
    # also the rewards.
    chosen_logratio = pc - rc
    rejected_logratio = pr - rr
    z = chosen_logratio - rejected_logratio
    losses = _smoothed_logistic(beta * z, eps) if kind == "sigmoid" else (z - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=(beta * chosen_logratio).detach(),
        rejected_rewards=(beta * rejected_logratio).detach(),
    )


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO per pair (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"): no
    reference model.

    Inputs, each [P] float (float16/bfloat16/float32/float64), on one device: the per-token MEAN log-prob of
    each pair's chosen / rejected completion under the policy (sum over the completion's tokens / its length):
    SimPO's reward is this length-normalised log-likelihood, scaled by beta.

    With d = beta * (policy_chosen - policy_rejected) - gamma and eps = label_smoothing:
      loss = -(1 - eps) * logsigmoid(d) - eps * logsigmoid(-d)
    gamma is the paper's target reward margin, subtracted after the beta scaling (not gamma / beta, the
    "gamma_beta_ratio" some implementations take; TRL's CPOTrainer simpo_gamma is this gamma too).
    eps > 0 smooths the labels as in conservative DPO.
    rewards: chosen = beta * policy_chosen, rejected = beta * policy_rejected, detached.

    beta > 0 and gamma finite; label_smoothing in [0, 0.5].
    Returns a PreferenceLoss of [P] tensors in float32 (float64 if any input is float64).
    """
    op = "simpo_loss"
    beta = _check_positive(op, "beta", beta)
    gamma = float(gamma)
    if not math.isfinite(gamma):
        raise ValueError(f"{op}: gamma must be a finite float, got {gamma}")
    eps = _check_label_smoothing(op, label_smoothing)
    pc, pr = _pair_tensors(op, policy_chosen=policy_chosen, policy_rejected=policy_rejected)
    losses = _smoothed_logistic(beta * (pc - pr) - gamma, eps)
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=(beta * pc).detach(),
        rejected_rewards=(beta * pr).detach(),
    )


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLoss:
    """ORPO per pair (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"):
    L_SFT + lambda * L_OR, the SFT term plus an odds-ratio term; no reference model.

    Inputs, each [P] float (float16/bfloat16/float32/float64), on one device:
      policy_chosen, policy_rejected: per-token MEAN log-probs of each completion under the policy (so < 0);
                                      exp of one is the paper's length-normalised P(y | x).
      chosen_nll: the SFT term of each pair, normally the mean NLL over the chosen completion's tokens
                  (= -policy_chosen); passed separately so a caller can weight it or compute it otherwise.
                  (TRL's ORPOTrainer instead takes one token-mean NLL over the whole batch's chosen rows,
                  prompt tokens included.)

    With odds(y) = P / (1 - P), in logs:
      log_odds = (policy_chosen - policy_rejected) - (log(1 - exp(policy_chosen)) - log(1 - exp(policy_rejected)))
      loss     = chosen_nll - beta * logsigmoid(log_odds)
    beta is the paper's lambda. log(1 - exp(x)) is computed without cancellation near 0 nor underflow far
    below it, with finite gradients, and a mean log-prob of exactly 0 (or above) is clamped to just below 0
    (see _log1mexp): the loss stays finite for log-probs from -1e-8 to -50 and beyond.
    rewards: chosen = beta * policy_chosen, rejected = beta * policy_rejected, detached (as TRL logs them).

    beta > 0, finite. Returns a PreferenceLoss of [P] tensors in float32 (float64 if any input is float64).
    """
    op = "orpo_loss"
    beta = _check_positive(op, "beta", beta)
    pc, pr, nll = _pair_tensors(op, policy_chosen=policy_chosen, policy_rejected=policy_rejected, chosen_nll=chosen_nll)
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
    losses = nll - beta * F.logsigmoid(log_odds)
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=(beta * pc).detach(),
        rejected_rewards=(beta * pr).detach(),
    )
