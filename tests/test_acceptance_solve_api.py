"""Acceptance tests of ``bilevel.solve`` and the objects around it, from the outside.

Written the way a user porting a Betty / hypertorch / BOAT script would check the
public API: every method name on small problems whose answer is known in closed
form, with the variables as pytrees (dicts, nested tuples, an ``nn.Module``'s
parameters used through ``torch.func.functional_call``); dtypes (float32,
float64, and a float64 upper level over a float32 lower level); mini-batches
(lists, DataLoaders, generators, one stream per level); the stopping rules and
the history; stop-and-resume (from ``result.state``, a ``state_dict()``, a file
written by ``torch.save`` and read by a plain ``torch.load``); config objects
versus option keywords; the outer optimizer as a name, a class, a factory or an
instance (checked against ``torch.optim`` driven by the closed-form
hypergradient); and bad input.

Complements ``test_api.py`` and ``test_acceptance_algorithms.py`` (which check
the algorithms' biased limits on the flat problems Q, M1, L); nothing here
compares with numbers taken from the library's own output: references are closed
forms, ``torch.optim`` on the exact hypergradient, or a second, independently
arranged run (e.g. a manual zip of two batch streams).
"""

from __future__ import annotations

import functools
import math
import time
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import bilevel
from bilevel.algorithms import BAMM, BDA, LVHBA, MEHA, Implicit, OneStep, Penalty, Unrolled
from bilevel.api import HISTORY_KEYS
from bilevel.implicit import CG
from bilevel.problems import BilevelProblem, LevelBatches, quadratic
from bilevel.solvers import LBFGS

F64, F32 = torch.float64, torch.float32
ALL_METHODS = ["implicit", "unrolled", "one_step", "penalty", "meha", "bamm", "lvhba", "bda"]


def run(*args, **kwargs):
    kwargs.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # certificate warnings are not what these tests check
        return bilevel.solve(*args, **kwargs)


def leaves(tree):
    return torch.utils._pytree.tree_leaves(tree)


def assert_trees_equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for p, q in zip(la, lb):
        assert p.dtype == q.dtype and p.shape == q.shape
        assert torch.equal(p, q), float((p - q).abs().max())


# =====================================================================================
# Problem S: separable, in pytree form.  x = {"a": (2,), "b": (1,)}, y = ((2,), ((1,),)).
#   f(x, y) = 1/2 sum_i w_i (y_i - x_i)^2           ->  y*(x) = x
#   F(x, y) = 1/2 |y - c|^2 + rho/2 |x|^2           ->  x* = y* = c / (1 + rho)
# =====================================================================================

S_W = (1.0, 0.8, 0.6)
S_C = (1.0, -2.0, 0.5)
S_RHO = 0.5


def cat_x(x):
    return torch.cat([x["a"], x["b"]])


def cat_y(y):
    return torch.cat([y[0], y[1][0]])


def split_x(v):
    return {"a": v[:2].clone(), "b": v[2:].clone()}


def split_y(v):
    return (v[:2].clone(), (v[2:].clone(),))


def s_problem(dtype=F64):
    w, c = torch.tensor(S_W, dtype=dtype), torch.tensor(S_C, dtype=dtype)

    def inner(x, y):
        return 0.5 * (w * (cat_y(y) - cat_x(x)) ** 2).sum()

    def outer(x, y):
        return 0.5 * ((cat_y(y) - c) ** 2).sum() + 0.5 * S_RHO * (cat_x(x) ** 2).sum()

    star = c / (1 + S_RHO)
    return BilevelProblem(outer, inner, split_x(torch.zeros(3, dtype=dtype)), split_y(torch.zeros(3, dtype=dtype)),
                          solution={"x": split_x(star), "y": split_y(star)})


def l_problem(dtype=F64):
    """Problem L (ALGORITHMS.md 8) with n = 4 in pytree form: F = 1/2|x|^2 + 1/2|y - e|^2,
    f = 1/2|y - 2e|^2 s.t. y - x <= 0; x* = y* = 0.5 e, constraint active."""
    def cx(x):
        return torch.cat([x["u"], x["v"]])

    def cy(y):
        return torch.cat([y[0], y[1][0]])

    outer = lambda x, y: 0.5 * (cx(x) ** 2).sum() + 0.5 * ((cy(y) - 1) ** 2).sum()  # noqa: E731
    inner = lambda x, y: 0.5 * ((cy(y) - 2) ** 2).sum()  # noqa: E731
    constraints = lambda x, y: cy(y) - cx(x)  # noqa: E731
    x0 = {"u": torch.zeros(2, dtype=dtype), "v": torch.zeros(2, dtype=dtype)}
    y0 = (torch.zeros(3, dtype=dtype), (torch.zeros(1, dtype=dtype),))
    half = lambda t: 0.5 * torch.ones_like(t)  # noqa: E731
    solution = {"x": {k: half(v) for k, v in x0.items()}, "y": (half(y0[0]), (half(y0[1][0]),))}
    return BilevelProblem(outer, inner, x0, y0, constraints=constraints, solution=solution)


