"""fastsft generate | eval | merge (fastsft.train.inference): checkpoints load back exactly, LoRA merges exactly."""

import copy
import io
import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fastsft
from fastsft.cli import main
from fastsft.data import PackedLoader
from fastsft.train import build, evaluation, inference, loop
from fastsft.train import checkpoint as ckpt
from fastsft.train.config import load_config
from fastsft.train.synthetic import exact_match_items
from fastsft.train.tiny import tiny_model, tiny_tokenizer

EXACT_MATCH_ITEMS = 6
# (module, name, value): the built-in synthetic data shrunk
SMALL_SYNTHETIC = [
    (build, "SYNTHETIC_TRAIN_RECORDS", 200),
    (build, "SYNTHETIC_EVAL_RECORDS", 40),
    (evaluation, "EXACT_MATCH_ITEMS", EXACT_MATCH_ITEMS),
]
CPU = torch.device("cpu")


def _train(run_dir, *overrides):
    """A real checkpoint from 4 steps of `fastsft train` on a shrunken synthetic task (~4 s on 2 cores)."""
    with pytest.MonkeyPatch.context() as mp:
        for module, name, value in SMALL_SYNTHETIC:
            mp.setattr(module, name, value)
        config = load_config(
            None,
            [
                f"output_dir={run_dir}",
                f"data.cache_dir={run_dir / 'cache'}",
                "schedule.max_steps=4",
                "packing.max_tokens=512",
                "data.max_seq_len=256",
                "logging.progress_bar=false",
                "eval.exact_match=false",
                "eval.max_batches=2",
                *overrides,
            ],
        )
        result = loop.train(config, log=lambda *_: None)
    return run_dir / f"checkpoint-{result.steps}"


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    # lr 1e-2: PEFT starts B at 0, so a few large steps are needed for the adapter to change the outputs.
    return _train(tmp_path_factory.mktemp("lora") / "run", "lora.enabled=true", "optimizer.lr=1e-2")


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("full") / "run")


@pytest.fixture(scope="module")
def chatty_checkpoint(tmp_path_factory):
    """A full-weights checkpoint whose greedy replies are long and varied (a few training steps teach the tiny
    model to answer "" or "\\n\\n\\n...", which would make comparing two generations prove little): random
    weights scaled up so the next-token distribution is far from uniform and changes at every position."""
    path = tmp_path_factory.mktemp("chatty") / "checkpoint"
    model = tiny_model(seed=1)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def small_synthetic(monkeypatch):
    for module, name, value in SMALL_SYNTHETIC:  # eval reads the sizes at call time, as the run did
        monkeypatch.setattr(module, name, value)


