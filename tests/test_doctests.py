"""The >>> examples of groupseg.training and groupseg.eval (repository folders training/ and eval/).

groupseg/'s own modules run under --doctest-modules (see pyproject and conftest.py); these two
folders are installed inside the groupseg namespace, so they are imported here by that name.
"""
import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    f"groupseg.{folder}.{m.name}"
    for folder in ("training", "eval")
    for m in pkgutil.iter_modules([str(ROOT / folder)])
    if ">>>" in (ROOT / folder / f"{m.name}.py").read_text(encoding="utf-8")
)


def test_examples_are_found():
    assert "groupseg.training.nouns" in MODULES  # the examples named in the nouns docs


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module, name)
    runnable = sum(not ex.options.get(doctest.SKIP) for t in tests for ex in t.examples)
    if not runnable:
        pytest.skip(f"{name}: every example is marked +SKIP (needs data or a download)")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted == runnable > 0  # the examples were found and ran
    assert result.failed == 0
