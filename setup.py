"""Build tensorbridge: csrc/ is compiled with CMake + Ninja into tensorbridge._C.

What happens to the compiled core follows ``TENSORBRIDGE_EXTENSION`` (as at run time):

- ``auto`` (the default): if the build fails (no compiler, a compile error...), the
  package still installs as pure Python, a warning says why, and the reason is recorded
  in the package (``tensorbridge/_build.json``) so that ``tensorbridge.info()`` shows it.
- ``on`` (or the older ``TENSORBRIDGE_REQUIRE_EXTENSION=1``): a failed build fails the
  install.
- ``off``: nothing is compiled; the package is pure Python.

A build never ships a binary it did not just build: the output directory's old modules
are removed before CMake runs, and each configuration (generator, options) builds in
its own directory, so switching generators or options reconfigures from scratch.

Pass extra CMake arguments with CMAKE_ARGS="-DTB_ENABLE_CUDA=OFF ..."; DEBUG=1
builds with debug information; TB_SANITIZE=1 builds with ASan and UBSan. Release builds
pass CMAKE_ARGS="-DTB_TESTING=OFF": no tensorbridge._C_testing, no fault switch in _C.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
VERSION = (ROOT / "python" / "tensorbridge" / "_version.py").read_text().split('"')[1]
BUILD_RECORD = "_build.json"  # read by tensorbridge._backend


def extension_mode() -> str:
    """auto, on or off, from TENSORBRIDGE_EXTENSION (and the older switches)."""
    mode = os.environ.get("TENSORBRIDGE_EXTENSION", "").strip().lower()
    if mode in ("auto", "on", "off"):
        return mode
    if mode:
        raise SystemExit(f"TENSORBRIDGE_EXTENSION={mode!r} is not understood: use auto, on or off.")
    legacy = os.environ.get("TENSORBRIDGE_DISABLE_EXTENSION", "").strip().lower()
    if legacy not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
        # (refused, as import refuses it: a build that guessed would install a package
        # that then fails to import)
        raise SystemExit(
            f"TENSORBRIDGE_DISABLE_EXTENSION={legacy!r} is not understood: set it to 1 or 0, "
            "or use TENSORBRIDGE_EXTENSION=off (or auto) instead."
        )
    disabled = legacy in ("1", "true", "yes", "on")  # (the older spelling of off)
    if os.environ.get("TENSORBRIDGE_REQUIRE_EXTENSION") == "1":
        if disabled:
            raise SystemExit(
                "TENSORBRIDGE_REQUIRE_EXTENSION=1 and TENSORBRIDGE_DISABLE_EXTENSION="
                f"{legacy} contradict each other: set TENSORBRIDGE_EXTENSION=on or off instead."
            )
        return "on"
    return "off" if disabled else "auto"


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


def _warn(message: str) -> None:
    bar = "=" * 78
    print(
        f"\n{bar}\nWARNING (tensorbridge): {message}\n"
        "tensorbridge is installed as pure Python and will use its fallback path;\n"
        "tensorbridge.info()['fallback_reason'] repeats this. Set TENSORBRIDGE_EXTENSION=on\n"
        f"to make this a build error instead.\n{bar}\n",
        file=sys.stderr,
        flush=True,
    )


def _summary(output: str) -> str:
    """The compiler's or CMake's error lines (at most five), else the output's end."""
    lines = output.strip().splitlines()
    errors = [ln.strip() for ln in lines if "error" in ln.lower()]
    return "\n".join(errors[:5] if errors else lines[-5:])


