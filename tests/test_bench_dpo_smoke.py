"""The DPO training-step benchmark still runs end to end and means what it says: `--dry-run` on the CPU, with
fastsft's Triton kernels in the interpreter.

Benchmarks are not tests (ARCHITECTURE.md), but this one carries a correctness claim: fastsft's DPO loss, sequence
log-probs and gradients on a set of pairs equal those of the padded TRL-style baseline (fp32 in the dry run). The
check must be able to fail: a baseline with a wrong loss or a wrong log-prob is flagged. The rows must also train
the same objective on the same pairs: their token and pair counts agree, and so do their first losses.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_dpo.py"
SHAPES = ("llama-3.2-1b", "qwen3-0.6b")
ROWS = ("trl_padded", "fastsft_packed", "trl_padded_liger", "trl_fused_head")
LABELS = {
    "trl_padded": "trl padded",
    "fastsft_packed": "fastsft packed",
    "trl_padded_liger": "trl padded + liger",
    "trl_fused_head": "trl padded, fused head",
}
RAN_ON_CPU = ("trl_padded", "fastsft_packed", "trl_fused_head")  # Liger's kernels need CUDA (and the package)
MEASURED = ("tokens_per_s", "supervised_tokens_per_s", "pairs_per_s", "step_time_s", "tflops_per_s")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(out_dir: Path, *args: str, interpret: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if interpret:
        env.update(TRITON_INTERPRET="1", FASTSFT_BACKEND="triton")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _files(out_dir: Path) -> dict[str, list[Path]]:
    files = {ext: sorted(out_dir.glob(f"*.{ext}")) for ext in ("json", "md", "png")}
    assert all(len(found) == 1 for found in files.values()), files
    return files


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dpo_dry_run")
    done = _run(out_dir, "--dry-run")
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    files = _files(out_dir)
    return files, json.loads(files["json"][0].read_text()), done.stdout


def test_result_files(dry_run):
    files, payload, stdout = dry_run
    assert files["png"][0].read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for f in files.values() for p in f) == sorted(payload["files"].values())
    meta = payload["metadata"]
    for key in ("gpu", "cuda", "torch", "triton", "transformers", "trl", "fastsft", "python", "git_revision", "date"):
        assert key in meta, key
    assert meta["gpu"] == "cpu" and meta["git_revision"] and "--dry-run" in meta["command"]
    s = payload["settings"]
    assert s["dry_run"] is True and s["device"] == "cpu" and s["compute_dtype"] == "float32"
    assert tuple(s["shapes"]) == SHAPES and tuple(s["rows"]) == ROWS
    assert 0.4 <= s["data"]["prompt_share"][0] <= s["data"]["prompt_share"][1] <= 0.6
    assert s["data"]["padded_pairs"] >= 1 and s["beta"] > 0
    report = files["md"][0].read_text()
    assert meta["command"] in report and "Parity" in report and "no speed data" in report
    assert all(f"| {label} |" in report for label in LABELS.values())
    assert "parity: ok" in stdout  # progress lines are printed as the run goes


def test_one_entry_per_row_with_a_status(dry_run):
    _, payload, _ = dry_run
    cells = sorted((e["shape"], e["row"]) for e in payload["results"])
    assert cells == sorted((shape, row) for shape in SHAPES for row in ROWS)
    for entry in payload["results"]:
        assert entry["label"] == LABELS[entry["row"]]
        if entry["row"] in RAN_ON_CPU:
            assert entry["status"] == "ok", entry
        else:  # never faked: on the CPU Liger cannot run, and the entry says why
            assert entry["status"].startswith("skipped: "), entry
            assert entry["tokens_per_s"] is None and entry["pairs_per_s"] is None


def test_rows_measured_the_same_work(dry_run):
    _, payload, _ = dry_run
    for shape in SHAPES:
        by_row = {e["row"]: e for e in payload["results"] if e["shape"] == shape}
        ran = [by_row[row] for row in RAN_ON_CPU]
        for e in ran:
            assert e["warmup_steps"] >= 1 and _finite_positive(e["warmup_s"]), e
            assert e["timed_steps"] >= 1 and len(e["step_times_s"]) == e["timed_steps"], e
            for key in MEASURED:
                assert _finite_positive(e[key]), (key, e)
            assert e["pairs_per_s"] == pytest.approx(e["pairs"] / sum(e["step_times_s"]))
            assert "peak_gib" in e and e["peak_gib"] is None and e["mfu"] is None  # no GPU: nothing invented
            assert e["supervised_tokens"] < e["tokens"] <= e["input_tokens"]
            assert len(e["losses"]) == e["warmup_steps"] + e["timed_steps"]
        # Same steps, same pairs, same completions, whatever the layout.
        assert len({(e["tokens"], e["supervised_tokens"], e["pairs"]) for e in ran}) == 1
        assert by_row["fastsft_packed"]["input_tokens"] == by_row["fastsft_packed"]["tokens"]  # nothing padded
        assert by_row["trl_padded"]["padding_share"] > 0
        # Same weights, pairs and reference: the first step's DPO loss agrees to fp32 precision in every row.
        first = [e["losses"][0] for e in ran]
        assert max(first) - min(first) <= 1e-5 * abs(first[0]), first
        assert abs(first[0] - math.log(2)) > 1e-3  # the reference is not the policy: the loss is not just ln 2
        assert payload["derived"][shape]["first_loss_rel_spread"] <= 1e-5
        # Ratios are each row over trl padded.
        assert by_row["trl_padded"]["vs_trl_padded"]["tokens_per_s"] == pytest.approx(1.0)
        fast = by_row["fastsft_packed"]
        for key in ("tokens_per_s", "pairs_per_s"):
            assert fast["vs_trl_padded"][key] == pytest.approx(fast[key] / by_row["trl_padded"][key])
        assert by_row["trl_padded_liger"]["vs_trl_padded"] is None


def test_fastsft_ran_patched_through_its_kernels(dry_run):
    _, payload, _ = dry_run
    for entry in payload["results"]:
        if entry["row"] == "fastsft_packed":
            assert entry["patch"]["attention_implementation"] == "fastsft", entry["patch"]
            assert entry["patch"]["patched"].get("cross_entropy") == 1
            assert entry["fastsft_backend"] == "triton"  # the real kernels, in Triton's interpreter


def test_parity_with_the_padded_baseline(dry_run):
    _, payload, _ = dry_run
    parity = payload["parity"]
    assert parity["status"] == "ok" and parity["passed"] is True, parity
    assert parity["shape"] == SHAPES[0] and parity["pairs"] >= 2 and parity["precision"].startswith("float32")
    lp, lf = parity["loss_trl_padded"], parity["loss_fastsft"]
    assert math.isfinite(lp) and abs(lp - math.log(2)) > 1e-3
    assert parity["loss_rel_diff"] == pytest.approx(abs(lf - lp) / abs(lp))
    tol = parity["tolerance"]
    assert parity["loss_rel_diff"] <= tol["loss"] and parity["logps_max_rel_diff"] <= tol["logps"]
    assert parity["grad_rel_diff"] <= tol["grads"] and parity["grad_tensors"] > 0
    assert tol["loss"] <= 1e-4  # fp32: fastsft computes the same loss as the padded baseline, tightly


# --------------------------------------------------------------------------------------------------
# The parity check can fail: in-process, on the tiny model (fastsft's PyTorch reference ops)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_dpo
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return bench_dpo


def _parity(bench):
    ctx = bench.make_context(argparse.Namespace(dry_run=True))
    record = bench.parity_record("qwen3-0.6b")
    bench.parity_check(record, ctx)
    return record


def test_parity_check_passes_in_process(bench):
    record = _parity(bench)
    assert record["status"] == "ok" and record["passed"] is True, record


def test_parity_check_flags_a_wrong_loss(bench, monkeypatch):
    right = bench.dpo_sigmoid_losses
    monkeypatch.setattr(bench, "dpo_sigmoid_losses", lambda *args: right(*args) * 1.001)
    record = _parity(bench)
    assert record["passed"] is False and record["status"].startswith("failed: "), record
    assert "loss" in record["status"] and record["loss_rel_diff"] > record["tolerance"]["loss"]


def test_parity_check_flags_a_wrong_log_prob(bench, monkeypatch):
    """A baseline that drops each sequence's first completion token (an off-by-one in the mask)."""
    right = bench.trl_logits_logps

    def off_by_one(model, batch):
        mask = batch["completion_mask"]
        first = mask.cumsum(dim=1) == 1
        return right(model, {**batch, "completion_mask": mask.masked_fill(first & (mask == 1), 0)})

    monkeypatch.setattr(bench, "trl_logits_logps", off_by_one)
    record = _parity(bench)
    assert record["passed"] is False, record
    assert "logps" in record["status"] and "grads" in record["status"], record["status"]


