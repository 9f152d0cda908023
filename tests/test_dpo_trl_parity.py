"""fastsft's DPO against TRL's DPOTrainer, model to gradients (#20, item 7): on a tiny random Llama in fp32, the
loss and every parameter's gradient of fastsft's packed pairs (fastsft.train.preference) equal those of a real
TRL 1.16 DPOTrainer (its tokenization, padded collator, fused log-prob head and compute_loss) on the same pairs
and the same reference log-probs; packing the pairs into one row, several rows or one pair per micro-batch
changes nothing.

Both sides score the SAME token ids and completion masks: fastsft's pairs are built from the rows of TRL's padded
batch (padding stripped), since on conversational pairs the two tokenizations differ in their masks (TRL also
trains the chat template's "\\n" after <|im_end|>; fastsft trains the reply and <|im_end|>, as its SFT does):
`test_tokenization_compared_with_trls` pins that difference, and shows plain-text pairs tokenize identically, so
there the whole fastsft pipeline (prepare_preference_dataset, PackedLoader, reference_logprobs) is compared.

TRL 1.16 details the comparison relies on (trl/trainer/dpo_trainer.py): a pair's log-prob is the sum over its
completion tokens (prompt_ids + chosen_ids, the completion mask shifted by one, as fastsft's labels); the
"sigmoid" loss is -logsigmoid(beta * margin) with no label smoothing (`label_smoothing` is read only by other
loss types), averaged over the pairs of the batch; no SFT / aux term unless asked for (loss_type "sft",
MoE router loss); max_length=None: no truncation; for plain text TRL appends the EOS text to each completion.
DPOConfig defaults to bf16=True, which autocasts to bfloat16 even with use_cpu=True (TRL's log-probs are then
~2e-4 off, relatively): fp32 needs bf16=False.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

import fastsft
from fastsft.data import PackedLoader, build_micro_batch
from fastsft.data.preference import prepare_preference_dataset
from fastsft.train.preference import PreferenceSettings, preference_forward_backward, reference_logprobs
from fastsft.train.synthetic import synthetic_preference_records
from fastsft.train.tiny import tiny_model, tiny_model_config, tiny_tokenizer

pytest.importorskip("trl", reason="trl (a dev extra) is not installed")
pytest.importorskip("datasets", reason="datasets (a dev extra) is not installed")

DEVICE = torch.device("cpu")
PAIRS = 5


def _model(seed, initializer_range=None):
    """fastsft's tiny Llama (fp32, eager attention); a larger `initializer_range` makes a sharper model."""
    if initializer_range is None:
        model = tiny_model(seed=seed)
    else:
        config = tiny_model_config()
        config.initializer_range = initializer_range
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    model.set_attn_implementation("eager")
    return model


def _trainer(tmp_path, records, *, beta, model, ref_model=None, precompute=True):
    """A real TRL DPOTrainer: the sigmoid loss, no truncation, one batch of all the pairs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    with warnings.catch_warnings():  # TRL's and transformers' deprecation notices
        warnings.simplefilter("ignore")
        args = DPOConfig(
            output_dir=str(tmp_path / "trl"),
            per_device_train_batch_size=len(records),
            loss_type="sigmoid",
            beta=beta,
            max_length=None,
            precompute_ref_log_probs=precompute,
            padding_free=False,
            bf16=False,  # TRL's DPOConfig defaults to bf16=True (autocast, even on the CPU): fp32 here
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        return DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=Dataset.from_list(records),
            processing_class=tiny_tokenizer(),
        )


def _trl_batch(trainer):
    (batch,) = list(trainer.get_train_dataloader())  # every pair in one padded batch: chosen rows, then rejected
    return batch


def _trl_loss_and_grads(trainer, batch):
    """TRL's loss on `batch` (its own compute_loss on its patched model) and the gradients of its backward."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
        trainer.accelerator.backward(loss)
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


class _BatchPairs:
    """fastsft's tokenized pairs (examples 2i chosen, 2i + 1 rejected) holding exactly the token ids and
    completion masks of TRL's padded batch: row i is pair i's chosen sequence, row P + i its rejected one; the
    right padding (attention mask 0) is dropped. `trained` is TRL's completion mask: token t is a target."""

    def __init__(self, batch):
        ids, attention, completion = (batch[k] for k in ("input_ids", "attention_mask", "completion_mask"))
        pairs = ids.shape[0] // 2
        tokens, trained, lengths = [], [], []
        for row in (r for i in range(pairs) for r in (i, pairs + i)):
            n = int(attention[row].sum())
            assert bool(attention[row, :n].all())  # right-padded
            tokens.append(ids[row, :n].numpy())
            trained.append(completion[row, :n].numpy())
            lengths.append(n)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tokens = np.concatenate(tokens).astype(np.int32)
        self.trained = np.concatenate(trained).astype(np.uint8)

    def __len__(self):
        return len(self.lengths)


