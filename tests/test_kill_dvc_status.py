"""Any stage killed with SIGKILL at a random point, as DVC sees it: `dvc status` tells the truth, `dvc repro` completes.

One tiny project is reproduced once; each case kills the process group of `dvc repro <stage>` (or of
`nanollm <stage>` run by hand) in a copy of it, at a seeded random point of the stage's run time, and
checks that the stage was still running then. Linux only: process states come from /proc.
"""

import io
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tool_env

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PIPELINE = list(DVC_YAML)  # download, train_tokenizer, tokenize, pretrain, evaluate, bench_kvcache
KILL_SEED = 7
TINY = {
    "seed": 1337,
    "data": {"max_bytes": 200_000, "val_fraction": 0.1},
    "tokenizer": {"vocab_size": 300},  # 256 bytes + <|endoftext|> + 43 merges
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
    "train": {
        "batch_size": 8,
        "max_steps": 10,
        "warmup_steps": 2,
        "eval_interval": 5,
        "eval_batches": 2,
        "log_interval": 5,
        "checkpoint_interval": 3,  # several checkpoints, so a kill can land between two of them
        "device": "cpu",
        "dtype": "float32",
    },
    "eval": {"max_tokens": 2000, "sample_tokens": 16},
    "bench": {"prompt_lengths": [8, 16], "new_tokens": [8], "repeats": 1, "warmup": 0, "compile": False},
    "tracking": {"enabled": False},  # MLflow's start-up would double each stage's time; tracking is no DVC dep
}

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


