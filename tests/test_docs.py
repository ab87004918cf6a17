"""The examples in the public docstrings and the README run and show what they say."""

from __future__ import annotations

import doctest
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

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
    "tensorbridge._registry",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2  # the quick start and the data loader


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_python_blocks_run_as_written(index):
    """Every README Python block runs unchanged, each in a fresh interpreter (so it needs
    nothing from the others), with warnings as errors."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", BLOCKS[index]],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"README block {index} failed:\n{proc.stderr[-3000:]}"
