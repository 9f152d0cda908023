"""The training loop: exact gradient accumulation, exact resume, atomic checkpoints, the NaN guard, the CLI."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import fastsft
from fastsft.data import PackedLoader, build_micro_batch, prepare_dataset
from fastsft.train import build, evaluation, loop
from fastsft.train import checkpoint as ckpt
from fastsft.train import step as step_module
from fastsft.train.config import load_config
from fastsft.train.synthetic import synthetic_records
from fastsft.train.tiny import tiny_model, tiny_tokenizer


def small_config(tmp_path, *overrides):
    base = [
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "schedule.max_steps=12",
        "schedule.warmup_steps=2",
        "packing.max_tokens=512",
        "data.max_seq_len=256",
        "checkpointing.every_steps=6",
        "checkpointing.keep_last=3",
        "logging.every_steps=1",
        "logging.progress_bar=false",
        "eval.every_steps=6",
        "eval.max_batches=2",
        "eval.exact_match=false",
    ]
    return load_config(None, base + list(overrides))


@pytest.fixture(autouse=True)
def small_synthetic(monkeypatch):
    monkeypatch.setattr(build, "SYNTHETIC_TRAIN_RECORDS", 300)
    monkeypatch.setattr(build, "SYNTHETIC_EVAL_RECORDS", 40)
    monkeypatch.setattr(evaluation, "EXACT_MATCH_ITEMS", 8)


def test_accumulated_micro_batches_give_the_one_big_batch_gradient(tmp_path):
    """Each micro-batch's loss is a sum over its tokens divided by the whole step's count, so four
    micro-batches accumulate exactly the gradient of the same documents in one batch."""
    tokenizer = tiny_tokenizer()
    data = prepare_dataset(synthetic_records(64, seed=0), tokenizer, max_seq_len=256, cache_dir=tmp_path)
    step = next(PackedLoader(data, max_tokens=300, grad_accum=4).steps(0))
    assert len(step) == 4
    device = torch.device("cpu")
    grads = []
    for batches in (step, [build_micro_batch(data, torch.cat([torch.from_numpy(mb.doc_ids) for mb in step]))]):
        model = fastsft.patch(tiny_model(seed=0))
        loss, _, supervised = step_module.forward_backward(model, batches, device, None)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    uninterrupted = loop.train(small_config(tmp_path / "a"), log=lambda *_: None)
    assert len(uninterrupted.losses) == 12

    original = step_module.forward_backward
    calls = []

    def crash_on_step_nine(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt  # killed after checkpoint-6 was written
        return original(*args, **kwargs)

    monkeypatch.setattr(step_module, "forward_backward", crash_on_step_nine)
    with pytest.raises(KeyboardInterrupt):
        loop.train(small_config(tmp_path / "b"), log=lambda *_: None)
    monkeypatch.setattr(step_module, "forward_backward", original)
    assert [p.name for p in ckpt.checkpoints(tmp_path / "b" / "run")] == ["checkpoint-6"]

    resumed = loop.train(small_config(tmp_path / "b"), log=lambda *_: None)
    # The first 6 losses come from checkpoint-6, the rest were trained again: the whole run, bit-identical on CPU.
    assert resumed.steps == 12 and len(resumed.losses) == 12 and resumed.losses_first_step == 1
    assert resumed.losses == uninterrupted.losses


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    real_save = torch.save
    saves = []

    def dying_save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed while writing checkpoint-12
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        loop.train(small_config(tmp_path), log=lambda *_: None)
    run = tmp_path / "run"
    assert [p.name for p in ckpt.checkpoints(run)] == ["checkpoint-6"]
    assert not [p for p in run.iterdir() if ".partial-" in p.name]
    state = ckpt.load_trainer_state(run / "checkpoint-6")
    assert state["position"]["step"] == 6
    model = tiny_model(seed=123)
    ckpt.load_model_weights(model, run / "checkpoint-6")  # loads (safetensors), no error


def test_non_finite_gradients_skip_steps_then_stop_with_a_clear_message(tmp_path, monkeypatch):
    original = step_module.forward_backward

    def poisoned(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return result

    monkeypatch.setattr(step_module, "forward_backward", poisoned)
    config = small_config(tmp_path, "nan_guard.max_skipped_steps=2")
    with pytest.raises(FloatingPointError, match=r"3 steps in a row had non-finite.*nan_guard.max_skipped_steps=2"):
        loop.train(config, log=lambda *_: None)


def test_the_nan_guard_counts_consecutive_skips(tmp_path, monkeypatch):
    """Every other step poisoned: 6 skips in all but never 2 in a row, so max_skipped_steps=1 lets it finish
    (with the skipped steps counted and the good steps' updates applied)."""
    original = step_module.forward_backward
    calls = []

    def every_other(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        calls.append(None)
        if len(calls) % 2 == 0:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("inf"))
        return result

    monkeypatch.setattr(step_module, "forward_backward", every_other)
    result = loop.train(small_config(tmp_path, "nan_guard.max_skipped_steps=1"), log=lambda *_: None)
    assert result.steps == 12 and result.skipped_steps == 6
    untrained = tiny_model(seed=0)
    trained = tiny_model(seed=0)
    ckpt.load_model_weights(trained, tmp_path / "run" / "checkpoint-12")
    assert not torch.equal(untrained.model.norm.weight, trained.model.norm.weight)  # the good steps did update


def test_metrics_checkpoints_and_config_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "peak_flops", lambda device, dtype: 2e12)  # a pretend 2 TFLOP/s device: MFU
    result = loop.train(small_config(tmp_path, "checkpointing.keep_last=1"), log=lambda *_: None)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(r["tokens_per_s"] > 0 and r["supervised_tokens_per_s"] > 0 and r["lr"] >= 0 for r in steps)
    assert all(r["mfu"] == pytest.approx(r["tflops_per_s_per_device"] / 2) for r in steps)
    assert all(0 < r["tflops_per_s_per_device"] < 1 for r in steps)  # a 2-core CPU, a 0.4M-parameter model
    assert result.plot == run / "loss.png" and (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"])) for r in steps]
    assert steps[1]["lr"] > steps[0]["lr"] > 0 and steps[-1]["lr"] < steps[2]["lr"]  # warmup, then decay
    assert any("eval_loss" in r for r in records) and result.eval_loss is not None
    assert [p.name for p in ckpt.checkpoints(run)] == ["checkpoint-12"]  # keep_last=1
    assert load_config(run / "config.yaml", []) == small_config(tmp_path, "checkpointing.keep_last=1")
    assert result.losses[-1] < result.losses[0]


def test_cli_config_error_exits_2_with_the_suggestion(capsys):
    from fastsft.cli import main

    assert main(["train", "optimizer.learning_rate=1e-4"]) == 2
    assert "did you mean 'optimizer.lr'" in capsys.readouterr().err


def test_cli_bad_data_exits_2_naming_the_file_line_and_field(tmp_path, capsys):
    from fastsft.cli import main

    data = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    args = [
        "train",
        f"data.train={data}",
        "data.eval=null",
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "logging.progress_bar=false",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.jsonl:2" in err[0] and "messages[1].role" in err[0], err
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def _step_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_a_local_model_directory_with_jsonl_data_trains_like_the_preset(tmp_path):
    """model.name_or_path=<a local HF directory> (here the preset's own weights and tokenizer, saved) and
    data.train=<a JSONL file> (the synthetic records, written out) give the preset's run exactly: loading, the
    tokenizer round trip and the file source change nothing."""
    model_dir = tmp_path / "model"
    tiny_model(seed=0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(300, seed=0, split="train")))
    preset = small_config(tmp_path / "a", "schedule.max_steps=4", "data.eval=null")
    local = small_config(
        tmp_path / "b",
        "schedule.max_steps=4",
        "data.eval=null",
        f"model.name_or_path={model_dir}",
        f"data.train={data}",
    )
    loop.train(preset, log=lambda *_: None)
    loop.train(local, log=lambda *_: None)
    assert _step_losses(tmp_path / "b" / "run") == _step_losses(tmp_path / "a" / "run")
    assert len(_step_losses(tmp_path / "b" / "run")) == 4


def test_activation_checkpointing_and_bf16_autocast(tmp_path, monkeypatch):
    """Recomputing activations changes no number (fp32); bf16 autocast (fp32 master weights) tracks fp32."""
    checkpointing = {}
    original = step_module.forward_backward

    def spy(model, *args, **kwargs):
        new_name = hasattr(type(model), "is_activation_checkpointing")  # transformers >= 5.x
        checkpointing[current] = model.is_activation_checkpointing if new_name else model.is_gradient_checkpointing
        return original(model, *args, **kwargs)

    monkeypatch.setattr(step_module, "forward_backward", spy)
    runs = {}
    variants = {"plain": [], "ckpt": ["model.activation_checkpointing=true"], "bf16": ["model.dtype=bf16"]}
    for current, extra in variants.items():
        config = small_config(tmp_path / current, "schedule.max_steps=4", "data.eval=null", *extra)
        loop.train(config, log=lambda *_: None)
        runs[current] = _step_losses(tmp_path / current / "run")
    assert checkpointing == {"plain": False, "ckpt": True, "bf16": False}
    assert runs["ckpt"] == pytest.approx(runs["plain"], rel=1e-6)
    assert runs["bf16"] == pytest.approx(runs["plain"], rel=2e-2) and runs["bf16"] != runs["plain"]
    state = ckpt.load_trainer_state(tmp_path / "bf16" / "run" / "checkpoint-4")["optimizer"]["state"]
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())  # fp32 AdamW states


