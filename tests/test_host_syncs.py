"""Host synchronizations of the hot paths (issue 8, GPU speed), counted on the CPU.

``_host_syncs.count_host_syncs`` counts every operation that would make the
host wait for an accelerator.  The library reads convergence flags every step
on the CPU (free there) and every 8 steps on accelerators (``_sync_every``);
``simulate_accelerator`` makes the CPU take the accelerator path, so the
counts below are those of a GPU run.  Each test also checks that the
accelerator path computes exactly what the CPU path computes.
"""

import math
import warnings

import pytest
import torch
from _host_syncs import count_host_syncs, simulate_accelerator

import bilevel
from bilevel.algorithms import METHODS
from bilevel.implicit import CG, GMRES, MINRES, BiCGStab, Neumann
from bilevel.layers import QPStatus, qp_solve
from bilevel.problems import coupled_constraint, nonunique_lower_level, quadratic
from bilevel.solvers import OptimizerLoop
from bilevel.status import StepSizeWarning

EVERY = 8


@pytest.fixture
def accelerator(monkeypatch):
    """The accelerator policy (look every 8 steps) on the CPU."""
    assert simulate_accelerator(monkeypatch, EVERY) >= 5  # the solvers, the QP, the algorithms, the driver


# -- the counter itself -------------------------------------------------------------------
READS = {
    "item": lambda x: x.sum().item(),
    "float": lambda x: float(x.sum()),
    "int": lambda x: int(x[0]),
    "bool": lambda x: bool((x > 0).any()),
    "format": lambda x: f"{x.sum():.3g}",
    "math.isfinite": lambda x: math.isfinite(x.sum()),
    "__index__": lambda x: [1, 2, 3][torch.tensor(1)],
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "equal": lambda x: torch.equal(x, x + 0),
    "allclose": lambda x: torch.allclose(x, x),
    "nonzero": lambda x: x.nonzero(),
    "where(cond)": lambda x: torch.where(x > 0),
    "mask index": lambda x: x[x > 0],
    "mask assign": lambda x: x.clone().__setitem__(x > 0, 0.0),
    "masked_select": lambda x: torch.masked_select(x, x > 0),
    "unique": lambda x: torch.unique(x),
    "repeat_interleave": lambda x: torch.repeat_interleave(torch.tensor([1, 2])),
    "cholesky": lambda x: torch.linalg.cholesky(torch.eye(3)),
    "solve": lambda x: torch.linalg.solve(torch.eye(3), x[:3]),
    "svd": lambda x: torch.linalg.matrix_norm(torch.eye(3), 2),
}
FREE = {
    "arithmetic": lambda x: (x * 2 + 1).exp().sum(),
    "any": lambda x: (x > 0).any(),
    "where(c, a, b)": lambda x: torch.where(x > 0, x, 0.0),
    "nonzero_static": lambda x: torch.nonzero_static(x, size=2),
    "int index": lambda x: x[torch.tensor([0, 2])],
    "cholesky_ex": lambda x: torch.linalg.cholesky_ex(torch.eye(3)),
    "lu_factor_ex": lambda x: torch.linalg.lu_factor_ex(torch.eye(3)),
    ".cpu() on the CPU": lambda x: x.cpu().to("cpu"),
    "shape": lambda x: x.shape[0] + x.numel(),
}


@pytest.mark.parametrize("name", sorted(READS))
def test_counter_sees_each_kind_of_host_read(name):
    x = torch.tensor([1.0, -2.0, 3.0, 4.0])
    with count_host_syncs() as syncs:
        READS[name](x)
    assert syncs.count == 1, syncs.report()
    assert "test_host_syncs.py" in next(iter(syncs.sites))


@pytest.mark.parametrize("name", sorted(FREE))
def test_counter_ignores_device_side_work(name):
    with count_host_syncs() as syncs:
        FREE[name](torch.tensor([1.0, -2.0, 3.0, 4.0]))
    assert syncs.count == 0, syncs.report()


