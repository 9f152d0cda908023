"""fastsft.patch(model, attention=...): whose kernels run the packed attention ("fastsft", "torch",
"flash_attn"), clear errors for a missing backend or an option it lacks, and the same loss and gradients
whichever runs.

torch's varlen_attn and flash-attn run only on CUDA in fp16 / bf16, so on the CPU they are replaced by
fakes that implement FlashAttention's documented varlen semantics densely (window_size=(left, right):
query i sees key j when i - left <= j <= i + right, -1 meaning unbounded; causal sets right = 0; softcap
c > 0 caps the scores as c * tanh(s / c)). A patched model running a fake must then give exactly the loss and
gradients of the same model running fastsft's own kernels: that checks how fastsft translates its window,
softcap, scale, causality and GQA into those APIs. The GPU suite runs the real ones.
"""

import copy
import sys
import types

import pytest
import torch
import torch.nn.attention.varlen
from test_patch import COMMON, assert_same_grads, make, packed_batch

import fastsft
import fastsft.ops.attention as ops_attention
from fastsft.ops import varlen_attention


def _flash_semantics(q, k, v, cu_seqlens, *, scale, causal, window_size, softcap, calls):
    calls.append({"window_size": tuple(window_size), "causal": causal, "softcap": softcap, "heads": k.shape[1]})
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    left, right = window_size
    right = 0 if causal else right
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qd, kd, vd = (t[start:end].transpose(0, 1).double() for t in (q, k, v))
        scores = qd @ kd.transpose(1, 2) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(end - start)[:, None]
        j = torch.arange(end - start)[None, :]
        allowed = torch.ones(end - start, end - start, dtype=torch.bool)
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        outs.append((probs @ vd).transpose(0, 1).to(q.dtype))
    return torch.cat(outs)


def _fake_flash_attn(calls):
    module = types.ModuleType("flash_attn")

    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        **unused,
    ):
        assert torch.equal(cu_q, cu_k) and max_q == max_k and dropout_p == 0.0
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        return _flash_semantics(
            q, k, v, cu_q, scale=scale, causal=causal, window_size=window_size, softcap=softcap, calls=calls
        )

    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def _fake_torch_varlen_attn(calls, *, old_signature=False):
    def varlen_attn(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        return_aux=None,
        scale=None,
        window_size=(-1, -1),
        enable_gqa=False,
    ):
        assert torch.equal(cu_seq_q, cu_seq_k) and return_aux is None
        assert enable_gqa or key.shape[1] == query.shape[1], "GQA heads without enable_gqa=True"
        scale = scale if scale is not None else query.shape[-1] ** -0.5
        return _flash_semantics(
            query, key, value, cu_seq_q, scale=scale, causal=False, window_size=window_size, softcap=0.0, calls=calls
        )

    def varlen_attn_early(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, *, scale=None):
        """An early signature: is_causal, no window, no GQA."""
        assert key.shape[1] == query.shape[1], "GQA heads given to a varlen_attn without enable_gqa"
        scale = scale if scale is not None else query.shape[-1] ** -0.5
        return _flash_semantics(
            query, key, value, cu_seq_q, scale=scale, causal=is_causal, window_size=(-1, -1), softcap=0.0, calls=calls
        )

    return varlen_attn_early if old_signature else varlen_attn


@pytest.fixture
def cpu_flash_kernels(monkeypatch):
    """Let the fakes run on CPU fp32 (the real kernels' CUDA / fp16-bf16 check is tested on its own below)."""
    monkeypatch.setattr(ops_attention, "_check_flash_inputs", lambda where, q: None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # FlashAttention-2's interface
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(calls))
    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", _fake_torch_varlen_attn(calls))
    return calls


