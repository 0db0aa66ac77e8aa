"""nanollm.threads: the CPUs divided among the processes sharing them, and every stage applying the answer."""

import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from click.testing import CliRunner

from nanollm import threads
from stages.cli import cli


def test_default_divides_the_cpus_among_torchrun_ranks_and_queue_workers(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    monkeypatch.setattr(threads, "queue_workers", lambda: 0)
    assert threads.default_threads({}) == (8, "8 CPUs, no other nanollm process known")
    assert threads.default_threads({"LOCAL_WORLD_SIZE": "2"}) == (4, "8 CPUs / 2 torchrun processes")
    monkeypatch.setattr(threads, "queue_workers", lambda: 2)
    assert threads.default_threads({"LOCAL_WORLD_SIZE": "2"}) == (
        2,
        "8 CPUs / 2 torchrun processes / 2 dvc queue workers",
    )
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    assert threads.default_threads({"LOCAL_WORLD_SIZE": "4"})[0] == 1  # never fewer than one


def test_queue_workers_are_counted_from_the_process_table():
    """A process whose argv reads like DVC's `dvc exp queue-worker NAME` counts; this one does not."""
    before = threads.queue_workers()
    fake = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "exp", "queue-worker", "w1@localhost"]
    )
    try:
        deadline = time.monotonic() + 10
        while threads.queue_workers() == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threads.queue_workers() == before + 1
    finally:
        fake.kill()
        fake.wait()


def test_queue_workers_reads_a_proc_like_folder(tmp_path):
    for pid, argv in {
        "11": [b"dvc", b"exp", b"queue-worker", b"a@x"],
        "12": [b"python", b"train.py"],
        "x": [b"exp"],
    }.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
    (tmp_path / "13").mkdir()  # a process that is gone: no cmdline
    assert threads.queue_workers(tmp_path) == 1
    assert threads.queue_workers(tmp_path / "missing") == 0


def test_apply_sets_torch_and_openmp_for_children(monkeypatch):
    previous = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        threads.apply_threads(1)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        child = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True, text=True
        )
        assert child.stdout.strip() == "1"  # a child process (a BPE worker, a torchrun rank) inherits the budget
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(
    "setting, expected", [(1, "1 CPU thread(s) (threads in params.yaml)"), (None, "CPU thread(s) (")]
)
def test_every_stage_applies_the_thread_count(tmp_path, monkeypatch, caplog, setting, expected):
    monkeypatch.chdir(tmp_path)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "5")  # restored after the test
    previous = torch.get_num_threads()
    params = {"threads": setting, "data": {"max_documents": 40, "val_fraction": 0.5}, "tracking": {"enabled": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        with caplog.at_level("INFO", logger="nanollm"):
            result = CliRunner().invoke(cli, ["download"])
        assert result.exit_code == 0, result.output
        assert any(expected in r.getMessage() for r in caplog.records)
        wanted = setting or threads.default_threads()[0]
        assert os.environ["OMP_NUM_THREADS"] == str(wanted) and torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(previous)
