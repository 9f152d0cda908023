"""`torchrun --nproc-per-node 2 -m fastsft train ...` on 2 CPU processes (gloo): FSDP2 and DDP give the
losses, gradients, eval loss and weights of 1 process with twice the gradient accumulation; an FSDP run
resumes exactly; ranks that disagree about the data stop with a clear error."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastsft.data import prepare_dataset
from fastsft.data.packing import pack_documents
from fastsft.train import build, evaluation, loop
from fastsft.train import checkpoint as ckpt
from fastsft.train.config import load_config
from fastsft.train.synthetic import synthetic_records
from fastsft.train.tiny import tiny_tokenizer

ENTRY = str(Path(__file__).resolve().parent / "_train_entry.py")
TRAIN_RECORDS, EVAL_RECORDS, ITEMS = 300, 40, 4
MAX_TOKENS = 700  # 30 micro-batches: an even number (see the cache fixture)


def overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={run_dir}",
        f"data.cache_dir={cache}",
        "schedule.max_steps=3",
        "schedule.warmup_steps=1",
        f"packing.max_tokens={MAX_TOKENS}",
        "data.max_seq_len=256",
        "optimizer.grad_clip=0.05",  # small enough that clipping acts: the clipped norm must be the global one
        "checkpointing.every_steps=1",
        "checkpointing.keep_last=null",
        "logging.every_steps=1",
        "logging.progress_bar=false",
        "eval.every_steps=2",
        "eval.max_batches=3",  # odd: rank 1 runs a discarded repeat; the 3 micro-batches are the same on 1 rank
        "eval.exact_match=true",
        *extra,
    ]


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", ENTRY]
    command += [str(TRAIN_RECORDS), str(EVAL_RECORDS), str(ITEMS), "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def metrics(run_dir: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    adapter = checkpoint / "adapter_model.safetensors"  # a LoRA run saves only its adapters, in PEFT's format
    return load_file(adapter if adapter.is_file() else checkpoint / "model.safetensors")


def first_moments(checkpoint: Path) -> dict[str, torch.Tensor]:
    """AdamW's exp_avg after the first step = (1 - beta1) * the first (clipped) gradient, by parameter name."""
    state = ckpt.load_trainer_state(checkpoint)["optimizer"]["state"]
    return {name: s["exp_avg"] for name, s in state.items()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tokenized data, shared by every run; its packing must have an even number of micro-batches so
    that 2 ranks x grad_accum 1 and 1 rank x grad_accum 2 group the same bins into each step."""
    path = tmp_path_factory.mktemp("cache")
    data = prepare_dataset(
        synthetic_records(TRAIN_RECORDS, seed=0, split="train"), tiny_tokenizer(), max_seq_len=256, cache_dir=path
    )
    assert len(pack_documents(data.lengths, MAX_TOKENS, seed=0, epoch=0)) % 2 == 0
    return path


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, cache):
    """1 process, grad_accum=2: the reference runs (full fine-tuning, LoRA), made when first asked for."""
    runs = {}

    def run(*extra: str) -> Path:
        if extra not in runs:
            runs[extra] = _one_process(tmp_path_factory.mktemp("one") / "run", cache, extra)
        return runs[extra]

    return run


@pytest.fixture(scope="module")
def one_process(one_process_runs):
    return one_process_runs()


def _one_process(run_dir: Path, cache: Path, extra: tuple[str, ...]) -> Path:
    saved = build.SYNTHETIC_TRAIN_RECORDS, build.SYNTHETIC_EVAL_RECORDS, evaluation.EXACT_MATCH_ITEMS
    build.SYNTHETIC_TRAIN_RECORDS, build.SYNTHETIC_EVAL_RECORDS, evaluation.EXACT_MATCH_ITEMS = (
        TRAIN_RECORDS,
        EVAL_RECORDS,
        ITEMS,
    )
    try:
        config = load_config(None, overrides(run_dir, cache, "distributed.grad_accum=2", *extra))
        loop.train(config, log=lambda *_: None)
    finally:
        build.SYNTHETIC_TRAIN_RECORDS, build.SYNTHETIC_EVAL_RECORDS, evaluation.EXACT_MATCH_ITEMS = saved
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same losses, eval loss, first gradient (AdamW's first moment), final weights, exact match."""
    losses, expected = metrics(run_dir, "loss"), metrics(reference, "loss")
    assert sorted(losses) == [1, 2, 3]
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=1e-5), step
    assert metrics(run_dir, "eval_loss") == pytest.approx(metrics(reference, "eval_loss"), rel=1e-5)
    moments, expected_moments = first_moments(run_dir / "checkpoint-1"), first_moments(reference / "checkpoint-1")
    assert moments.keys() == expected_moments.keys()
    for name in expected_moments:
        torch.testing.assert_close(moments[name], expected_moments[name], rtol=1e-4, atol=1e-8, msg=name)
    final, expected_final = weights(run_dir / "checkpoint-3"), weights(reference / "checkpoint-3")
    assert final.keys() == expected_final.keys()
    for name in expected_final:
        torch.testing.assert_close(final[name], expected_final[name], rtol=1e-4, atol=1e-6, msg=name)
    for step in (1, 3):  # token counters are global (every rank's), not rank 0's
        counts = [json.loads((d / f"checkpoint-{step}" / ckpt.STATE_JSON).read_text()) for d in (run_dir, reference)]
        assert counts[0]["tokens"] == counts[1]["tokens"] > 0
        assert counts[0]["supervised_tokens"] == counts[1]["supervised_tokens"] > 0
    result, expected_result = (json.loads((d / "result.json").read_text()) for d in (run_dir, reference))
    assert result["exact_match_after"] == expected_result["exact_match_after"]
    assert len(result["samples"]) == len(expected_result["samples"]) > 0


