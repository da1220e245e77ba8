"""benchmarks/kernel_bench.py: the smoke mode runs every method of every op under the interpreter and writes its JSON;
without a GPU and without --smoke it says it needs one; --compile-only builds kernels for a GPU without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_bench.py"


def _run(*arguments: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # the script decides
    env["PYTHONPATH"] = str(SCRIPT.parents[1])
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, env=env,
                          timeout=300, check=False)  # fmt: skip


def test_smoke_mode_runs_every_kernel(tmp_path):
    result = _run("--smoke", "--json", str(tmp_path / "smoke.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["smoke"] and "interpreter" in data["device"]
    methods = {(row["op"], row["method"]) for row in data["rows"]}
    assert {("linear", "triton"), ("local", "triton"), ("masked", "triton"), ("masked", "sdpa (unmasked)")} <= methods
    assert all("ms" in row and row["ms"] > 0 for row in data["rows"]), [r for r in data["rows"] if "ms" not in r]
    assert (tmp_path / "smoke.md").read_text().count("| triton |") == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_without_a_gpu_it_says_so():
    result = _run()
    assert result.returncode == 1
    assert "CUDA GPU" in result.stderr and "--smoke" in result.stderr


def test_kernels_compile_for_a_gpu_without_one():
    """Triton's compiler and ptxas build the masked kernels for sm_90 and some config of each fits its shared memory
    (the interpreter accepts code a GPU would refuse; the full check is `--compile-only` over every op)."""
    result = _run("--compile-only", "90", "--ops", "masked", "--dims", "40", "--dtypes", "bf16")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.count("ok   masked") == 4
