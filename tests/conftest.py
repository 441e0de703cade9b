"""Settings of this project's own tests.

Tests written elsewhere against the public API (acceptance tests dropped into this
folder) see the library as users do: torch's default dtype and warnings shown as
warnings.  The project's own test files, listed here, run in float64 from a fixed
seed and turn every ``BilevelWarning`` they do not expect into an error (a test
that expects one uses ``pytest.warns``).  Add new test files to the list.
"""

import pytest
import torch

OWN_TEST_FILES = frozenset({
    "test_acceptance_jaxopt.py",
    "test_acceptance_layers.py",
    "test_acceptance_torch_peers.py",
    "test_api.py",
    "test_benchmarks_gpu.py",
    "test_benchmarks_layers.py",
    "test_benchmarks_single_loop.py",
    "test_conditions.py",
    "test_hyper_curvature.py",
    "test_lanczos.py",
    "test_distributed.py",
    "test_docstrings.py",
    "test_example_moe.py",
    "test_example_tutorials.py",
    "test_examples.py",
    "test_host_syncs.py",
    "test_hpo_errors.py",
    "test_hpo_examples.py",
    "test_hpo_hypergrad.py",
    "test_hpo_hypernetwork.py",
    "test_hpo_resume.py",
    "test_hypergrad.py",
    "test_implicit_failures.py",
    "test_layers_argmin.py",
    "test_layers_convex.py",
    "test_layers_convex_cones.py",
    "test_layers_moe.py",
    "test_layers_qp.py",
    "test_linear_solve.py",
    "test_linear_solve_complex.py",
    "test_main.py",
    "test_memory.py",
    "test_operators.py",
    "test_problems.py",
    "test_projections.py",
    "test_projections_pytree.py",
    "test_readme.py",
    "test_root.py",
    "test_single_loop.py",
    "test_single_loop_y_set.py",
    "test_solvers.py",
    "test_solvers_batched.py",
})


def _own(node) -> bool:
    return node.path.name in OWN_TEST_FILES


def pytest_collection_modifyitems(items):
    for item in items:
        if _own(item):
            item.add_marker(pytest.mark.filterwarnings("error::bilevel.status.BilevelWarning"))


@pytest.fixture(autouse=True)
def float64_default(request):
    """The project's tests run in float64 and from a fixed seed unless they ask otherwise."""
    if not _own(request.node):
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)