def _greedy(model, tokenizer, messages, max_new_tokens):
    """What plain `model.generate` answers (no fastsft code on the path but the chat template)."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _load_plain(path):
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()


# --------------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------------


def test_merge_writes_plain_weights_with_the_adapters_outputs(lora_checkpoint, tmp_path, capsys):
    from peft import PeftModel

    out = tmp_path / "merged"
    assert main(["merge", str(lora_checkpoint), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind

    merged = _load_plain(out)  # plain transformers, no PEFT
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not [name for name in merged.state_dict() if "lora" in name]
    seed = ckpt.load_meta(lora_checkpoint)["seed"]
    with_adapter = PeftModel.from_pretrained(tiny_model(seed=seed), lora_checkpoint).eval()
    base = tiny_model(seed=seed).eval()
    ids = torch.randint(5, 101, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m(ids).logits for m in (merged, with_adapter, base))
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-5, atol=1e-5)
    # The adapter matters: had merge dropped it, the merged logits would be the base's.
    assert (adapter_logits - base_logits).abs().max() > 1e-2
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    meta = ckpt.load_meta(out)
    assert meta["lora"] is False and meta["base_model"] == "tiny" and meta["merged_from"] == str(lora_checkpoint)
    assert not inference.inspect_checkpoint(out).lora  # generate/eval take it as a full-weights checkpoint


def test_merge_refuses_a_non_empty_output_dir_unless_forced(lora_checkpoint, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(lora_checkpoint), str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["merge", str(lora_checkpoint), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_merge_of_a_full_checkpoint_says_there_is_nothing_to_merge(full_checkpoint, tmp_path, capsys):
    assert main(["merge", str(full_checkpoint), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastsft merge: ") and str(full_checkpoint) in err and "nothing to merge" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_lora_checkpoint_without_its_base_is_a_clear_error(lora_checkpoint, tmp_path, capsys):
    bare = tmp_path / "adapter"
    shutil.copytree(lora_checkpoint, bare)
    (bare / ckpt.META_FILE).unlink()
    assert main(["generate", str(bare), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert str(bare) in err and "fastsft.json" in err and "--base" in err and err.count("\n") == 1

    missing = tmp_path / "no-such-base"
    assert main(["merge", str(bare), str(tmp_path / "out"), "--base", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err

    (bare / ckpt.META_FILE).write_text(json.dumps({"base_model": str(missing), "seed": 0, "lora": True}))
    assert main(["eval", str(bare)]) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "eval", "merge"])
def test_a_path_that_is_not_a_checkpoint_exits_2_naming_it(command, full_checkpoint, tmp_path, capsys):
    for path in (tmp_path / "nowhere", full_checkpoint.parent):  # a missing path; a run dir, not a checkpoint
        argv = [command, str(path)] + ([str(tmp_path / "out")] if command == "merge" else [])
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastsft {command}: {path}: not a checkpoint directory") and err.count("\n") == 1
    assert "newest checkpoint is" in err and str(full_checkpoint) in err  # the run dir points at its checkpoint


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------


def test_generate_prints_the_greedy_reply_of_plain_transformers(chatty_checkpoint, monkeypatch, capsys):
    loaded = []
    real_load = inference.load_checkpoint
    monkeypatch.setattr(inference, "load_checkpoint", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    question = "What is 23 + 41?"
    assert main(["generate", str(chatty_checkpoint), "--prompt", question, "--max-new-tokens", "16"]) == 0
    assert hasattr(loaded[0][0], "fastsft_report")  # the CLI generated with the fastsft-patched model

    expected = _greedy(_load_plain(chatty_checkpoint), tiny_tokenizer(), [{"role": "user", "content": question}], 16)
    assert len(set(expected)) >= 5  # a long, varied reply: the comparison below is not trivially true
    assert capsys.readouterr().out == expected + "\n"


def test_generate_with_a_lora_checkpoint_and_a_system_prompt(lora_checkpoint, capsys):
    from peft import PeftModel

    prompts = ["What is 23 + 41?", "Spell backwards: tam."]
    argv = ["generate", str(lora_checkpoint), "--system", "Answer briefly.", "--max-new-tokens", "6"]
    assert main(argv + [arg for p in prompts for arg in ("--prompt", p)]) == 0
    model = PeftModel.from_pretrained(tiny_model(seed=ckpt.load_meta(lora_checkpoint)["seed"]), lora_checkpoint)
    tokenizer = tiny_tokenizer()
    system = {"role": "system", "content": "Answer briefly."}
    replies = [_greedy(model.eval(), tokenizer, [system, {"role": "user", "content": p}], 6) for p in prompts]
    assert capsys.readouterr().out == f"> {prompts[0]}\n{replies[0]}\n\n> {prompts[1]}\n{replies[1]}\n"


def test_interactive_chat_keeps_the_conversation(chatty_checkpoint, monkeypatch, capsys):
    calls = []
    real_reply = inference.generate_reply

    def spy(model, tokenizer, messages, **kwargs):
        calls.append(copy.deepcopy(messages))
        return real_reply(model, tokenizer, messages, **kwargs)

    monkeypatch.setattr(inference, "generate_reply", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 3?\nAnd 4 + 4?\n/exit\nnever read\n"))
    assert main(["generate", str(chatty_checkpoint), "--max-new-tokens", "10"]) == 0
    first, second = capsys.readouterr().out.splitlines()

    assert len(calls) == 2
    assert calls[0] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert calls[1] == [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And 4 + 4?"},
    ]
    model, tokenizer = _load_plain(chatty_checkpoint), tiny_tokenizer()
    assert first == _greedy(model, tokenizer, calls[0], 10)
    assert second == _greedy(model, tokenizer, calls[1], 10)  # answered with the first exchange as context
    assert second != _greedy(model, tokenizer, calls[1][-1:], 10)  # ... which changes the answer


def test_interactive_reset_forgets_all_but_the_system_prompt(chatty_checkpoint, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(inference, "generate_reply", lambda m, t, messages, **k: calls.append(list(messages)) or "ok")
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n/reset\nthree\n"))  # ends at end of input
    assert main(["generate", str(chatty_checkpoint), "--system", "Be brief."]) == 0
    system = {"role": "system", "content": "Be brief."}
    assert [len(c) for c in calls] == [2, 4, 2]
    assert calls[2] == [system, {"role": "user", "content": "three"}]
    assert capsys.readouterr().out == "ok\nok\n(conversation cleared)\nok\n"


# --------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------


def test_eval_reports_the_held_out_loss_of_evaluate_loss(full_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(full_checkpoint), "eval.exact_match=true", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    keys = {"checkpoint", "eval_data", "loss", "perplexity", "micro_batches", "exact_match", "exact_match_items"}
    assert keys <= set(report)

    # Independently: the run's config (the default of `fastsft eval`), the weights, loop's own eval path.
    config = load_config(full_checkpoint.parent / "config.yaml")
    tokenizer = tiny_tokenizer()
    model = tiny_model(seed=123)  # every weight comes from the checkpoint
    ckpt.load_model_weights(model, full_checkpoint)
    fastsft.patch(model)
    _, eval_data = build.datasets(config, tokenizer)
    loader = PackedLoader(eval_data, max_tokens=config.packing.max_tokens)
    expected = evaluation.evaluate_loss(model, loader, CPU, None, config.eval.max_batches)
    assert report["loss"] == pytest.approx(expected, rel=1e-6)
    run_loss = json.loads((full_checkpoint.parent / "result.json").read_text())["eval_loss"]
    assert report["loss"] == pytest.approx(run_loss, rel=1e-6)  # what the run itself reported at its end
    assert report["micro_batches"] == config.eval.max_batches
    assert f"{expected:.4f}" in printed

    items = exact_match_items(EXACT_MATCH_ITEMS, seed=config.seed + 1)
    expected_match, _ = evaluation.exact_match(model, tokenizer, items)
    assert report["exact_match"] == expected_match and report["exact_match_items"] == len(items)


def test_eval_of_a_lora_checkpoint_prints_json_to_stdout(lora_checkpoint, capsys):
    assert main(["eval", str(lora_checkpoint), "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["eval_data"] == "synthetic" and report["exact_match"] is None  # the run had exact match off
    run_loss = json.loads((lora_checkpoint.parent / "result.json").read_text())["eval_loss"]
    assert report["loss"] == pytest.approx(run_loss, rel=1e-6)  # the adapter is applied, as in training


def test_eval_config_errors_exit_2(full_checkpoint, capsys):
    assert main(["eval", str(full_checkpoint), "data.eval=null"]) == 2
    assert "data.eval" in capsys.readouterr().err
    assert main(["eval", str(full_checkpoint), "optimizer.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


@pytest.mark.parametrize("style", ["llama3", "chatml", "mistral", "gemma"])
def test_the_end_of_turn_token_training_supervised_stops_generation(style):
    """Llama 3 ends a reply with <|eot_id|>, Gemma with <end_of_turn>: not their base models' EOS. The stop
    ids include it (found from the template), so a fine-tuned model stops where it was trained to."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _chat_tokenizers import STYLES, make_tokenizer

    tokenizer = make_tokenizer(style)
    expected = tokenizer.convert_tokens_to_ids(STYLES[style].end_of_turn)
    assert inference.end_of_turn_id(tokenizer) == expected
    model = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=None))
    assert expected in inference.stop_token_ids(model, tokenizer, "any prompt")