def _layouts(data):
    """One optimizer step over every pair, as fastsft can pack it: one row; the loader's packing into rows of
    at most the longest pair; each pair alone in its own micro-batch."""
    pairs = len(data) // 2
    (one_row,) = PackedLoader(data, max_tokens=int(data.lengths.sum()), group=2).steps(0)
    assert len(one_row) == 1
    row = max(int(data.lengths.reshape(-1, 2).sum(1).max()), int(data.lengths.sum()) * 2 // 5)
    (several,) = PackedLoader(data, max_tokens=row, grad_accum=pairs, group=2).steps(0)
    assert 1 < len(several) < pairs  # several rows, some holding more than one pair
    one_at_a_time = [build_micro_batch(data, np.array([2 * i, 2 * i + 1])) for i in range(pairs)]
    return {"one row": one_row, "packed": several, "one pair at a time": one_at_a_time}


def _fastsft_loss_and_grads(initial, step, settings, reference):
    model = fastsft.patch(copy.deepcopy(initial))
    model.train()
    loss, tokens, supervised, metric_sums = preference_forward_backward(
        model, step, settings, DEVICE, None, reference=reference
    )
    assert int(metric_sums[-1]) == sum(mb.num_documents // 2 for mb in step)
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_same(loss, grads, want_loss, want_grads, what):
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: loss\n{m}")
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        label = f"{what}: {name}"
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, s=label: f"{s}\n{m}")


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("reference_kind", ["initial", "other"])
def test_dpo_loss_and_every_gradient_equal_trls(tmp_path, beta, reference_kind):
    """reference "initial": TRL's precompute_ref_log_probs=True with no ref_model (the initial policy; every
    reward is 0 before the step); "other": another, sharper model as ref_model, which TRL runs in each
    compute_loss (precompute off), so the rewards are far from 0 (beta * margin of order 1: the sigmoid's
    curved part) and the loss depends on beta."""
    records = synthetic_preference_records(PAIRS, seed=3)
    initial = _model(seed=0)
    reference_model = _model(seed=1, initializer_range=0.1) if reference_kind == "other" else None
    trainer = _trainer(
        tmp_path,
        records,
        beta=beta,
        model=copy.deepcopy(initial),
        ref_model=copy.deepcopy(reference_model),
        precompute=reference_kind == "initial",
    )
    batch = _trl_batch(trainer)
    assert batch["input_ids"].shape[0] == 2 * PAIRS
    assert (batch["attention_mask"] == 0).any()  # TRL's batch really is padded
    trl_loss, trl_grads = _trl_loss_and_grads(trainer, batch)
    if reference_kind == "initial":
        trl_reference = torch.stack([batch["ref_chosen_logps"], batch["ref_rejected_logps"]], 1).reshape(-1)
    else:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, trainer._prepare_inputs(batch))
        trl_reference = torch.stack([chosen, rejected], 1).reshape(-1)

    data = _BatchPairs(batch)
    reference = reference_logprobs(
        fastsft.patch(copy.deepcopy(reference_model or initial)),
        PackedLoader(data, max_tokens=int(data.lengths.sum()), group=2),
        DEVICE,
        None,
    )
    # The reference log-probs: fastsft's pass over the packed pairs equals TRL's padded one.
    torch.testing.assert_close(torch.from_numpy(reference).float(), trl_reference.float(), rtol=1e-5, atol=1e-4)

    settings = PreferenceSettings("dpo", beta=beta)
    layouts = _layouts(data)
    results = {name: _fastsft_loss_and_grads(initial, step, settings, reference) for name, step in layouts.items()}
    if reference_kind == "initial":
        assert trl_loss.item() == pytest.approx(np.log(2), rel=1e-6)  # policy == reference: every margin is 0
    for name, (loss, grads) in results.items():
        _assert_same(loss, grads, trl_loss, trl_grads, f"fastsft ({name}) vs TRL")
    # packed (several pairs per row, several rows) equals one pair at a time, and one row
    one_loss, one_grads = results["one pair at a time"]
    for name in ("one row", "packed"):
        _assert_same(*results[name], one_loss, one_grads, f"fastsft {name} vs one pair at a time")

    # The comparison can fail: a 1% larger beta on fastsft's side breaks it (the gradients scale with beta).
    off = PreferenceSettings("dpo", beta=beta * 1.01)
    loss, grads = _fastsft_loss_and_grads(initial, layouts["packed"], off, reference)
    with pytest.raises(AssertionError):
        _assert_same(loss, grads, trl_loss, trl_grads, "beta off by 1%")
    if reference_kind == "other":
        assert not torch.allclose(loss, trl_loss, rtol=1e-5, atol=1e-7)


