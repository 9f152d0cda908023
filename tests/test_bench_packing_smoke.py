"""The packing benchmark script still runs end to end, at a small N, writing its results to a tmp folder."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_packing.py"


def test_packing_bench_smoke(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--n", "3000", "--max-tokens", "8192", "--repeats", "2", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"

    (json_path,) = tmp_path.glob("packing_*.json")
    (md_path,) = tmp_path.glob("packing_*.md")
    assert json_path.stem == md_path.stem
    payload = json.loads(json_path.read_text())
    meta, settings = payload["metadata"], payload["settings"]
    for key in ("cpu", "python", "numpy", "git_revision", "date", "command", "native"):
        assert meta[key], key
    assert json_path.stem.startswith("packing_") and json_path.stem.endswith(meta["date"])
    assert settings["num_docs"] == 3000 and settings["max_tokens"] == 8192

    by_impl = {entry["impl"]: entry for entry in payload["results"]}
    native, python = by_impl["pack_documents(backend='native')"], by_impl["pack_documents(backend='python')"]
    assert native["status"] == python["status"] == "ok"  # CI builds the native extension
    assert native["identical_to_other_backend"] and python["identical_to_other_backend"]
    for entry in payload["results"]:
        assert len(entry["times_s"]) == 2 and entry["median_s"] > 0
        assert entry["bins"] >= settings["lower_bound_bins"] == math.ceil(settings["total_tokens"] / 8192)
        assert entry["efficiency"] == settings["total_tokens"] / (entry["bins"] * 8192)

    markdown = md_path.read_text()
    assert "| pack_documents(backend='native') | ok |" in markdown
    assert "bit-identical: True" in markdown
