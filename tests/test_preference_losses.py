"""Preference losses (fastsft.ops.preference): each against its formula written here in plain float64, against
TRL's own implementations, and at the edges (empty batches, bad arguments, extreme log-probs)."""

import importlib
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fastsft.ops.preference import PreferenceLoss, dpo_loss, orpo_loss, simpo_loss

BETAS = [0.05, 0.1, 0.5, 2.0]
SMOOTHINGS = [0.0, 0.1, 0.3, 0.5]
P = 16


# --------------------------------------------------------------------------------------------------
# The formulas, written directly from the papers (float64, no stabilisation needed at these magnitudes)
# --------------------------------------------------------------------------------------------------


def _log_sigmoid(t):
    return torch.log(1.0 / (1.0 + torch.exp(-t)))


def _dpo_formula(pc, pr, rc, rr, beta, eps, kind):
    z = (pc - pr) - (rc - rr)
    if kind == "ipo":
        return (z - 1.0 / (2.0 * beta)) ** 2
    return -(1.0 - eps) * _log_sigmoid(beta * z) - eps * _log_sigmoid(-beta * z)


def _simpo_formula(pc, pr, beta, gamma, eps):
    d = beta * pc - beta * pr - gamma
    return -(1.0 - eps) * _log_sigmoid(d) - eps * _log_sigmoid(-d)


def _orpo_formula(pc, pr, nll, beta):
    # odds(y) = P / (1 - P) with P = exp(mean log-prob); the loss is the NLL minus beta * log sigmoid(log odds ratio).
    p_c, p_r = torch.exp(pc), torch.exp(pr)
    log_odds_ratio = torch.log((p_c / (1.0 - p_c)) / (p_r / (1.0 - p_r)))
    return nll - beta * _log_sigmoid(log_odds_ratio)


def _sequence_logps(n, dtype=torch.float64):
    """Sums of ~20 tokens' log-probs: around -20, spread by several nats."""
    return (-20.0 + 6.0 * torch.randn(n, dtype=torch.float64)).to(dtype)


def _mean_logps(n, dtype=torch.float64, low=-3.0, high=-0.02):
    return (low + (high - low) * torch.rand(n, dtype=torch.float64)).to(dtype)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _values_and_grads(fn, tensors):
    tensors = _leaves(*tensors)
    losses = fn(*tensors)
    losses = losses.losses if isinstance(losses, PreferenceLoss) else losses
    # A random weight per pair: the gradient of each pair's loss counts, not only their sum.
    weights = torch.rand(losses.shape, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad((losses.double() * weights).sum(), tensors)
    return losses.detach(), grads


def _assert_close(name, actual, expected, rtol, atol):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _check_against_formula(fn, formula, inputs, grad_count):
    """fastsft in float64 (tight) and in float32 (fp32 tolerance) against the float64 formula: losses and the
    gradients w.r.t. the first grad_count inputs."""
    torch.manual_seed(1)
    exact, exact_grads = _values_and_grads(formula, inputs)
    for dtype, rtol, atol in [(torch.float64, 1e-12, 1e-12), (torch.float32, 2e-5, 2e-5)]:
        torch.manual_seed(1)  # the same per-pair weights as the formula's run
        values, grads = _values_and_grads(fn, [t.to(dtype) for t in inputs])
        assert values.dtype == dtype
        _assert_close(f"{dtype} losses", values, exact, rtol, atol)
        for i in range(grad_count):
            _assert_close(f"{dtype} d loss / d input {i}", grads[i], exact_grads[i], rtol, atol)


# --------------------------------------------------------------------------------------------------
# 1. Against the formulas
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", SMOOTHINGS)
@pytest.mark.parametrize("beta", BETAS)
def test_dpo_sigmoid_matches_formula(beta, label_smoothing):
    inputs = [_sequence_logps(P) for _ in range(4)]
    _check_against_formula(
        lambda *t: dpo_loss(*t, beta=beta, label_smoothing=label_smoothing),
        lambda *t: _dpo_formula(*t, beta, label_smoothing, "sigmoid"),
        inputs,
        grad_count=4,
    )


@pytest.mark.parametrize("beta", BETAS)
def test_ipo_matches_formula(beta):
    inputs = [_mean_logps(P) for _ in range(4)]
    _check_against_formula(
        lambda *t: dpo_loss(*t, beta=beta, kind="ipo"),
        lambda *t: _dpo_formula(*t, beta, 0.0, "ipo"),
        inputs,
        grad_count=4,
    )


@pytest.mark.parametrize("label_smoothing", SMOOTHINGS)
@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 0.5), (2.5, 1.4), (10.0, 3.0), (0.5, 0.0), (1.0, -0.3)])
def test_simpo_matches_formula(beta, gamma, label_smoothing):
    inputs = [_mean_logps(P), _mean_logps(P)]
    _check_against_formula(
        lambda *t: simpo_loss(*t, beta=beta, gamma=gamma, label_smoothing=label_smoothing),
        lambda *t: _simpo_formula(*t, beta, gamma, label_smoothing),
        inputs,
        grad_count=2,
    )


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.25, 1.0])
@pytest.mark.parametrize("log_prob_range", [(-3.0, -0.02), (-0.5, -1e-3), (-12.0, -2.0)])
def test_orpo_matches_formula(beta, log_prob_range):
    low, high = log_prob_range
    pc, pr = _mean_logps(P, low=low, high=high), _mean_logps(P, low=low, high=high)
    nll = 0.7 * -pc + 0.1 * torch.rand(P, dtype=torch.float64)  # a weighted SFT term, not just -pc
    _check_against_formula(
        lambda *t: orpo_loss(*t, beta=beta),
        lambda *t: _orpo_formula(*t, beta),
        [pc, pr, nll],
        grad_count=3,
    )


