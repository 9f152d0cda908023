"""`fastsft train objective=dpo|ipo|simpo|orpo`: the loop on preference pairs (built-in synthetic pairs or a
.jsonl in TRL's format): metrics, the reference log-probs' caching, exact resume, bad input."""

import json

import numpy as np
import pytest

from fastsft.cli import main as cli_main
from fastsft.train import build, evaluation, loop
from fastsft.train import preference as preference_module
from fastsft.train.config import ConfigError, load_config
from fastsft.train.synthetic import near_miss, sample_exchange, synthetic_preference_records


def small_config(tmp_path, *overrides):
    base = [
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "schedule.max_steps=8",
        "schedule.warmup_steps=1",
        "packing.max_tokens=512",
        "data.max_seq_len=128",
        "checkpointing.every_steps=4",
        "logging.every_steps=1",
        "logging.progress_bar=false",
        "eval.every_steps=4",
        "eval.max_batches=2",
        "eval.exact_match=false",
        "optimizer.lr=1e-3",
    ]
    return load_config(None, base + list(overrides))


@pytest.fixture(autouse=True)
def small_synthetic(monkeypatch):
    monkeypatch.setattr(build, "SYNTHETIC_TRAIN_RECORDS", 120)
    monkeypatch.setattr(build, "SYNTHETIC_EVAL_RECORDS", 24)
    monkeypatch.setattr(evaluation, "EXACT_MATCH_ITEMS", 8)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo", "orpo"])
def test_each_objective_trains_and_logs_its_metrics(tmp_path, objective):
    result = loop.train(small_config(tmp_path, f"objective={objective}"), log=lambda *_: None)
    assert result.steps == 8 and len(result.losses) == 8 and all(np.isfinite(result.losses))
    records = _metrics(result.run_dir)
    steps = [r for r in records if "loss" in r]
    assert all(0.0 <= r["reward_accuracy"] <= 1.0 for r in steps)
    assert all(r["chosen_reward"] - r["rejected_reward"] == pytest.approx(r["reward_margin"], abs=1e-5) for r in steps)
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all("eval_reward_accuracy" in r and "eval_likelihood_accuracy" in r for r in evals)
    assert result.reward_accuracy_before is not None and result.reward_accuracy_after is not None
    if objective in ("dpo", "ipo"):
        assert result.reward_accuracy_before == 0.0  # before training the policy is the reference: no margin
        assert (result.run_dir / "reference_logprobs_train.npy").is_file()
    else:
        assert not (result.run_dir / "reference_logprobs_train.npy").exists()


def test_the_reference_is_computed_once_per_weights_and_data(tmp_path, monkeypatch):
    calls = []
    original = preference_module.reference_logprobs

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(preference_module, "reference_logprobs", counting)
    first = loop.train(small_config(tmp_path / "a", "objective=dpo", "schedule.max_steps=2"), log=lambda *_: None)
    assert len(calls) == 2  # train and eval pairs
    # Another run from the same initial weights on the same data (its own run directory, the same data cache)
    second = small_config(tmp_path / "a", "objective=dpo", "schedule.max_steps=2", f"output_dir={tmp_path / 'b'}")
    loop.train(second, log=lambda *_: None)
    assert len(calls) == 2
    name = "reference_logprobs_train.npy"
    np.testing.assert_array_equal(np.load(first.run_dir / name), np.load(tmp_path / "b" / name))
    # Other initial weights (another seed): computed again
    loop.train(
        small_config(tmp_path / "a", "objective=dpo", "schedule.max_steps=2", f"output_dir={tmp_path / 'c'}", "seed=1"),
        log=lambda *_: None,
    )
    assert len(calls) == 4


def test_resume_continues_exactly_with_the_first_starts_reference(tmp_path, monkeypatch):
    uninterrupted = loop.train(small_config(tmp_path / "a", "objective=dpo"), log=lambda *_: None)
    original = preference_module.preference_forward_backward
    calls = []

    def crash_on_step_six(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # killed after checkpoint-4 was written
        return original(*args, **kwargs)

    monkeypatch.setattr(preference_module, "preference_forward_backward", crash_on_step_six)
    with pytest.raises(KeyboardInterrupt):
        loop.train(small_config(tmp_path / "b", "objective=dpo"), log=lambda *_: None)
    monkeypatch.setattr(preference_module, "preference_forward_backward", original)
    resumed = loop.train(small_config(tmp_path / "b", "objective=dpo"), log=lambda *_: None)
    assert resumed.steps == 8 and resumed.losses == uninterrupted.losses

    # Without the run's reference file a resume cannot know the initial model's log-probs: a clear error.
    (tmp_path / "b" / "run" / "reference_logprobs_train.npy").unlink()
    for checkpoint in (tmp_path / "b" / "run").glob("checkpoint-8"):
        checkpoint.rename(checkpoint.with_name("moved-away"))
    with pytest.raises(FileNotFoundError, match="reference_logprobs_train.npy is missing"):
        loop.train(small_config(tmp_path / "b", "objective=dpo"), log=lambda *_: None)


def test_a_jsonl_of_trl_pairs_trains_from_the_cli(tmp_path, capsys):
    pairs = tmp_path / "prefs.jsonl"
    rows = synthetic_preference_records(40, seed=3)
    rows[1] = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}  # plain-text pairs mix with conversational ones
    pairs.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    args = [
        "train",
        "objective=simpo",
        f"data.train={pairs}",
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "schedule.max_steps=3",
        "packing.max_tokens=512",
        "data.max_seq_len=128",
        "logging.progress_bar=false",
    ]
    assert cli_main(args) == 0
    assert "steps: 3" in capsys.readouterr().out