def _unrolled_point(T, s):
    """Unrolled T steps of size s from y0 = 0 (no warm start): y_T = a x with
    a_i = 1 - (1 - s w_i)^T, so the unrolled objective is minimized at x = a c / (a^2 + rho)."""
    w, c = torch.tensor(S_W, dtype=F64), torch.tensor(S_C, dtype=F64)
    a = 1 - (1 - s * w) ** T
    x = a * c / (a ** 2 + S_RHO)
    return x, a * x


def _one_step_point(xi):
    """DARTS estimate rho x + xi w (y' - c) with y' = y*(x) = x vanishes at x = xi w c / (rho + xi w)."""
    w, c = torch.tensor(S_W, dtype=F64), torch.tensor(S_C, dtype=F64)
    x = xi * w * c / (S_RHO + xi * w)
    return x, x


# method -> (options, max error on x and y).  Single-loop methods carry an O(1/c_k) or
# O(mu_k) bias that decays slowly; their bound is what the defaults reach in the budget
# (a few per cent of |x*| ~ 1.5), tighter than the distance 1.5 of the start point.
EVERY_METHOD = {
    "implicit": ({"outer_optimizer": "sgd", "lr": 0.6, "max_steps": 25}, 1e-6),
    "unrolled": ({"steps": 5, "step_size": 0.5, "outer_optimizer": "sgd", "lr": 0.6, "max_steps": 40}, 1e-9),
    "one_step": ({"step_size": 0.5, "outer_optimizer": "sgd", "lr": 0.5, "max_steps": 120}, 1e-8),
    "penalty": ({"max_steps": 300}, 2e-2),
    "meha": ({"max_steps": 1000}, 5e-2),
    "bamm": ({"max_steps": 1000}, 5e-2),
    "lvhba": ({"max_steps": 1000}, 1e-2),
    "bda": ({"max_steps": 100}, 2e-2),
}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_name_reaches_its_known_answer_with_dict_and_nested_tuple_variables(method):
    options, tol = EVERY_METHOD[method]
    p = l_problem() if method == "lvhba" else s_problem()
    r = run(p, method=method, **options)
    assert isinstance(r.x, dict) and sorted(r.x) == sorted(p.x0)
    assert isinstance(r.y, tuple) and isinstance(r.y[1], tuple) and len(r.y[1]) == 1
    assert [t.shape for t in leaves(r.y)] == [t.shape for t in leaves(p.y0)]
    if method == "unrolled":
        x_ref, y_ref = _unrolled_point(5, 0.5)
    elif method == "one_step":
        x_ref, y_ref = _one_step_point(0.5)
    else:
        x_ref, y_ref = torch.cat(leaves(p.solution.x)), torch.cat(leaves(p.solution.y))
    x_err = float((torch.cat(leaves(r.x)) - x_ref).abs().max())
    y_err = float((torch.cat(leaves(r.y)) - y_ref).abs().max())
    assert x_err < tol and y_err < tol, (x_err, y_err)
    if method in ("unrolled", "one_step"):  # their fixed points are biased: the test can tell
        assert float((x_ref - torch.cat(leaves(p.solution.x))).abs().max()) > 1e-2
    if method == "lvhba":
        assert float(p.constraints(r.x, r.y).max()) <= 1e-8
    assert r.state.iteration == options["max_steps"] and len(r.history["outer"]) == options["max_steps"]
    # the problem's own start point is not touched
    assert all(float(t.abs().max()) == 0 for t in leaves((p.x0, p.y0)))


# =====================================================================================
# nn.Module parameters as the upper variable, through torch.func.functional_call
# =====================================================================================