def test_rewards_follow_the_papers():
    pc, pr, rc, rr = (_sequence_logps(P) for _ in range(4))
    out = dpo_loss(pc, pr, rc, rr, beta=0.3)
    _assert_close("dpo chosen rewards", out.chosen_rewards, 0.3 * (pc - rc), 1e-12, 1e-12)
    _assert_close("dpo rejected rewards", out.rejected_rewards, 0.3 * (pr - rr), 1e-12, 1e-12)
    pc, pr = _mean_logps(P), _mean_logps(P)
    for out in (simpo_loss(pc, pr, beta=2.5, gamma=1.0), orpo_loss(pc, pr, -pc, beta=2.5)):
        _assert_close("chosen rewards", out.chosen_rewards, 2.5 * pc, 1e-12, 1e-12)
        _assert_close("rejected rewards", out.rejected_rewards, 2.5 * pr, 1e-12, 1e-12)


def test_compute_dtypes():
    """Half precision is computed (and returned) in float32, float64 stays float64, mixed inputs promote."""
    pc, pr, rc, rr = (_sequence_logps(4, torch.bfloat16) for _ in range(4))
    out = dpo_loss(pc, pr, rc, rr)
    assert out.losses.dtype == out.chosen_rewards.dtype == out.rejected_rewards.dtype == torch.float32
    exact = _dpo_formula(*(t.double() for t in (pc, pr, rc, rr)), 0.1, 0.0, "sigmoid")
    _assert_close("bf16 inputs, fp32 compute", out.losses, exact, 2e-5, 2e-5)
    assert simpo_loss(pc.half(), pr.half()).losses.dtype == torch.float32
    assert dpo_loss(pc.float(), pr.double(), rc, rr).losses.dtype == torch.float64
    m = _mean_logps(4, torch.float16)
    assert orpo_loss(m, m, -m.float()).losses.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# 2. Parity with TRL
# --------------------------------------------------------------------------------------------------


