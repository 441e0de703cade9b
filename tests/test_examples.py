"""The tutorials in examples/ run and say what they claim.

The documentation build executes every example as well (sphinx-gallery); these
tests check the numbers each one prints its claims about.
"""

import ast
import pathlib
import runpy
import warnings

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run(name: str) -> dict:
    """Execute examples/<name>.py as a script and return its globals."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    dtype = torch.get_default_dtype()
    try:
        with warnings.catch_warnings():
            # the examples run as a user would, outside the suite's strict warning filter
            warnings.simplefilter("default")
            return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    finally:
        plt.close("all")
        torch.set_default_dtype(dtype)


def test_every_example_is_a_gallery_tutorial():
    """The docs build runs every example through sphinx-gallery, which needs a
    module docstring that opens with a title (a line underlined with ``=``)."""
    for path in sorted(EXAMPLES.glob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text()), clean=True) or ""
        lines = docstring.splitlines()
        assert len(lines) >= 2 and lines[0].strip(), f"{path.name}: the module docstring must open with a title"
        underline = lines[1].strip()
        assert set(underline) == {"="} and len(underline) >= len(lines[0].strip()), (
            f"{path.name}: the docstring's first line is the title, underlined with '=' on the second line"
        )
        assert "# %%" in path.read_text(), f"{path.name}: text and code cells ('# %%' blocks)"


def test_five_minutes():
    ns = run("plot_five_minutes")
    assert ns["relative_error"](ns["g"]) < 1e-12
    assert ns["info"].ok
    assert ns["relative_error"](ns["g_rough"]) > 1e-2 and ns["caught"], "the rough solution must warn"
    assert ns["relative_error"](ns["g_root"]) < 1e-6
    assert ns["implicit"] == pytest.approx(ns["finite_difference"], rel=1e-7)


def test_scipy_solver_example_matches_finite_differences():
    pytest.importorskip("scipy")
    pytest.importorskip("sklearn")
    ns = run("scipy_solver")
    assert ns["implicit_derivative"] == pytest.approx(ns["fd_derivative"], rel=1e-5)
    assert ns["fit"].last_info.ok


def test_cg_neumann_unrolled():
    ns = run("plot_cg_neumann_unrolled")
    final = {name: rows[-1][1] for name, rows in ns["results"].items()}
    assert final["CG"] < 1e-10
    assert final["Neumann"] < 0.2 and final["unrolled"] < 1e-3
    # CG at the same budget is more accurate than Neumann
    for (k, cg_error, *_), (_, neumann_error, *_) in zip(ns["results"]["CG"], ns["results"]["Neumann"]):
        assert cg_error <= neumann_error, k


@pytest.mark.slow
def test_hyper_cleaning():
    pytest.importorskip("sklearn")
    ns = run("plot_hyper_cleaning")
    accuracy = ns["data"]["accuracy"]
    assert accuracy(ns["unweighted"]) < 0.7
    for result in ns["results"].values():
        assert accuracy(result.y) > 0.85