class _LearnedPrior:
    """x = the parameters (weight (2, 3), bias (2,)) of an nn.Linear(3, 2) that predicts the
    lower level's target m_x = W z + b from a fixed input z; y = {"pred": (2,)}.
        f(x, y) = 1/2 |y - m_x|^2,   F(x, y) = 1/2 |y - t|^2 + rho/2 (|W|^2 + |b|^2).
    Phi(W, b) = 1/2 |W z + b - t|^2 + rho/2 (...) is minimized at W* = u z^T, b* = u with
    u = t / (|z|^2 + 1 + rho); its Hessian has eigenvalues |z|^2 + 1 + rho and rho."""

    def __init__(self, dtype=F64):
        g = torch.Generator().manual_seed(0)
        self.model = torch.nn.Linear(3, 2).to(dtype)
        with torch.no_grad():
            for q in self.model.parameters():
                q.copy_(torch.randn(q.shape, generator=g, dtype=dtype))
        z = torch.randn(3, generator=g, dtype=dtype)
        self.z = z / z.norm()                       # |z| = 1: Hessian eigenvalues 3 and 1
        self.t = torch.tensor([1.0, -0.5], dtype=dtype)
        self.rho = 1.0
        u = self.t / (1 + 1 + self.rho)
        self.W_star, self.b_star = torch.outer(u, self.z), u

    def inner(self, x, y):
        m = torch.func.functional_call(self.model, x, (self.z,))
        return 0.5 * ((y["pred"] - m) ** 2).sum()

    def outer(self, x, y):
        return 0.5 * ((y["pred"] - self.t) ** 2).sum() + 0.5 * self.rho * sum((q ** 2).sum() for q in x.values())


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_nn_module_parameters_as_the_upper_variable(method):
    prob = _LearnedPrior()
    before = {k: v.detach().clone() for k, v in prob.model.named_parameters()}
    x0 = dict(prob.model.named_parameters())         # Parameters with requires_grad=True, as users pass them
    y0 = {"pred": torch.zeros(2, dtype=F64)}
    options = {"steps": 30, "step_size": 1.0} if method == "unrolled" else {}
    r = run(prob.outer, prob.inner, x0, y0, method=method, outer_optimizer="sgd", lr=0.5, max_steps=40, **options)
    assert set(r.x) == {"weight", "bias"} and r.x["weight"].shape == (2, 3)
    # contraction max(|1 - 0.5*3|, |1 - 0.5*1|) = 0.5 per step: 0.5^40 ~ 1e-12
    torch.testing.assert_close(r.x["weight"], prob.W_star, atol=1e-7, rtol=0)
    torch.testing.assert_close(r.x["bias"], prob.b_star, atol=1e-7, rtol=0)
    torch.testing.assert_close(r.y["pred"], prob.W_star @ prob.z + prob.b_star, atol=1e-6, rtol=0)
    for k, v in prob.model.named_parameters():       # the user's module is not modified
        assert torch.equal(v.detach(), before[k])
    # the answer loads straight back into the module, as a user porting a script would do
    prob.model.load_state_dict(r.x)
    torch.testing.assert_close(prob.model(prob.z).detach(), r.y["pred"], atol=1e-6, rtol=0)


# =====================================================================================
# dtypes
# =====================================================================================

@pytest.mark.parametrize("method", ALL_METHODS)
def test_float32_pytrees_stay_float32_in_results_history_and_checkpoints(method):
    p = (l_problem if method == "lvhba" else s_problem)(F32)
    options = {"steps": 5} if method in ("unrolled", "bda") else {}
    r = run(p, method=method, max_steps=12, **options)
    for leaf in leaves((r.x, r.y)):
        assert leaf.dtype == F32
    assert all(type(v) is float and math.isfinite(v) for v in r.history["outer"])
    assert all(type(v) is int for v in r.history["step"])
    checkpoint = r.state.state_dict()
    for leaf in leaves((checkpoint["x"], checkpoint["y"], checkpoint["extras"])):
        if torch.is_tensor(leaf) and leaf.is_floating_point():
            assert leaf.dtype == F32
    resumed = run(p, method=method, max_steps=14, resume=checkpoint, **options)
    assert all(leaf.dtype == F32 for leaf in leaves((resumed.x, resumed.y)))
    # the same iteration in float64 agrees to float32 resolution
    r64 = run((l_problem if method == "lvhba" else s_problem)(F64), method=method, max_steps=12, **options)
    assert float((torch.cat(leaves(r.x)).double() - torch.cat(leaves(r64.x))).abs().max()) < 1e-3


@pytest.mark.parametrize("method", ["implicit", "penalty"])
def test_float64_upper_level_over_float32_lower_level(method):
    """Each level keeps its own dtype; y*(x) = x and Phi = 1/2|x - 1|^2 + 1/4|x|^2 give x* = 2/3."""
    w = torch.tensor([1.0, 0.8, 0.6])
    inner = lambda x, y: 0.5 * (w * (y - x.to(y.dtype)) ** 2).sum()  # noqa: E731
    outer = lambda x, y: 0.5 * ((y - 1) ** 2).sum() + 0.25 * (x ** 2).sum()  # noqa: E731
    options = {"outer_optimizer": "sgd", "lr": 0.5, "max_steps": 40} if method == "implicit" else {"max_steps": 300}
    r = run(outer, inner, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F32), method=method, **options)
    assert r.x.dtype == F64 and r.y.dtype == F32
    tol = 1e-3 if method == "implicit" else 2e-2       # float32 lower level; penalty's O(1/lambda) bias
    assert float((r.x - 2 / 3).abs().max()) < tol and float((r.y.double() - 2 / 3).abs().max()) < tol


# =====================================================================================
# The history and the stopping rules
# =====================================================================================

def test_history_records_phi_and_the_exact_hypergradient_norm_at_the_x_each_step_started_from():
    """On Q the outer value of step k is Phi(x_{k-1}) = F(x_{k-1}, y*(x_{k-1})) and the
    hypergradient norm is |grad Phi(x_{k-1})|, both in closed form; y is one step behind x."""
    p = quadratic()
    xs = []
    r = run(p, method="implicit", outer_optimizer="sgd", lr=0.5, max_steps=6,
            callback=lambda state: xs.append(state.x.detach().clone()))
    starts = [p.x0] + xs[:-1]
    phi = [float(p.outer(x, p.inner_solution(x))) for x in starts]
    grad = [float(p.hypergradient(x).norm()) for x in starts]
    assert r.history["outer"] == pytest.approx(phi, rel=1e-7)
    assert r.history["hypergradient_norm"] == pytest.approx(grad, rel=1e-6)
    assert float((r.y - p.inner_solution(starts[-1])).norm()) < 1e-6
    torch.testing.assert_close(r.x, xs[-1], rtol=0, atol=0)


