"""The one switch (TENSORBRIDGE_EXTENSION=auto|on|off), what a failed build leaves behind,
`python -m tensorbridge info --check`, and `pip install .` on a machine without CMake or
Ninja.

Each case runs in a fresh interpreter: the switch is read once, at import. A copy of the
package without its compiled modules stands for an install whose build failed.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import tensorbridge as tb
from tensorbridge import _backend

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(tb.__file__).resolve().parent
ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in (_backend.DISABLE_ENV, _backend.MODE_ENV, "PYTHONPATH", "CMAKE_ARGS")
}


def run(args: list[str], path: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Runs python with `args`, importing tensorbridge from `path` (default: this one)."""
    pythonpath = str(path if path is not None else PACKAGE.parent)
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": pythonpath, **env},
        timeout=300,
        check=False,
    )


INFO = "import json, tensorbridge as tb; print(json.dumps(tb.info()))"


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    """A copy of the package with no compiled modules and no build record."""
    shutil.copytree(
        PACKAGE,
        tmp_path / "tensorbridge",
        ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__", "_build.json"),
    )
    return tmp_path


@pytest.mark.parametrize(
    ("variable", "value"),
    [("TENSORBRIDGE_EXTENSION", "off"), ("TENSORBRIDGE_DISABLE_EXTENSION", "1")],
    ids=["off", "the-older-disable-switch"],
)
def test_off_is_the_pure_python_path_and_silent(variable, value):
    proc = run(["-W", "error", "-c", INFO], **{variable: value})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["extension"] is False and info["extension_mode"] == "off"
    assert f"{variable}={value}" in info["fallback_reason"]
    assert proc.stderr == ""


def test_an_unknown_switch_value_names_the_valid_ones():
    proc = run(["-c", "import tensorbridge"], TENSORBRIDGE_EXTENSION="fast")
    assert proc.returncode != 0
    assert "TENSORBRIDGE_EXTENSION='fast' is not understood" in proc.stderr
    assert "auto (the default), on or off" in proc.stderr


def test_auto_without_the_extension_warns_once_and_says_why(bare):
    code = (
        "import warnings, json\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import tensorbridge as tb\n"
        "    import tensorbridge._backend\n"
        "print(json.dumps([str(x.category.__name__) for x in w]))\n"
        "print(json.dumps(tb.info()))\n"
    )
    proc = run(["-c", code], bare)
    assert proc.returncode == 0, proc.stderr
    warned, info = (json.loads(line) for line in proc.stdout.splitlines())
    assert warned == ["FallbackWarning"]
    assert info["extension"] is False and info["extension_mode"] == "auto"
    assert "tensorbridge._C is not installed" in info["fallback_reason"]
    # the pure-Python path works
    proc = run(
        ["-W", "ignore", "-c", "import tensorbridge as tb, torch; tb.to_numpy(torch.ones(2))"], bare
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("folder", ["", "tensorbridge_tools"])  # (a name it begins)
@pytest.mark.parametrize("statement", ["import tensorbridge", "from tensorbridge import ray"])
def test_the_fallback_warning_points_at_the_import_and_reads_as_sentences(bare, statement, folder):
    """It pointed at tensorbridge's own _backend.py (so a filter by module could not
    catch it), and a broken module's loader error ran into the next sentence."""
    (bare / "tensorbridge" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_text("junk")
    (bare / folder).mkdir(exist_ok=True)
    script = bare / folder / "user_script.py"
    script.write_text(f"import warnings\nwarnings.simplefilter('always')\n{statement}\n")
    proc = run([str(script)], bare)
    warning = next(line for line in proc.stderr.splitlines() if "FallbackWarning" in line)
    assert warning.startswith(f"{script}:3: FallbackWarning: tensorbridge uses its pure-Python")
    assert re.search(r"failed to load: .*\. Set TENSORBRIDGE_EXTENSION=off to silence", warning)


def test_on_without_the_extension_refuses_to_import(bare):
    proc = run(["-c", "import tensorbridge"], bare, TENSORBRIDGE_EXTENSION="on")
    assert proc.returncode != 0
    assert "ImportError: TENSORBRIDGE_EXTENSION=on, but the compiled core cannot be used" in (
        proc.stderr
    )
    assert "TENSORBRIDGE_EXTENSION=auto" in proc.stderr  # the way out


def test_the_recorded_build_failure_is_the_reason_given(bare):
    reason = (
        "the compiled extension failed to build: CMake build failed (exit 1): x.cpp: error: boom"
    )
    record = {"version": tb.__version__, "built": False, "reason": reason}
    (bare / "tensorbridge" / "_build.json").write_text(json.dumps(record))
    proc = run(["-W", "ignore", "-c", INFO], bare)
    assert proc.returncode == 0, proc.stderr
    assert reason in json.loads(proc.stdout)["fallback_reason"]
    proc = run(["-c", "import tensorbridge"], bare, TENSORBRIDGE_EXTENSION="on")
    assert proc.returncode != 0 and "error: boom" in proc.stderr


def test_info_check_exits_nonzero_on_the_fallback_path(bare):
    proc = run(["-W", "ignore", "-m", "tensorbridge", "info", "--check"], bare)
    assert proc.returncode == 1
    assert "the compiled core is not in use" in proc.stderr
    proc = run(["-m", "tensorbridge", "info", "--check"], TENSORBRIDGE_EXTENSION="off")
    assert proc.returncode == 1
    proc = run(["-m", "tensorbridge", "info", "--bogus"])
    assert proc.returncode == 2 and "unknown option" in proc.stderr


@pytest.mark.skipif(_backend._LOADED is None, reason="needs the compiled extension")
def test_info_check_passes_with_the_extension_and_on_imports():
    proc = run(["-m", "tensorbridge", "info", "--check", "--json"], TENSORBRIDGE_EXTENSION="on")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["extension"] is True


def test_the_typed_usage_file_runs():
    """tests/typing/usage.py (checked by mypy --strict in CI) is also correct at run time."""
    proc = run(["-W", "error", str(ROOT / "tests" / "typing" / "usage.py")])
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- the build


def _has_build_tools() -> bool:
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return False
    return shutil.which("cmake") is not None


def _source_tree(dst: Path) -> Path:
    """A copy of what a source distribution holds, without build outputs."""
    dst.mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "csrc", dst / "csrc")
    shutil.copytree(
        ROOT / "python",
        dst / "python",
        ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "_build.json"),
    )
    return dst