@pytest.mark.parametrize("strategy, lora", [("fsdp", False), ("ddp", False), ("fsdp", True)])
def test_two_processes_equal_one_process_with_twice_the_accumulation(tmp_path, cache, one_process_runs, strategy, lora):
    """LoRA under FSDP: frozen base weights and trainable adapters in the same sharded units; the adapters
    are gathered and saved in PEFT's format."""
    extra = ("lora.enabled=true",) if lora else ()
    run_dir = tmp_path / "run"
    done = torchrun(2, overrides(run_dir, cache, f"distributed.strategy={strategy}", *extra))
    assert f"on 2 ranks ({strategy})" in done.stdout
    assert done.stdout.count("held-out exact match:") == 1  # rank 0 alone reports
    assert_same_run(run_dir, one_process_runs(*extra))
    # The checkpoint is the same files whatever the strategy (HF weights, or PEFT's adapter files).
    files = {p.name for p in (run_dir / "checkpoint-3").iterdir()}
    assert files == {p.name for p in (one_process_runs(*extra) / "checkpoint-3").iterdir()}
    assert ("adapter_config.json" in files) == lora and ("config.json" in files) != lora


def test_an_fsdp_run_resumes_exactly(tmp_path, cache, one_process):
    """Stop after checkpoint-2 (its later files removed), resume under FSDP: step 3 equals the uninterrupted
    run's, so weights, AdamW state (saved by parameter name) and the data position were all restored."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_process, run_dir)  # a 1-process checkpoint resumes on 2 ranks: the layout is portable
    shutil.rmtree(run_dir / "checkpoint-3")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(line for line in lines if json.loads(line)["step"] <= 2) + "\n")
    done = torchrun(2, overrides(run_dir, cache, "distributed.strategy=fsdp"))
    assert "resumed from" in done.stdout and "at step 2" in done.stdout
    assert_same_run(run_dir, one_process)


def test_ranks_with_different_data_stop_with_a_clear_error(tmp_path, cache):
    """Rank 1 reads other records than rank 0 (as with unshared, different copies of a data file)."""
    data = [tmp_path / "rank0.jsonl", tmp_path / "rank1.jsonl"]
    for seed, path in enumerate(data):
        records = synthetic_records(40, seed=seed, split="train")
        path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))
    script = tmp_path / "entry.py"  # each rank points data.train at its own file
    script.write_text(
        "import os, sys\n"
        f"sys.argv[sys.argv.index('data.train=RANK')] = 'data.train=' + {str(tmp_path)!r} + "
        "'/rank' + os.environ['RANK'] + '.jsonl'\n"
        f"sys.path.insert(0, {str(Path(ENTRY).parent)!r})\n"
        f"exec(open({ENTRY!r}).read())\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    command += [str(TRAIN_RECORDS), str(EVAL_RECORDS), str(ITEMS), "train", "data.train=RANK", "data.eval=null"]
    command += [
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'c'}",
        "schedule.max_steps=1",
        "logging.progress_bar=false",
        "eval.exact_match=false",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode != 0
    assert "the ranks disagree about the tokenized training data" in done.stderr
    assert not (tmp_path / "run" / "checkpoint-1").exists()


@pytest.mark.parametrize("lora", [False, True])
def test_the_weightless_copy_fsdp_shards_matches_the_real_model(tmp_path, lora):
    """What ranks other than 0 build under FSDP: the same parameters, buffers and patches as rank 0's real model
    (a local HF directory here), on the meta device: nothing read, nothing allocated."""
    from fastsft.train.tiny import tiny_model

    model_dir = tmp_path / "model"
    tiny_model(seed=3).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    config = load_config(None, [f"model.name_or_path={model_dir}", f"lora.enabled={str(lora).lower()}"])
    real, _ = build.build_model(config)
    skeleton, tokenizer = build.build_model(config, device="meta")
    shapes = {name: p.shape for name, p in real.named_parameters()}
    assert {name: p.shape for name, p in skeleton.named_parameters()} == shapes
    assert {name for name, _ in skeleton.named_buffers()} == {name for name, _ in real.named_buffers()}
    assert all(p.is_meta for p in skeleton.parameters()) and not any(p.is_meta for p in real.parameters())
    assert str(skeleton.fastsft_report) == str(real.fastsft_report)
    assert [n for n, p in skeleton.named_parameters() if p.requires_grad] == [
        n for n, p in real.named_parameters() if p.requires_grad
    ]
    assert tokenizer.vocab_size == tiny_tokenizer().vocab_size


def test_fsdp_in_bf16_tracks_one_process(tmp_path, cache, one_process_runs):
    """model.dtype=bf16 under FSDP: parameters all-gathered in bf16 (MixedPrecisionPolicy), gradients reduced
    in fp32, fp32 master shards; the losses track 1 process's bf16 autocast run."""
    run_dir = tmp_path / "run"
    torchrun(2, overrides(run_dir, cache, "distributed.strategy=fsdp", "model.dtype=bf16"))
    reference = one_process_runs("model.dtype=bf16")
    losses, expected = metrics(run_dir, "loss"), metrics(reference, "loss")
    assert sorted(losses) == sorted(expected) == [1, 2, 3]
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=2e-2), step
    final = weights(run_dir / "checkpoint-3")
    assert all(t.dtype == torch.float32 for t in final.values())  # the master weights are saved