def _trl_trainer(module: str, name: str):
    """A trainer class of TRL (a dev extra; the GPU machine has none). CPO and ORPO live in trl.experimental in
    1.16, whose import warns that the API is unstable: expected here, so silenced."""
    pytest.importorskip("trl", reason="trl (a dev extra) is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), name)


class _Accelerator:
    """The part of accelerate.Accelerator the TRL loss code reads: one CPU process."""

    device = torch.device("cpu")

    def gather(self, t):
        return t

    def gather_for_metrics(self, t):
        return t

    def unwrap_model(self, model):
        return model


class _LogProbModel:
    """Stands in for the policy under TRL 1.16's DPOTrainer, which calls model(..., fused_lm_head=True) and reads
    per-token log-probs (zero off the completion) from the output. Row i's log-prob sits at its first position, so
    TRL's sum over the sequence gives logps[i] exactly; the completion mask still has the completion's length."""

    training = True

    def __init__(self, logps: torch.Tensor, width: int):
        self.log_probs = torch.cat([logps.unsqueeze(1), logps.new_zeros(logps.shape[0], width - 1)], dim=1)

    def __call__(self, **kwargs):
        shape = self.log_probs.shape
        return SimpleNamespace(
            log_probs=self.log_probs,
            entropy=torch.zeros(shape),
            mean_logits=torch.zeros(shape),
            is_top1=torch.zeros(shape, dtype=torch.bool),
        )


def _trl_dpo(pc, pr, rc, rr, chosen_lengths, rejected_lengths, *, beta, label_smoothing, loss_type):
    """TRL's DPO loss (the scalar mean over the pairs), its gradients w.r.t. pc and pr, and the chosen / rejected
    rewards it logs (their means over the pairs).

    TRL 1.16's DPOTrainer has no `dpo_loss` method any more: the loss is computed inside `_compute_loss`, from the
    model's per-token log-probs. So the trainer is made with object.__new__ (no model, data or Accelerator), given
    the attributes `_compute_loss` reads, reference log-probs precomputed (as TRL's precompute_ref_log_probs does)
    and a stand-in model returning chosen and rejected rows [pc; pr]. Completion lengths matter for IPO only,
    which TRL normalises by them (from the completion mask)."""
    DPOTrainer = _trl_trainer("trl.trainer.dpo_trainer", "DPOTrainer")
    pc, pr = _leaves(pc, pr)
    lengths = torch.cat([chosen_lengths, rejected_lengths])
    width = int(lengths.max())
    positions = torch.arange(width + 1)
    # Position 0 is the prompt; positions 1..length are the completion (TRL shifts the mask by one).
    completion_mask = ((positions >= 1) & (positions <= lengths.unsqueeze(1))).long()
    trainer = object.__new__(DPOTrainer)
    trainer.model = _LogProbModel(torch.cat([pc, pr]), width)
    trainer.accelerator = _Accelerator()
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.f_divergence_type = "reverse_kl"  # standard DPO
    trainer.ld_alpha, trainer.use_weighting, trainer.aux_loss_enabled = None, False, False
    trainer.precompute_ref_logps = True
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    grads = torch.autograd.grad(loss, (pc, pr))
    metrics = trainer._metrics["train"]
    return loss.detach(), grads, metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


def _check_dpo_against_trl(pairs, *, beta, label_smoothing, kind, trl_loss_type, one_pair_at_a_time):
    torch.manual_seed(2)
    pc, pr, rc, rr = (_sequence_logps(pairs, torch.float32) for _ in range(4))
    chosen_lengths, rejected_lengths = torch.randint(1, 40, (pairs,)), torch.randint(1, 40, (pairs,))
    if kind == "ipo":
        # fastsft's ipo takes per-token means; TRL takes sums and divides the log-ratios by the lengths itself.
        ours_inputs = [pc / chosen_lengths, pr / rejected_lengths, rc / chosen_lengths, rr / rejected_lengths]
    else:
        ours_inputs = [pc, pr, rc, rr]
    groups = [[i] for i in range(pairs)] if one_pair_at_a_time else [list(range(pairs))]
    for idx in groups:
        trl_loss, trl_grads, trl_chosen, trl_rejected = _trl_dpo(
            pc[idx],
            pr[idx],
            rc[idx],
            rr[idx],
            chosen_lengths[idx],
            rejected_lengths[idx],
            beta=beta,
            label_smoothing=label_smoothing,
            loss_type=trl_loss_type,
        )
        leaves = _leaves(*(t[idx] for t in ours_inputs))
        out = dpo_loss(*leaves, beta=beta, label_smoothing=label_smoothing, kind=kind)
        ours_loss = out.losses.mean()
        ours_grads = torch.autograd.grad(ours_loss, leaves[:2])
        if kind == "ipo":  # d/d sum = d/d mean / length
            ours_grads = (ours_grads[0] / chosen_lengths[idx], ours_grads[1] / rejected_lengths[idx])
        _assert_close("loss vs TRL", ours_loss, trl_loss, 1e-5, 1e-6)
        _assert_close("d loss / d policy_chosen vs TRL", ours_grads[0], trl_grads[0], 1e-5, 1e-6)
        _assert_close("d loss / d policy_rejected vs TRL", ours_grads[1], trl_grads[1], 1e-5, 1e-6)
        if kind == "sigmoid":  # TRL logs only the batch means of the rewards (per pair when one pair per call)
            assert out.chosen_rewards.mean().item() == pytest.approx(trl_chosen, rel=1e-5, abs=1e-6)
            assert out.rejected_rewards.mean().item() == pytest.approx(trl_rejected, rel=1e-5, abs=1e-6)
        else:
            # TRL logs beta * (sum log-ratio) for IPO too, though its loss uses the per-token means; fastsft's
            # rewards are in the units of its inputs, beta * (mean log-ratio).
            assert trl_chosen == pytest.approx(beta * (pc[idx] - rc[idx]).mean().item(), rel=1e-5, abs=1e-6)
            _assert_close(
                "ipo chosen rewards", out.chosen_rewards, beta * (pc[idx] - rc[idx]) / chosen_lengths[idx], 1e-5, 1e-6
            )


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_trl(beta):
    """Plain DPO: TRL's loss_type="sigmoid" over a batch (TRL's "sigmoid" ignores label_smoothing in 1.16)."""
    _check_dpo_against_trl(
        12, beta=beta, label_smoothing=0.0, kind="sigmoid", trl_loss_type="sigmoid", one_pair_at_a_time=False
    )


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3, 0.5])
def test_conservative_dpo_matches_trl(label_smoothing):
    """DPO with label smoothing. TRL 1.16's "sigmoid" loss no longer reads label_smoothing; its "aot" loss is
    -(1 - eps) logsigmoid(beta delta) - eps logsigmoid(-beta delta) with delta the difference of the *sorted*
    policy and reference log-ratios over the batch. With one pair per call the sort is the identity and delta = z,
    so "aot" is exactly conservative DPO: compared pair by pair."""
    _check_dpo_against_trl(
        6, beta=0.2, label_smoothing=label_smoothing, kind="sigmoid", trl_loss_type="aot", one_pair_at_a_time=True
    )


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_trl(beta):
    """IPO: TRL divides each log-ratio by its completion's length (from the completion mask); fastsft takes the
    per-token means directly."""
    _check_dpo_against_trl(
        12, beta=beta, label_smoothing=0.0, kind="ipo", trl_loss_type="ipo", one_pair_at_a_time=False
    )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 0.5), (2.5, 1.4)])
