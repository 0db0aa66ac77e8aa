"""The CLI contract: every stage is listed, --help is instant, bad params exit 2 with one line."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlflow", "datasets", "tiktoken", "numpy", "matplotlib")


def test_help_lists_every_stage():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_every_dvc_stage_is_a_command():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert name in COMMANDS
        assert stage["cmd"].split()[:2] == ["nanollm", name]


@pytest.mark.parametrize("args", [["--help"]] + [[name, "--help"] for name in COMMANDS])
def test_help_imports_no_heavy_module(args):
    code = (
        "import sys\n"
        "from stages.cli import cli\n"
        f"try:\n    cli({args!r}, prog_name='nanollm')\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage: nanollm" in done.stdout


BAD_PARAMS = [
    "train:\n  lr: -0.001\n",
    "tokenizer:\n  vocab_size: 100\n",
    "model:\n  n_embd: 250\n  n_head: 4\n",
    "model:\n  n_layers: 4\n",
    "seed: [1]\n",
    "model: {n_layer: 2\n",  # broken YAML
]


@pytest.mark.parametrize("text", BAD_PARAMS)
@pytest.mark.parametrize("stage", list(COMMANDS))
def test_bad_params_exit_2_with_one_line_and_write_nothing(tmp_path, monkeypatch, stage, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(text)
    result = CliRunner().invoke(cli, [stage])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: params.yaml"), result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_missing_params_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--params", "nope.yaml", "download"])
    assert result.exit_code == 2
    assert "nope.yaml" in result.stderr and "not found" in result.stderr
