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


def test_published_figures_are_the_committed_metrics():
    """README.md's results table and docs/kv_cache.md's report render from metrics/ and reports/ as committed.

    After a default `dvc repro`, `python docs/results.py` rewrites both; a figure edited by hand,
    or metrics committed without re-rendering, fails here.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("results", ROOT / "docs" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    assert results.stale_sections(ROOT) == [], "run `python docs/results.py` after `dvc repro`, and commit"


def _copy_of_the_project(tmp_path):
    """The documents and the files they render from, copied to tmp_path; returns docs/results.py as a module."""
    import importlib.util
    import shutil

    for name in ("README.md", "params.yaml", "metrics", "reports", "docs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / name)
    spec = importlib.util.spec_from_file_location("results", ROOT / "docs" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    return results


def test_the_results_table_changes_with_the_metrics(tmp_path):
    """The check can fail: a changed figure in a metrics file makes the README stale."""
    import json

    results = _copy_of_the_project(tmp_path)
    metrics = tmp_path / "metrics" / "evaluate.json"
    data = json.loads(metrics.read_text())
    data["bits_per_byte"] += 0.01
    metrics.write_text(json.dumps(data))
    assert results.stale_sections(tmp_path) == ["README.md"]


def test_the_int8_row_carries_the_kept_124m_run_and_changes_with_it(tmp_path):
    """The default model's int8 ratio is mostly noise; beside it the README shows the 124M shape's, rendered from
    docs/figures/int8_decode.json (benchmarks/int8_decode.py --out) with its command: editing that file stales it."""
    import json

    figures = json.loads((ROOT / "docs" / "figures" / "int8_decode.json").read_text())
    (shape,) = [s for s in figures["shapes"] if s["model"].startswith("GPT-2 124M")]
    readme = (ROOT / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| int8 weights, batch-1 decoding")]
    assert f"at the GPT-2 124M shape x{shape['int8_vs_fp32']:.2f}" in row and f"`{figures['command']}`" in row
    assert figures["command"].startswith("python benchmarks/int8_decode.py") and "--out docs/figures/" in row

    results = _copy_of_the_project(tmp_path)
    assert results.stale_sections(tmp_path) == []
    kept = tmp_path / "docs" / "figures" / "int8_decode.json"
    shape["int8_vs_fp32"] += 0.5
    kept.write_text(json.dumps(figures))
    assert results.stale_sections(tmp_path) == ["README.md"]
