"""Issue #19, item 1: what `fastsft.patch` swaps is measured, not assumed, and a model it cannot run exactly is
refused, never trained on a different loss.

- the head: what the causal LM's forward does around lm_head (a softcap, a logit scale, a scale of the hidden
  states) is measured from the forward itself; anything else keeps the model's own loss;
- the loss: given labels or shift_labels, a patched model always returns one (an MoE model's includes its
  router auxiliary loss, as HF adds it);
- packed documents: a model whose layers cannot keep them apart refuses a packed row, in the forward and in
  `fastsft train` before any data is read.
"""

import copy
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import fastsft
from fastsft.cli import main
from fastsft.patch import UnsupportedModelError
from fastsft.patch.loss import HeadTransform, probe_head
from fastsft.train.tiny import tiny_tokenizer

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=96,
)


def _model(model_type: str, *, meta: bool = False, **overrides):
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.device("meta" if meta else "cpu"):
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config).float()


def _packed(lengths=(7, 1, 12), vocab=90, seed=0):
    """(per-document ids, packed row [1, T], position_ids, shift_labels with -100 at each document's end)."""
    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]
    row = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    shift = torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in docs])[None]
    return docs, row, positions, shift


# --------------------------------------------------------------------------------------------------
# The head, measured
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "overrides", "expected"),
    [
        ("llama", {}, lambda c: HeadTransform()),
        ("gemma2", {"final_logit_softcapping": 30.0}, lambda c: HeadTransform(softcap=c.final_logit_softcapping)),
        ("cohere", {"logit_scale": 0.25}, lambda c: HeadTransform(logit_scale=c.logit_scale)),
        ("granite", {"logits_scaling": 4.0}, lambda c: HeadTransform(logit_scale=1 / c.logits_scaling)),
    ],
    ids=["llama", "gemma2-softcap", "cohere-logit-scale", "granite-logits-scaling"],
)
def test_the_head_transform_is_measured_from_the_forward(model_type, overrides, expected):
    """On the meta device too: the probe runs the forward on stubs, never on the weights."""
    model = _model(model_type, meta=True, **overrides)
    transform, why = probe_head(model)
    assert why == "" and transform == expected(model.config)


def test_an_unrecognised_logit_transform_keeps_the_models_own_loss():
    class SquaredLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits**2
            return out

    torch.manual_seed(0)
    model = SquaredLogits(LlamaConfig(**TINY))
    transform, why = probe_head(model)
    assert transform is None and "does not recognise" in why
    fastsft.patch(model)
    assert "cross_entropy" not in model.fastsft_report.patched
    assert "does not recognise" in model.fastsft_report.not_patched["cross_entropy"]


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("cohere", {"logit_scale": 0.25}),
        ("granite", {"logits_scaling": 4.0}),
        ("gemma2", {}),
        ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8, "sliding_window": 4}),
        ("mixtral", {"num_local_experts": 4}),
    ],
    ids=["cohere", "granite", "gemma2", "gpt_oss-sinks", "mixtral"],
)
def test_packed_patched_equals_per_document_unpatched(model_type, overrides):
    """Cohere's logit_scale was once ignored by the fused loss (loss off by 1e-2, no warning); gpt-oss's
    attention sinks (s_aux) and alternating sliding windows run in fastsft's varlen attention; Mixtral keeps
    its own loss (router aux loss off here: the configs' default) and gets fastsft's attention."""
    overrides = {**overrides, "attention_dropout": 0.0}
    reference = _model(model_type, **overrides)
    if model_type == "gemma2":
        reference.config.final_logit_softcapping = 2.0  # low enough that the cap bends these logits
    patched = fastsft.patch(copy.deepcopy(reference))
    assert patched.fastsft_report.patched.get("attention") and not patched.fastsft_report.packing
    docs, row, positions, shift = _packed()
    total = int((shift != -100).sum())
    expected = 0.0
    for doc in docs:
        out = reference(input_ids=doc[None], labels=doc[None], num_items_in_batch=total, use_cache=False)
        out.loss.backward()
        expected += out.loss.item()
    out = patched(input_ids=row, position_ids=positions, shift_labels=shift, num_items_in_batch=total, use_cache=False)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    for (name, a), (_, b) in zip(reference.named_parameters(), patched.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------
# A loss, always
# --------------------------------------------------------------------------------------------------


def test_an_moe_model_given_shift_labels_alone_returns_hfs_loss_with_the_router_aux_loss():
    """The loss stays Mixtral's own (it adds the router auxiliary loss); shift_labels alone must still give
    it, equal to what HF computes from labels on the same tokens (aux loss included)."""
    reference = _model("mixtral", output_router_logits=True, router_aux_loss_coef=0.5, num_local_experts=4)
    patched = fastsft.patch(copy.deepcopy(reference))
    ids = torch.randint(3, 90, (1, 11), generator=torch.Generator().manual_seed(1))
    expected = reference(input_ids=ids, labels=ids, use_cache=False)
    assert expected.aux_loss is not None and expected.aux_loss.item() > 0
    shift = torch.cat([ids[:, 1:], torch.tensor([[-100]])], dim=1)
    out = patched(input_ids=ids, shift_labels=shift, use_cache=False)
    assert out.loss is not None
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)