def _sleepy(seconds):
    def callback(state):
        time.sleep(seconds)
    return callback


STOPS = {
    "max_steps": ({"max_steps": 7}, False, "max_steps"),
    "tol": ({"max_steps": 500, "tol": 1e-5}, True, "tol"),
    "callback": ({"max_steps": 500, "callback": lambda s, rec: rec["step"] == 4}, False, "callback"),
    "max_time": ({"max_steps": 100, "max_time": 0.25, "callback": _sleepy(0.05)}, False, "max_time"),
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_every_stopping_rule_leaves_one_history_record_per_step(stop):
    options, converged, word = STOPS[stop]
    p = quadratic()
    start = time.perf_counter()
    r = run(p, method="implicit", outer_optimizer="sgd", lr=0.5, **options)
    elapsed = time.perf_counter() - start
    n = r.state.iteration
    assert set(r.history) == set(HISTORY_KEYS)
    assert all(len(v) == n for v in r.history.values())
    assert r.history["step"] == list(range(1, n + 1))
    assert r.converged is converged and word in r.message
    if stop == "max_steps":
        assert n == 7
    if stop == "tol":
        assert r.history["hypergradient_norm"][-1] <= 1e-5 < min(r.history["hypergradient_norm"][:-1])
    if stop == "callback":
        assert n == 4
    if stop == "max_time":
        assert 1 <= n < 100 and 0.25 <= elapsed < 5.0


@pytest.mark.parametrize("method", ["implicit", "meha"])
def test_max_steps_zero_returns_copies_of_the_start_point_and_an_empty_history(method):
    p = s_problem()
    r = run(p, method=method, max_steps=0)
    assert r.state.iteration == 0 and not r.converged
    assert set(r.history) == set(HISTORY_KEYS) and all(v == [] for v in r.history.values())
    assert_trees_equal(r.x, p.x0)
    for mine, start in zip(leaves(r.x), leaves(p.x0)):
        mine.add_(1.0)                                  # the result is the caller's to change
        assert float(start.abs().max()) == 0


def test_a_tol_met_at_the_first_step_stops_after_one_step():
    p = quadratic()
    r = run(p, method="implicit", tol=1e3, max_steps=50)
    assert r.converged and r.state.iteration == 1 and len(r.history["outer"]) == 1


class _StopAt:
    def __init__(self, step):
        self.step, self.seen = step, []

    def __call__(self, state):                      # a callable object taking the state only
        self.seen.append(state.iteration)
        return state.iteration == self.step


def _stop_with(value, at, state, record):          # used through functools.partial
    return value if record["step"] == at else None


@pytest.mark.parametrize("make, stops_at", [
    (lambda: _StopAt(3), 3),
    (lambda: functools.partial(_stop_with, 1, 5), 5),                  # a truthy int
    (lambda: functools.partial(_stop_with, torch.tensor(True), 2), 2),  # a 0-d bool tensor
    (lambda: functools.partial(_stop_with, 0, 2), None),                # falsy: keeps going
    (lambda: (lambda state, record=None, *, verbose=False: None), None),
    (lambda: (lambda *args: None), None),
])
def test_callbacks_of_several_shapes(make, stops_at):
    p = quadratic()
    callback = make()
    r = run(p, method="implicit", max_steps=8, callback=callback)
    assert r.state.iteration == (stops_at or 8)
    assert ("callback" in r.message) == (stops_at is not None)
    if isinstance(callback, _StopAt):
        assert callback.seen == [1, 2, 3]


class _Boom(Exception):
    pass


@pytest.mark.parametrize("method", ["implicit", "penalty", "bda"])
def test_an_exception_raised_by_an_objective_mid_run_propagates_unchanged(method):
    flag = {"armed": False}

    def outer(x, y):
        if flag["armed"]:
            raise _Boom("user error in outer")
        return ((y - 1) ** 2).sum()

    def arm(state):
        flag["armed"] = state.iteration >= 3

    with pytest.raises(_Boom, match="user error in outer"):
        run(outer, lambda x, y: ((y - x) ** 2).sum(), torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64),
            method=method, max_steps=10, callback=arm)


@pytest.mark.parametrize("method, options", [
    ("implicit", {}), ("unrolled", {"steps": 5}), ("one_step", {}),
])
def test_nan_appearing_mid_run_names_the_exact_step(method, options):
    """y*(x) = x, Phi(x) = -x, so SGD with lr = 1 gives x_k = k exactly; the outer value
    carries 0 * log(3.5 - x), finite (and with zero gradient) until x = 4, the start of step 5."""
    outer = lambda x, y: -y.sum() + 0.0 * torch.log(3.5 - x.sum())  # noqa: E731
    inner = lambda x, y: 0.5 * ((y - x) ** 2).sum()  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"step 5\b"):
        run(outer, inner, torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), method=method,
            outer_optimizer="sgd", lr=1.0, max_steps=20, **options)
    # one step fewer runs clean, and lands where the arithmetic says
    r = run(outer, inner, torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), method=method,
            outer_optimizer="sgd", lr=1.0, max_steps=4, **options)
    torch.testing.assert_close(r.x, torch.tensor([4.0], dtype=F64), atol=1e-6, rtol=0)