def test_counter_sees_copies_between_devices():
    """Copies to and from another device, here the data-less meta device (the copy
    out fails there, after the counter saw it)."""
    x, m = torch.ones(3), torch.ones(3, device="meta")
    with count_host_syncs() as syncs:
        x.to("meta")
        for read in (m.cpu, lambda: m.to("cpu"), m.tolist):
            with pytest.raises(NotImplementedError):
                read()
    assert syncs.count == 4, syncs.report()  # tolist once, not once more for its copy


def test_counter_works_under_autograd_and_torch_func():
    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g * float(g.sum())

    x = torch.tensor([1.0, 2.0])
    with count_host_syncs() as syncs:
        torch.func.grad(lambda v: (v ** 2).sum() * float(v.detach().sum()))(x)  # one read under grad
        torch.func.vmap(lambda v: torch.where(v > 1, v, 0.0).sum())(x.reshape(2, 1))  # none under vmap
        ReadsInBackward.apply(x.clone().requires_grad_()).sum().backward()  # one in a backward pass
        torch.func.grad(lambda v: ReadsInBackward.apply(v).sum())(x)  # one in a backward under grad
    assert syncs.count == 3, syncs.report()
    assert list(syncs.ops) == ["aten._local_scalar_dense"]


def test_counter_ignores_torch_optim_host_step_counter():
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([p], lr=0.1)
    with count_host_syncs() as syncs:
        for _ in range(3):
            p.grad = torch.ones(3)
            optimizer.step()
    assert syncs.count == 0, syncs.report()


def test_batched_cg_on_the_cpu_reads_every_iteration():
    """Without the accelerator policy the batched loop looks every step: the
    counter sees it (what the bounds below would catch on an accelerator)."""
    matvec, b = _spd_batch()
    with count_host_syncs() as syncs:
        _, info = CG(maxiter=200, tol=1e-10)(matvec, b, batch_dims=1)
    assert syncs.count >= int(info.iterations.max())


# -- (i) batched Krylov solves ----------------------------------------------------------------
def _spd_batch(B=4, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, n, n, generator=g)
    A = M @ M.mT / n + 0.5 * torch.eye(n)
    return (lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)), torch.randn(B, n, generator=g)


@pytest.mark.parametrize("solver", [
    CG(maxiter=200, tol=1e-10), GMRES(maxiter=200, tol=1e-10, restart=20), BiCGStab(maxiter=200, tol=1e-10),
    MINRES(maxiter=200, tol=1e-10), Neumann(terms=40, alpha=0.3),
], ids=lambda s: type(s).__name__)
def test_batched_krylov_solves_read_every_eighth_iteration(accelerator, solver):
    matvec, b = _spd_batch()
    with count_host_syncs() as syncs:
        _, info = solver(matvec, b, batch_dims=1)
    iterations = int(info.iterations.max())
    assert iterations >= 20
    assert syncs.count <= iterations / EVERY + 4, syncs.report()


# -- (ii) the batched QP layer ------------------------------------------------------------------
def _qp_batch(B=5, n=6, m=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, n, n, generator=g)
    Q = L @ L.mT + torch.eye(n)
    q = torch.randn(B, n, generator=g)
    G = torch.randn(B, m, n, generator=g)
    return Q, q, G, torch.rand(B, m, generator=g) + 0.1


def _qp_run(Q, q, G, h, **options):
    q = q.clone().requires_grad_()
    with count_host_syncs() as forward:
        z, info = qp_solve(Q, q, G=G, h=h, return_info=True, **options)
    with count_host_syncs() as backward:
        (grad,) = torch.autograd.grad((z ** 2).sum(), q)
    return (z.detach(), grad, info), forward, backward


def test_qp_forward_and_backward_read_rarely(accelerator):
    (_, _, info), forward, backward = _qp_run(*_qp_batch())
    assert info.converged.all() and int(info.iterations.max()) >= 8
    # the input check, the layout of G and Q (bound rows, a diagonal Q), the loop every 8
    # iterations, the failure check
    assert forward.count <= int(info.iterations.max()) / EVERY + 4, forward.report()
    # the sizes of the reduced adjoint systems (free variables, active general rows), its checks
    assert backward.count <= 2, backward.report()


