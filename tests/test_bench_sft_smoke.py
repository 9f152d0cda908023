"""The end-to-end SFT benchmark still runs end to end and means what it says: `--dry-run` on the CPU, with
fastsft's Triton kernels in the interpreter.

Benchmarks are not tests (ARCHITECTURE.md), but this one also carries a correctness claim, the loss-curve parity
of fastsft against the unpatched Hugging Face model; in the dry run (fp32) that parity is tight, so a kernel or
a patch that changes the loss or its gradients fails here. The rows must also train the same objective on the
same examples: their first losses agree, and so do their token counts.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_sft.py"
SHAPES = ("llama-3.2-1b", "qwen3-0.6b")
ROWS = ("hf_padded", "hf_packed", "hf_packed_liger", "fastsft", "fastsft_torch", "fastsft_flash_attn")
RAN_ON_CPU = ("hf_padded", "hf_packed", "fastsft")  # the others need CUDA or a package, in a dry run always
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
    assert len(files["json"]) == 1 and len(files["md"]) == 1 and len(files["png"]) == 2, files
    return files


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sft_dry_run")
    done = _run(out_dir, "--dry-run")
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    files = _files(out_dir)
    return out_dir, files, json.loads(files["json"][0].read_text()), done.stdout


def test_result_files(dry_run):
    out_dir, files, payload, stdout = dry_run
    for png in files["png"]:
        assert png.read_bytes()[:8] == PNG_MAGIC, png
    assert sorted(p.name for f in files.values() for p in f) == sorted(payload["files"].values())
    assert payload["parity"]["plot"] == payload["files"]["parity_png"]

    meta = payload["metadata"]
    for key in (
        "gpu",
        "cuda",
        "torch",
        "triton",
        "transformers",
        "fastsft",
        "python",
        "git_revision",
        "date",
        "command",
    ):
        assert key in meta, key
    assert meta["gpu"] == "cpu" and meta["torch"] and meta["git_revision"] and "--dry-run" in meta["command"]

    s = payload["settings"]
    assert s["dry_run"] is True and s["device"] == "cpu" and s["compute_dtype"] == "float32"
    assert tuple(s["shapes"]) == SHAPES and tuple(s["rows"]) == ROWS
    assert 0.4 <= s["data"]["prompt_share"][0] <= s["data"]["prompt_share"][1] <= 0.6
    assert set(payload["shapes"]) == set(SHAPES) and set(payload["derived"]) == set(SHAPES)
    assert all(d["first_loss_rel_spread"] < 1e-5 for d in payload["derived"].values())

    report = files["md"][0].read_text()
    assert meta["command"] in report and "Loss-curve parity" in report
    assert all(f"| {row} |" in report for row in ROWS)
    assert "parity: ok" in stdout  # progress lines are printed as the run goes


def test_one_entry_per_row_with_a_status(dry_run):
    _, _, payload, _ = dry_run
    cells = sorted((e["shape"], e["row"]) for e in payload["results"])
    assert cells == sorted((shape, row) for shape in SHAPES for row in ROWS)
    for entry in payload["results"]:
        if entry["row"] in RAN_ON_CPU:
            assert entry["status"] == "ok", entry
        else:  # never faked: on the CPU these cannot run, and the entry says why
            assert entry["status"].startswith("skipped: "), entry
            assert entry["tokens_per_s"] is None
    torch_rows = [e for e in payload["results"] if e["row"] == "fastsft_torch"]
    assert all("CUDA" in e["status"] for e in torch_rows)


def test_rows_that_ran_measured_the_same_work(dry_run):
    _, _, payload, _ = dry_run
    for shape in SHAPES:
        by_row = {e["row"]: e for e in payload["results"] if e["shape"] == shape}
        ran = [by_row[row] for row in RAN_ON_CPU]
        for e in ran:
            assert e["warmup_steps"] >= 1 and _finite_positive(e["warmup_s"]), e
            assert e["timed_steps"] >= 1 and len(e["step_times_s"]) == e["timed_steps"], e
            for key in ("tokens_per_s", "supervised_tokens_per_s", "step_time_s", "tflops_per_s"):
                assert _finite_positive(e[key]), (key, e)
            assert e["supervised_tokens"] < e["tokens"] <= e["input_tokens"]
            assert e["mfu"] is None and e["peak_gib"] is None  # no GPU: nothing invented
            assert len(e["losses"]) == e["warmup_steps"] + e["timed_steps"]
        # Same steps, same examples, same supervised targets, whatever the layout.
        assert len({(e["tokens"], e["supervised_tokens"]) for e in ran}) == 1
        assert by_row["hf_packed"]["input_tokens"] == by_row["hf_packed"]["tokens"]  # packing pads nothing
        # Same initial weights and data: the first step's loss agrees to fp32 precision in every row.
        first = [e["losses"][0] for e in ran]
        assert max(first) - min(first) <= 1e-5 * abs(first[0]), first
        # Ratios are this row over the baseline row; a missing baseline gives None.
        assert by_row["hf_padded"]["vs_hf_padded"]["tokens_per_s"] == pytest.approx(1.0)
        fast = by_row["fastsft"]
        assert fast["vs_hf_padded"]["tokens_per_s"] == pytest.approx(
            fast["tokens_per_s"] / by_row["hf_padded"]["tokens_per_s"]
        )
        assert fast["vs_hf_packed_liger"] is None


def test_fastsft_ran_patched_through_its_kernels(dry_run):
    _, _, payload, _ = dry_run
    for entry in payload["results"]:
        if entry["row"] != "fastsft":
            continue
        patch = entry["patch"]
        assert patch["attention_implementation"] == "fastsft", patch
        for op in ("rms_norm", "swiglu", "rope", "attention"):
            assert patch["patched"].get(op, 0) >= 2, patch  # every one of the 2 layers
        assert patch["patched"].get("cross_entropy") == 1, patch
        assert entry["fastsft_backend"] == "triton"  # the real kernels, in Triton's interpreter


def test_loss_parity_with_unpatched_hf(dry_run):
    _, _, payload, _ = dry_run
    parity = payload["parity"]
    assert parity["status"] == "ok" and parity["shape"] == "qwen3-0.6b", parity
    assert parity["steps"] == parity["steps_requested"] == 3
    hf, fast = parity["losses_hf"], parity["losses_fastsft"]
    assert len(hf) == len(fast) == len(parity["rel_diff"]) == 3
    assert all(math.isfinite(x) for x in hf + fast)
    assert hf[-1] < hf[0] - 0.05  # the optimizer moved the weights: later steps compare the gradients too
    worst = parity["max_rel_diff"]
    assert worst is not None and math.isfinite(worst)
    assert worst == pytest.approx(max(abs(f - h) / abs(h) for h, f in zip(hf, fast, strict=True)))
    assert worst < 1e-4, parity  # fp32: fastsft computes the same losses and gradients as HF
    assert "attention x2 (fastsft)" in parity["patch"]


def test_out_of_budget_is_recorded_not_raised(tmp_path):
    """A zero budget measures nothing but still writes every file, each unmeasured item "out of time"."""
    done = _run(
        tmp_path,
        "--dry-run",
        "--budget-s",
        "0",
        "--shapes",
        "qwen3-0.6b",
        "--rows",
        "hf_padded,fastsft",
        "--parity-steps",
        "2",
        interpret=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    payload = json.loads(_files(tmp_path)["json"][0].read_text())
    assert [(e["row"], e["status"]) for e in payload["results"]] == [
        ("hf_padded", "out of time"),
        ("fastsft", "out of time"),
    ]
    assert payload["parity"]["status"] == "out of time" and payload["parity"]["steps"] == 0


def test_sigterm_writes_what_was_measured(tmp_path):
    """benchmarks/gpu_proof.py stops a part past its time limit with SIGTERM (SIGKILL 10 s later): the rows
    measured so far are kept, the rest is "out of time", and the files are still written."""
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
        if "llama-3.2-1b fastsft: start" in line:
            process.send_signal(signal.SIGTERM)  # during fastsft's first (interpreted, seconds-long) step
    assert process.wait(timeout=120) == 0, "".join(output)[-4000:]
    assert any("SIGTERM" in line for line in output)
    payload = json.loads(_files(tmp_path)["json"][0].read_text())
    status = {(e["shape"], e["row"]): e["status"] for e in payload["results"]}
    assert len(status) == len(SHAPES) * len(ROWS)
    assert status[("llama-3.2-1b", "hf_padded")] == status[("llama-3.2-1b", "hf_packed")] == "ok"
    for shape in SHAPES:
        assert status[(shape, "fastsft")] == "out of time"
        assert status[(shape, "fastsft_torch")].startswith("skipped: ")  # could not have run here anyway
    assert status[("qwen3-0.6b", "hf_padded")] == "out of time"
    assert payload["parity"]["status"] == "out of time" and payload["parity"]["steps"] == 0


def test_needs_cuda_without_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the refusal is about machines without a GPU")
    done = _run(tmp_path, "--rows", "fastsft", interpret=False)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr
    assert not any(tmp_path.iterdir())
