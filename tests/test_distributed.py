"""bilevel.distributed: 2 gloo processes on CPU give what one process gives on the
concatenated batches (float64, tight tolerance).

The ranks run once for the whole module (``tests/_distributed_worker.py`` under
``torch.distributed.run``, a few seconds); each test compares one scenario with
the same code run here, in one process, on the full batches.
"""

import os
import signal
import subprocess
import sys

import _distributed_worker as worker
import pytest
import torch
import torch.distributed as dist

import bilevel
from bilevel.distributed import data_parallel, is_replicated, shard

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

HERE = os.path.dirname(os.path.abspath(__file__))
RTOL, ATOL = 1e-10, 1e-12


def _identity(f, **_):
    return f


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of every scenario on each of the 2 ranks."""
    out = tmp_path_factory.mktemp("ranks")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "_distributed_worker.py"), str(out)]
    # a session of its own, so that on a timeout the launcher and both ranks are stopped together
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_tree_close(actual, expected, rtol=RTOL, atol=ATOL):
    a, spec_a = torch.utils._pytree.tree_flatten(actual)
    e, spec_e = torch.utils._pytree.tree_flatten(expected)
    assert spec_a == spec_e
    for x, y in zip(a, e):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def test_two_ranks_ran_and_hold_identical_bits(ranks):
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["replicated"] is True and ranks[1]["replicated"] is True
    # is_replicated compared bits; check the saved results directly as well
    for name in worker.SCENARIOS:
        a = torch.utils._pytree.tree_leaves(ranks[0][name])
        b = torch.utils._pytree.tree_leaves(ranks[1][name])
        assert all(torch.equal(x, y) for x, y in zip(a, b)), name


def test_hypergradient_equals_one_process_on_the_concatenated_batch(ranks):
    expected = worker.hypergradients(_identity, lambda b: b)
    assert set(ranks[0]["hypergrad"]) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(ranks[0]["hypergrad"][key], value, rtol=RTOL, atol=ATOL, msg=key)
    # the data actually differs between the ranks: each rank's own hypergradient is not the answer
    full = worker.problem_data(d=10)
    half = {k: (X[:16], t[:16]) for k, (X, t) in full.items()}
    x = torch.linspace(-1.0, 0.5, 10)
    y = worker._inner_solution(x, full, 10)
    with pytest.warns(bilevel.OptimalityWarning):  # y solves the full problem, not rank 0's half
        local = bilevel.hypergrad(lambda a, b: worker.outer(a, b, half), lambda a, b: worker.inner(a, b, half), x, y)
    assert (local - expected["default d=10"]).abs().max() > 1e-3


def test_every_method_iterates_equal_one_process(ranks):
    expected = worker.solve_runs(_identity, lambda b: b)
    assert set(ranks[0]["solve"]) == set(worker.METHODS)
    for method in worker.METHODS:
        got = ranks[0]["solve"][method]
        _assert_tree_close(got, expected[method])
        # and the run moved: the comparison is not between two start points
        assert (got["x"] + 1.0).abs().max() > 1e-3, method


def test_hpo_tuner_equals_one_process(ranks):
    expected = worker.tuner_run(_identity, lambda b: b)
    _assert_tree_close(ranks[0]["tuner"], expected)
    assert abs(float(expected["decay"]) - 0.05) > 1e-6  # the hyper-parameter moved


def test_without_a_process_group_the_wrapper_refuses():
    assert not dist.is_initialized()
    for call in (lambda: data_parallel(worker.inner), lambda: shard(torch.zeros(4)),
                 lambda: is_replicated(torch.zeros(2))):
        with pytest.raises(RuntimeError, match="no torch.distributed process group is initialized"):
            call()


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="`fn` must be callable"):
        data_parallel(3)
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        data_parallel(worker.inner, reduction="avg")
    with pytest.raises(ValueError, match="`local_argnums`"):
        data_parallel(worker.inner, local_argnums=(-1,))
