"""benchmarks/gpu_proof.py: the one prepared GPU command, checked on the CPU.

`--dry-run` runs every part in its CPU mode (kernels through the Triton interpreter, tiny models) and must
leave the bundle a lent GPU machine can return: at most 8 files, a summary naming every part, and a tarball
holding each benchmark's result files. The budget logic (shares, carry-over, stopping a part that runs out
of time and keeping its output) is checked directly on small commands.
"""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_proof  # noqa: E402

PART_NAMES = [part.name for part in gpu_proof.PARTS]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("proof") / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_proof.py"), "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return done, out


def test_dry_run_leaves_the_bundle_a_gpu_machine_can_return(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["SUMMARY.md", "proof.log", "results.tar.gz", "summary.json"]
    assert len(files) <= gpu_proof.MAX_BUNDLE_FILES and all((out / f).is_file() for f in files)


def test_every_part_ran_in_order_and_ok(dry_run):
    _, out = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["metadata"]["git_revision"]
    assert [p["name"] for p in summary["parts"]] == PART_NAMES
    assert {p["name"]: p["status"] for p in summary["parts"]} == dict.fromkeys(PART_NAMES, "ok")
    for part in summary["parts"]:
        assert 0 < part["seconds"] <= part["time_limit_s"] + gpu_proof.KILL_GRACE_S, part
    tests = next(p["tests"] for p in summary["parts"] if p["name"] == "gpu_tests")
    assert tests["tests"] >= 1 and tests["failures"] == tests["errors"] == 0  # on CPU the gpu tests skip


def test_the_tarball_holds_each_benchmarks_result_files(dry_run):
    _, out = dry_run
    summary = json.loads((out / "summary.json").read_text())
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
        index = json.load(tar.extractfile("triton_cache_index.json"))
    assert "gpu_tests_junit.xml" in names and "entries" in index
    for stem in ("cross_entropy", "elementwise", "attention", "sft"):
        produced = [n for n in names if n.startswith(f"{stem}_") and n.endswith(".json")]
        assert produced, (stem, sorted(names))
        assert any(n.startswith(f"{stem}_") and n.endswith(".png") for n in names), stem
    for part in summary["parts"]:
        assert set(part["files"]) <= names, part  # every file a part reported travels in the tarball


def test_summary_markdown_names_every_part_and_carries_the_tables(dry_run):
    _, out = dry_run
    text = (out / "SUMMARY.md").read_text()
    assert text.startswith("# GPU proof: cpu (dry run, CPU)")
    for name in PART_NAMES:
        assert f"| {name} | ok |" in text, name
    assert text.count("<!-- ") >= 4  # the markdown table of each benchmark follows
    log = (out / "proof.log").read_text()
    assert all(f"{name}: ok in" in log for name in PART_NAMES)


def test_a_part_past_its_time_is_stopped_and_its_output_kept(tmp_path):
    log = gpu_proof.Log(tmp_path / "log")
    part = gpu_proof.Part("slow", 0.1, "sleeps")
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"]
    status, seconds = gpu_proof.run_part(part, command, {}, 3.0, log)
    assert status == "out of time" and seconds < 60
    text = (tmp_path / "log").read_text()
    assert "started" in text and "slow: out of time" in text


def test_a_failing_part_is_recorded_with_its_exit_code(tmp_path):
    log = gpu_proof.Log(tmp_path / "log")
    command = [sys.executable, "-c", "raise SystemExit(3)"]
    status, _ = gpu_proof.run_part(gpu_proof.Part("bad", 0.1, "fails"), command, {}, 60.0, log)
    assert status == "failed (exit 3)"


def test_time_left_unused_passes_to_the_next_part():
    parts = list(gpu_proof.PARTS)
    usable = 480.0 - gpu_proof.BUNDLE_RESERVE_S
    first = gpu_proof.time_limit(480.0, 0.0, parts, 0)
    assert first == pytest.approx(usable * parts[0].share)
    # The first part took 10 s of its share: the second gets its own share and the rest of the first's.
    second = gpu_proof.time_limit(480.0, 10.0, parts, 1)
    assert second == pytest.approx(usable * (parts[0].share + parts[1].share) - 10.0)
    # The last part (no share of its own) gets everything that is left, and nothing once it is spent.
    assert gpu_proof.time_limit(480.0, 100.0, parts, len(parts) - 1) == pytest.approx(usable - 100.0)
    assert gpu_proof.time_limit(480.0, 500.0, parts, len(parts) - 1) == 0.0


def test_no_time_left_skips_a_part_but_still_bundles(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_proof.py"),
            "--dry-run",
            "--out",
            str(out),
            "--budget-s",
            "16",
            "--parts",
            "bench_elementwise",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [p["status"] for p in summary["parts"]] == ["skipped: no time left"]
    assert sorted(p.name for p in out.iterdir()) == ["SUMMARY.md", "proof.log", "results.tar.gz", "summary.json"]


def test_a_kernel_benchmark_stopped_by_sigterm_writes_what_it_measured(tmp_path):
    """What gpu_proof's time limit sends: the benchmark stops after the config in progress is dropped, and
    writes its files with the configs it did not reach named (bench_sft does the same, see its smoke test)."""
    import os
    import signal

    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTSFT_BACKEND": "triton"}
    command = [sys.executable, str(REPO / "benchmarks" / "bench_cross_entropy.py"), "--smoke", "--out", str(tmp_path)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    measured = 0
    for line in process.stdout:
        measured += " ms" in line  # one line per measured cell
        if measured == 9:  # a few cells past the first config (7 implementations each)
            process.send_signal(signal.SIGTERM)
            break
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM: out of time after" in output
    (result,) = tmp_path.glob("cross_entropy_*.json")
    payload = json.loads(result.read_text())
    assert 1 <= len(payload["configs_not_run"]) < 6, payload["configs_not_run"]
    measured_configs = {json.dumps(e["config"], sort_keys=True) for e in payload["results"]}
    assert len(measured_configs) == 6 - len(payload["configs_not_run"])
    assert len(payload["results"]) == 7 * len(measured_configs)  # every reported config is whole