def test_a_bad_pair_names_the_file_line_and_field(tmp_path, capsys):
    pairs = tmp_path / "prefs.jsonl"
    rows = synthetic_preference_records(4, seed=3)
    rows[2]["rejected"] = rows[2]["chosen"]
    pairs.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    args = ["train", "objective=dpo", f"data.train={pairs}", f"output_dir={tmp_path / 'run'}"]
    assert cli_main(args + [f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    assert f"{pairs.name}:3" in capsys.readouterr().err


def test_preference_config_errors():
    with pytest.raises(ConfigError, match="data.format"):
        load_config(None, ["objective=dpo", "data.format=chat"])
    with pytest.raises(ConfigError, match="kernels.cross_entropy"):
        load_config(None, ["objective=dpo", "kernels.cross_entropy=false"])
    with pytest.raises(ConfigError, match="preference.label_smoothing"):
        load_config(None, ["objective=orpo", "preference.label_smoothing=0.1"])


def test_synthetic_near_misses_are_wrong_but_close():
    import random

    rng = random.Random(0)
    for task in ("add", "sub", "reverse", "sort", "count_items", "capital", "color"):
        for _ in range(200):
            exchange = sample_exchange(rng, task)
            wrong = near_miss(exchange, rng)
            assert wrong != exchange.answer
            if task in ("add", "sub", "reverse", "sort"):  # same length, one change or one swap
                assert len(wrong) == len(exchange.answer)
                assert (
                    sorted(wrong) == sorted(exchange.answer)
                    or sum(a != b for a, b in zip(wrong, exchange.answer, strict=True)) == 1
                )


def test_the_readme_preference_loop_runs_as_written(tmp_path):
    """The README's plain-PyTorch DPO loop, run on the CPU with the tiny model (only the device and the file
    name substituted): it trains, and the loss is DPO's."""
    import re
    from pathlib import Path

    import torch

    import fastsft
    from fastsft.train.tiny import tiny_model, tiny_tokenizer

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("In your own loop (a model patched by `fastsft.patch`") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    pairs = tmp_path / "prefs.jsonl"
    pairs.write_text("\n".join(json.dumps(row) for row in synthetic_preference_records(24, seed=5)) + "\n")
    code = code.replace('"cuda"', '"cpu"').replace('"prefs.jsonl"', repr(str(pairs)))
    code = code.replace("max_seq_len=2048)", f"max_seq_len=2048, cache_dir={str(tmp_path / 'cache')!r})")
    model = fastsft.patch(tiny_model(seed=0))
    before = [p.detach().clone() for p in model.parameters()]
    namespace = {
        "model": model,
        "tokenizer": tiny_tokenizer(),
        "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3),
    }
    exec(compile(code, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.losses.shape[0] >= 1 and torch.isfinite(out.losses).all()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_dpo_with_lora_uses_the_base_model_as_reference(tmp_path, monkeypatch):
    """With LoRA the reference pass runs with the adapters disabled (the base model); the run trains the
    adapters only and saves them in PEFT's format."""
    pytest.importorskip("peft")
    seen = []
    original = preference_module._adapters_disabled

    def spying(model):
        seen.append(callable(getattr(model, "disable_adapter", None)))
        return original(model)

    monkeypatch.setattr(preference_module, "_adapters_disabled", spying)
    result = loop.train(small_config(tmp_path, "objective=dpo", "lora.enabled=true"), log=lambda *_: None)
    assert seen and all(seen)  # the train and eval reference passes both ran on the PEFT model, adapters off
    assert result.steps == 8 and all(np.isfinite(result.losses))
    assert (result.run_dir / "checkpoint-8" / "adapter_config.json").is_file()
