"""Build tensorbridge: csrc/ is compiled with CMake + Ninja into tensorbridge._C.

If CMake, a C++ compiler or pybind11 is missing, or the build fails, the package
still installs as pure Python (tensorbridge then uses its fallback path) and a
warning says why. Set TENSORBRIDGE_REQUIRE_EXTENSION=1 to make such a failure fatal.

Pass extra CMake arguments with CMAKE_ARGS="-DTB_ENABLE_CUDA=OFF ..."; DEBUG=1
builds with debug information; TB_SANITIZE=1 builds with ASan and UBSan. Release builds
pass CMAKE_ARGS="-DTB_TESTING=OFF": no tensorbridge._C_testing, no fault switch in _C.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
VERSION = (ROOT / "python" / "tensorbridge" / "_version.py").read_text().split('"')[1]


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


def _warn(message: str) -> None:
    bar = "=" * 78
    print(
        f"\n{bar}\nWARNING (tensorbridge): {message}\n"
        "tensorbridge is installed as pure Python and will use its fallback path.\n"
        f"{bar}\n",
        file=sys.stderr,
        flush=True,
    )


class CMakeBuild(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if os.environ.get("TENSORBRIDGE_REQUIRE_EXTENSION") == "1":
                raise
            _warn(f"the compiled extension could not be built ({exc}).")

    def build_extension(self, ext: CMakeExtension) -> None:
        if ext.name == TESTING_MODULE:
            # A by-product of the one CMake build that makes tensorbridge._C (built first).
            if not Path(self.get_ext_fullpath(ext.name)).exists():
                raise RuntimeError(f"the CMake build did not produce {ext.name}")
            return
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("CMake was not found on PATH")
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("pybind11 is not installed") from exc

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
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

        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
        jobs = [f"-j{self.parallel}"] if self.parallel else []
        subprocess.run([cmake, "--build", ".", *jobs], cwd=build_temp, check=True)


# Development and CI builds also make the test-only module; a release build passes
# CMAKE_ARGS="-DTB_TESTING=OFF" and ships neither it nor the engine's fault switch.
TESTING_MODULE = "tensorbridge._C_testing"
TESTING = "-DTB_TESTING=OFF" not in os.environ.get("CMAKE_ARGS", "").split()

setup(
    version=VERSION,
    ext_modules=[
        CMakeExtension("tensorbridge._C", ROOT),
        *([CMakeExtension(TESTING_MODULE, ROOT)] if TESTING else []),
    ],
    cmdclass={"build_ext": CMakeBuild},
)