def test_progress_false_prints_nothing_and_progress_true_draws_a_bar_on_stderr(capsys):
    p = quadratic()
    run(p, method="implicit", max_steps=5, progress=False)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    run(p, method="implicit", max_steps=5, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "5/5" in err


# =====================================================================================
# Mini-batches
# =====================================================================================

def _ridge_data(dtype=F64):
    g = torch.Generator().manual_seed(0)
    Xtr, Xv = torch.randn(12, 3, generator=g, dtype=dtype), torch.randn(10, 3, generator=g, dtype=dtype)
    w = torch.tensor([1.0, -1.0, 0.5], dtype=dtype)
    ttr = Xtr @ w + 0.3 * torch.randn(12, generator=g, dtype=dtype)
    tv = Xv @ w + 0.3 * torch.randn(10, generator=g, dtype=dtype)
    return Xtr, ttr, Xv, tv


def _ridge_inner(lam, w, batch):
    X, t = batch
    return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (lam.exp() * w ** 2).sum()


def _ridge_outer(lam, w, batch):
    X, t = batch
    return 0.5 * ((X @ w - t) ** 2).sum()


IMPLICIT_LBFGS = {"method": "implicit", "inner_solver": LBFGS(maxiter=100), "lr": 0.1}


def test_a_dataloader_is_cycled_like_the_list_of_its_batches():
    Xtr, ttr, _, _ = _ridge_data()
    loader = DataLoader(TensorDataset(Xtr, ttr), batch_size=5)           # 3 batches: 5, 5, 2 rows
    batches = [[Xtr[i:i + 5], ttr[i:i + 5]] for i in (0, 5, 10)]
    # outer on the same training batch: the minimizer changes with the batch, so order matters
    a = run(_ridge_outer, _ridge_inner, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), data=loader,
            max_steps=8, **IMPLICIT_LBFGS)
    b = run(_ridge_outer, _ridge_inner, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), data=batches,
            max_steps=8, **IMPLICIT_LBFGS)
    c = run(_ridge_outer, _ridge_inner, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64),
            data=[batches[0], batches[2], batches[1]], max_steps=8, **IMPLICIT_LBFGS)
    assert_trees_equal(a.x, b.x)
    assert a.history["outer"] == b.history["outer"]
    assert not torch.equal(a.x, c.x)                                    # another order, another run


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_one_stream_per_level_is_a_zip_of_two_independently_cycled_streams(form):
    """3 training and 2 validation batches: each level cycles on its own, so step k sees
    (valid[k % 2], train[k % 3]), the same as a hand-made stream of LevelBatches (period 6)."""
    Xtr, ttr, Xv, tv = _ridge_data()
    train = DataLoader(TensorDataset(Xtr, ttr), batch_size=4)
    valid = DataLoader(TensorDataset(Xv, tv), batch_size=5)
    tb = [[Xtr[i:i + 4], ttr[i:i + 4]] for i in (0, 4, 8)]
    vb = [[Xv[i:i + 5], tv[i:i + 5]] for i in (0, 5)]
    data = (valid, train) if form == "tuple" else {"inner": train, "outer": valid}
    zipped = [LevelBatches(outer=vb[k % 2], inner=tb[k % 3]) for k in range(6)]
    common = dict(max_steps=9, **IMPLICIT_LBFGS)
    a = run(_ridge_outer, _ridge_inner, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), data=data, **common)
    b = run(_ridge_outer, _ridge_inner, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), data=zipped, **common)
    assert_trees_equal(a.x, b.x)
    assert a.history["outer"] == b.history["outer"]
    # resume mid-way: the checkpointed run's batches of both levels are skipped
    first = run(_ridge_outer, _ridge_inner, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64),
                data=data, **{**common, "max_steps": 4})
    resumed = run(_ridge_outer, _ridge_inner, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64),
                  data=data, resume=first.state, **common)
    assert_trees_equal(resumed.x, a.x)
    assert resumed.history["outer"] == a.history["outer"][4:]


def test_per_level_streams_give_the_outer_objective_only_validation_batches():
    Xtr, ttr, Xv, tv = _ridge_data()
    train = DataLoader(TensorDataset(Xtr, ttr), batch_size=4)
    valid = DataLoader(TensorDataset(Xv, tv), batch_size=5)
    rows = {"outer": set(), "inner": set()}

    def outer(lam, w, batch):
        rows["outer"].add(batch[0].shape[0])
        return _ridge_outer(lam, w, batch)

    def inner(lam, w, batch):
        rows["inner"].add(batch[0].shape[0])
        return _ridge_inner(lam, w, batch)

    run(outer, inner, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), data={"outer": valid, "inner": train},
        method="penalty", max_steps=6)
    assert rows == {"outer": {5}, "inner": {4}}