def test_a_run_directory_holding_other_checkpoints_is_refused_not_pruned(tmp_path):
    """resume=never (or an explicit older checkpoint) into a directory with checkpoints would mix two runs:
    keep_last would prune the wrong ones and resume=auto would later pick the other run's. Refused, and
    nothing is deleted."""
    loop.train(small_config(tmp_path, "checkpointing.keep_last=null"), log=lambda *_: None)
    run = tmp_path / "run"
    before = [p.name for p in ckpt.checkpoints(run)]
    assert before == ["checkpoint-6", "checkpoint-12"]
    with pytest.raises(ckpt.ResumeError, match="already holds checkpoints.*resume=never"):
        loop.train(small_config(tmp_path, "checkpointing.resume=never"), log=lambda *_: None)
    with pytest.raises(ckpt.ResumeError, match="older than the checkpoints.*checkpoint-12"):
        loop.train(small_config(tmp_path, f"checkpointing.resume={run / 'checkpoint-6'}"), log=lambda *_: None)
    assert [p.name for p in ckpt.checkpoints(run)] == before
    # From another run directory, an older checkpoint is fine.
    other = small_config(tmp_path / "o", f"checkpointing.resume={run / 'checkpoint-6'}", "checkpointing.keep_last=1")
    result = loop.train(other, log=lambda *_: None)
    assert result.steps == 12 and [p.name for p in ckpt.checkpoints(tmp_path / "o" / "run")] == ["checkpoint-12"]


