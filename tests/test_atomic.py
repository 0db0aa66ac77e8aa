"""Atomic outputs: all or nothing at the target path, also when the writer is killed."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nanollm.atomic import atomic_path, write_json


def test_success_replaces_the_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert target.stat().st_mode & 0o055  # readable by others, not mkdtemp's 0700


def test_failure_keeps_the_old_target(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_sigkilled_writer_leaves_nothing_at_target_and_its_temporary_is_swept(tmp_path, reaped):
    """Also while the killed writer is a zombie: an orphaned stage waits for a PID 1 that may never reap it."""
    target = tmp_path / "tokens"
    code = textwrap.dedent(
        f"""
        import time
        from nanollm.atomic import atomic_path
        with atomic_path({str(target)!r}, directory=True) as tmp:
            (tmp / "train.bin").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    if reaped:
        writer.wait()
    else:
        _wait_for_state(writer.pid, "Z")  # dead, not reaped: kill(pid, 0) still finds it
    assert not target.exists()
    (orphan,) = tmp_path.iterdir()
    assert orphan.name.startswith(".tokens.tmp-")
    with atomic_path(target, directory=True) as tmp:  # the next run sweeps the dead writer's leftovers
        (tmp / "train.bin").write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"]
    writer.wait()


def _wait_for_state(pid: int, state: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != state:
        assert time.monotonic() < deadline, f"process {pid} never reached state {state}"
        time.sleep(0.01)