def test_a_generator_that_runs_dry_in_one_level_is_a_clear_error():
    Xtr, ttr, Xv, tv = _ridge_data()
    train = DataLoader(TensorDataset(Xtr, ttr), batch_size=4)
    short = ([Xv[i:i + 5], tv[i:i + 5]] for i in (0, 5))               # a one-shot generator of 2 batches
    with pytest.raises(ValueError, match="ran out after 2"):
        run(_ridge_outer, _ridge_inner, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64),
            data=(short, train), max_steps=5, **IMPLICIT_LBFGS)


def test_resume_with_a_shuffled_dataloader_rebuilt_from_the_same_seed():
    """The usual script: the loader is rebuilt after a restart from the same seed; the
    resumed run skips the batches used before and ends where the uninterrupted one ends."""
    Xtr, ttr, _, _ = _ridge_data()

    def loader():
        return DataLoader(TensorDataset(Xtr, ttr), batch_size=4, shuffle=True,
                          generator=torch.Generator().manual_seed(7))

    start = (torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64))
    full = run(_ridge_outer, _ridge_inner, *start, data=loader(), method="meha", max_steps=11)
    first = run(_ridge_outer, _ridge_inner, *start, data=loader(), method="meha", max_steps=5)
    resumed = run(_ridge_outer, _ridge_inner, *start, data=loader(), method="meha", max_steps=11,
                  resume=first.state.state_dict())
    assert_trees_equal(resumed.x, full.x)
    assert_trees_equal(resumed.y, full.y)


# =====================================================================================
# Checkpoint / resume
# =====================================================================================

RESUME_OPTIONS = {"unrolled": {"steps": 5}, "bda": {"steps": 4}}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_three_resumed_segments_equal_one_run_for_pytree_variables(method, tmp_path):
    """0 -> 10 (state), 10 -> 20 (state_dict), 20 -> 30 (torch.save / plain torch.load of a
    file); the last segment crosses the single-loop methods' curvature re-estimate at 25.
    Iterates and the concatenated histories equal those of one 30-step run."""
    p = l_problem() if method == "lvhba" else s_problem()
    options = RESUME_OPTIONS.get(method, {})
    full = run(p, method=method, max_steps=30, **options)
    one = run(p, method=method, max_steps=10, **options)
    two = run(p, method=method, max_steps=20, resume=one.state, **options)
    path = tmp_path / "checkpoint.pt"
    torch.save(two.state.state_dict(), path)
    three = run(p, method=method, max_steps=30, resume=torch.load(path), **options)
    assert_trees_equal(three.x, full.x)
    assert_trees_equal(three.y, full.y)
    for key in ("step", "outer", "hypergradient_norm", "inner_residual"):
        joined = one.history[key] + two.history[key] + three.history[key]
        expected = [v for v in full.history[key] if v == v]                  # records that are not NaN
        assert [v for v in joined if v == v] == pytest.approx(expected, rel=1e-12, abs=1e-300), key
    assert three.state.iteration == 30 and three.history["step"] == list(range(21, 31))


def test_resuming_does_not_touch_the_state_or_checkpoint_it_starts_from():
    p = s_problem()
    first = run(p, method="penalty", max_steps=6)
    x_before = {k: v.clone() for k, v in first.x.items()}
    checkpoint = first.state.state_dict()
    a = run(p, method="penalty", max_steps=12, resume=first.state)
    b = run(p, method="penalty", max_steps=12, resume=first.state)       # the same state, again
    c = run(p, method="penalty", max_steps=12, resume=checkpoint)
    d = run(p, method="penalty", max_steps=12, resume=checkpoint)
    for other in (b, c, d):
        assert_trees_equal(other.x, a.x)
    assert first.state.iteration == 6 and checkpoint["iteration"] == 6
    assert_trees_equal(first.x, x_before)
    assert_trees_equal(checkpoint["x"], x_before)


def test_resuming_at_or_past_max_steps_takes_no_step():
    p = quadratic()
    first = run(p, method="implicit", max_steps=5)
    again = run(p, method="implicit", max_steps=5, resume=first.state)
    assert again.state.iteration == 5 and again.history["step"] == []
    assert torch.equal(again.x, first.x)


def test_resume_after_a_tol_stop_continues_to_a_tighter_tol():
    """Steps before the first stop have |g| > 1e-3 > 1e-8, so continuing to tol = 1e-8
    stops at the very step where a single run with tol = 1e-8 stops."""
    p = quadratic()
    loose = run(p, method="implicit", outer_optimizer="sgd", lr=0.5, tol=1e-3)
    tight = run(p, method="implicit", outer_optimizer="sgd", lr=0.5, tol=1e-8, resume=loose.state)
    direct = run(p, method="implicit", outer_optimizer="sgd", lr=0.5, tol=1e-8)
    assert loose.converged and tight.converged
    assert loose.state.iteration < tight.state.iteration == direct.state.iteration
    torch.testing.assert_close(tight.x, direct.x, rtol=0, atol=1e-12)


