"""Every Triton kernel compiles for Ampere and Hopper with its real GPU block sizes (no GPU needed)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GEMM_KERNELS = ("_logits_kernel", "_grad_hidden_kernel", "_grad_weight_kernel")
ATTENTION_KERNELS = ("_attention_forward_kernel", "_attention_grad_kv_kernel", "_attention_grad_q_kernel")
EXPECTED_KERNELS = (
    GEMM_KERNELS
    + (
        "_cross_entropy_rows_kernel",
        "_rope_kernel",
        "_rms_norm_forward_kernel",
        "_rms_norm_backward_kernel",
        "_gated_forward_kernel",
        "_gated_backward_kernel",
        "_attention_delta_kernel",
    )
    + ATTENTION_KERNELS
)


@pytest.fixture(scope="module")
def compile_records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("_compile_kernels.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records, f"no compile results; stderr:\n{proc.stderr[-4000:]}"
    return records


def test_every_kernel_compiles_for_sm80_and_sm90(compile_records):
    failed = [r for r in compile_records if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} sm_{r['arch']} {r['dtype']}: {r['error']}" for r in failed)
    kernels = {r["kernel"] for r in compile_records}
    assert kernels == set(EXPECTED_KERNELS) and {r["arch"] for r in compile_records} == {80, 90}


def test_gemm_kernels_use_tensor_cores(compile_records):
    """Half-precision GEMMs must lower to wgmma on Hopper and mma.sync on Ampere, not to FMA loops."""
    gemms = [r for r in compile_records if r["kernel"] in GEMM_KERNELS and r["dtype"] != "fp32"]
    assert gemms
    for r in gemms:
        used = r["wgmma"] if r["arch"] == 90 else r["mma_sync"]
        assert used, f"{r['kernel']} sm_{r['arch']} {r['dtype']} does not use tensor cores"


# Shared memory a block may use: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def test_attention_kernels_use_tensor_cores_and_fit_shared_memory(compile_records):
    attention = [r for r in compile_records if r["kernel"] in ATTENTION_KERNELS]
    assert {r["dtype"] for r in attention} == {"bf16", "fp16", "fp32"}
    for r in attention:
        where = f"{r['kernel']} sm_{r['arch']} {r['dtype']} D={r['constexprs']['BLOCK_D']}"
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], f"{where}: {r['shared_bytes']} B of shared memory"
        if r["dtype"] != "fp32":
            assert r["wgmma"] if r["arch"] == 90 else r["mma_sync"], f"{where} does not use tensor cores"
        if r["num_stages"] > 1:
            # Multi-stage configs must actually get their K/V (or q/dO) loads software-pipelined.
            assert r["cp_async"], f"{where}: num_stages={r['num_stages']} but no cp.async (loads not pipelined)"


def _is_triton_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "jit"


def test_every_kernel_launch_passes_its_arguments_by_keyword():
    """`kernel[grid](a, b, ...)` would still compile with two same-typed arguments swapped; by keyword, each
    value is tied to the parameter it is meant for. Launch options (num_warps, ...) and ** config dicts are
    keywords too. Static: reads kernels/*.py, imports nothing."""
    launch_options = {"num_warps", "num_stages", "num_ctas", "maxnreg"}
    launched = set()
    for path in sorted((Path(__file__).parents[1] / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        params = {
            node.name: {arg.arg for arg in node.args.args}
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and any(_is_triton_jit(d) for d in node.decorator_list)
        }
        for node in ast.walk(tree):
            is_launch = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in params
            )
            if not is_launch:
                continue
            name, where = node.func.value.id, f"{path.name}:{node.lineno}"
            launched.add(name)
            assert not node.args, f"{where}: {name} is launched with positional arguments"
            unknown = {kw.arg for kw in node.keywords if kw.arg is not None} - params[name] - launch_options
            assert not unknown, f"{where}: {name} has no parameter(s) {sorted(unknown)}"
    assert launched == set(EXPECTED_KERNELS)
