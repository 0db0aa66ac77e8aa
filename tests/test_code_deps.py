"""What code decides an output is declared: every stage's DVC deps and the checkpoint's code fingerprint.

DVC re-runs a stage only when a declared dependency changes, and pretrain resumes a checkpoint
only when the training code's digest is unchanged. Both lists are written by hand, so this
module derives the truth from the source: the nanollm modules a command imports, transitively,
including the imports inside function bodies (stages import torch-side modules lazily) and
leaving out `if TYPE_CHECKING:` blocks, which never run. A package's __init__.py runs when
any of its modules is imported, so it counts too.
"""

import ast
from pathlib import Path

import pytest
import yaml

from nanollm import checkpoint

ROOT = Path(__file__).resolve().parents[1]
DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    """The source file of a first-party module name (nanollm.x.y or stages.x), or None."""
    if name.split(".")[0] not in ("nanollm", "stages"):
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _packages(name: str) -> list[str]:
    """nanollm.data.tokens -> [nanollm, nanollm.data]: the packages whose __init__ runs first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported_names(file: Path) -> set[str]:
    """First-party module names `file` imports anywhere, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from nanollm.model import transformer` imports a submodule, `... import Transformer` a name
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {n for n in names if _module_file(n) is not None}


def _sibling_files(file: Path) -> set[Path]:
    """Files a module reads from its own folder by name, as `Path(__file__).with_name("int8_gemm.c")`."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
            continue
        name = node.args[0]
        if node.func.attr == "with_name" and isinstance(name, ast.Constant) and "__file__" in ast.unparse(node.func):
            found.add(file.parent / name.value)
    return {f for f in found if f.is_file()}


def import_closure(*roots: str) -> set[Path]:
    """Source files of every first-party module the roots import, transitively (roots included), and the
    files those modules read from their own folder (a C kernel's source)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_packages(name))
        todo.extend(_imported_names(_module_file(name)))
    modules = {_module_file(n) for n in seen}
    return modules | {f for m in modules for f in _sibling_files(m)}


def _covered(file: Path, declared: list[str]) -> bool:
    """Whether a dep (a file, or a folder holding it) of the list covers `file`."""
    rel = file.relative_to(ROOT)
    return any(rel == Path(d) or Path(d) in rel.parents for d in declared)


def _stage_module(name: str) -> str:
    command = DVC_STAGES[name]["cmd"].split()
    assert command[0] == "nanollm", f"stage {name} does not run a nanollm command"
    return f"stages.{command[1].replace('-', '_')}"


@pytest.mark.parametrize("stage", list(DVC_STAGES))
def test_every_module_a_stage_imports_is_one_of_its_deps(stage):
    """stages/cli.py (the group, which parses params.yaml) is followed for its imports but not required."""
    deps = [d for d in DVC_STAGES[stage]["deps"] if isinstance(d, str)]
    needed = {f for f in import_closure(_stage_module(stage)) if f.relative_to(ROOT).parts[0] == "nanollm"}
    needed.add(_module_file(_stage_module(stage)))
    missing = sorted(str(f.relative_to(ROOT)) for f in needed if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r} imports these but does not list them in deps: {missing}"


@pytest.mark.parametrize("stage", list(DVC_STAGES))
def test_no_stage_declares_code_it_does_not_import(stage):
    """The other direction: a stale code dep re-runs a stage for edits that cannot change its outputs."""
    closure = import_closure(_stage_module(stage))
    code = [d for d in DVC_STAGES[stage]["deps"] if d.startswith(("nanollm", "stages"))]
    unused = [d for d in code if not any(_covered(f, [d]) for f in closure)]
    assert not unused, f"dvc.yaml stage {stage!r} lists code deps it never imports: {unused}"


def test_the_fingerprint_covers_all_the_code_that_decides_the_weights():
    """The model, the loop and what they import (config decides hidden sizes, hardware the dtype)."""
    package = ROOT / "nanollm"
    needed = import_closure("nanollm.training.loop", "nanollm.model", "nanollm.config")
    digested = [f"nanollm/{name}" for name in checkpoint.TRAINING_CODE]
    missing = sorted(str(f.relative_to(ROOT)) for f in needed if not _covered(f, digested))
    assert not missing, f"nanollm.checkpoint.TRAINING_CODE lacks {missing}"
    assert all((package / name).exists() for name in checkpoint.TRAINING_CODE)


def test_the_fingerprint_changes_with_each_file_it_covers(tmp_path, monkeypatch):
    """code_digest really reads every covered file: editing any one of them changes it."""
    copy = tmp_path / "nanollm"
    for name in checkpoint.TRAINING_CODE:
        src = ROOT / "nanollm" / name
        dst = copy / name
        if src.is_dir():
            for file in src.rglob("*.py"):
                (dst / file.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                (dst / file.relative_to(src)).write_bytes(file.read_bytes())
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    monkeypatch.setattr(checkpoint, "__file__", str(copy / "checkpoint.py"))
    before = checkpoint.code_digest()
    for file in sorted(copy.rglob("*.py")):
        original = file.read_bytes()
        file.write_bytes(original + b"\n# edited\n")
        assert checkpoint.code_digest() != before, f"editing {file.relative_to(copy)} left the digest unchanged"
        file.write_bytes(original)
    assert checkpoint.code_digest() == before


def test_the_closure_sees_lazy_imports_and_skips_type_checking_ones():
    closure = {str(f.relative_to(ROOT)) for f in import_closure("stages.evaluate")}
    assert "nanollm/evaluate.py" in closure  # imported inside the command body
    assert "nanollm/__init__.py" in closure and "nanollm/data/__init__.py" in closure
    assert "nanollm/config.py" in closure  # through stages.cli
    assert "nanollm/inference/int8_gemm.c" in closure  # read by nanollm/inference/native.py, not imported


def test_every_package_of_the_source_tree_is_one_the_wheel_lists():
    """pyproject.toml names its packages one by one: a new subpackage left off would be missing from a
    wheel (and from an MLflow model's environment built from one) while an editable install still works."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("nanollm", "stages")
        for init in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found <= listed, f"pyproject.toml lacks packages {sorted(found - listed)}"
