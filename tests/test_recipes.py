"""The Python blocks of docs/recipes.md run as written (torchrun blocks excepted)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
BLOCKS = re.findall(r"```python\n(.*?)```", RECIPES.read_text(), flags=re.S)


def test_recipes_have_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_recipe_runs(index, capsys):
    block = BLOCKS[index]
    if block.startswith("# runs under torchrun"):
        compile(block, f"recipes.md[{index}]", "exec")  # at least valid Python
        return
    with warnings.catch_warnings():
        if block.startswith("# needs: lightning"):
            pytest.importorskip("lightning")
            warnings.simplefilter("ignore")  # Lightning's own advice and deprecations
        exec(compile(block, f"recipes.md[{index}]", "exec"), {})
    assert capsys.readouterr().out.strip()
