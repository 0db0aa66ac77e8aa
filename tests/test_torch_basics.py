"""docs/torch_basics.md: every python block runs, in order, and its asserts hold."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "torch_basics.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)
SECTIONS = ["view", "broadcasting", "masking", "topk-gather", "einsum"]


def test_each_section_has_one_example():
    assert len(BLOCKS) == len(SECTIONS)


@pytest.mark.parametrize("index", range(len(SECTIONS)), ids=SECTIONS)
def test_example_runs(index):
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"{DOC.name} block {index + 1}", "exec"), namespace)  # noqa: S102
    assert "torch" in namespace  # the block is self-contained: it imports what it uses
