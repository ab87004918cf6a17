"""The examples in the public docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "tensorbridge",
    "tensorbridge._backend",
    "tensorbridge._batch",
    "tensorbridge._convert",
    "tensorbridge._cuda",
    "tensorbridge._handle",
    "tensorbridge._loader",
    "tensorbridge._pinned",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