def _loss_and_grads_match(family, implementation, calls, **overrides):
    torch.manual_seed(0)
    ours = make(family, **overrides)
    theirs = copy.deepcopy(ours)
    fastsft.patch(ours)
    fastsft.patch(theirs, attention=implementation)
    assert theirs.fastsft_report.attention_implementation == implementation
    ids, position_ids, labels = packed_batch()
    loss_ours = ours(input_ids=ids, position_ids=position_ids, labels=labels).loss
    loss_ours.backward()
    calls.clear()
    loss_theirs = theirs(input_ids=ids, position_ids=position_ids, labels=labels).loss
    loss_theirs.backward()
    assert len(calls) == ours.config.num_hidden_layers, "the named implementation did not run every layer"
    torch.testing.assert_close(loss_theirs, loss_ours, rtol=1e-6, atol=1e-6)
    assert_same_grads(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_flash_attn_gives_the_same_loss_and_gradients(cpu_flash_kernels, family):
    _loss_and_grads_match(family, "flash_attn", cpu_flash_kernels)
    if family == "gemma2":  # soft-capped scores reach flash-attn's softcap
        assert {c["softcap"] for c in cpu_flash_kernels} == {5.0}
    if family == "mistral":  # fastsft's window 9 (keys seen, itself included) is flash-attn's left = 8
        assert {c["window_size"] for c in cpu_flash_kernels} == {(8, 0)}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_torch_varlen_attn_gives_the_same_loss_and_gradients(cpu_flash_kernels, family):
    _loss_and_grads_match(family, "torch", cpu_flash_kernels)
    assert all(c["heads"] == COMMON["num_key_value_heads"] for c in cpu_flash_kernels)  # enable_gqa, not repeats


def test_torch_varlen_attn_without_enable_gqa_repeats_heads_and_refuses_a_window(cpu_flash_kernels, monkeypatch):
    monkeypatch.setattr(
        torch.nn.attention.varlen, "varlen_attn", _fake_torch_varlen_attn(cpu_flash_kernels, old_signature=True)
    )
    _loss_and_grads_match("llama", "torch", cpu_flash_kernels)
    torch.manual_seed(0)
    model = fastsft.patch(make("mistral"), attention="torch")
    ids, position_ids, labels = packed_batch()
    with pytest.raises(NotImplementedError, match=r"takes no window \(window=9\)"):
        model(input_ids=ids, position_ids=position_ids, labels=labels)


def test_models_outside_the_family_table_use_the_named_implementation(cpu_flash_kernels):
    from transformers import HeliumConfig, HeliumForCausalLM

    torch.manual_seed(0)
    config = HeliumConfig(**COMMON, head_dim=COMMON["hidden_size"] // COMMON["num_attention_heads"], pad_token_id=0)
    config._attn_implementation = "eager"
    ref = HeliumForCausalLM(config)
    patched = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match="not one of the supported families"):
        fastsft.patch(patched, attention="flash_attn")
    assert patched.config._attn_implementation == "fastsft_fa"  # no "flash" in it: HF would change its masks
    ids, position_ids, labels = packed_batch()
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = patched(input_ids=ids, position_ids=position_ids, labels=labels)
    assert len(cpu_flash_kernels) == config.num_hidden_layers
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    fastsft.unpatch(patched)
    assert patched.config._attn_implementation == "eager"


def test_torch_varlen_attn_refuses_soft_capped_attention_at_patch_time():
    with pytest.raises(ValueError, match="gemma2 soft-caps its attention logits"):
        fastsft.patch(make("gemma2"), attention="torch")


def test_an_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match=r"attention must be True, False or one of 'fastsft', 'torch', 'flash_attn'"):
        fastsft.patch(make("llama"), attention="sdpa")


def test_a_missing_flash_attn_is_a_clear_error_at_patch_time(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    model = make("llama")
    with pytest.raises(ImportError, match="needs the flash-attn package"):
        fastsft.patch(model, attention="flash_attn")
    assert "forward" not in model.model.__dict__  # nothing was left half-patched


def test_a_torch_without_varlen_attn_is_a_clear_error_at_patch_time(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)
    with pytest.raises(ImportError, match=r"needs torch.nn.attention.varlen.varlen_attn \(torch >= 2.11\)"):
        fastsft.patch(make("llama"), attention="torch")


def test_explicit_fastsft_is_the_default():
    torch.manual_seed(0)
    model = fastsft.patch(make("llama"), attention="fastsft")
    assert model.fastsft_report.attention_implementation == "fastsft"
    assert model.config._attn_implementation == "fastsft"


@pytest.mark.parametrize("implementation", ["torch", "flash_attn"])
def test_flash_kernels_need_cuda_half_precision_inputs(implementation):
    q = torch.randn(8, 2, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(
        ValueError,
        match=rf"implementation='{implementation}'\) runs FlashAttention CUDA kernels; "
        r"q is on cpu",
    ):
        varlen_attention(q, q, q, cu, 5, implementation=implementation)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["torch", "flash_attn"])
def test_gpu_real_flash_kernels_through_fastsft_match_float64(implementation, monkeypatch):
    """The real torch varlen_attn / flash-attn on CUDA in bf16, called through fastsft's translation (window,
    GQA, scale): each document's output and gradients within 2x torch's own bf16 error, like fastsft's."""
    if implementation == "flash_attn":
        pytest.importorskip("flash_attn", reason="flash-attn is optional and not installed")
    import functools

    import test_attention

    chosen = functools.partial(varlen_attention, implementation=implementation)
    monkeypatch.setattr(test_attention, "varlen_attention", chosen)
    lengths = [1, 700, 4096, 33, 2500]
    q, k, v, cu_seqlens = test_attention.documents(lengths, 16, 4, 128, torch.bfloat16)
    grad = torch.randn_like(q)
    test_attention._check_documents_on_gpu(q, k, v, cu_seqlens, [0, 1, 2, 4], grad)
    q, k, v, cu_seqlens = test_attention.documents(lengths, 16, 4, 128, torch.bfloat16)
    test_attention._check_documents_on_gpu(q, k, v, cu_seqlens, [2, 4], torch.randn_like(q), window=1024)
