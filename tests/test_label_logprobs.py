"""fastsft.patch.label_logprobs: the per-token log-probabilities a preference loss needs, from a patched model's
decoder and head (its measured scale / softcap included), equal to log_softmax of the unpatched model's logits."""

import copy

import pytest
import torch
import transformers

import fastsft
from fastsft.ops import per_sequence_sum
from fastsft.patch import UnsupportedModelError, label_logprobs

VOCAB = 97
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    attention_dropout=0.0,
)
# A plain head, a softcapped one (Gemma-2) and a scaled one (Cohere's logit_scale).
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 3.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
}


def _model(family):
    config_name, model_name, extra = MODELS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**BASE, **extra)
    config._attn_implementation = "eager"
    return getattr(transformers, model_name)(config).float()


def _packed(lengths=(6, 9, 4)):
    """One row of three sequences: ids, positions restarting per sequence, shifted labels (-100 on the first
    two positions of each sequence, as a prompt, and on its last position), cu_seqlens."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = torch.full_like(ids, -100)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        labels[0, start + 1 : end - 1] = ids[0, start + 2 : end]
    return ids, positions, labels, cu


@pytest.mark.parametrize("family", sorted(MODELS))
def test_equals_log_softmax_of_the_unpatched_logits_per_sequence(family):
    reference = _model(family)
    patched = fastsft.patch(copy.deepcopy(reference))
    ids, positions, labels, cu = _packed()
    got = per_sequence_sum(label_logprobs(patched, labels, input_ids=ids, position_ids=positions), cu)
    # The unpatched model on each sequence alone: its own logits, head transform included.
    want = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        logits = reference(input_ids=ids[:, start:end], use_cache=False).logits[0].double()
        rows = labels[0, start:end]
        picked = torch.log_softmax(logits, -1).gather(1, rows.clamp_min(0)[:, None]).squeeze(1)
        want.append(torch.where(rows != -100, picked, 0.0).sum())
    want = torch.stack(want)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # and the gradient reaches the model: d(sum of one sequence's log-probs) / d weights is that of the reference
    got[1].backward()
    want_reference = reference(input_ids=ids[:, cu[1] : cu[2]], use_cache=False).logits[0]
    rows = labels[0, cu[1] : cu[2]]
    picked = torch.log_softmax(want_reference.float(), -1).gather(1, rows.clamp_min(0)[:, None]).squeeze(1)
    torch.where(rows != -100, picked, 0.0).sum().backward()
    for (name, p), q in zip(patched.named_parameters(), reference.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_an_unpatched_model_is_a_clear_error():
    model = _model("llama")
    ids, positions, labels, _ = _packed()
    with pytest.raises(UnsupportedModelError, match="not patched"):
        label_logprobs(model, labels, input_ids=ids, position_ids=positions)


def test_a_router_aux_loss_is_refused_not_dropped():
    """An MoE model asked for its router auxiliary loss: the preference log-probs would leave it out, so they
    refuse; with output_router_logits=False they are the model's."""
    config = transformers.MixtralConfig(**BASE, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = fastsft.patch(transformers.MixtralForCausalLM(config))
    ids, positions, labels, _ = _packed()
    with pytest.raises(UnsupportedModelError, match="router auxiliary loss"):
        label_logprobs(model, labels, input_ids=ids, position_ids=positions)
    logprobs = label_logprobs(model, labels, input_ids=ids, position_ids=positions, output_router_logits=False)
    assert logprobs.shape == (ids.numel(),) and bool(torch.isfinite(logprobs).all())