def test_stale_staging_directories_of_a_killed_save_are_removed(tmp_path):
    run = tmp_path / "run"
    (run / ".checkpoint-6.partial-99999").mkdir(parents=True)
    (run / ".checkpoint-6.partial-99999" / "model.safetensors").write_bytes(b"half")
    (run / ".checkpoint-3.retired-99998").mkdir()
    loop.train(small_config(tmp_path, "schedule.max_steps=2", "data.eval=null"), log=lambda *_: None)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_resuming_applies_the_configs_optimizer_settings(tmp_path):
    """The checkpoint's AdamW param groups carry the old lr / weight decay; the resumed run's config wins
    (so the NaN guard's advice, lower optimizer.lr and resume, works)."""
    loop.train(small_config(tmp_path, "schedule.max_steps=6", "schedule.kind=constant"), log=lambda *_: None)
    resumed = small_config(
        tmp_path, "schedule.max_steps=8", "schedule.kind=constant", "optimizer.lr=1e-5", "optimizer.weight_decay=0.1"
    )
    seen = []
    original = step_module.forward_backward

    def spy(model, *args, **kwargs):
        seen.append([(group["lr"], group["weight_decay"]) for group in optimizer_of[0].param_groups])
        return original(model, *args, **kwargs)

    optimizer_of = []
    original_optimizer = build.optimizer

    def capture(*args, **kwargs):
        optimizer_of.append(original_optimizer(*args, **kwargs))
        return optimizer_of[-1]

    import unittest.mock

    with (
        unittest.mock.patch.object(step_module, "forward_backward", spy),
        unittest.mock.patch.object(build, "optimizer", capture),
    ):
        loop.train(resumed, log=lambda *_: None)
    assert len(seen) == 2
    for groups in seen:  # matrices decayed, norm weights not; the new lr
        assert groups == [(pytest.approx(1e-5), 0.1), (pytest.approx(1e-5), 0.0)]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if "lr" in r and r["step"] > 6] == [pytest.approx(1e-5)] * 2
    # config.yaml is the resumed run's; the settings that trained the first 6 steps are kept beside it.
    assert load_config(tmp_path / "run" / "config.yaml", []).optimizer.lr == 1e-5
    assert load_config(tmp_path / "run" / "config-before-step-6.yaml", []).optimizer.lr == 2e-3