def test_resume_with_nn_module_parameters():
    prob = _LearnedPrior()
    x0, y0 = dict(prob.model.named_parameters()), {"pred": torch.zeros(2, dtype=F64)}
    kw = dict(method="implicit", outer_optimizer=torch.optim.Adam, lr=0.05)
    full = run(prob.outer, prob.inner, x0, y0, max_steps=12, **kw)
    first = run(prob.outer, prob.inner, x0, y0, max_steps=7, **kw)
    resumed = run(prob.outer, prob.inner, x0, y0, max_steps=12, resume=first.state.state_dict(), **kw)
    torch.testing.assert_close(resumed.x, full.x, rtol=0, atol=1e-12)


def test_resume_accepts_the_result_itself_and_names_a_bad_argument():
    p = quadratic()
    first = run(p, method="implicit", max_steps=2)
    from_result = run(p, method="implicit", max_steps=4, resume=first)
    from_state = run(p, method="implicit", max_steps=4, resume=first.state)
    torch.testing.assert_close(from_result.x, from_state.x, rtol=0, atol=0)
    with pytest.raises(TypeError, match="resume"):
        run(p, method="implicit", max_steps=4, resume=[first.state])


def test_a_checkpoint_with_another_x_structure_is_refused():
    x0 = {"a": torch.zeros(3, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    inner = lambda x, y: 0.5 * ((y - x["a"]) ** 2).sum()  # noqa: E731
    outer = lambda x, y: 0.5 * ((y - 1) ** 2).sum() + 0.5 * ((x["b"] - 1) ** 2).sum()  # noqa: E731
    first = run(outer, inner, x0, torch.zeros(3, dtype=F64), method="implicit", max_steps=3)
    checkpoint = first.state.state_dict()
    checkpoint["x"] = {"a": checkpoint["x"]["a"]}       # e.g. from a script before "b" was added
    with pytest.raises(ValueError, match="x"):
        run(outer, inner, x0, torch.zeros(3, dtype=F64), method="implicit", max_steps=5, resume=checkpoint)


def test_a_checkpoint_with_another_y_shape_is_refused_at_the_start():
    p = quadratic()
    checkpoint = run(p, method="implicit", max_steps=2).state.state_dict()
    checkpoint["y"] = torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError, match="y"):
        run(p, method="implicit", max_steps=4, resume=checkpoint)


def test_a_checkpoint_of_another_method_is_refused_clearly():
    p = quadratic()
    checkpoint = run(p, method="implicit", max_steps=2).state.state_dict()
    with pytest.raises((ValueError, TypeError), match="checkpoint|resume"):
        run(p, method="penalty", max_steps=4, resume=checkpoint)


# =====================================================================================
# Config objects vs option keywords
# =====================================================================================

CONFIGS = {
    "implicit": (Implicit, {"solve": CG(maxiter=20), "inner_solver": LBFGS(maxiter=50), "outer_optimizer": "sgd",
                            "lr": 0.3}),
    "unrolled": (Unrolled, {"steps": 4, "step_size": 0.3, "truncate": 2, "warm_start": True}),
    "one_step": (OneStep, {"step_size": 0.4, "inner_steps": 2, "lr": 0.2}),
    "penalty": (Penalty, {"lam0": 5.0, "lam_growth": 0.5, "inner_steps": 2}),
    "meha": (MEHA, {"c": 2.0, "p": 0.3, "gamma": 0.5}),
    "bamm": (BAMM, {"mu0": 0.5, "q": 3.0, "y_step": 0.3}),
    "lvhba": (LVHBA, {"eta": 0.05, "c": 2.0}),
    "bda": (BDA, {"steps": 4, "mu": 0.3, "warm_start": False}),
}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_config_object_and_the_same_options_as_keywords_are_the_same_run(method):
    cls, options = CONFIGS[method]
    p = l_problem() if method == "lvhba" else s_problem()
    by_name = run(p, method=method, max_steps=10, **options)
    config = cls(**options)
    by_object = run(p, method=config, max_steps=10)
    again = run(p, method=config, max_steps=10)                       # a config carries no run state
    assert_trees_equal(by_object.x, by_name.x)
    assert_trees_equal(by_object.y, by_name.y)
    assert by_object.history["outer"] == by_name.history["outer"]
    assert_trees_equal(again.x, by_object.x)
    # keywords on top of a config replace its fields
    overridden = run(p, method=cls(), max_steps=10, **options)
    assert_trees_equal(overridden.x, by_name.x)
    # and the options matter (the comparison above could not pass by ignoring them)
    default = run(p, method=method, max_steps=10)
    assert not all(torch.equal(u, v) for u, v in zip(leaves(default.x), leaves(by_name.x)))


# =====================================================================================
# The outer optimizer, checked against torch.optim on the exact hypergradient of Q
# =====================================================================================

def _reference(p, make_optimizer, steps):
    x = p.x0.clone()
    optimizer = make_optimizer([x])
    for _ in range(steps):
        x.grad = p.hypergradient(x)
        optimizer.step()
    return x


@pytest.mark.parametrize("spec, kwargs, reference", [
    (None, {}, lambda params: torch.optim.Adam(params, lr=1e-2)),          # the documented defaults
    ("RMSprop", {"lr": 0.05}, lambda params: torch.optim.RMSprop(params, lr=0.05)),  # any-case name
    (torch.optim.Adagrad, {"lr": 0.3}, lambda params: torch.optim.Adagrad(params, lr=0.3)),
    (lambda params: torch.optim.SGD(params, lr=0.2, weight_decay=0.1), {},
     lambda params: torch.optim.SGD(params, lr=0.2, weight_decay=0.1)),
], ids=["default-adam", "name", "class", "factory"])
def test_outer_optimizer_forms_follow_torch_optim_on_the_exact_hypergradient(spec, kwargs, reference):
    p = quadratic()
    options = dict(kwargs) if spec is None else {"outer_optimizer": spec, **kwargs}
    r = run(p, method="implicit", max_steps=30, **options)
    x_ref = _reference(p, reference, 30)
    assert float((r.x - x_ref).abs().max()) < 1e-6
    assert float((x_ref - p.x0).abs().max()) > 0.1                        # the runs went somewhere


def test_outer_optimizer_instance_lends_its_settings_and_stays_untouched():
    p = quadratic()
    dummy = torch.zeros(3, dtype=F64, requires_grad=True)
    template = torch.optim.SGD([dummy], lr=0.2, momentum=0.8, nesterov=True)
    r = run(p, method="implicit", outer_optimizer=template, max_steps=25)
    x_ref = _reference(p, lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.8, nesterov=True), 25)
    assert float((r.x - x_ref).abs().max()) < 1e-6
    assert torch.equal(dummy.detach(), torch.zeros(3, dtype=F64)) and len(template.state) == 0
    assert isinstance(r.state.optimizer, torch.optim.SGD) and r.state.optimizer is not template