def test_qp_accelerator_path_computes_what_the_cpu_path_computes(monkeypatch):
    Q, q, G, h = _qp_batch()
    G[1, :2] = torch.tensor([[1.0] + [0.0] * 5, [-1.0] + [0.0] * 5])  # element 1: z1 <= -1 and z1 >= 1
    h[1, :2] = -1.0
    cpu, _, _ = _qp_run(Q, q, G, h, check=False)
    simulate_accelerator(monkeypatch, EVERY)
    device, _, _ = _qp_run(Q, q, G, h, check=False)
    assert cpu[2].status[1] == QPStatus.INFEASIBLE
    for a, b in zip(cpu[:2], device[:2]):  # the infeasible element's rows are NaN on both
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for name in cpu[2].__dataclass_fields__:
        assert torch.equal(getattr(cpu[2], name), getattr(device[2], name)), name


# -- (iii) the single-loop methods, and the driver ------------------------------------------------
def _problem(method):
    return coupled_constraint(n=4) if method == "lvhba" else nonunique_lower_level(n=4)


@pytest.mark.parametrize("method", ["penalty", "meha", "bamm", "bda", "lvhba"])
def test_single_loop_steps_read_well_below_once_per_step(accelerator, method):
    """32 steps through bilevel.solve (one curvature re-estimate at step 25): the
    step reports, the blow-up checks and the history are read every 8 steps."""
    steps, problem = 32, _problem(method)
    with count_host_syncs() as start:
        METHODS[method]().init(problem)
    with count_host_syncs() as syncs:
        result = bilevel.solve(problem, method=method, max_steps=steps, progress=False)
    assert len(result.history["outer"]) == steps and all(math.isfinite(v) for v in result.history["outer"])
    per_step = (syncs.count - start.count) / steps
    assert per_step <= 0.4, syncs.report()


def test_lvhba_builtin_projection_reads_a_few_times_per_step(accelerator):
    """The projection onto {g <= 0} is an inner solve (FISTA) with a stopping rule:
    one read to skip it, one per 10 iterations, one for the feasibility check."""
    problem = coupled_constraint(n=4)
    problem.data.pop("project")
    algorithm = METHODS["lvhba"]()
    state = algorithm.init(problem)
    with count_host_syncs() as syncs:
        for _ in range(16):
            state = algorithm.step(problem, state)
    assert syncs.count / 16 <= 4, syncs.report()


@pytest.mark.parametrize("method", ["implicit", "unrolled", "one_step"])
def test_baselines_read_nothing_per_step_in_the_driver_and_algorithms(accelerator, method):
    """The reads these methods still make per step are in bilevel.implicit (the
    certificates, the finiteness checks; see the issue) and, for "implicit", the
    warm start's convergence test; none comes from the reports or the driver."""
    steps = 16
    options = {"steps": 5} if method == "unrolled" else {}
    with count_host_syncs() as syncs:
        bilevel.solve(quadratic(), method=method, max_steps=steps, progress=False, **options)
    ours = sum(n for site, n in syncs.sites.items()
               if site.startswith(("bilevel/algorithms/", "bilevel/api.py")) and "(_gradient_norm)" not in site)
    assert ours <= steps / EVERY + 3, syncs.report(30)


def _runs(problem_fn, monkeypatch, **options):
    """The same run on the CPU path and on the accelerator path: (result or error, warnings)."""
    out = []
    for simulated in (False, True):
        if simulated:
            simulate_accelerator(monkeypatch, EVERY)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = bilevel.solve(problem_fn(), progress=False, **options)
            except FloatingPointError as error:
                result = str(error)
        out.append((result, sorted({str(w.message) for w in caught if w.category is StepSizeWarning})))
    return out