def test_simpo_matches_trl_cpo(beta, gamma, label_smoothing):
    """SimPO against TRL's CPOTrainer.cpo_loss with loss_type="simpo" (trl.experimental.cpo in 1.16). TRL subtracts
    simpo_gamma / beta from the log-prob difference before scaling by beta, so its simpo_gamma is the paper's (and
    fastsft's) gamma. cpo_alpha's NLL term is added outside cpo_loss, so it plays no part here."""
    CPOTrainer = _trl_trainer("trl.experimental.cpo.cpo_trainer", "CPOTrainer")
    trainer = object.__new__(CPOTrainer)
    trainer.accelerator = _Accelerator()
    trainer.beta, trainer.simpo_gamma, trainer.label_smoothing = beta, gamma, label_smoothing
    trainer.loss_type, trainer.alpha = "simpo", 0.0  # alpha != 0 would be AlphaPO's reward transform
    pc, pr = _mean_logps(P, torch.float32), _mean_logps(P, torch.float32)
    trl_pc, trl_pr = _leaves(pc, pr)
    trl_losses, trl_chosen, trl_rejected = trainer.cpo_loss(trl_pc, trl_pr)
    ours_pc, ours_pr = _leaves(pc, pr)
    out = simpo_loss(ours_pc, ours_pr, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    _assert_close("losses vs TRL", out.losses, trl_losses, 1e-5, 1e-6)
    _assert_close("chosen rewards vs TRL", out.chosen_rewards, trl_chosen, 1e-6, 1e-6)
    _assert_close("rejected rewards vs TRL", out.rejected_rewards, trl_rejected, 1e-6, 1e-6)
    weights = torch.rand(P) + 0.5
    trl_grads = torch.autograd.grad((trl_losses * weights).sum(), (trl_pc, trl_pr))
    ours_grads = torch.autograd.grad((out.losses * weights).sum(), (ours_pc, ours_pr))
    for ours, theirs in zip(ours_grads, trl_grads, strict=True):
        _assert_close("gradients vs TRL", ours, theirs, 1e-5, 1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(beta):
    """ORPO against TRL's ORPOTrainer.odds_ratio_loss (trl.experimental.orpo in 1.16). TRL returns
    beta * logsigmoid(log_odds), positive, and its trainer subtracts the mean from the NLL; fastsft's per-pair
    loss is chosen_nll - beta * logsigmoid(log_odds). Log-probs stay away from 0 here: TRL's log1mexp has NaN
    gradients for x within float32 rounding of 0 (see test_orpo_is_stable_at_extreme_log_probs)."""
    ORPOTrainer = _trl_trainer("trl.experimental.orpo.orpo_trainer", "ORPOTrainer")
    trainer = object.__new__(ORPOTrainer)
    trainer.accelerator = _Accelerator()
    trainer.beta = beta
    pc, pr = _mean_logps(P, torch.float32, -4.0, -1e-3), _mean_logps(P, torch.float32, -4.0, -1e-3)
    nll = -pc
    trl_pc, trl_pr = _leaves(pc, pr)
    trl_ratio_losses, trl_chosen, trl_rejected, _, _ = trainer.odds_ratio_loss(trl_pc, trl_pr)
    trl_losses = nll - trl_ratio_losses
    ours_pc, ours_pr = _leaves(pc, pr)
    out = orpo_loss(ours_pc, ours_pr, nll, beta=beta)
    _assert_close("losses vs TRL", out.losses, trl_losses, 1e-5, 1e-6)
    _assert_close("chosen rewards vs TRL", out.chosen_rewards, trl_chosen, 1e-6, 1e-6)
    _assert_close("rejected rewards vs TRL", out.rejected_rewards, trl_rejected, 1e-6, 1e-6)
    weights = torch.rand(P) + 0.5
    trl_grads = torch.autograd.grad((trl_losses * weights).sum(), (trl_pc, trl_pr))
    ours_grads = torch.autograd.grad((out.losses * weights).sum(), (ours_pc, ours_pr))
    for ours, theirs in zip(ours_grads, trl_grads, strict=True):
        _assert_close("gradients vs TRL", ours, theirs, 1e-5, 1e-6)


# --------------------------------------------------------------------------------------------------
# 3. Edge cases
# --------------------------------------------------------------------------------------------------


def _all_losses(pc, pr, rc, rr):
    return {
        "dpo": dpo_loss(pc, pr, rc, rr, label_smoothing=0.1),
        "ipo": dpo_loss(pc, pr, rc, rr, kind="ipo"),
        "simpo": simpo_loss(pc, pr, label_smoothing=0.1),
        "orpo": orpo_loss(pc, pr, -pc),
    }


def test_no_pairs():
    pc, pr, rc, rr = _leaves(*(torch.empty(0, dtype=torch.bfloat16) for _ in range(4)))
    for name, out in _all_losses(pc, pr, rc, rr).items():
        for field in (out.losses, out.chosen_rewards, out.rejected_rewards, out.margins, out.accuracies):
            assert field.shape == (0,) and field.dtype == torch.float32, name
        (grad,) = torch.autograd.grad(out.losses.sum(), pc)
        assert grad.shape == (0,), name


def test_rewards_are_detached_and_losses_differentiable():
    pc, pr, rc, rr = _leaves(*(_mean_logps(5) for _ in range(4)))
    for name, out in _all_losses(pc, pr, rc, rr).items():
        assert out.losses.requires_grad, name
        for field in (out.chosen_rewards, out.rejected_rewards, out.margins, out.accuracies):
            assert not field.requires_grad and field.grad_fn is None, name


def test_margins_and_accuracies():
    # Rewards by hand: beta * (policy - reference) with beta = 0.5 and reference 0:
    # chosen [-0.5, -1.5, -1.0, 2.0], rejected [-1.0, -0.5, -1.0, 0.5].
    pc = torch.tensor([-1.0, -3.0, -2.0, 4.0])
    pr = torch.tensor([-2.0, -1.0, -2.0, 1.0])
    out = dpo_loss(pc, pr, torch.zeros(4), torch.zeros(4), beta=0.5)
    torch.testing.assert_close(out.margins, torch.tensor([0.5, -1.0, 0.0, 1.5]))
    torch.testing.assert_close(out.accuracies, torch.tensor([1.0, 0.0, 0.0, 1.0]))  # a tie is not a win
    assert out.accuracies.dtype == torch.float32
    out = simpo_loss(pc, pr, beta=2.0)
    torch.testing.assert_close(out.margins, torch.tensor([2.0, -4.0, 0.0, 6.0]))
    torch.testing.assert_close(out.accuracies, torch.tensor([1.0, 0.0, 0.0, 1.0]))


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_bad_shapes_and_dtypes_name_the_argument():
    good = torch.randn(4)
    _raises(r"reference_rejected.*\(3,\).*torch\.float32", dpo_loss, good, good, good, torch.randn(3))
    _raises(r"policy_rejected.*\(4, 1\)", dpo_loss, good, good.unsqueeze(1), good, good)
    _raises(r"policy_chosen.*1-D.*\(\)", simpo_loss, torch.tensor(1.0), torch.tensor(1.0))
    _raises(r"policy_chosen.*torch\.int64", dpo_loss, torch.arange(4), good, good, good)
    _raises(r"chosen_nll.*torch\.bool", orpo_loss, good, good, torch.ones(4, dtype=torch.bool))
    _raises(r"chosen_nll.*\(5,\)", orpo_loss, good, good, torch.randn(5))
    _raises(r"policy_rejected.*list", simpo_loss, good, [0.0, 0.0, 0.0, 0.0])
    _raises(r"reference_chosen.*meta.*cpu", dpo_loss, good, good, torch.empty(4, device="meta"), good)


@pytest.mark.parametrize("beta", [0.0, -0.1, math.nan, math.inf])
def test_bad_beta(beta):
    p = torch.randn(3)
    _raises("beta", dpo_loss, p, p, p, p, beta=beta)
    _raises("beta", dpo_loss, p, p, p, p, beta=beta, kind="ipo")
    _raises("beta", simpo_loss, p, p, beta=beta)
    _raises("beta", orpo_loss, p, p, -p, beta=beta)


@pytest.mark.parametrize("label_smoothing", [-0.01, 0.51, 1.0, math.nan])
def test_bad_label_smoothing(label_smoothing):
    p = torch.randn(3)
    _raises("label_smoothing", dpo_loss, p, p, p, p, label_smoothing=label_smoothing)
    _raises("label_smoothing", simpo_loss, p, p, label_smoothing=label_smoothing)


def test_bad_kind_gamma_and_ipo_smoothing():
    p = torch.randn(3)
    _raises("kind.*'hinge'", dpo_loss, p, p, p, p, kind="hinge")
    _raises("label_smoothing.*ipo", dpo_loss, p, p, p, p, kind="ipo", label_smoothing=0.1)
    _raises("gamma", simpo_loss, p, p, gamma=math.nan)
    # The edges of the ranges are allowed.
    dpo_loss(p, p, p, p, label_smoothing=0.5)
    simpo_loss(p, p, label_smoothing=0.0, gamma=0.0)


# --------------------------------------------------------------------------------------------------
# 4. Numerical stability
# --------------------------------------------------------------------------------------------------


def test_orpo_is_stable_at_extreme_log_probs():
    """Mean log-probs a hair below 0 (1 - exp(x) cancels in float32) and far below it (exp(x) underflows next to 1):
    finite losses and gradients, equal to the formula evaluated in float64."""
    values = [-1e-8, -1e-6, -1e-3, -0.69, -0.7, -5.0, -50.0, -100.0]
    grid = torch.tensor([(c, r) for c in values for r in values], dtype=torch.float64)
    pc, pr = grid[:, 0], grid[:, 1]
    nll = -pc
    for beta in (0.1, 1.0):
        leaves = _leaves(pc.float(), pr.float(), nll.float())
        out = orpo_loss(*leaves, beta=beta)
        grads = torch.autograd.grad(out.losses.sum(), leaves)
        assert torch.isfinite(out.losses).all()
        for grad in grads:
            assert torch.isfinite(grad).all()
        # The plain formula is accurate enough in float64 at these inputs (1 - exp(-1e-8) keeps ~8 digits).
        exact = _orpo_formula(pc, pr, nll, beta)
        _assert_close("losses at extreme log-probs", out.losses, exact, 1e-5, 1e-6)


def test_log1mexp_is_accurate_in_float32():
    """ORPO's log(1 - exp(x)) to float32 precision from -1e-30 to -80, against 50-digit arithmetic (mpmath, which
    torch's sympy dependency brings): neither cancellation near 0 nor a lost exp(x) far below it. (Below -87 the
    value, about -exp(x), is a float32 subnormal and only absolutely accurate.)"""
    mpmath = pytest.importorskip("mpmath")
    from fastsft.ops.preference import _log1mexp

    mpmath.mp.dps = 50
    magnitudes = torch.logspace(-30, math.log10(80.0), 400, dtype=torch.float64)
    x = torch.cat([-magnitudes, torch.tensor([-math.log(2.0)])]).float()
    exact = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()], dtype=torch.float64)
    relative_error = ((_log1mexp(x).double() - exact) / exact).abs().max().item()
    assert relative_error < 1e-6, f"log1mexp: max relative error {relative_error:.2e} in float32"