def test_a_mid_epoch_resume_with_another_layout_is_refused(tmp_path):
    """The position counts steps of world_size x grad_accum micro-batches: with another grouping it would
    repeat or skip examples, so it is refused (at an epoch boundary any layout is fine)."""
    loop.train(small_config(tmp_path, "schedule.max_steps=6"), log=lambda *_: None)
    with pytest.raises(ckpt.ResumeError, match="middle of epoch 0.*grad_accum"):
        loop.train(small_config(tmp_path, "schedule.max_steps=8", "distributed.grad_accum=2"), log=lambda *_: None)
    result = loop.train(small_config(tmp_path, "schedule.max_steps=8"), log=lambda *_: None)  # same layout
    assert result.steps == 8


def test_the_unpatched_loss_trains_identically(tmp_path):
    """kernels.cross_entropy=false: HF's own loss (it needs `labels`; the shifted labels are passed as
    shift_labels) gives the fused loss's numbers."""
    fused = loop.train(small_config(tmp_path / "f", "schedule.max_steps=4"), log=lambda *_: None)
    plain = loop.train(
        small_config(tmp_path / "p", "schedule.max_steps=4", "kernels.cross_entropy=false"), log=lambda *_: None
    )
    assert plain.losses == pytest.approx(fused.losses, rel=1e-5)
    assert plain.eval_loss == pytest.approx(fused.eval_loss, rel=1e-5)


def test_eval_runs_once_per_step_and_counts_are_recorded(tmp_path):
    loop.train(small_config(tmp_path), log=lambda *_: None)  # eval every 6 of 12 steps: at 6 and 12
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12]
    state = json.loads((tmp_path / "run" / "checkpoint-12" / ckpt.STATE_JSON).read_text())
    assert state["tokens"] == records[-2]["tokens_seen"] > state["supervised_tokens"] > 0


def test_weight_decay_skips_norms_and_biases(tmp_path):
    model = fastsft.patch(tiny_model(seed=0))
    optimizer = build.optimizer(model, small_config(tmp_path, "optimizer.weight_decay=0.1"), torch.device("cpu"))
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"]) and any("embed" in names[id(p)] for p in decayed["params"])
    assert {names[id(p)].rsplit(".", 2)[-2] for p in plain["params"]} == {
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
    }