def _same_run(cpu, device):
    (a, wa), (b, wb) = cpu, device
    assert wa == wb
    if isinstance(a, str):
        assert a == b
        return
    assert a.history.keys() == b.history.keys()
    for key in a.history:
        if key != "time":
            assert a.history[key] == pytest.approx(b.history[key], rel=0, abs=0, nan_ok=True), key
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_deferred_blow_up_check_backs_off_as_on_the_cpu(monkeypatch):
    """An x step far too large: both paths go back to the saved state at the same
    step with the same warning, and continue identically."""
    cpu, device = _runs(quadratic, monkeypatch, method="penalty", lr=50.0, max_steps=60)
    assert any("went back to step" in w for w in cpu[1])
    _same_run(cpu, device)


def test_deferred_blow_up_check_raises_at_the_step_it_happened(monkeypatch):
    cpu, device = _runs(quadratic, monkeypatch, method="meha", lr=1e4, backoffs=1, max_steps=60)
    assert "diverged at step 4" in cpu[0]
    _same_run(cpu, device)


def test_deferred_history_check_names_the_step_of_a_nan_outer_value(monkeypatch):
    """F becomes NaN (with finite gradients) on its 40th call: the driver names the
    same step on both paths although the accelerator path reads 8 steps at once."""
    def problem():
        calls = [0]
        base = quadratic()

        def outer(x, y):
            calls[0] += 1
            return base.outer(x, y) + (math.nan if calls[0] >= 40 else 0.0)

        return bilevel.BilevelProblem(outer, base.inner, base.x0, base.y0)

    cpu, device = _runs(problem, monkeypatch, method="bamm", max_steps=40)
    assert cpu[0].startswith("solve: step ")
    _same_run(cpu, device)


# -- (iv) OptimizerLoop ---------------------------------------------------------------------------
def _optimizer_loop_run(optimizer, fun, maxiter=300, **options):
    init = torch.zeros(6)
    c = torch.linspace(-1.0, 2.0, 6)
    with count_host_syncs() as syncs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bilevel.ConvergenceWarning)
            try:
                w, info = OptimizerLoop(optimizer, maxiter=maxiter, **options).run(fun, init, c)
            except FloatingPointError as error:
                return str(error), syncs
    return (w, int(info.iterations), float(info.residual_norm), float(info.value), int(info.status)), syncs


@pytest.mark.parametrize("optimizer, options", [
    ("sgd", dict(lr=0.2)), ("sgd", dict(lr=0.1, momentum=0.5)), ("adam", dict(lr=0.05, tol=1e-2)),
    ("rprop", dict(lr=0.1, step_sizes=(1e-12, 1.0))),  # torch's Rprop step itself reads (boolean masks)
], ids=["sgd", "momentum", "adam", "rprop"])
def test_optimizer_loop_reads_every_eighth_step_and_stops_where_the_cpu_loop_stops(monkeypatch, optimizer, options):
    """On the accelerator path the steps after the tolerance was met are undone:
    point, step count, value and residual equal the CPU loop's, bit for bit."""
    def fun(w, c):
        return ((w - c) ** 2).sum() + 0.1 * (w ** 4).sum()

    cpu, cpu_syncs = _optimizer_loop_run(optimizer, fun, **options)
    simulate_accelerator(monkeypatch, EVERY)
    device, device_syncs = _optimizer_loop_run(optimizer, fun, **options)
    steps = cpu[1]
    assert 16 < steps < 300 and steps % EVERY != 0  # converged between two looks: some steps were undone
    assert torch.equal(cpu[0], device[0]) and cpu[1:] == device[1:]
    assert cpu_syncs.count >= steps
    if optimizer != "rprop":
        assert device_syncs.count <= steps / EVERY + 4, device_syncs.report()


def test_optimizer_loop_names_the_first_non_finite_step_on_both_paths(monkeypatch):
    calls = [0]

    def fun(w, c):
        calls[0] += 1
        return ((w - c) ** 2).sum() + (math.inf if calls[0] >= 12 else 0.0)

    cpu, _ = _optimizer_loop_run("sgd", fun, lr=1e-3)
    calls[0] = 0
    simulate_accelerator(monkeypatch, EVERY)
    device, _ = _optimizer_loop_run("sgd", fun, lr=1e-3)
    assert isinstance(cpu, str) and "at iteration 11" in cpu
    assert device == cpu