def test_orpo_log_prob_of_exactly_zero_stays_finite():
    """float32 log_softmax returns exactly 0 for a token the model is certain of, so a mean log-prob of 0 occurs."""
    pc, pr = _leaves(torch.tensor([0.0, -1.0, 0.0]), torch.tensor([-1.0, 0.0, 0.0]))
    out = orpo_loss(pc, pr, -pc, beta=0.1)
    grads = torch.autograd.grad(out.losses.sum(), (pc, pr))
    assert torch.isfinite(out.losses).all()
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_dpo_is_stable_at_huge_margins(label_smoothing):
    """|z| = 1e4: exp(beta z) overflows float32, logsigmoid must not. For large |t| = |beta z|,
    -logsigmoid(t) -> max(-t, 0), so the loss tends to eps * beta * z (z > 0) or (1 - eps) * beta * |z| (z < 0)."""
    beta, eps = 0.5, label_smoothing
    z = torch.tensor([1e4, -1e4])
    pc, pr = _leaves(z, torch.zeros(2))
    out = dpo_loss(pc, pr, torch.zeros(2), torch.zeros(2), beta=beta, label_smoothing=eps)
    (grad,) = torch.autograd.grad(out.losses.sum(), pc)
    torch.testing.assert_close(out.losses, torch.tensor([eps * beta * 1e4, (1 - eps) * beta * 1e4]))
    torch.testing.assert_close(grad, torch.tensor([eps * beta, -(1 - eps) * beta]))
    ipo = dpo_loss(pc, pr, torch.zeros(2), torch.zeros(2), beta=beta, kind="ipo")
    (ipo_grad,) = torch.autograd.grad(ipo.losses.sum(), pc)
    assert torch.isfinite(ipo.losses).all() and torch.isfinite(ipo_grad).all()
    torch.testing.assert_close(ipo_grad, 2.0 * (z - 1.0 / (2.0 * beta)))


def test_traces_under_torch_compile():
    """The module docstring's promise: each loss traces into one graph (no graph break, no host sync), with the
    eager values. aot_eager traces exactly as inductor would, without compiling C++ on CPU."""

    def losses(pc, pr, rc, rr):
        return torch.cat(
            [
                dpo_loss(pc, pr, rc, rr, label_smoothing=0.1).losses,
                dpo_loss(pc, pr, rc, rr, kind="ipo").losses,
                simpo_loss(pc, pr).losses,
                orpo_loss(pc, pr, -pc).losses,
            ]
        )

    inputs = [_mean_logps(8, torch.float32) for _ in range(4)]
    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), losses(*inputs))
