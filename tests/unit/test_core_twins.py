"""The compiled core is a twin of the pure-Python specification: same public names,
signatures and docstrings, and it really is the compiled code that runs when it was built."""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import os
import platform
import types
from pathlib import Path

import pytest

from runicorn.core import backend as backend_module
from runicorn.core.backend import FUNCTIONS, MODULES, NATIVE, PYTHON, active_backend

CONCEPTS = sorted(MODULES)


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _pure(concept: str) -> types.ModuleType:
    return importlib.import_module(MODULES[concept][0])


def _native(concept: str) -> types.ModuleType:
    return importlib.import_module(MODULES[concept][1])


@pytest.fixture(params=CONCEPTS)
def twins(request: pytest.FixtureRequest) -> tuple[types.ModuleType, ...]:
    """(pure module, compiled module) of one concept; skipped where only Python is tested."""
    if request.config.getoption("--no-native") or _flag("RUNICORN_PURE_PYTHON"):
        pytest.skip("the compiled core is deselected")
    return _pure(request.param), _native(request.param)


def _public_names(module: types.ModuleType) -> list[str]:
    """What a caller may use: public attributes defined by (or constants of) the module."""
    names = []
    for name, value in vars(module).items():
        if name.startswith("_") or name == "annotations" or isinstance(value, types.ModuleType):
            continue
        if isinstance(value, types.GenericAlias):
            names.append(name)  # a documented record type such as FileStat
            continue
        defined_in = getattr(value, "__module__", module.__name__)
        if (inspect.isclass(value) or callable(value)) and defined_in != module.__name__:
            continue  # imported helpers (NamedTuple, ThreadPoolExecutor, is_hidden, ...)
        names.append(name)
    return sorted(names)


def _public_functions(module: types.ModuleType) -> list[str]:
    return [name for name in _public_names(module) if inspect.isfunction(getattr(module, name))]


def test_compiled_module_offers_every_public_name_of_its_twin(twins):
    pure, native = twins
    missing = [name for name in _public_names(pure) if not hasattr(native, name)]
    assert missing == []


def test_compiled_module_shares_the_constants_and_types_of_its_twin(twins):
    pure, native = twins
    for name in _public_names(pure):
        if not inspect.isfunction(getattr(pure, name)):
            assert getattr(native, name) is getattr(pure, name), name


def test_compiled_functions_have_the_signatures_of_their_twins(twins):
    pure, native = twins
    for name in _public_functions(pure):
        assert str(inspect.signature(getattr(native, name))) == str(
            inspect.signature(getattr(pure, name))
        ), name


def test_compiled_functions_have_the_docstrings_of_their_twins(twins):
    pure, native = twins
    for name in _public_functions(pure):
        assert getattr(native, name).__doc__ == getattr(pure, name).__doc__, name
        assert getattr(pure, name).__doc__, f"{name} of the specification has no docstring"


def test_backend_functions_are_covered_by_the_twin_checks(twins):
    pure, _native_module = twins
    concept = next(c for c, (p, _) in MODULES.items() if p == pure.__name__)
    assert set(FUNCTIONS[concept]) <= set(_public_functions(pure))


def test_compiled_modules_explain_themselves(twins):
    _pure_module, native = twins
    assert native.__doc__ and "twin" in native.__doc__


def _compiled_artifacts() -> list[Path]:
    package_dir = Path(backend_module.__file__).parent
    return [
        path
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        for path in package_dir.glob(f"_native_*{suffix}")
    ]


def test_compiled_core_loaded_when_the_build_was_native():
    """Like yarl's test_quoting_c_loaded: a broken build must not pass by testing Python twice."""
    if _flag("RUNICORN_PURE_PYTHON"):
        pytest.skip("RUNICORN_PURE_PYTHON forces the pure-Python backend")
    if platform.python_implementation() != "CPython":
        pytest.skip("the compiled core is built for CPython only")
    if not (_flag("RUNICORN_REQUIRE_NATIVE") or _compiled_artifacts()):
        pytest.skip("pure-Python build: no compiled core was built or required")
    for concept in CONCEPTS:
        module = _native(concept)
        assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert active_backend().name == NATIVE


def test_native_backend_runs_compiled_functions(backend):
    compiled = backend.name == NATIVE
    for concept, names in FUNCTIONS.items():
        for name in names:
            function = getattr(backend, name)
            assert inspect.isfunction(function) is not compiled, (concept, name)
    assert backend.name in (NATIVE, PYTHON)