def test_tokenization_compared_with_trls(tmp_path):
    """The same pairs through fastsft's prepare_preference_dataset and TRL's DPOTrainer tokenization: the same
    token ids; the same completion masks for plain text (TRL appends the EOS, fastsft trains it); for
    conversations TRL's completion is everything the template renders after the generation prompt, so it also
    trains the "\\n" that follows <|im_end|>, which fastsft (as for SFT) leaves untrained."""
    tokenizer = tiny_tokenizer()
    conversations = synthetic_preference_records(PAIRS, seed=3)
    text = [
        {
            "prompt": r["prompt"][-1]["content"] + "\nAnswer: ",
            "chosen": r["chosen"][0]["content"],
            "rejected": r["rejected"][0]["content"],
        }
        for r in conversations
    ]
    newline = tokenizer.convert_tokens_to_ids("\n")
    for name, records in (("conversations", conversations), ("text", text)):
        trl_data = _trainer(tmp_path / name, records, beta=0.1, model=_model(seed=0)).train_dataset
        ours = prepare_preference_dataset(records, tokenizer, cache_dir=tmp_path / name / "cache", max_seq_len=1024)
        assert len(ours) == 2 * len(trl_data) == 2 * PAIRS
        for i, example in enumerate(trl_data):
            for k, side in enumerate(("chosen", "rejected")):
                ids, trained = ours[2 * i + k]
                prompt, completion = example["prompt_ids"], example[f"{side}_ids"]
                assert ids.tolist() == prompt + completion, (name, i, side)
                trl_trained = np.array([0] * len(prompt) + [1] * len(completion), dtype=bool)
                assert ids[trained][-1] == tokenizer.eos_token_id  # fastsft: the reply, then <|im_end|>
                if name == "text":
                    assert (trained == trl_trained).all(), (i, side)
                else:  # the only difference: TRL also trains the template's "\n" after the final <|im_end|>
                    assert completion[-2:] == [tokenizer.eos_token_id, newline]
                    assert (trained[:-1] == trl_trained[:-1]).all() and trl_trained[-1] and not trained[-1]


def test_text_pairs_end_to_end_equal_trl(tmp_path):
    """Plain-text pairs, where the two tokenizations agree: fastsft's whole pipeline (prepare_preference_dataset,
    PackedLoader in several micro-batches, reference_logprobs of the initial model, preference_forward_backward)
    gives TRL's loss and gradients on its own batch (the mean over pairs and the gradients do not depend on the
    order TRL's sampler put the pairs in)."""
    tokenizer = tiny_tokenizer()
    records = [
        {
            "prompt": r["prompt"][-1]["content"] + "\nAnswer: ",
            "chosen": r["chosen"][0]["content"],
            "rejected": r["rejected"][0]["content"],
        }
        for r in synthetic_preference_records(PAIRS, seed=4)
    ]
    initial = _model(seed=0)
    beta = 0.3
    trainer = _trainer(tmp_path, records, beta=beta, model=copy.deepcopy(initial))
    batch = _trl_batch(trainer)
    trl_loss, trl_grads = _trl_loss_and_grads(trainer, batch)

    data = prepare_preference_dataset(records, tokenizer, cache_dir=tmp_path / "cache", max_seq_len=1024)
    longest_pair = int(data.lengths.reshape(-1, 2).sum(1).max())
    reference = reference_logprobs(
        fastsft.patch(copy.deepcopy(initial)), PackedLoader(data, max_tokens=longest_pair, group=2), DEVICE, None
    )
    # TRL's precomputed reference log-probs, matched to fastsft's examples by their tokens
    index = {tuple(data[k][0].tolist()): k for k in range(len(data))}
    for row in range(2 * PAIRS):
        n = int(batch["attention_mask"][row].sum())
        k = index[tuple(batch["input_ids"][row, :n].tolist())]
        column = "ref_chosen_logps" if row < PAIRS else "ref_rejected_logps"
        assert k % 2 == (row >= PAIRS)
        assert reference[k] == pytest.approx(batch[column][row % PAIRS].item(), rel=1e-5, abs=1e-4)

    (step,) = PackedLoader(data, max_tokens=longest_pair, grad_accum=PAIRS, group=2).steps(0)
    assert len(step) > 1
    loss, grads = _fastsft_loss_and_grads(initial, step, PreferenceSettings("dpo", beta=beta), reference)
    _assert_same(loss, grads, trl_loss, trl_grads, "fastsft pipeline vs TRL on text pairs")