# --------------------------------------------------------------------------------------------------
# Budget and SIGTERM
# --------------------------------------------------------------------------------------------------


def test_out_of_budget_is_recorded_not_raised(tmp_path):
    """A zero budget measures nothing but still writes every file, each unmeasured item "out of time"."""
    args = ("--dry-run", "--budget-s", "0", "--shapes", "qwen3-0.6b", "--rows", "trl_padded,fastsft_packed")
    done = _run(tmp_path, *args, interpret=False)
    assert done.returncode == 0, done.stderr[-4000:]
    payload = json.loads(_files(tmp_path)["json"][0].read_text())
    assert [(e["row"], e["status"]) for e in payload["results"]] == [
        ("trl_padded", "out of time"),
        ("fastsft_packed", "out of time"),
    ]
    assert payload["parity"]["status"] == "out of time" and payload["parity"]["passed"] is None


def test_sigterm_writes_what_was_measured(tmp_path):
    """benchmarks/gpu_proof.py stops a part past its time limit with SIGTERM (SIGKILL 10 s later): the rows
    measured so far are kept, the rest (the parity check included) is "out of time", and the files are written."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTSFT_BACKEND": "triton"}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in process.stdout:  # progress lines are flushed as they happen
        output.append(line)
        if "llama-3.2-1b fastsft_packed: start" in line:
            process.send_signal(signal.SIGTERM)  # during fastsft's first (interpreted, seconds-long) step
    assert process.wait(timeout=120) == 0, "".join(output)[-4000:]
    assert any("SIGTERM" in line for line in output)
    payload = json.loads(_files(tmp_path)["json"][0].read_text())
    status = {(e["shape"], e["row"]): e["status"] for e in payload["results"]}
    assert len(status) == len(SHAPES) * len(ROWS)
    assert status[("llama-3.2-1b", "trl_padded")] == "ok"
    assert status[("llama-3.2-1b", "fastsft_packed")] == "out of time"
    for shape in SHAPES:
        assert status[(shape, "trl_padded_liger")].startswith("skipped: ")  # could not have run here anyway
        assert status[(shape, "trl_fused_head")] == "out of time"
    assert status[("qwen3-0.6b", "trl_padded")] == "out of time"
    assert payload["parity"]["status"] == "out of time" and payload["parity"]["passed"] is None


def test_needs_cuda_without_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the refusal is about machines without a GPU")
    done = _run(tmp_path, "--rows", "fastsft_packed", interpret=False)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr
    assert not any(tmp_path.iterdir())
