"""fastsft.patch(model) inside the tools users train with: HF Trainer, TRL's SFTTrainer, PEFT LoRA, gradient
checkpointing, torch.compile, bf16, and the Triton kernels (through the interpreter on CPU)."""

import copy
import warnings

import pytest
import torch
from conftest import assert_within_torch_error
from test_patch import COMMON, FAMILIES, VOCAB, assert_same_grads, make, packed_batch, twins

import fastsft


def _rows(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + (i * 7) % 15
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * (length // 3) + ids[length // 3 :]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _train_with_trainer(model, tmp_path, collator):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(_rows(32)), data_collator=collator)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_hf_trainer_with_flattening_collator_tracks_the_unpatched_run(tmp_path):
    """HF Trainer + DataCollatorWithFlattening (packed rows, cu_seq_lens kwargs, num_items_in_batch with
    gradient accumulation): the patched model's logged losses equal the unpatched model's."""
    from transformers import DataCollatorWithFlattening

    torch.manual_seed(0)
    ref = make("llama")
    patched = fastsft.patch(copy.deepcopy(ref))
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses_ref = _train_with_trainer(ref, tmp_path / "ref", DataCollatorWithFlattening())
        losses = _train_with_trainer(patched, tmp_path / "patched", collator)
    assert len(losses) == 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), rtol=1e-4, atol=1e-4)


def test_trl_sft_trainer_runs_the_patched_model(tmp_path):
    """TRL's own data path (prompt/completion text, its tokenization, padding-free packing) into the patched
    model: the completion-only loss it logs equals the unpatched model's."""
    from _chat_tokenizers import make_tokenizer
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = make_tokenizer("chatml")
    tokenizer.pad_token = "<|endoftext|>"
    torch.manual_seed(0)
    ref = make("qwen3", vocab_size=len(tokenizer))
    patched = fastsft.patch(copy.deepcopy(ref))
    pairs = [("What is the capital of France?", " The capital of France is Paris."), ("hello", " world, thanks!")]
    data = Dataset.from_list([{"prompt": p * (1 + i % 3), "completion": c} for i in range(12) for p, c in pairs])

    def run(model, out):
        config = SFTConfig(
            output_dir=str(out),
            max_steps=3,
            per_device_train_batch_size=4,
            padding_free=True,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            logging_steps=1,
            learning_rate=1e-3,
            disable_tqdm=True,
            seed=0,
            data_seed=0,
            max_length=None,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses_ref, losses = run(ref, tmp_path / "ref"), run(patched, tmp_path / "patched")
    assert len(losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), rtol=1e-4, atol=1e-4)


def test_peft_lora_model_matches_unpatched():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = make("mistral")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0)
    ref = get_peft_model(base, lora)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapters matter
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    patched = copy.deepcopy(ref)
    assert fastsft.patch(patched) is patched and patched.fastsft_report.patched["attention"] == 3
    ids, position_ids, labels = packed_batch()
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = patched(input_ids=ids, position_ids=position_ids, labels=labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out_ref.loss.backward()
    out.loss.backward()
    assert_same_grads(ref, patched)
    assert sum(1 for name, p in patched.named_parameters() if p.grad is not None) == sum(
        1 for name, _ in patched.named_parameters() if "lora_" in name
    )


def test_gradient_checkpointing():
    ref, patched = twins("gemma2")
    for model in (ref, patched):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    ids, position_ids, labels = packed_batch()
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = patched(input_ids=ids, position_ids=position_ids, labels=labels)
    out_ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(ref, patched)


def test_torch_compile():
    ref, patched = twins("qwen2")
    compiled = torch.compile(patched, backend="aot_eager")
    ids, position_ids, labels = packed_batch()
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = compiled(input_ids=ids, position_ids=position_ids, labels=labels)
    out_ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(ref, patched)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_error_within_twice_hf_bf16_error(family):
    """bf16 patched vs bf16 HF, both against the float64 model: the patched error is at most 2x HF's. A
    single scalar loss's error is a noisy sample, so losses are compared by their worst error over four
    batches; the final hidden states and every gradient (accumulated over the batches) element-wise."""
    torch.manual_seed(0)
    exact = make(family).double()
    hf_bf16 = copy.deepcopy(exact).to(torch.bfloat16)
    patched = fastsft.patch(copy.deepcopy(exact).to(torch.bfloat16))
    losses = {"exact": [], "hf": [], "patched": []}
    hidden = {}
    for seed in range(4):
        ids, position_ids, labels = packed_batch(seed=seed + 1)
        for name, model in (("exact", exact), ("hf", hf_bf16), ("patched", patched)):
            loss = model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
            loss.backward()
            losses[name].append(loss.detach().double())
            if seed == 0:
                with torch.no_grad():
                    hidden[name] = model.model(input_ids=ids, position_ids=position_ids, use_cache=False)[0]
    loss_exact = torch.stack(losses["exact"])
    assert_within_torch_error("losses", torch.stack(losses["patched"]), torch.stack(losses["hf"]), loss_exact)
    assert_within_torch_error("last_hidden_state", hidden["patched"], hidden["hf"], hidden["exact"])
    exact_params, hf_params = dict(exact.named_parameters()), dict(hf_bf16.named_parameters())
    for name, p in patched.named_parameters():
        assert_within_torch_error(name, p.grad, hf_params[name].grad, exact_params[name].grad)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_triton_kernels_through_the_interpreter(family, triton_backend):
    """The same parity with every op on its Triton kernel (interpreted on CPU, compiled on a GPU)."""
    ref, patched = twins(family)
    ids, position_ids, labels = packed_batch(lengths=[9, 1, 14, 6])
    out_ref = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = patched(input_ids=ids, position_ids=position_ids, labels=labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-5)
    out_ref.loss.backward()
    out.loss.backward()
    assert_same_grads(ref, patched, rtol=1e-3, atol=1e-4)


def test_config_is_not_shared_after_patch_and_unpatch_restores_it():
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**COMMON)
    model = LlamaForCausalLM(config)
    fastsft.patch(model)
    assert model.config is not config and model.model.layers[0].self_attn.config is model.config
    fastsft.unpatch(model)
    assert model.config is config and model.model.layers[0].self_attn.config is config


