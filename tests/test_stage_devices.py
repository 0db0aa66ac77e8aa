"""Every command that runs the model picks its device by nanollm.hardware.pick_device, the rule pretrain uses.

The rule itself (cuda, then mps, then cpu; explicit names; errors) is tested in test_hardware.py;
here each stage is run for real on a tiny project with a spy around the rule, so a stage that
goes back to hard-coding its device fails.
"""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_stage_evaluate import project  # noqa: F401  (the tiny corpus, tokenizer, memmaps and checkpoint)

from nanollm import hardware
from stages.cli import cli

BENCH = {"prompt_lengths": [4], "new_tokens": [3], "repeats": 1, "warmup": 0, "compare_transformers": False}
COMMANDS = {  # command -> (its arguments, the params key that names its device)
    "evaluate": ([], "eval.device"),
    "bench_kvcache": ([], "bench.device"),
    "generate": (["--prompt", "def ", "--max-new-tokens", "3"], "eval.device"),
}


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = hardware.pick_device

    def pick_device(name="auto", local_rank=0, key="train.device"):
        calls.append((name, key))
        return real(name, local_rank, key)

    monkeypatch.setattr(hardware, "pick_device", pick_device)
    return calls


def _invoke(root, command, device="auto", extra=()):
    section = "bench" if command == "bench_kvcache" else "eval"
    params = {"seed": 3, "tracking": {"enabled": False}, "bench": BENCH, "eval": {"sample_tokens": 4}}
    params[section] = {**params.get(section, {}), "device": device}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    args, _ = COMMANDS[command]
    return CliRunner().invoke(cli, ["--params", "params.yaml", command, *args, *extra])


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_each_command_asks_the_one_device_rule(project, spy, command, device):  # noqa: F811
    root, _ = project
    result = _invoke(root, command, device)
    assert result.exit_code == 0, result.output
    assert spy == [(device, COMMANDS[command][1])]
    if command != "generate":
        name = "evaluate" if command == "evaluate" else "bench_kvcache"
        recorded = json.loads((root / "metrics" / f"{name}.json").read_text())["device"]
        assert recorded == str(hardware.pick_device(device))


def test_generate_device_option_overrides_params(project, spy):  # noqa: F811
    root, _ = project
    result = _invoke(root, "generate", device="cuda:3", extra=["--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert spy == [("cpu", "--device")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_absent_device_is_a_one_line_error(project, command):  # noqa: F811
    root, _ = project
    result = _invoke(root, command, device="cuda")
    key = COMMANDS[command][1]
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {key} is 'cuda' but this machine has none; set {key}: auto or cpu"


def test_a_bad_device_name_stops_before_any_work(project):  # noqa: F811
    root, _ = project
    result = _invoke(root, "evaluate", device="gpu0")
    assert result.exit_code == 2
    assert "eval.device: got 'gpu0'; must be auto, cpu, mps, cuda or cuda:N" in result.output