def test_lr_sets_the_step_of_a_named_optimizer():
    p = quadratic()
    r = run(p, method="implicit", outer_optimizer="sgd", lr=0.35, max_steps=20)
    x_ref = _reference(p, lambda params: torch.optim.SGD(params, lr=0.35), 20)
    assert float((r.x - x_ref).abs().max()) < 1e-6


# =====================================================================================
# Bad input: clear errors naming the argument
# =====================================================================================

_O = lambda x, y: ((y - 1) ** 2).sum()  # noqa: E731
_I = lambda x, y: ((y - x) ** 2).sum()  # noqa: E731
_Z = torch.zeros(3, dtype=F64)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: run(_O, _I, _Z, _Z, method=Implicit), ValueError, r"Implicit\(\)", id="method-class"),
    pytest.param(lambda: run(_O, _I, _Z, _Z, method=None), ValueError, "unknown method", id="method-none"),
    pytest.param(lambda: run(quadratic(), constraints=lambda x, y: y), TypeError, "constraints",
                 id="problem-and-constraints"),
    pytest.param(lambda: run(_O, _I, _Z, _Z, data=3), TypeError, "data", id="data-int"),
    pytest.param(lambda: run(_O, _I, _Z, _Z, data=[1, 2]), ValueError, "outer", id="data-but-two-arg-objectives"),
    pytest.param(lambda: run(lambda x, y, b: _O(x, y), lambda x, y, b: _I(x, y), _Z, _Z), ValueError, "outer",
                 id="batch-argument-but-no-data"),
    pytest.param(lambda: run(_O, _I, _Z, _Z, outer_optimizer=42), TypeError, "outer_optimizer",
                 id="optimizer-int"),
    pytest.param(lambda: run(_O, _I, _Z, _Z, outer_optimizer=lambda params: None), TypeError, "factory",
                 id="optimizer-factory-returns-none"),
    pytest.param(lambda: run(_O, _I, [0.0, 0.0, 0.0], _Z), TypeError, "x0", id="x0-list-of-floats"),
    pytest.param(lambda: run(_O, _I, _Z, _Z, max_steps=5.0), ValueError, "max_steps", id="max-steps-float"),
    pytest.param(lambda: run(_O, _I, _Z, _Z, method="unrolled", steps="10"), ValueError, "steps",
                 id="option-of-wrong-type"),
    pytest.param(lambda: run(_O, _I, _Z, _Z, lr="0.1", max_steps=2), (TypeError, ValueError), "lr", id="lr-str"),
    pytest.param(lambda: run(_O, _I, _Z, _Z, tol="1e-3", max_steps=2), (TypeError, ValueError), "tol", id="tol-str"),
    pytest.param(lambda: run(_O, _I, _Z, _Z, max_time="1", max_steps=2), (TypeError, ValueError), "max_time", id="max-time-str"),
    pytest.param(lambda: run(_O, _I, _Z, _Z, method="implicit", solve="cg", max_steps=2), TypeError, "solve", id="implicit-solve-str"),
])
def test_bad_input_is_rejected_with_an_error_naming_it(call, error, match):
    with pytest.raises(error, match=match):
        call()