def test_readme_loop_fastsft_data_into_a_patched_model(tmp_path):
    """The README's plain-PyTorch loop: fastsft.data micro-batches (shifted labels, cu_seqlens) into a
    patched model; a step's gradient equals the unpatched model's on the same documents."""
    from _chat_tokenizers import make_tokenizer
    from test_data_pipeline import conversation

    from fastsft.data import PackedLoader, prepare_dataset

    tokenizer = make_tokenizer("llama3")
    data = prepare_dataset([conversation(1 + i % 3) for i in range(12)], tokenizer, cache_dir=tmp_path)
    loader = PackedLoader(data, max_tokens=int(data.lengths.max()) + 30, grad_accum=3)
    torch.manual_seed(0)
    ref = make("llama", vocab_size=len(tokenizer))
    model = fastsft.patch(copy.deepcopy(ref))
    step = next(loader.steps(epoch=0))
    supervised = sum(mb.num_supervised for mb in step)
    for mb in step:
        out = model(
            **mb.model_inputs(),
            cu_seq_lens_q=mb.cu_seqlens,
            max_length_q=mb.max_seqlen,
            shift_labels=mb.labels,
            num_items_in_batch=supervised,
        )
        out.loss.backward()
        # The same documents through the unpatched model with HF's own (unshifted) labels, one at a time.
        for d in mb.doc_ids.tolist():
            ids, trained = data[d]
            ids = torch.tensor(ids.tolist())[None]
            labels = ids.masked_fill(~torch.tensor(trained.tolist())[None], -100)
            ref(input_ids=ids, labels=labels, num_items_in_batch=supervised, use_cache=False).loss.backward()
    assert_same_grads(ref, model)


def test_lora_added_after_patching_is_honoured_and_unpatch_keeps_it():
    """Patch, then PEFT wraps lm_head and the MLPs: the loss must include the lm_head adapter (the fused
    loss steps aside for a wrapped head) and unpatching must keep every adapter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = make("llama")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "gate_proj"], lora_dropout=0.0)
    torch.manual_seed(1)
    ref = get_peft_model(copy.deepcopy(base), lora)
    torch.manual_seed(1)
    patched = get_peft_model(fastsft.patch(copy.deepcopy(base)), lora)
    with torch.no_grad():
        for model in (ref, patched):
            torch.manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    ids, position_ids, labels = packed_batch()
    expected = ref(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    got = patched(input_ids=ids, position_ids=position_ids, labels=labels)
    torch.testing.assert_close(got.loss, expected, rtol=1e-5, atol=1e-6)
    fastsft.unpatch(patched)
    again = patched(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fp32_model_under_bf16_autocast(family):
    """Mixed precision (HF Trainer's bf16=True on an fp32 model): errors within 2x HF's own under autocast."""
    torch.manual_seed(0)
    exact = make(family).double()
    hf = copy.deepcopy(exact).float()
    patched = fastsft.patch(copy.deepcopy(exact).float())
    losses = {"exact": [], "hf": [], "patched": []}
    for seed in range(4):
        ids, position_ids, labels = packed_batch(seed=seed + 1)
        for name, model in (("exact", exact), ("hf", hf), ("patched", patched)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "exact"):
                loss = model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
            loss.backward()
            losses[name].append(loss.detach().double())
    stack = {name: torch.stack(values) for name, values in losses.items()}
    assert_within_torch_error("losses", stack["patched"], stack["hf"], stack["exact"])
    exact_params, hf_params = dict(exact.named_parameters()), dict(hf.named_parameters())
    for name, p in patched.named_parameters():
        assert p.grad.dtype == torch.float32
        assert_within_torch_error(name, p.grad, hf_params[name].grad, exact_params[name].grad)
