"""Build the optional compiled core of runicorn.

Every ``csrc/<name>.pyx`` becomes the extension module ``runicorn.core.<name>``, the
compiled twin of a pure-Python module in ``src/runicorn/core/``.

Environment switches:

* ``RUNICORN_PURE_PYTHON=1`` -- build no extension at all (no compiler needed).
* ``RUNICORN_REQUIRE_NATIVE=1`` -- a failed compile fails the install (CI uses this), instead
  of the default loud fallback to the pure-Python build.

The build always says which kind it produced: "Accelerated build" or "Pure Python build".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent.resolve()
PURE = os.environ.get("RUNICORN_PURE_PYTHON", "") not in ("", "0")
REQUIRE_NATIVE = os.environ.get("RUNICORN_REQUIRE_NATIVE", "") not in ("", "0")


def _say(message: str) -> None:
    print(f"*** runicorn: {message}", file=sys.stderr, flush=True)


def _extensions() -> list:
    if PURE:
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRE_NATIVE:
            raise
        _say("Cython is not installed; falling back to the pure-Python build")
        return []
    from setuptools import Extension

    modules = [
        Extension(
            f"runicorn.core.{pyx.stem}",
            [str(pyx.relative_to(HERE))],
            extra_compile_args=["-O3"] if os.name == "posix" else [],
        )
        for pyx in sorted((HERE / "csrc").glob("*.pyx"))
    ]
    return cythonize(
        modules,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        quiet=True,
    )


class OptionalBuildExt(build_ext):
    """Compile the extensions; fall back loudly to pure Python unless native is required."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing or broken
            self._fallback(exc)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._fallback(exc)

    def _fallback(self, exc: Exception) -> None:
        if REQUIRE_NATIVE:
            _say(f"compiling the native core failed and RUNICORN_REQUIRE_NATIVE is set: {exc}")
            raise exc
        _say(f"compiling the native core failed ({exc}); Pure Python build")
        self.extensions = []


EXTENSIONS = _extensions()
_say("Accelerated build" if EXTENSIONS else "Pure Python build")

setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": OptionalBuildExt})