def test_a_model_that_cannot_take_shift_labels_refuses_them():
    class OwnLoss(LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = super().forward(input_ids=input_ids, **kwargs).logits
            loss = None
            if labels is not None:
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:])
            return type(super().forward(input_ids=input_ids))(loss=loss, logits=logits)

    torch.manual_seed(0)
    model = fastsft.patch(OwnLoss(LlamaConfig(**TINY)), cross_entropy=False)
    ids = torch.randint(3, 90, (1, 6))
    with pytest.raises(UnsupportedModelError, match="pass labels"):
        model(input_ids=ids, shift_labels=ids)
    assert model(input_ids=ids, labels=ids).loss is not None


# --------------------------------------------------------------------------------------------------
# Packed documents the model cannot keep apart
# --------------------------------------------------------------------------------------------------


def _qwen3_next():
    return _model(
        "qwen3_next",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        head_dim=8,
    )


def test_linear_attention_layers_refuse_a_packed_row_but_run_one_document_per_row():
    model = fastsft.patch(_qwen3_next())
    assert "GatedDeltaNet" in model.fastsft_report.packing
    _, row, positions, shift = _packed()
    with pytest.raises(UnsupportedModelError, match="packed documents"):
        model(input_ids=row, position_ids=positions, shift_labels=shift, use_cache=False)
    ids = row[:, :7]
    out = model(input_ids=ids, labels=ids, use_cache=False)
    assert out.loss is not None and torch.isfinite(out.loss)
    fastsft.unpatch(model)
    assert "_fastsft_packing" not in model.model.__dict__ and "forward" not in model.model.__dict__


def test_fastsft_train_refuses_such_a_model_before_reading_data(tmp_path, capsys):
    tokenizer = tiny_tokenizer()
    model = _qwen3_next()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    capsys.readouterr()  # save_pretrained's progress bars
    code = main(
        [
            "train",
            f"model.name_or_path={tmp_path / 'model'}",
            f"output_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "logging.progress_bar=false",
        ]
    )
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]
    assert code == 2 and len(err) == 1 and err[0].startswith("fastsft train: "), err
    assert "packs several documents into each row" in err[0] and "GatedDeltaNet" in err[0]
    assert not (tmp_path / "cache").exists()  # refused before the data was tokenized


# --------------------------------------------------------------------------------------------------
# gpt-oss: its attention sinks in cached generation too
# --------------------------------------------------------------------------------------------------


def _gpt_oss():
    return _model("gpt_oss", num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=4)


def test_gpt_oss_patched_generates_what_it_generates_unpatched():
    """Cached generation runs fastsft's plain PyTorch attention path, sinks included."""
    reference = _gpt_oss().eval()
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    patched = fastsft.patch(copy.deepcopy(reference))
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(3))
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    torch.testing.assert_close(patched.generate(ids, **settings), reference.generate(ids, **settings))