PREFERENCE_MAX_TOKENS = 710  # the 300 synthetic pairs pack into 60 micro-batches: even (see the cache fixture)


@pytest.fixture(scope="module")
def preference_cache(tmp_path_factory):
    from fastsft.data import prepare_preference_dataset
    from fastsft.train.synthetic import synthetic_preference_records

    path = tmp_path_factory.mktemp("preference-cache")
    records = synthetic_preference_records(TRAIN_RECORDS, seed=0, split="train")
    data = prepare_preference_dataset(records, tiny_tokenizer(), max_seq_len=256, cache_dir=path)
    pair_lengths = data.lengths.reshape(-1, 2).sum(axis=1)
    assert len(pack_documents(pair_lengths, PREFERENCE_MAX_TOKENS, seed=0, epoch=0)) % 2 == 0
    return path


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_dpo_on_two_processes_equals_one_process_with_twice_the_accumulation(tmp_path, preference_cache, strategy):
    """DPO: pairs stay whole on one rank, the step's pair count is global, and every rank runs the reference
    pass (FSDP needs them all): losses, eval loss, first gradients and final weights of 1 process."""
    extra = ("objective=dpo", f"packing.max_tokens={PREFERENCE_MAX_TOKENS}")
    reference = _one_process(tmp_path / "one" / "run", preference_cache, extra)
    for cached in preference_cache.glob("*/reference-*.npy"):  # the 2 ranks compute the reference pass themselves
        cached.unlink()
    run_dir = tmp_path / "run"
    torchrun(2, overrides(run_dir, preference_cache, f"distributed.strategy={strategy}", *extra))
    for name in ("train", "eval"):
        file = f"reference_logprobs_{name}.npy"
        np.testing.assert_allclose(np.load(run_dir / file), np.load(reference / file), rtol=1e-6)
    assert_same_run(run_dir, reference)
    assert metrics(run_dir, "reward_accuracy") == pytest.approx(metrics(reference, "reward_accuracy"), abs=1e-6)
