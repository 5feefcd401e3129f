"""The quick benchmarks still run (a changed signature once broke two of them without a test
noticing). Smoke only: exit status 0 and the totals line; their ratios are not asserted (timings
on a shared machine are noise, and the README reports them from full runs)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script,args,expect", [
    ("bench_counting.py", ["--reps", "1", "--threads", "1"], "total"),
    ("bench_compensation.py", ["--layers", "lite0", "--reps", "1", "--threads", "1"],
     "total, every setting"),
    ("bench_refine.py", ["--product-only"], "running product + one idle sweep"),
])
def test_benchmark_runs(script, args, expect):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert any(line.startswith(expect) for line in out.stdout.splitlines()), out.stdout[-2000:]


def test_bench_gpu_without_a_gpu_says_so():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: make gpu-check runs bench_gpu.py in full")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().splitlines() == [
        "bench_gpu: no CUDA device on this machine; nothing measured"], out.stdout + out.stderr


@pytest.mark.parametrize("args,why", [(["--rounds", "0"], "--rounds must be >= 1, got 0"),
                                      (["--sentences", "0"], "--sentences must be >= 1, got 0")])
def test_bench_feedback_refuses_bad_counts_in_one_line(args, why):
    """Before loading the ViT-Base-sized model (the run itself takes minutes: the README reports
    it), a bad count is one line naming the flag."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_feedback.py"),
                          *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2 and out.stderr.strip() == f"error: {why}", out.stderr