def test_merge_refuses_an_output_dir_holding_the_checkpoint(lora_checkpoint, capsys):
    """`fastsft merge run/checkpoint-4 run --force` would replace the run directory, the checkpoint with it."""
    run = lora_checkpoint.parent
    before = sorted(p.name for p in run.iterdir())
    assert main(["merge", str(lora_checkpoint), str(run), "--force"]) == 2
    assert "must not be, contain or lie inside the checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before


def test_bad_devices_temperatures_and_json_targets_exit_2_before_any_work(full_checkpoint, tmp_path, capsys):
    assert main(["generate", str(full_checkpoint), "--prompt", "hi", "--device", "bogus"]) == 2
    assert "--device 'bogus' is not a device" in capsys.readouterr().err
    assert main(["generate", str(full_checkpoint), "--prompt", "hi", "--temperature", "nan"]) == 2
    assert "finite --temperature" in capsys.readouterr().err
    assert main(["eval", str(full_checkpoint), "--json", str(tmp_path / "missing" / "x.json")]) == 2
    assert "its directory does not exist" in capsys.readouterr().err


def test_an_adapter_on_the_wrong_base_is_one_line_exit_2(lora_checkpoint, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=101,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    capsys.readouterr()  # what saving printed
    assert main(["generate", str(lora_checkpoint), "--base", str(other), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fastsft generate:")]
    assert len(errors) == 1 and "does not fit the base model" in errors[0] and "Traceback" not in err, err
