"""The examples in the public docstrings and the README run and show what they say."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
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
    "tensorbridge._ranks",
    "tensorbridge._registry",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_the_package_namespace_is_its_api_and_its_modules():
    """dir(tensorbridge) shows what ``__all__`` names, the package's own modules and
    dunders: no name a module-level import left behind (``TYPE_CHECKING``, ``typing``)."""
    tb = importlib.import_module("tensorbridge")
    extra = {n for n in dir(tb) if not n.startswith("__")} - set(tb.__all__)
    others = {n for n in extra if not isinstance(getattr(tb, n), type(tb))}
    assert not others, others
    assert all(hasattr(tb, n) for n in tb.__all__)


README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2  # the quick start and the data loader


# Warnings the README's blocks may meet that come from another package's own code, each
# with why (everything else is an error).
FOREIGN_WARNINGS = [
    # Lightning 2.6 asks torch's pytree for LeafSpec, which torch 2.13 deprecates (every fit)
    "ignore:`isinstance(treespec, LeafSpec)` is deprecated:FutureWarning",
    # Ray 2.60's DataContext warns about its own deprecated defaults when it is made
    "ignore::DeprecationWarning:ray.data.context",
]


def _missing_imports(code: str) -> list[str]:
    """The top-level packages a block imports that are not installed (the integration
    recipes need their extras: hf, accelerate, lightning)."""
    names = re.findall(r"^(?:import|from)\s+(\w+)", code, flags=re.M)
    return [n for n in dict.fromkeys(names) if importlib.util.find_spec(n) is None]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_python_blocks_run_as_written(index):
    """Every README Python block runs unchanged, each in a fresh interpreter (so it needs
    nothing from the others), with warnings as errors. A block importing a package that is
    not installed is skipped, naming it (CI installs every extra, and fails on such a skip)."""
    missing = _missing_imports(BLOCKS[index])
    if missing:
        pytest.skip(f"{', '.join(missing)} is not installed (README block {index} imports it)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    ignored = [arg for w in FOREIGN_WARNINGS for arg in ("-W", w)]
    proc = subprocess.run(
        [sys.executable, "-W", "error", *ignored, "-c", BLOCKS[index]],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"README block {index} failed:\n{proc.stderr[-3000:]}"


def _readme_block_tool():
    """.ci/readme_block.py, which CI runs the README's install commands and quick start
    through (so what CI runs is what the README says)."""
    path = README.parent / ".ci" / "readme_block.py"
    spec = importlib.util.spec_from_file_location("readme_block", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_finds_the_readme_install_commands_and_quick_start():
    tool = _readme_block_tool()
    text = README.read_text()
    commands = tool.commands(tool.block(text, "Install and run", "bash"))
    assert any(c.startswith('pip install ".[test]"') for c in commands), commands
    assert any(c.startswith("python -m pytest") for c in commands), commands
    # the quick start CI runs is the README's first Python block, the one run above
    assert tool.block(text, "Quick start", "python") == BLOCKS[0]


def test_readme_block_tool_reads_sections_and_joins_continued_lines(tmp_path, capsys):
    tool = _readme_block_tool()
    text = (
        "# T\n\n## A\n\n```python\nprint(1)\n```\n\n### A.1\n\n```bash\n"
        "# a comment\npip install \\\n  x\n\npytest\n```\n\n## B\n\n```bash\nno\n```\n"
    )
    assert tool.block(text, "A", "python") == "print(1)\n"
    assert tool.commands(tool.block(text, "A", "bash")) == ["pip install    x", "pytest"]
    with pytest.raises(LookupError, match="no ```python block under the heading 'B'"):
        tool.block(text, "B", "python")
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert tool.main([str(readme), "A.1", "bash", "--commands"]) == 0
    assert capsys.readouterr().out == "pip install    x\npytest\n"
    assert tool.main([str(readme), "C", "bash"]) == 1
    assert "no heading 'C'" in capsys.readouterr().err


def test_a_readme_block_needing_a_missing_package_is_skipped_naming_it():
    code = "import numpy as np\nfrom no_such_package_here.sub import x\nimport numpy\n"
    assert _missing_imports(code) == ["no_such_package_here"]
    assert _missing_imports(BLOCKS[0]) == []  # the quick start needs only the install