def test_plot_true_without_matplotlib_fails_before_training(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(RuntimeError, match="logging.plot=true needs matplotlib"):
        loop.train(small_config(tmp_path, "logging.plot=true"), log=lambda *_: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_exact_match_renders_prompts_with_the_runs_template(monkeypatch):
    """data.chat_template is what training rendered; generation must see the same prompt."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(seed=0)
    prompts = []

    def fake_generate(input_ids, **kwargs):
        prompts.append(tokenizer.decode(input_ids[0]))
        assert 3 in kwargs["eos_token_id"]  # <|im_end|> stops the reply
        return input_ids

    monkeypatch.setattr(model, "generate", fake_generate)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    items = [([{"role": "user", "content": "Spell backwards: abc."}], "cba")]
    evaluation.exact_match(model, tokenizer, items, chat_template=template)
    assert prompts == ["[user] Spell backwards: abc.\n[assistant] "]


def test_the_loop_generates_with_the_runs_template(tmp_path, monkeypatch):
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    calls = []

    def spy(model, tokenizer, items, *, max_new_tokens=12, chat_template=None):
        calls.append(chat_template)
        return 0.0, [""] * len(items)

    monkeypatch.setattr(evaluation, "exact_match", spy)
    config = small_config(tmp_path, "schedule.max_steps=2", "eval.exact_match=true", f"data.chat_template={template}")
    loop.train(config, log=lambda *_: None)
    assert calls == [template, template]  # before and after training


def test_an_epoch_boundary_checkpoint_resumes_with_another_layout(tmp_path):
    """A checkpoint at an epoch's end records the next epoch's start, so it resumes with another grad_accum
    (or number of ranks); schedule.epochs then counts the next epoch in the new layout."""
    one_epoch = small_config(tmp_path, "schedule.max_steps=null", "schedule.epochs=1", "checkpointing.every_steps=null")
    first = loop.train(one_epoch, log=lambda *_: None)
    state = json.loads((tmp_path / "run" / f"checkpoint-{first.steps}" / ckpt.STATE_JSON).read_text())
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
    two_epochs = small_config(
        tmp_path,
        "schedule.max_steps=null",
        "schedule.epochs=2",
        "distributed.grad_accum=2",
        "checkpointing.every_steps=null",
    )
    second = loop.train(two_epochs, log=lambda *_: None)
    data = prepare_dataset(
        synthetic_records(300, seed=0, split="train"), tiny_tokenizer(), max_seq_len=256, cache_dir=tmp_path / "cache"
    )
    epoch_1_steps = PackedLoader(data, max_tokens=512, grad_accum=2).num_steps(1)
    assert second.steps == first.steps + epoch_1_steps
    assert epoch_1_steps < first.steps  # the new layout: about half the steps per epoch


def test_a_finished_run_run_again_changes_nothing(tmp_path):
    config = small_config(tmp_path, "schedule.max_steps=4", "eval.every_steps=null")
    first = loop.train(config, log=lambda *_: None)
    run = tmp_path / "run"
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    lines = []
    again = loop.train(config, log=lines.append)
    assert any("nothing to do" in line for line in lines)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == files  # nothing rewritten
    assert (again.steps, again.final_loss, again.eval_loss) == (first.steps, first.final_loss, first.eval_loss)


def test_a_kill_between_retiring_and_publishing_a_step_restores_it(tmp_path):
    """Saving step N again (the end of a run resumed at N) retires the old copy first; killed right then, the
    next start puts the retired copy back instead of deleting it."""
    loop.train(small_config(tmp_path, "schedule.max_steps=6", "data.eval=null"), log=lambda *_: None)
    run = tmp_path / "run"
    (run / "checkpoint-6").rename(run / ".checkpoint-6.retired-4242")
    ckpt.remove_stale_staging(run)
    assert [p.name for p in ckpt.checkpoints(run)] == ["checkpoint-6"]


def test_checkpoints_carry_the_training_template_and_an_absolute_base_path(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    model_dir = tmp_path / "model"
    tiny_model(seed=0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)
    config = small_config(
        tmp_path,
        "schedule.max_steps=2",
        "data.eval=null",
        f"data.chat_template={template}",
        "model.name_or_path=model",
        "lora.enabled=true",
    )
    loop.train(config, log=lambda *_: None)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert AutoTokenizer.from_pretrained(checkpoint).chat_template == template
    assert ckpt.load_meta(checkpoint)["base_model"] == str(model_dir.resolve())


def test_the_step_normaliser_reaches_the_model_as_an_integer(monkeypatch):
    """FSDP's mixed-precision policy casts floating inputs to bf16, which would round the supervised-token
    count (1001 -> 1000): the loop passes it as an int64 tensor."""
    tokenizer = tiny_tokenizer()
    data = prepare_dataset(synthetic_records(16, seed=0), tokenizer, max_seq_len=256, use_cache=False)
    step = next(PackedLoader(data, max_tokens=300, grad_accum=2).steps(0))
    model = fastsft.patch(tiny_model(seed=0))
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["num_items_in_batch"])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    step_module.forward_backward(model, step, torch.device("cpu"), None)
    assert [(n.dtype, int(n)) for n in seen] == [(torch.int64, sum(mb.num_supervised for mb in step))] * len(step)


def test_pruning_is_a_rename_so_a_kill_mid_delete_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """keep_last retires an old checkpoint by renaming it before deleting it: killed during the deletion (here:
    rmtree stops after one file), no visible checkpoint-N is left half-deleted, and the next start removes
    what remains."""
    run = tmp_path / "run"
    loop.train(small_config(tmp_path, "checkpointing.keep_last=null", "data.eval=null"), log=lambda *_: None)
    assert [p.name for p in ckpt.checkpoints(run)] == ["checkpoint-6", "checkpoint-12"]
    real_rmtree = shutil.rmtree

    def killed_after_one_file(path, *args, **kwargs):
        next(p for p in Path(path).iterdir() if p.is_file()).unlink()
        raise KeyboardInterrupt  # what a kill -9 leaves: a partly deleted directory

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoint(run / "checkpoint-6")
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    visible = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert visible == ["checkpoint-12"]  # the half-deleted one is hidden, not a broken checkpoint-6
    ckpt.remove_stale_staging(run)
    assert not [p for p in run.iterdir() if p.name.startswith(".checkpoint-")]
    assert [p.name for p in ckpt.checkpoints(run)] == ["checkpoint-12"]


def test_a_half_pruned_checkpoint_from_before_is_removed_at_start(tmp_path):
    """A checkpoint-N missing its trainer state and older than the newest complete one (what a kill during the
    old in-place deletion left) is finished off at start-up; a newer incomplete one is not touched."""
    run = tmp_path / "run"
    loop.train(small_config(tmp_path, "checkpointing.keep_last=null", "data.eval=null"), log=lambda *_: None)
    (run / "checkpoint-6" / ckpt.STATE_FILE).unlink()
    (run / "checkpoint-99").mkdir()  # not ours to judge: newer than any complete checkpoint
    ckpt.remove_stale_staging(run)
    assert not (run / "checkpoint-6").exists() and (run / "checkpoint-99").is_dir()
    assert [p.name for p in ckpt.checkpoints(run)] == ["checkpoint-12"]


def _two_checkpoints(tmp_path):
    loop.train(small_config(tmp_path, "checkpointing.keep_last=null", "data.eval=null"), log=lambda *_: None)
    return tmp_path / "run"


def test_a_truncated_newest_checkpoint_is_refused_in_one_line_naming_the_file(tmp_path, capsys):
    from fastsft.cli import main

    run = _two_checkpoints(tmp_path)
    weights = run / "checkpoint-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    args = [
        f"output_dir={run}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "schedule.max_steps=14",
        "packing.max_tokens=512",
        "data.max_seq_len=256",
        "data.eval=null",
        "eval.exact_match=false",
        "logging.progress_bar=false",
        "checkpointing.every_steps=6",
        "schedule.warmup_steps=2",
    ]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{weights} cannot be read" in err[0], err
    assert f"checkpointing.resume={run / 'checkpoint-6'}" in err[0]


def test_a_malicious_trainer_state_is_refused_without_suggesting_to_unpickle_it(tmp_path):
    run = _two_checkpoints(tmp_path)

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"optimizer": Payload()}, run / "checkpoint-12" / ckpt.STATE_FILE)
    with pytest.raises(ckpt.ResumeError) as info:
        loop.train(small_config(tmp_path, "schedule.max_steps=14", "data.eval=null"), log=lambda *_: None)
    message = str(info.value)
    assert "trainer_state.pt holds objects other than tensors and plain data" in message
    assert "weights_only" not in message and "checkpoint-6" in message


def test_result_json_covers_the_whole_run_after_a_resume(tmp_path):
    """The losses of the steps before a resume travel in the checkpoint (steps 5 and 6 too, taken after the
    last log step at 4), so the resumed run's result.json lists every step, equal to the uninterrupted run's."""
    config = small_config(tmp_path, "logging.every_steps=4", "data.eval=null", "checkpointing.keep_last=null")
    straight = loop.train(config, log=lambda *_: None)
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoint-12")  # killed after checkpoint-6: resume from there
    (run / "result.json").unlink()
    resumed = loop.train(config, log=lambda *_: None)
    recorded = json.loads((run / "result.json").read_text())
    assert recorded["losses_first_step"] == 1 and len(recorded["losses"]) == 12 == len(straight.losses)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    assert recorded["losses"] == pytest.approx(straight.losses, rel=1e-5)


def test_a_kill_after_the_final_checkpoint_is_completed_by_running_again(tmp_path):
    """Killed after the final checkpoint but before result.json, loss.png and the last pruning: running the
    same command again trains nothing and completes those outputs."""
    config = small_config(tmp_path, "checkpointing.keep_last=1", "data.eval=null")
    first = loop.train(config, log=lambda *_: None)
    run = tmp_path / "run"
    (run / "result.json").unlink()
    (run / "loss.png").unlink(missing_ok=True)
    shutil.copytree(run / "checkpoint-12", run / "checkpoint-6")  # the older one, not yet pruned
    lines = []
    again = loop.train(config, log=lines.append)
    assert any("nothing to do" in line for line in lines)
    assert any("completed the run's outputs" in line for line in lines)
    assert [p.name for p in ckpt.checkpoints(run)] == ["checkpoint-12"]
    recorded = json.loads((run / "result.json").read_text())
    assert recorded["losses"] == pytest.approx(first.losses, rel=1e-6) and recorded["steps"] == 12
    assert recorded["final_loss"] == pytest.approx(first.final_loss, rel=1e-6) and again.steps == 12
    assert (run / "loss.png").is_file()


def test_kill_9_right_after_a_checkpoint_appears_then_run_again(tmp_path):
    """A real kill -9 of `fastsft train` the moment checkpoint-6 appears (mid-prune, mid-save or just after:
    wherever it lands), then the same command again: the run ends whole (every step's loss in result.json,
    equal to an uninterrupted run's), keep_last holds and no staging, retired or pruned folder is left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(300, seed=0, split="train")))
    settings = [
        f"data.train={data}",
        "data.eval=null",
        "schedule.max_steps=12",
        "schedule.warmup_steps=2",
        "packing.max_tokens=512",
        "data.max_seq_len=256",
        "checkpointing.every_steps=3",
        "checkpointing.keep_last=2",
        "logging.every_steps=4",
        "logging.progress_bar=false",
        "eval.exact_match=false",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]

    def command(run):
        return [sys.executable, "-m", "fastsft", "train", f"output_dir={run}", *settings]

    straight = loop.train(load_config(None, [f"output_dir={tmp_path / 'straight'}", *settings]), log=lambda *_: None)
    run = tmp_path / "killed"
    process = subprocess.Popen(command(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "checkpoint-6").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    again = subprocess.run(command(run), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    recorded = json.loads((run / "result.json").read_text())
    assert recorded["losses_first_step"] == 1 and recorded["losses"] == pytest.approx(straight.losses, rel=1e-5)
    assert [p.name for p in ckpt.checkpoints(run)] == ["checkpoint-9", "checkpoint-12"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
