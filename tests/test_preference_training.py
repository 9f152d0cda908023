"""Preference training on packed pairs (fastsft.train.preference): each objective's loss and gradients equal the
paper's formula on the unpatched model run one sequence at a time; packing, gradient accumulation and the
pair-count normaliser change nothing; the reference pass is the initial (or base, with LoRA) model."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import fastsft
from fastsft.data import PackedLoader, build_micro_batch
from fastsft.train.preference import PreferenceSettings, preference_forward_backward, reference_logprobs

VOCAB = 61
DEVICE = torch.device("cpu")


def _model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).float()


class _Pairs:
    """A tokenized preference dataset: examples 2i (chosen) and 2i + 1 (rejected) share a prompt; only the
    completion tokens are trained."""

    def __init__(self, n_pairs, seed=0):
        rng = np.random.default_rng(seed)
        tokens, trained, lengths = [], [], []
        for _ in range(n_pairs):
            prompt = rng.integers(3, VOCAB, size=rng.integers(2, 7))
            for _ in range(2):
                completion = rng.integers(3, VOCAB, size=rng.integers(1, 8))
                tokens.append(np.concatenate([prompt, completion]))
                trained.append(np.concatenate([np.zeros(len(prompt)), np.ones(len(completion))]))
                lengths.append(len(prompt) + len(completion))
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tokens = np.concatenate(tokens).astype(np.int32)
        self.trained = np.concatenate(trained).astype(np.uint8)

    def __len__(self):
        return len(self.lengths)


def _sequence_logprob(model, data, example):
    """The unpatched model on one sequence alone: summed log-probs of its trained tokens, and their count."""
    start, end = int(data.offsets[example]), int(data.offsets[example + 1])
    ids = torch.from_numpy(data.tokens[start:end].astype(np.int64))[None]
    trained = torch.from_numpy(data.trained[start:end].astype(bool))
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
    targets = ids[0, 1:]
    picked = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    mask = trained[1:]
    return picked[mask].sum(), mask.sum().double()


def _formula_loss(settings, model, data, reference):
    """Mean over pairs of the objective written from its paper, on the unpatched model (float64)."""
    losses = []
    for pair in range(len(data) // 2):
        (c, nc), (r, nr) = (_sequence_logprob(model, data, 2 * pair + k) for k in range(2))
        beta = settings.beta
        if settings.objective == "dpo":
            z = (c - reference[2 * pair]) - (r - reference[2 * pair + 1])
            eps = settings.label_smoothing
            losses.append(-(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z))
        elif settings.objective == "ipo":
            z = (c - reference[2 * pair]) / nc - (r - reference[2 * pair + 1]) / nr
            losses.append((z - 1 / (2 * beta)) ** 2)
        elif settings.objective == "simpo":
            losses.append(-F.logsigmoid(beta * (c / nc - r / nr) - settings.gamma))
        else:  # orpo: NLL of the chosen completion + lambda * odds-ratio term
            lc, lr = c / nc, r / nr
            log_odds = (lc - torch.log(-torch.expm1(lc))) - (lr - torch.log(-torch.expm1(lr)))
            losses.append(-lc - beta * F.logsigmoid(log_odds))
    return torch.stack(losses).mean()


SETTINGS = [
    PreferenceSettings("dpo", beta=0.1),
    PreferenceSettings("dpo", beta=0.5, label_smoothing=0.2),
    PreferenceSettings("ipo", beta=0.3),
    PreferenceSettings("simpo", beta=2.0, gamma=0.5),
    PreferenceSettings("orpo", beta=0.25),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.objective}-{s.beta}-{s.label_smoothing}")
def test_loss_and_gradients_equal_the_formula_on_the_unpatched_model(settings):
    data = _Pairs(5)
    # A reference that is not the policy (so DPO's z is not 0): a differently initialised model.
    reference_model = fastsft.patch(_model(seed=7))
    all_pairs = PackedLoader(data, max_tokens=10_000, group=2)
    reference = reference_logprobs(reference_model, all_pairs, DEVICE, None) if settings.needs_reference else None

    unpatched = _model()
    patched = fastsft.patch(copy.deepcopy(unpatched))
    loader = PackedLoader(data, max_tokens=40, grad_accum=10, group=2)  # several pairs per row, several rows
    (step,) = list(loader.steps(0))
    loss, tokens, supervised, metric_sums = preference_forward_backward(
        patched, step, settings, DEVICE, None, reference=reference
    )
    want = _formula_loss(settings, unpatched, data, torch.from_numpy(reference) if reference is not None else None)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    assert metric_sums[-1] == 5  # pairs
    assert tokens == int(data.lengths.sum()) and supervised == sum(mb.num_supervised for mb in step)
    for (name, p), q in zip(patched.named_parameters(), unpatched.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=1e-4, atol=1e-6, msg=name)


def test_accumulation_and_packing_change_nothing():
    data = _Pairs(6, seed=3)
    settings = PreferenceSettings("dpo", beta=0.2)
    all_pairs = PackedLoader(data, max_tokens=10_000, group=2)
    reference = reference_logprobs(fastsft.patch(_model(seed=5)), all_pairs, DEVICE, None)
    grads = []
    for max_tokens, grad_accum in [(10_000, 1), (30, 12), (60, 3)]:
        model = fastsft.patch(_model())
        loader = PackedLoader(data, max_tokens=max_tokens, grad_accum=grad_accum, group=2)
        steps = list(loader.steps(0))
        assert len(steps) == 1  # the whole dataset in one optimizer step, in 1, 12 or 3 micro-batches
        assert sum(len(mb.doc_ids) for mb in steps[0]) == 12
        loss, *_ = preference_forward_backward(model, steps[0], settings, DEVICE, None, reference=reference)
        grads.append((loss, [p.grad.clone() for p in model.parameters()]))
    for loss, grad in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], rtol=1e-5, atol=1e-7)
        for g, g0 in zip(grad, grads[0][1], strict=True):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-7)


def test_reference_pass_equals_each_sequence_alone_and_keeps_the_model_as_it_was():
    data = _Pairs(4, seed=1)
    model = fastsft.patch(_model())
    model.train()
    reference = reference_logprobs(model, PackedLoader(data, max_tokens=25, group=2), DEVICE, None)
    assert model.training and all(p.grad is None for p in model.parameters())
    plain = _model()
    with torch.no_grad():
        want = [float(_sequence_logprob(plain, data, i)[0]) for i in range(len(data))]
    np.testing.assert_allclose(reference, want, rtol=1e-5, atol=1e-6)


def test_with_lora_the_reference_is_the_base_model_whatever_the_adapters_learned():
    peft = pytest.importorskip("peft")
    data = _Pairs(3, seed=2)
    model = peft.get_peft_model(fastsft.patch(_model()), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # adapters that have "learned" something: the policy is no longer the base model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    loader = PackedLoader(data, max_tokens=1000, group=2)
    reference = reference_logprobs(model, loader, DEVICE, None)
    plain = _model()
    with torch.no_grad():
        want = [float(_sequence_logprob(plain, data, i)[0]) for i in range(len(data))]
    np.testing.assert_allclose(reference, want, rtol=1e-5, atol=1e-6)
    # and the adapters are on again afterwards: the policy's log-probs differ from the base model's
    (step,) = list(loader.steps(0))
    mb = build_micro_batch(data, np.arange(len(data)))
    from fastsft.train.preference import sequence_logprobs

    sums, _ = sequence_logprobs(model, mb, DEVICE, None)
    assert not np.allclose(sums.detach().double().numpy(), want, atol=1e-3)


def test_dpo_without_reference_log_probs_is_a_clear_error():
    data = _Pairs(2)
    model = fastsft.patch(_model())
    (step,) = list(PackedLoader(data, max_tokens=1000, group=2).steps(0))
    with pytest.raises(ValueError, match="needs the reference model's log-probs"):
        preference_forward_backward(model, step, PreferenceSettings("dpo"), DEVICE, None)
