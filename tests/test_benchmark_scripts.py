"""The benchmark scripts that measure what this machine cannot (a GPU) still run end to end, here on a tiny CPU shape."""

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
