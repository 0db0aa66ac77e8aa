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
    assert result.stderr.strip() == (
        "Error: nope.yaml: params file not found; run from the project root or pass --params"
    )  # no meaningless "got None": a missing file has no value


def test_yaml_syntax_errors_name_the_line_without_a_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train: {lr: 1\n  batch_size: 2\n")
    result = CliRunner().invoke(cli, ["download"])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: params.yaml line 2: ") and "got None" not in result.stderr


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [("train-tokenizer", "train_tokenizer"), ("bench-kvcache", "bench_kvcache"), ("export_hf", "export-hf"),
     ("import_hf", "import-hf"), ("train_tokenizer", "train_tokenizer"), ("export-hf", "export-hf")],
)  # fmt: skip
def test_commands_answer_to_either_spelling(typed, canonical):
    result = CliRunner().invoke(cli, [typed, "--help"])
    expected = CliRunner().invoke(cli, [canonical, "--help"])
    assert result.exit_code == expected.exit_code == 0, result.output
    assert result.output.replace(typed, canonical) == expected.output  # the same command, usage line aside


@pytest.mark.parametrize(("typed", "suggested"), [("trian_tokenizer", "train_tokenizer"), ("pretrian", "pretrain")])
def test_a_misspelt_command_gets_a_suggestion(typed, suggested):
    result = CliRunner().invoke(cli, [typed])
    assert result.exit_code == 2
    assert f"No such command '{typed}'. Did you mean '{suggested}'?" in result.stderr


def test_an_unknown_command_gets_no_wild_guess():
    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code == 2 and "Did you mean" not in result.stderr


# ---------------------------------------------------------------------------- mutated params

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nanollm.config import Config, ConfigError, flatten  # noqa: E402

_DEFAULTS = flatten(Config().to_dict())
_ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def mutated_params(draw) -> dict:
    """The default params with a few keys replaced by odd values, removed or added."""
    tree = Config().to_dict()
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        key = draw(st.sampled_from(sorted(_DEFAULTS)))
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node[section]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[leaf] = draw(_ODD_VALUES)
        elif action == "delete":
            node.pop(leaf, None)
        else:
            node[draw(st.text(min_size=1, max_size=6))] = draw(_ODD_VALUES)
    return tree


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_params())
def test_mutated_params_validate_or_fail_with_one_line(raw):
    try:
        Config.from_dict(raw)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).split(":")[0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=mutated_params())
def test_mutated_params_through_the_cli_never_print_a_traceback(tmp_path_factory, raw):
    project = tmp_path_factory.mktemp("mutated")
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    # tokenize with no corpus: a valid file gets past validation and fails on the missing input
    result = CliRunner().invoke(
        cli,
        [
            "--params",
            str(project / "params.yaml"),
            "tokenize",
            "--corpus",
            str(project / "none"),
            "--out",
            str(project / "tokens"),
        ],
    )
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (project / "tokens").exists()


def test_commands_that_run_outside_a_project_take_the_defaults_without_params_yaml(tmp_path, monkeypatch):
    """`nanollm register` (and `nanollm serve --model-uri`) work from any folder against a store; the
    pipeline's stages still need the params file, and so does an explicit --params that is missing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = CliRunner().invoke(cli, ["register", "--run-id", "0123"])
    assert result.exit_code == 1 and "MLflow run 0123 is not in" in result.output  # it got as far as the store
    assert "params file not found" in CliRunner().invoke(cli, ["evaluate"]).output
    result = CliRunner().invoke(cli, ["--params", "elsewhere.yaml", "register", "--run-id", "0123"])
    assert result.exit_code == 2 and "params file not found" in result.output
