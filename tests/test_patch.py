"""fastsft.patch(model) on tiny random models of every supported family: same loss and gradients as the
unpatched model on packed and padded batches, per-instance patching, exact unpatch, the report."""

import copy
import warnings

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import fastsft
import fastsft.patch.attention as patch_attention
import fastsft.patch.loss as patch_loss
import fastsft.patch.modules as patch_modules
from fastsft.patch import UnsupportedModelError

VOCAB = 101
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    attention_dropout=0.0,
)


def make(family: str, **overrides):
    """A tiny random model of `family` (eager attention: the unpatched reference supports every option)."""
    if family == "llama":
        config, cls = LlamaConfig(**COMMON), LlamaForCausalLM
    elif family == "mistral":
        config, cls = MistralConfig(**COMMON, sliding_window=9), MistralForCausalLM
    elif family == "qwen2":
        config = Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=7, max_window_layers=1)
        cls = Qwen2ForCausalLM
    elif family == "qwen3":
        config, cls = Qwen3Config(**COMMON, head_dim=16), Qwen3ForCausalLM
    elif family == "gemma2":
        config = Gemma2Config(
            **COMMON,
            head_dim=16,
            sliding_window=6,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=24,
            hidden_activation="gelu_pytorch_tanh",
        )
        cls = Gemma2ForCausalLM
    elif family == "gemma3":
        config = Gemma3TextConfig(
            **COMMON,
            head_dim=16,
            sliding_window=6,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
        cls = Gemma3ForCausalLM
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    model = cls(config).float()
    with torch.no_grad():  # Gemma norms start at 0 (scale 1 + w): make them non-trivial, like trained ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
DOC_LENGTHS = [13, 1, 22, 9, 17]


def twins(family, **overrides):
    torch.manual_seed(0)
    ref = make(family, **overrides)
    patched = copy.deepcopy(ref)
    fastsft.patch(patched)
    return ref, patched


def packed_batch(lengths=DOC_LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(0, VOCAB, (1, total), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, torch.rand(total, generator=g) < 0.3] = -100  # prompt tokens
    return ids, position_ids, labels


def grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(ref, patched, rtol=1e-4, atol=1e-5):
    g_ref, g_patched = grads(ref), grads(patched)
    trainable = [name for name, p in ref.named_parameters() if p.requires_grad]
    assert g_ref.keys() == g_patched.keys() and sorted(g_ref) == sorted(trainable)
    for name in g_ref:
        torch.testing.assert_close(
            g_patched[name], g_ref[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_and_every_gradient_match_the_unpatched_model(family):
    ref, patched = twins(family)
    ids, position_ids, labels = packed_batch()
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = patched(input_ids=ids, position_ids=position_ids, labels=labels)
    assert out.logits is None  # the loss came from the hidden states; no [tokens, vocab] logits
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out_ref.loss.backward()
    out.loss.backward()
    assert_same_grads(ref, patched)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_batch_equals_documents_one_by_one(family):
    _, patched = twins(family)
    ids, position_ids, labels = packed_batch()
    with torch.no_grad():
        hidden = patched.model(input_ids=ids, position_ids=position_ids).last_hidden_state[0]
        start = 0
        for n in DOC_LENGTHS:
            alone = patched.model(input_ids=ids[:, start : start + n]).last_hidden_state[0]
            torch.testing.assert_close(hidden[start : start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_padded_batch_matches_unpatched(family):
    ref, patched = twins(family)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (3, 19), generator=g)
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[0, 12:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 5] = -100  # it would be predicted from a padding row, whose output no implementation defines
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out_ref.loss.backward()
    out.loss.backward()
    assert_same_grads(ref, patched)


def test_flattening_collator_kwargs_and_fastsft_shift_labels():
    """DataCollatorWithFlattening passes cu_seq_lens_q / max_length_q; fastsft batches pass shift_labels."""
    ref, patched = twins("llama")
    ids, position_ids, labels = packed_batch()
    cu = torch.tensor([0, *torch.tensor(DOC_LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = patched(
        input_ids=ids,
        position_ids=position_ids,
        labels=labels,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max(DOC_LENGTHS),
        max_length_k=max(DOC_LENGTHS),
    )
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    out_shift = patched(input_ids=ids, position_ids=position_ids, shift_labels=shifted)
    torch.testing.assert_close(out_shift.loss, out_ref.loss, rtol=1e-5, atol=1e-6)


def test_num_items_in_batch_sums_and_divides_like_hf():
    ref, patched = twins("qwen3")
    ids, position_ids, labels = packed_batch()
    n = torch.tensor(1000)
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, num_items_in_batch=n, use_cache=False)
    out = patched(input_ids=ids, position_ids=position_ids, labels=labels, num_items_in_batch=n)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-7)
    mean = patched(input_ids=ids, position_ids=position_ids, labels=labels).loss
    supervised = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(out.loss * 1000, mean * supervised, rtol=1e-5, atol=1e-5)


def test_keep_logits_and_no_labels_path():
    torch.manual_seed(0)
    ref = make("gemma2")
    patched = fastsft.patch(copy.deepcopy(ref), keep_logits=True)
    ids, position_ids, labels = packed_batch()
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = patched(input_ids=ids, position_ids=position_ids, labels=labels)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-5, atol=1e-5)  # softcapped like HF's
    no_labels = patched(input_ids=ids, position_ids=position_ids, use_cache=False)
    assert no_labels.loss is None
    torch.testing.assert_close(no_labels.logits, out_ref.logits, rtol=1e-5, atol=1e-5)


def test_unpatch_restores_bit_identical_outputs_and_modules():
    torch.manual_seed(0)
    model = make("gemma3")
    ids, position_ids, labels = packed_batch()
    before = model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    modules_before = [(name, type(m)) for name, m in model.named_modules()]
    config_before = model.config
    state_before = [sorted(m.__dict__) for m in model.modules()]
    fastsft.patch(model)
    assert sum("forward" in m.__dict__ for m in model.modules()) > 10
    assert [(name, type(m)) for name, m in model.named_modules()] == modules_before  # behaviour, not structure
    fastsft.unpatch(model)
    after = model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.loss, after.loss)
    assert [(name, type(m)) for name, m in model.named_modules()] == modules_before
    assert model.config is config_before and [sorted(m.__dict__) for m in model.modules()] == state_before
    assert not hasattr(model, "fastsft_report")
    with pytest.raises(ValueError, match="not patched"):
        fastsft.unpatch(model)


def test_patching_one_model_leaves_another_of_the_same_class_and_config_alone():
    torch.manual_seed(0)
    config = LlamaConfig(**COMMON)
    config._attn_implementation = "sdpa"
    a, b = LlamaForCausalLM(config), LlamaForCausalLM(config)
    ids, position_ids, labels = packed_batch()
    expected = b(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).logits
    fastsft.patch(a)
    assert b.config._attn_implementation == "sdpa" and a.config._attn_implementation == "fastsft"
    assert not any("forward" in m.__dict__ for m in b.modules())
    assert torch.equal(b(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).logits, expected)


def test_the_kernels_are_really_called(monkeypatch):
    calls = {}

    def counting(name, original):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        return wrapper

    def spy(module, name):
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))

    spy(patch_attention, "varlen_attention")
    spy(patch_attention, "apply_rope")
    spy(patch_loss, "fused_linear_cross_entropy")
    spy(patch_modules, "rms_norm")
    monkeypatch.setitem(patch_modules._GATED_OPS, "gelu_tanh", counting("geglu", patch_modules._GATED_OPS["gelu_tanh"]))
    _, patched = twins("gemma2")
    ids, position_ids, labels = packed_batch()
    patched(input_ids=ids, position_ids=position_ids, labels=labels).loss.backward()
    layers = patched.config.num_hidden_layers
    assert calls == {
        "varlen_attention": layers,
        "apply_rope": layers,
        "fused_linear_cross_entropy": 1,
        "rms_norm": 4 * layers + 1,  # Gemma-2: four norms per layer, plus the final norm
        "geglu": layers,
    }


def test_report_and_options():
    torch.manual_seed(0)
    model = fastsft.patch(make("qwen3"), swiglu=False, cross_entropy=False)
    report = model.fastsft_report
    layers = model.config.num_hidden_layers
    assert report.family == "qwen3"
    assert report.patched == {"rms_norm": 4 * layers + 1, "rope": layers, "attention": layers}
    assert report.not_patched == {"swiglu": "disabled", "cross_entropy": "disabled"}
    assert "rms_norm x" in str(report)
    ids, position_ids, labels = packed_batch()
    assert model(input_ids=ids, position_ids=position_ids, labels=labels).logits is not None  # HF's own head
    with pytest.raises(RuntimeError, match="already patched"):
        fastsft.patch(model)


@pytest.mark.parametrize("option", ["rope", "attention"])
def test_rope_or_attention_alone_still_match(option):
    torch.manual_seed(0)
    ref = make("mistral")
    patched = fastsft.patch(copy.deepcopy(ref), **{"rope": option == "rope", "attention": option == "attention"})
    ids, position_ids, labels = packed_batch()
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = patched(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)


def test_unsupported_family_warns_and_patches_attention_and_loss():
    from transformers import HeliumConfig, HeliumForCausalLM

    torch.manual_seed(0)
    config = HeliumConfig(**COMMON, head_dim=16, pad_token_id=0)
    config._attn_implementation = "eager"
    ref = HeliumForCausalLM(config)
    patched = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match=r"'helium' is not one of the supported families \(llama, mistral"):
        fastsft.patch(patched)
    report = patched.fastsft_report
    assert report.family == "generic" and set(report.patched) == {"attention", "cross_entropy"}
    assert report.not_patched["rms_norm"] == "family not in fastsft's table"
    ids, position_ids, labels = packed_batch()
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = patched(input_ids=ids, position_ids=position_ids, labels=labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)


def test_not_a_causal_lm_is_a_clear_error():
    with pytest.raises(TypeError, match="expects a Hugging Face causal LM"):
        fastsft.patch(torch.nn.Linear(2, 2))


def test_cached_generation_still_works():
    torch.manual_seed(0)
    ref = make("llama")
    patched = fastsft.patch(copy.deepcopy(ref))
    prompt = torch.randint(0, VOCAB, (1, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref.generate(prompt, max_new_tokens=6, do_sample=False)
        got = patched.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_twenty_optimizer_steps_track_the_unpatched_loss_curve(family):
    ref, patched = twins(family)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    opt = torch.optim.AdamW(patched.parameters(), lr=3e-3)
    curve_ref, curve = [], []
    for step in range(20):
        ids, position_ids, labels = packed_batch(seed=100 + step % 4)
        for model, optimizer, curve_ in ((ref, opt_ref, curve_ref), (patched, opt, curve)):
            optimizer.zero_grad()
            loss = model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
            loss.backward()
            optimizer.step()
            curve_.append(loss.item())
    assert curve[-1] < curve[0] - 0.5  # it learns
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(curve_ref), rtol=1e-3, atol=1e-3)


def test_head_dim_unlike_hidden_over_heads():
    ref, patched = twins("qwen3", head_dim=24)
    ids, position_ids, labels = packed_batch()
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = patched(input_ids=ids, position_ids=position_ids, labels=labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)


def test_return_dict_false_gives_a_tuple_with_the_loss_first():
    ref, patched = twins("llama")
    ids, position_ids, labels = packed_batch()
    expected = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    out = patched(input_ids=ids, position_ids=position_ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)


def test_eval_mode_with_labels_still_runs_the_kernels(monkeypatch):
    calls = []
    original = patch_attention.varlen_attention
    monkeypatch.setattr(patch_attention, "varlen_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    ref, patched = twins("llama")
    ref.eval()
    patched.eval()
    ids, position_ids, labels = packed_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
        got = patched(input_ids=ids, position_ids=position_ids, labels=labels).loss  # no use_cache=False
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == patched.config.num_hidden_layers


def test_deepcopy_and_pickle_of_a_patched_model(tmp_path):
    ref, patched = twins("gemma3")
    ids, position_ids, labels = packed_batch()
    expected = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    clone = copy.deepcopy(patched)
    torch.testing.assert_close(clone(input_ids=ids, position_ids=position_ids, labels=labels).loss, expected)
    fastsft.unpatch(clone)
    assert torch.equal(
        clone(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss,
        ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss,
    )
    torch.save(patched, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(loaded(input_ids=ids, position_ids=position_ids, labels=labels).loss, expected)
    assert loaded.fastsft_report.patched == patched.fastsft_report.patched


def test_state_dict_keys_are_unchanged():
    ref, patched = twins("gemma2")
    assert list(patched.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_static_cache_and_batched_generation(family):
    torch.manual_seed(0)
    ref = make(family)
    patched = fastsft.patch(copy.deepcopy(ref))
    prompt = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding
    for options in ({}, {"cache_implementation": "static"}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, **options)
            assert torch.equal(patched.generate(prompt, **kwargs), ref.generate(prompt, **kwargs)), options


def test_unknown_attention_arguments_are_refused_not_ignored():
    q = torch.randn(1, 4, 5, 16)
    k = torch.randn(1, 2, 5, 16)

    class Module:
        is_causal = True

    # (gpt-oss's s_aux used to be the example; fastsft implements attention sinks now.)
    with pytest.raises(UnsupportedModelError, match=r"alibi .*attention=False"):
        patch_attention.fastsft_attention(Module(), q, k, k, None, scaling=0.25, alibi=torch.zeros(4, 5))


def test_moe_router_aux_loss_is_added_to_the_fused_loss_as_hf_adds_it():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5
    )
    config._attn_implementation = "eager"
    ref = MixtralForCausalLM(config)
    patched = copy.deepcopy(ref)
    fastsft.patch(patched)  # a family in the table now
    assert patched.fastsft_report.patched["cross_entropy"] == 1  # fused, the router aux loss added to it
    ids, position_ids, labels = packed_batch()
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = patched(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    assert out.logits is None and out_ref.aux_loss.item() > 0
    torch.testing.assert_close(out.aux_loss, out_ref.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    out_ref.loss.backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), patched.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)  # the routers' gradients too


def test_composite_configs_are_not_patched_generically():
    from transformers import Gemma3Config

    from fastsft.patch.patcher import _generic_blockers

    class Model:
        _supports_attention_backend = True

    blockers = _generic_blockers(Model(), Gemma3Config())
    assert "Gemma3ForCausalLM" in blockers["attention"] and "Gemma3ForCausalLM" in blockers["cross_entropy"]


def test_partitioned_parameters_are_a_clear_error():
    torch.manual_seed(0)
    model = make("llama")
    model.model.norm.weight = torch.nn.Parameter(torch.empty(0))  # as DeepSpeed ZeRO-3 leaves it
    with pytest.raises(RuntimeError, match="before the model is partitioned"):
        fastsft.patch(model)
    assert "forward" not in model.__dict__