def _env() -> dict[str, str]:
    return tool_env(OMP_NUM_THREADS="1")  # fair on a 2-core machine, and training repeatable bit for bit


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    """A process leading its own group, so that one signal reaches it and everything it started."""
    return subprocess.Popen(
        args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


# ---------------------------------------------------------------------------- processes, read from /proc


def _stat(pid: int | str) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, ... ([] once the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _state(pid: int) -> str | None:
    """The one-letter state of a process (R, S, D, T, Z, ...), or None once it is gone (reaped)."""
    return next(iter(_stat(pid)), None)


def _stages_running(group: int) -> dict[int, str]:
    """pid -> stage of every live `nanollm <stage>` process in a process group."""
    found = {}
    for entry in Path("/proc").iterdir():
        stat = _stat(entry.name) if entry.name.isdigit() else []
        if len(stat) < 3 or int(stat[2]) != group or stat[0] == "Z":
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and argv[1].endswith(b"/nanollm") and argv[2].decode() in DVC_YAML:
            found[int(entry.name)] = argv[2].decode()
    return found


def _wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _run_times(proc: subprocess.Popen) -> dict[str, float]:
    """Seconds each `nanollm <stage>` process under `proc` lives, first seen to gone; waits for `proc` to succeed."""
    seen: dict[int, tuple[str, float]] = {}
    took: dict[str, float] = {}
    while proc.poll() is None:
        now, running = time.monotonic(), _stages_running(proc.pid)
        for pid, stage in running.items():
            seen.setdefault(pid, (stage, now))
        for pid in set(seen) - set(running) - {p for p, (s, _) in seen.items() if s in took}:
            took[seen[pid][0]] = now - seen[pid][1]
        time.sleep(0.005)
    out = proc.communicate()[0]
    assert proc.returncode == 0, out[-3000:]
    assert set(took) == set(PIPELINE), f"stages seen ending: {took}\n{out[-3000:]}"
    return took


def _kill_at(proc: subprocess.Popen, stage: str, delay: float) -> tuple[bool, str]:
    """SIGKILL the group of `proc` `delay` s after `nanollm <stage>` starts: whether it was still running, the output.

    The group is stopped (SIGSTOP) before it is killed: a stopped stage process had not
    finished, one that is a zombie or gone had, and nothing moves while we look.
    """

    pids: list[int] = []

    def started() -> bool:
        pids.extend(p for p, s in _stages_running(proc.pid).items() if s == stage)
        return bool(pids) or proc.poll() is not None

    _wait_until(started, 120, f"`nanollm {stage}` did not start")
    if not pids:
        # The whole run ended between two looks: on a busy 2-core machine the watching thread can
        # wait on the GIL longer than a tiny stage lives. That is a kill that came too late, as
        # long as the stage did run and succeed; anything else is a real failure.
        output = proc.communicate()[0]
        ran = proc.args[0].endswith("nanollm") or f"Running stage '{stage}'" in output
        assert proc.returncode == 0 and ran, f"{proc.args} ended before `nanollm {stage}` started:\n{output}"
        return False, output
    pid = pids[0]
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGSTOP)
    _wait_until(lambda: _state(pid) in (None, "Z", "T", "t"), 10, f"`nanollm {stage}` did not stop")
    mid_run = _state(pid) in ("T", "t")
    os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate(timeout=60)[0]
    # The killed stage is now an orphan: PID 1 reaps it late or never, and the rerun must sweep
    # its temporaries all the same (nanollm.atomic treats a zombie writer as dead).
    return mid_run, output


# ---------------------------------------------------------------------------- outputs and dvc.yaml


def _paths(stage: str, *kinds: str) -> list[str]:
    """The paths a stage lists under the given dvc.yaml keys (outs, metrics, plots, deps)."""
    entries = [e for kind in kinds for e in DVC_YAML[stage].get(kind, [])]
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def _inside(path: str, outputs: set[str]) -> bool:
    """Whether `path` is one of `outputs` or a file in one (bench_kvcache reads models/checkpoint/architecture.json)."""
    return any(path == out or path.startswith(f"{out}/") for out in outputs)


def _outputs(stage: str) -> list[str]:
    return _paths(stage, "outs", "metrics", "plots")


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def _same(a: Path, b: Path) -> bool:
    if a.is_dir() and b.is_dir():
        return _files(a) == _files(b) and all(_same(a / name, b / name) for name in _files(a))
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def _incomplete(path: Path, reference: Path) -> str | None:
    """Why `path` is not a complete output shaped like `reference` (the prepared project's), or None.

    Deterministic outputs must equal the reference byte for byte; timings (metrics, benchmark
    rows, charts) and a checkpoint of a training cut short need only be whole files of their kind.
    """
    if reference.is_dir():
        if not path.is_dir() or _files(path) != _files(reference):
            return f"{path} holds {[str(n) for n in _files(path)] if path.is_dir() else 'a file'}"
        return next((why for name in _files(path) if (why := _incomplete(path / name, reference / name))), None)
    data, expected = path.read_bytes(), reference.read_bytes()
    if data == expected:
        return None
    if path.suffix == ".json":
        try:
            whole = json.loads(data).keys() == json.loads(expected).keys()
        except (ValueError, AttributeError):
            whole = False
    elif path.suffix == ".csv":
        lines, ref = data.decode().splitlines(), expected.decode().splitlines()
        whole = lines[:1] == ref[:1] and len(lines) == len(ref) and {x.count(",") for x in lines} == {ref[0].count(",")}
    elif path.suffix == ".png":  # the signature, and the IEND chunk that closes every PNG
        whole = data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
    elif path.suffix == ".pt":
        import torch

        try:
            whole = (
                torch.load(io.BytesIO(data), weights_only=True).keys()
                == torch.load(reference, weights_only=True).keys()
            )
        except Exception:  # any unpickling error: a truncated or torn file
            whole = False
    else:
        whole = False
    return None if whole else f"{path} is not a complete {path.suffix} output"


_DVC_IN_PROCESS = threading.Lock()  # one DVC repo object at a time in this process: its caches are shared


def _stale(project: Path) -> set[str]:
    """The stages `dvc status` reports as changed, from the function behind it (a tenth of the CLI's start-up)."""
    from dvc.repo import Repo

    with _DVC_IN_PROCESS, Repo(str(project)) as repo:
        return {name.rsplit(":", 1)[-1] for name in repo.status()}


def _leftovers(project: Path) -> list[str]:
    """Temporaries of writers (.<name>.tmp-*, a checkpoint's .<name>.previous) anywhere outside .git and .dvc."""
    found = [p.relative_to(project) for pattern in (".*.tmp-*", ".*.previous") for p in project.rglob(pattern)]
    return sorted(str(p) for p in found if p.parts[0] not in (".git", ".dvc"))


# ---------------------------------------------------------------------------- the project and the cases


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A git + DVC repo with the whole pipeline reproduced; how long each stage's process ran."""
    project = tmp_path_factory.mktemp("killed") / "prepared"
    project.mkdir()
    for name in ("nanollm", "stages"):  # code deps of the stages; the installed package is what runs
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "dvc.yaml", project / "dvc.yaml")
    (project / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    _run(["git", "init", "-q"], project)
    _run([*DVC, "init", "-q"], project)
    return project, _run_times(_start([*DVC, "repro"], project))


def _killed_mid_run(prepared: tuple[Path, dict[str, float]], tmp_path: Path, stage: str, by_hand: bool):
    """A copy of the prepared project where `stage` was started and SIGKILLed mid-run.

    By hand: `nanollm <stage>` as dvc.yaml runs it. Else `dvc repro <stage>`, after an edit
    of the stage's module that makes it stale without changing what it writes. The first
    point is a seeded random fraction of the stage's run time; each retry on a fresh copy
    halves it. Returns the copy, the killed process's exit status and output, and the delay.
    """
    source, run_times = prepared
    fraction = random.Random(f"{KILL_SEED}-{stage}-{by_hand}").uniform(0.05, 0.95)
    for attempt in range(5):
        project = tmp_path / f"attempt-{attempt}"
        shutil.copytree(source, project, symlinks=True)
        if by_hand:
            args = shlex.split(DVC_YAML[stage]["cmd"])
        else:
            with open(project / "stages" / f"{stage}.py", "a") as f:
                f.write("# edited: the stage is stale, what it writes is not\n")
            if stage == "pretrain":  # else the run resumes from the final checkpoint and ends at once
                shutil.rmtree(project / "models" / "checkpoint")
            args = [*DVC, "repro", stage]
        proc = _start(args, project)
        delay = fraction * run_times[stage]
        mid_run, output = _kill_at(proc, stage, delay)
        if mid_run:
            return project, proc.returncode, output, delay
        fraction /= 2
    raise AssertionError(f"`nanollm {stage}` finished before every kill, the last one {delay:.3f} s in")


def _play(prepared: tuple[Path, dict[str, float]], tmp_path: Path, stage: str, by_hand: bool) -> dict[str, Any]:
    """Kill `stage` mid-run; record what is left and what `dvc status` says; run `dvc repro`; record again."""
    source = prepared[0]
    project, returncode, output, delay = _killed_mid_run(prepared, tmp_path, stage, by_hand)
    outputs = _outputs(stage)
    changed = {out for out in outputs if not _same(project / out, source / out)}
    seen = {
        "why": f"{'`nanollm' if by_hand else '`dvc repro'} {stage}` killed {delay:.2f} s in:\n{output[-3000:]}",
        "returncode": returncode,
        "lock_kept": (project / "dvc.lock").read_bytes() == (source / "dvc.lock").read_bytes(),
        "missing": [out for out in outputs if not (project / out).exists()],
        "fragments": [
            why for out in outputs if (project / out).exists() and (why := _incomplete(project / out, source / out))
        ],
        "changed": changed,
        "readers": {s for s in PIPELINE if any(_inside(dep, changed) for dep in _paths(s, "deps"))},
        "stale": _stale(project),
    }
    # by hand nothing need be stale (every old output may be intact): force the stage to run
    seen["rerun"] = _run([*DVC, "repro", *(["--force", "--single-item", stage] if by_hand else [])], project)
    seen["stale_after_rerun"] = _stale(project)
    seen["leftovers"] = _leftovers(project)
    return seen


CASES = [(stage, False) for stage in PIPELINE] + [("evaluate", True), ("bench_kvcache", True)]


@pytest.fixture(scope="module")
def killed(prepared, tmp_path_factory) -> dict[tuple[str, bool], dict[str, Any] | BaseException]:
    """Every case of CASES, two at a time (2 cores): (stage, by_hand) -> what `_play` saw, or the error it met."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            (stage, by_hand): pool.submit(
                _play, prepared, tmp_path_factory.mktemp(f"{stage}-{'by-hand' if by_hand else 'dvc'}"), stage, by_hand
            )
            for stage, by_hand in CASES
        }
    return {case: future.exception() or future.result() for case, future in futures.items()}


def _seen(killed: dict, stage: str, by_hand: bool) -> dict[str, Any]:
    """What the case saw, once it is sure the stage died of SIGKILL."""
    seen = killed[stage, by_hand]
    if isinstance(seen, BaseException):
        raise seen
    assert seen["returncode"] == -signal.SIGKILL, seen["why"]
    return seen


@pytest.mark.parametrize("stage", PIPELINE)
def test_sigkill_in_dvc_repro_keeps_dvc_status_truthful_and_the_next_repro_completes(killed, stage):
    seen = _seen(killed, stage, by_hand=False)
    why = f"{seen['why']}\nchanged outputs: {seen['changed']}"
    assert seen["lock_kept"], why  # DVC recorded nothing of the killed run
    # DVC deletes a stage's outputs (all but persist ones) before it runs the command: after
    # the kill each one is absent or complete, never a fragment
    assert not seen["fragments"], f"{why}\n{seen['fragments']}"
    # stale: the killed stage (its code changed) and each stage that reads one of its changed outputs
    assert seen["stale"] == {stage} | seen["readers"], why
    assert f"Running stage '{stage}'" in seen["rerun"], seen["rerun"]
    assert seen["stale_after_rerun"] == set(), seen["rerun"]  # `dvc status`: "Data and pipelines are up to date."
    assert not seen["leftovers"], seen["leftovers"]


@pytest.mark.parametrize("stage", ["evaluate", "bench_kvcache"])
def test_sigkill_of_a_stage_run_by_hand_leaves_each_output_old_or_whole_and_dvc_status_says_which(killed, stage):
    seen = _seen(killed, stage, by_hand=True)
    why = f"{seen['why']}\nchanged outputs: {seen['changed']}"
    # the previous output stays until a complete new one replaces it
    assert not seen["missing"] and not seen["fragments"], f"{why}\n{seen['missing']} {seen['fragments']}"
    # an output rewritten with other bytes (timings) makes the stage stale; else it is up to date, truly
    assert seen["stale"] == ({stage} if seen["changed"] else set()), why
    assert f"Running stage '{stage}'" in seen["rerun"], seen["rerun"]
    assert seen["stale_after_rerun"] == set(), seen["rerun"]
    assert not seen["leftovers"], seen["leftovers"]