# What pyproject.toml's [build-system] requires brings, with the names CMake and Ninja
# install as commands.
BUILD_TOOLS = frozenset({"cmake", "ctest", "cpack", "ccmake", "cmake-gui", "ninja"})


def _path_without(tools: frozenset[str], bin_dir: Path) -> str:
    """A PATH of one directory holding a link to every command on this PATH but `tools`
    (the first of each name, as PATH finds it): the compiler, linker and shell stay."""
    bin_dir.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            target = os.path.join(directory, name)
            link = bin_dir / name
            if name in tools or link.exists() or link.is_symlink():
                continue
            if os.path.isfile(target) and os.access(target, os.X_OK):
                link.symlink_to(target)
    return str(bin_dir)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="needs a C++ compiler")
def test_pip_install_builds_the_extension_with_no_cmake_or_ninja_on_path(tmp_path):
    """`pip install .` (build isolation on, as by default) gets CMake and Ninja from the
    build requirements in pyproject.toml: with neither on PATH it builds the compiled
    core, and a fresh interpreter importing the install uses it.

    Needs the package index pip is configured with (the build requirements are fetched
    into an isolated environment, as on a user's machine)."""
    path = _path_without(BUILD_TOOLS, tmp_path / "bin")
    for tool in ("cmake", "ninja"):
        assert shutil.which(tool, path=path) is None, f"{tool} is still on the PATH"
    src = _source_tree(tmp_path / "src")
    site = tmp_path / "site"
    proc = subprocess.run(
        # --no-deps: numpy and torch are taken from this interpreter, not installed again
        [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--target", str(site), "."],
        cwd=src,
        capture_output=True,
        text=True,
        # on: a build that fails is an install that fails, not a pure-Python install
        env={**ENV, "PATH": path, _backend.MODE_ENV: "on"},
        timeout=1800,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    # the isolated build environment got both from the package index...
    installed = " ".join(re.findall(r"^\s*Successfully installed (.*)$", log, flags=re.M))
    assert re.search(r"\bcmake-\d", installed), log[-5000:]
    assert re.search(r"\bninja-\d", installed), log[-5000:]
    # ...and built with them: Ninja numbers its steps [n/m], Make prints percentages
    assert re.search(r"^\s*\[\d+/\d+\] Linking CXX shared module", log, flags=re.M), log[-5000:]

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, tensorbridge as tb; print(json.dumps([tb.__file__, tb.info()]))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": str(site), _backend.MODE_ENV: "on"},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, info = json.loads(proc.stdout)
    assert Path(module).is_relative_to(site), module  # the install, not this checkout
    assert info["extension"] is True, info["fallback_reason"]
    assert Path(info["extension_path"]).is_relative_to(site)


@pytest.mark.slow
@pytest.mark.skipif(not _has_build_tools(), reason="needs cmake and pybind11 (the dev extra)")
def test_a_broken_build_never_ships_the_previous_binary(tmp_path):
    """A compile error leaves no compiled module behind (a stale one from an earlier build
    is removed), records why for info(), and fails the build with the switch on."""
    src = _source_tree(tmp_path / "src")
    bindings = src / "csrc" / "bindings.cpp"
    bindings.write_text("#error tensorbridge-broken-build\n" + bindings.read_text())
    lib = tmp_path / "lib"
    stale = lib / "tensorbridge" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an old binary")
    build = [
        "setup.py",
        "build_ext",
        f"--build-lib={lib}",
        f"--build-temp={tmp_path / 'tmp'}",
    ]
    env = {"CMAKE_ARGS": "-DTB_ENABLE_CUDA=OFF -DTB_TESTING=OFF", "PYTHONPATH": ""}

    proc = subprocess.run(
        [sys.executable, *build],
        cwd=src,
        capture_output=True,
        text=True,
        env={**ENV, **env},
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # auto: installs as pure Python...
    assert "WARNING (tensorbridge)" in proc.stderr  # ...and says so
    assert not stale.exists(), "the previous binary survived a failed build"
    assert not list((lib / "tensorbridge").glob("_C*"))
    record = json.loads((lib / "tensorbridge" / "_build.json").read_text())
    assert record["built"] is False and "tensorbridge-broken-build" in record["reason"]

    proc = subprocess.run(
        [sys.executable, *build],
        cwd=src,
        capture_output=True,
        text=True,
        env={**ENV, **env, "TENSORBRIDGE_EXTENSION": "on"},
        timeout=600,
        check=False,
    )
    assert proc.returncode != 0
    assert "tensorbridge-broken-build" in proc.stderr


def test_version_and_info_help():
    proc = run(["-m", "tensorbridge", "--version"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"tensorbridge {tb.__version__} (")
    proc = run(["-m", "tensorbridge", "info", "--help"])
    assert proc.returncode == 0 and "--check" in proc.stdout and "--json" in proc.stdout


def _setup_function(name: str):
    """One function of setup.py, without running setup() (which importing it would)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict = {"re": re, "os": os}
    exec(compile(ast.Module([node], []), "setup.py", "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize(
    ("cmake_args", "testing"),
    [
        ("", True),
        ("-DTB_ENABLE_CUDA=OFF", True),
        ("-DTB_TESTING=OFF", False),
        ("-DTB_TESTING=0", False),
        ("-D TB_TESTING=off", False),
        ("-DTB_TESTING:BOOL=FALSE", False),
        ("-DTB_TESTING=OFF -DTB_TESTING=ON", True),
        ("-DTB_TESTING=ON -DTB_TESTING=no", False),
    ],
)
def test_setup_reads_tb_testing_as_cmake_does(cmake_args, testing):
    """setup.py expects the test-only module exactly when CMake builds it (a mismatch
    used to throw away a good build as failed)."""
    assert _setup_function("testing_build")(cmake_args) is testing


@pytest.mark.parametrize(
    "record",
    [
        "[" * 100_000,  # deep enough to make the JSON decoder recurse out
        json.dumps({"version": "0.0.1", "built": False, "reason": "a failure from last month"}),
        json.dumps({"built": "no", "reason": 3}),
    ],
    ids=["corrupt", "another-version", "wrong-types"],
)
def test_a_stale_or_corrupt_build_record_is_ignored(bare, record):
    (bare / "tensorbridge" / "_build.json").write_text(record)
    proc = run(["-W", "ignore", "-c", INFO], bare)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reason = json.loads(proc.stdout)["fallback_reason"]
    assert "tensorbridge._C is not installed" in reason and "last month" not in reason


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"TENSORBRIDGE_EXTENSION": "on"},
        {"TENSORBRIDGE_EXTENSION": " Off "},
        {"TENSORBRIDGE_EXTENSION": "maybe"},
        {"TENSORBRIDGE_DISABLE_EXTENSION": "1"},
        {"TENSORBRIDGE_DISABLE_EXTENSION": "no"},
        {"TENSORBRIDGE_DISABLE_EXTENSION": "maybe"},
        {"TENSORBRIDGE_EXTENSION": "auto", "TENSORBRIDGE_DISABLE_EXTENSION": "1"},
        {"TENSORBRIDGE_REQUIRE_EXTENSION": "1", "TENSORBRIDGE_DISABLE_EXTENSION": "maybe"},
        {"TENSORBRIDGE_REQUIRE_EXTENSION": "1", "TENSORBRIDGE_DISABLE_EXTENSION": "1"},
        {"TENSORBRIDGE_REQUIRE_EXTENSION": "1"},
    ],
)
def test_setup_reads_the_switch_as_import_does(monkeypatch, env):
    """The build and the import read TENSORBRIDGE_EXTENSION (and its older spelling) alike:
    a value one refuses, the other refuses too (a build that guessed installed a package
    whose import then failed)."""
    for name in (_backend.MODE_ENV, _backend.DISABLE_ENV, "TENSORBRIDGE_REQUIRE_EXTENSION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from_setup = _setup_function("extension_mode")
    try:
        at_import = _backend.extension_mode()
    except ValueError:
        with pytest.raises(SystemExit, match="is not understood"):
            from_setup()
        return
    if env.get("TENSORBRIDGE_REQUIRE_EXTENSION") != "1":
        assert from_setup() == at_import
    elif at_import == "off":  # (a build required, an import that would not use it)
        with pytest.raises(SystemExit, match="contradict each other"):
            from_setup()
    else:  # (a build-time switch only: the import then finds the core built)
        assert from_setup() == "on" and at_import == "auto"
