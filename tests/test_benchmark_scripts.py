"""Benchmark scripts whose figures the docs quote (or that wait for a GPU) still run end to end, on tiny shapes."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_mfu_runs_the_pretrain_loop_and_reports_mfu():
    tiny = "--layers 2 --width 64 --heads 2 --seq 32 --batch 2 --grad-accum 2 --vocab 300 --steps 4"
    command = [sys.executable, "benchmarks/pretrain_mfu.py", "--device", "cpu", "--no-compile", *tiny.split()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model: 2 layers x 64 wide, 2 heads, context 32, vocab 300" in done.stdout
    assert "2 x grad_accum 2 = 128 tokens per step" in done.stdout
    match = re.search(r"tokens/s: ([\d,]+)\s+MFU: ([\d.]+)%", done.stdout)
    assert match and float(match.group(1).replace(",", "")) > 0 and float(match.group(2)) > 0, done.stdout


def test_weight_layout_times_every_layout_of_the_real_decode_layout():
    command = [sys.executable, "benchmarks/weight_layout.py", "--layers", "1", "--width", "32", "--heads", "2"]
    command += ["--vocab", "100", "--rounds", "1", "--steps", "2", "--threads", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) ms \| ([\d.]+) GB/s \|$", done.stdout, flags=re.M)
    assert [r[0].split(" ")[0] for r in rows] == ["nn.Linear", "column-major,", "decode", "sum()"], done.stdout
    assert all(float(ms) > 0 for _, ms, _ in rows)