class CMakeBuild(build_ext):
    def run(self) -> None:
        mode = extension_mode()
        self._package_dir().mkdir(parents=True, exist_ok=True)
        self._remove_old_modules()
        if mode == "off":
            self._record(False, "the package was built with TENSORBRIDGE_EXTENSION=off.")
            return
        try:
            super().run()
        except Exception as exc:
            self._remove_old_modules()  # a half-finished build ships nothing
            reason = f"the compiled extension failed to build: {exc}"
            self._record(False, reason)
            if mode == "on":
                raise
            _warn(reason)
            return
        self._record(True, None)

    def build_extensions(self) -> None:
        # One CMake build makes every module; setuptools' parallel mode would check the
        # test-only module's output while that build is still running.
        for ext in self.extensions:
            self.build_extension(ext)

    def _package_dir(self) -> Path:
        return Path(self.get_ext_fullpath("tensorbridge._C")).parent.resolve()

    def _remove_old_modules(self) -> None:
        for old in self._package_dir().glob("_C*.so"):
            old.unlink()
        for old in self._package_dir().glob("_C*.pyd"):
            old.unlink()

    def _record(self, built: bool, reason: str | None) -> None:
        """Writes what happened to the package (tensorbridge/_build.json)."""
        record = {"version": VERSION, "built": built, "reason": reason}
        (self._package_dir() / BUILD_RECORD).write_text(json.dumps(record, indent=1) + "\n")

    def get_outputs(self) -> list[str]:
        outputs = [o for o in super().get_outputs() if Path(o).exists()]
        record = self._package_dir() / BUILD_RECORD
        if record.exists():
            outputs.append(str(record))
        return outputs

    def build_extension(self, ext: CMakeExtension) -> None:
        if ext.name == TESTING_MODULE:
            # A by-product of the one CMake build that makes tensorbridge._C (built first).
            if not Path(self.get_ext_fullpath(ext.name)).exists():
                raise RuntimeError(f"the CMake build did not produce {ext.name}")
            return
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(
                "CMake was not found (pip installs it from the build requirements; with "
                "--no-build-isolation, run: pip install cmake ninja pybind11)"
            )
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError(
                "pybind11 is not installed (pip installs it from the build requirements; "
                "with --no-build-isolation, run: pip install cmake ninja pybind11)"
            ) from exc

        out_dir = self._package_dir()
        build_type = "Debug" if os.environ.get("DEBUG") == "1" else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DTB_VERSION={VERSION}",
        ]
        if os.environ.get("TB_SANITIZE") == "1":
            args.append("-DTB_SANITIZE=ON")
        if shutil.which("ninja"):
            args.append("-GNinja")
        else:
            try:
                import ninja  # the PyPI package ships a binary

                args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja.BIN_DIR}/ninja"]
            except ImportError:
                pass  # CMake's default generator
        args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]

        # One directory per configuration: CMake cannot switch generators (or reliably
        # drop options) in a configured directory, and a stale cache must never decide
        # what is built. The configuration includes what CMake finds once and caches for
        # good: the CUDA compiler (CUDACXX, nvcc on PATH), the architectures (CUDAARCHS),
        # and CMakeLists.txt itself, whose defaults a configured cache would keep.
        cmake_lists = (Path(ext.sourcedir) / "CMakeLists.txt").read_bytes()
        found = [
            os.environ.get("CUDACXX", ""),
            shutil.which("nvcc") or "",
            os.environ.get("CUDAARCHS", ""),
            hashlib.sha256(cmake_lists).hexdigest(),
        ]
        key = hashlib.sha256("\0".join([ext.sourcedir, *args, *found]).encode()).hexdigest()[:12]
        build_temp = Path(self.build_temp) / f"cmake-{key}"
        build_temp.mkdir(parents=True, exist_ok=True)
        jobs = [f"-j{self.parallel}"] if self.parallel else []
        for step in ([cmake, ext.sourcedir, *args], [cmake, "--build", ".", *jobs]):
            proc = subprocess.run(step, cwd=build_temp, capture_output=True, text=True)
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr)
            if proc.returncode != 0:
                what = "configure" if step[1] != "--build" else "build"
                raise RuntimeError(
                    f"CMake {what} failed (exit {proc.returncode}):\n"
                    f"{_summary(proc.stdout + proc.stderr)}"
                )
        if not Path(self.get_ext_fullpath(ext.name)).exists():
            raise RuntimeError(f"the CMake build did not produce {ext.name}")


def testing_build(cmake_args: str) -> bool:
    """Whether CMAKE_ARGS leave TB_TESTING on (its default), read as CMake reads it: the
    last -DTB_TESTING[:BOOL]=value wins, and OFF/0/FALSE/NO/N (any case) mean off."""
    found = re.findall(r"-D\s*TB_TESTING(?::BOOL)?=(\S*)", cmake_args)
    false = ("OFF", "0", "FALSE", "NO", "N", "IGNORE", "NOTFOUND", "")
    return not found or found[-1].upper() not in false


# Development and CI builds also make the test-only module; a release build passes
# CMAKE_ARGS="-DTB_TESTING=OFF" and ships neither it nor the engine's fault switch.
TESTING_MODULE = "tensorbridge._C_testing"
TESTING = testing_build(os.environ.get("CMAKE_ARGS", ""))

setup(
    version=VERSION,
    ext_modules=[
        CMakeExtension("tensorbridge._C", ROOT),
        *([CMakeExtension(TESTING_MODULE, ROOT)] if TESTING else []),
    ],
    cmdclass={"build_ext": CMakeBuild},
)
