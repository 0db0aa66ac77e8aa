"""The README's set-up commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command_word_for_word():
    (ci_command,) = _commands((ROOT / ".ci/run").read_text())
    readme = _commands((ROOT / "README.md").read_text())
    assert len(readme) == 2, "the README gives exactly two set-up commands"
    assert ci_command in readme
    assert ci_command.endswith("pytest -q")


def test_readme_pipeline_command_ends_in_dvc_repro():
    pipeline = [c for c in _commands((ROOT / "README.md").read_text()) if "pytest" not in c]
    assert len(pipeline) == 1 and pipeline[0].endswith("dvc repro")
