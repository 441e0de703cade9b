"""The examples run and say what they claim."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scipy_solver_example_matches_finite_differences():
    pytest.importorskip("scipy")
    pytest.importorskip("sklearn")
    implicit, finite_differences = load("scipy_solver").main()
    assert implicit == pytest.approx(finite_differences, rel=1e-5)
