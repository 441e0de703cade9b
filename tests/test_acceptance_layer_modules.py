"""Acceptance tests: the optimization layers as ``torch.nn.Module`` s inside real models.

What a user of a serious PyTorch library expects from :class:`~bilevel.layers.QPLayer`,
:class:`~bilevel.layers.ConvexLayer` (QP route and conic route),
:class:`~bilevel.layers.ArgminLayer` and :class:`~bilevel.layers.HardConstraintMoE` /
:class:`~bilevel.layers.HardConstraint` / :class:`~bilevel.layers.SoftConstraint`
once they sit in a model that is trained, saved, copied and composed:

* training loops with ``torch.optim`` (closed-form and finite-difference oracles at the
  first step), gradient accumulation over several backward calls, ``retain_graph``;
* the module protocol: ``.to(dtype)`` / ``.double()`` / ``.to(device)``, ``state_dict``
  round trips, ``copy.deepcopy`` and ``pickle``, ``repr``, ``eval`` / ``no_grad`` /
  ``inference_mode``, frozen inputs;
* batching edge cases (a batch of one, an empty batch);
* composition with :mod:`torch.func` and second derivatives (correct, or refused clearly);
* errors for inputs on the wrong device or of the wrong dtype.

Only the public API is used; correctness checks run in float64 (this file is not one of
the project's own test files, so torch's default dtype stays float32 and every tensor
here is created with an explicit dtype).  Tests of library bugs are
``xfail(strict=True)`` with the bug in the reason.
"""

from __future__ import annotations

import contextlib
import copy
import math
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from bilevel.layers import (
    ArgminLayer,
    BoxPartition,
    ConvexLayer,
    HardConstraint,
    HardConstraintMoE,
    QPLayer,
    SoftConstraint,
    evaluate_basis,
)
from bilevel.problems import burgers_1d, heat_1d
from bilevel.problems.pde import INTERIOR
from bilevel.solvers import LBFGS, LevenbergMarquardt

try:  # ConvexLayer needs CVXPY (the bilevel[cvxpy] extra)
    import cvxpy as cp
except ImportError:  # pragma: no cover - depends on the environment
    cp = None

D = torch.float64
FIELDS = {"u": (), "u_x": (0,), "u_t": (1,), "u_xx": (0, 0)}
needs_cvxpy = pytest.mark.skipif(cp is None, reason="cvxpy is not installed")


@contextlib.contextmanager
def _seeded(seed):
    """Seed torch's global generator (for nn.Linear's initialisation) without leaking the state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _close(a, b, atol=1e-9, rtol=1e-8, msg=None):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=msg)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# =========================================================================== models


class Quartic(nn.Module):
    """objective(z, y) = 0.5 ||z - y||^2 + 0.25 exp(log_w) sum z^4: z + w z^3 = y elementwise."""

    def __init__(self):
        super().__init__()
        self.log_w = nn.Parameter(torch.tensor(0.0, dtype=D))

    def forward(self, z, y):
        return 0.5 * ((z - y) ** 2).sum() + 0.25 * self.log_w.exp() * (z**4).sum()


def quartic_objective(z, y):
    """A module-level (picklable) objective: z + z^3 = y elementwise."""
    return 0.5 * ((z - y) ** 2).sum() + 0.25 * (z**4).sum()


class HeatResidual(nn.Module):
    """Pointwise heat residual with a learnable diffusion coefficient: u_t - nu u_xx at
    interior points, u - target at initial / boundary points (``target`` is data)."""

    def __init__(self, nu=0.2):
        super().__init__()
        self.log_nu = nn.Parameter(torch.tensor(math.log(nu), dtype=D))

    def forward(self, f, kind, target):
        pde = f["u_t"] - self.log_nu.exp() * f["u_xx"]
        return torch.where(kind == INTERIOR, pde, f["u"] - target)


class ProjectionNet(nn.Module):
    """x -> y = 2 * Linear(x) -> an optimization layer -> z, batched over the rows of x.

    ``kind``: ``"qp"`` (QPLayer, box [-1/2, 1/2]^4: z = clamp(y)), ``"convex_qp"`` (the
    same box through cvxpy: ConvexLayer's QP route), ``"convex_conic"`` (projection onto
    the unit ball: Clarabel and the residual-map derivative), ``"argmin"`` (ArgminLayer
    with the learnable :class:`Quartic` objective and a warm-start buffer).
    """

    def __init__(self, kind, seed=0, n=4, d=3):
        super().__init__()
        with _seeded(seed):
            self.lin = nn.Linear(d, n).to(D)
        self.kind = kind
        if kind == "qp":
            self.layer = QPLayer()
            self.register_buffer("Q", torch.eye(n, dtype=D))
            self.register_buffer("G", torch.cat([torch.eye(n, dtype=D), -torch.eye(n, dtype=D)]))
            self.register_buffer("h", torch.full((2 * n,), 0.5, dtype=D))
        elif kind in ("convex_qp", "convex_conic"):
            x, y = cp.Variable(n), cp.Parameter(n)
            cons = [x <= 0.5, x >= -0.5] if kind == "convex_qp" else [cp.norm(x, 2) <= 1]
            self.layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - y)), cons), parameters=[y],
                                     variables=[x])
        elif kind == "argmin":
            # a tight tolerance: LBFGS solves the batch as one problem (the summed objective), so at
            # the default sqrt(eps) an element's solution moves by ~1e-8 with the batch it is in
            self.layer = ArgminLayer(Quartic(), LBFGS(tol=1e-12), init=torch.zeros(n, dtype=D), input_ndims=[1])
        else:
            raise ValueError(kind)

    def project(self, y):
        if self.kind == "qp":
            return self.layer(self.Q, -y, G=self.G, h=self.h)
        if self.kind.startswith("convex"):
            return self.layer(y)[0]
        return self.layer(y)

    def forward(self, x):
        return self.project(2 * self.lin(x))


class HardPINN(nn.Module):
    """A basis network on (x, t), a hard-constraint layer choosing its coefficients so that
    the PDE holds at the collocation points, and the constrained field u at those points."""

    def __init__(self, experts, residual=None, seed=0, N=5, solver=None):
        super().__init__()
        with _seeded(seed):
            self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, N)).to(D)
        self.hard = HardConstraintMoE(HeatResidual() if residual is None else residual, experts, solver=solver)

    def forward(self, pts, kind, target):
        basis = evaluate_basis(self.net, pts, FIELDS)
        omega = self.hard(basis, kind, target)
        return self.hard.fields(omega, basis["u"])


def _heat_data():
    problem = heat_1d(nu=0.2)
    pts, kind = problem.collocation(8, 6, dtype=D)
    experts = BoxPartition(problem.lower, problem.upper, (2, 1))(pts)
    return problem, pts, kind, experts


KINDS = ["qp", "convex_qp", "convex_conic", "argmin", "moe"]


def _needs(kind):
    return [needs_cvxpy] if kind.startswith("convex") else []


CASES = [pytest.param(k, marks=_needs(k)) for k in KINDS]


class Case:
    """A model containing the layer, two mini-batches and a sum-reduced loss.

    For the batched layers a mini-batch is rows of ``x`` and the loss on the concatenated
    batch is the sum of the two losses; for the hard constraint a mini-batch is a set of
    targets for the constrained field (the layer solves the same collocation problem).
    """

    def __init__(self, kind, seed=0):
        self.kind = kind
        g = torch.Generator().manual_seed(100 + seed)
        if kind == "moe":
            problem, pts, kind_, experts = _heat_data()
            self.model = HardPINN(experts, seed=seed)
            exact = problem.exact(pts)
            self.fixed = (pts, kind_, exact)
            self.batches = [exact.clone(), 1.1 * exact + 0.05]
        else:
            self.model = ProjectionNet(kind, seed=seed)
            x = torch.randn(6, 3, generator=g, dtype=D)
            self.target = 0.3 * torch.randn(6, 4, generator=g, dtype=D)
            self.batches = [x[:3], x[3:]]

    def output(self, model, batch):
        if self.kind == "moe":
            pts, kind, exact = self.fixed
            return model(pts, kind, exact)
        return model(batch)

    def loss(self, model, batch, which=None):
        out = self.output(model, batch)
        if self.kind == "moe":
            return ((out - batch) ** 2).sum()
        target = self.target[:3] if which == 0 else self.target[3:] if which == 1 else self.target
        return ((out - target) ** 2).sum()

    def joint_loss(self, model):
        if self.kind == "moe":
            return self.loss(model, self.batches[0]) + self.loss(model, self.batches[1])
        return self.loss(model, torch.cat(self.batches))


# =========================================================================== training loops


def test_argmin_layer_in_a_model_trains_like_its_closed_form():
    """Linear -> ArgminLayer(0.5 z'Mz - y'z) over a batch: the Adam trajectory, the loss
    and the first step's gradients equal those of the model with z = M^-1 y."""
    n, d, B = 4, 3, 16
    g = torch.Generator().manual_seed(1)
    L = torch.randn(n, n, generator=g, dtype=D)
    M = L @ L.T + n * torch.eye(n, dtype=D)
    X = torch.randn(B, d, generator=g, dtype=D)
    T = torch.linalg.solve(M, (X @ torch.randn(d, n, generator=g, dtype=D)).T).T  # reachable targets

    def objective(z, y):
        return 0.5 * z @ M @ z - y @ z

    layer = ArgminLayer(objective, LBFGS(), init=torch.zeros(n, dtype=D), input_ndims=[1])
    closed = lambda y: torch.linalg.solve(M, y.T).T

    def run(project):
        with _seeded(0):
            lin = nn.Linear(d, n).to(D)
        opt = torch.optim.Adam(lin.parameters(), lr=0.2)
        losses, first = [], None
        for _ in range(10):
            opt.zero_grad()
            loss = ((project(lin(X)) - T) ** 2).sum()
            loss.backward()
            if first is None:
                first = [p.grad.clone() for p in lin.parameters()]
            opt.step()
            losses.append(float(loss.detach()))
        return losses, first

    losses, first = run(layer)
    ref_losses, ref_first = run(closed)
    for got, want in zip(first, ref_first):
        _close(got, want, atol=1e-7, rtol=1e-6)
    assert losses[-1] < 0.5 * losses[0]
    _close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-7, rtol=1e-7)


@needs_cvxpy
def test_conic_convex_layer_trains_with_sgd_like_the_ball_projection():
    """The conic route (Clarabel + residual-map derivative) inside a model trained by SGD
    with momentum follows the closed-form model y / max(1, ||y||) step by step."""
    X = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=D)
    T = 0.5 * torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=D)
    model = ProjectionNet("convex_conic", seed=4)
    ball = lambda y: y / torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(1.0)

    def run(forward, params):
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        losses, first = [], None
        for _ in range(6):
            opt.zero_grad()
            loss = ((forward(X) - T) ** 2).sum()
            loss.backward()
            if first is None:
                first = [p.grad.clone() for p in params]
            opt.step()
            losses.append(float(loss.detach()))
        return losses, first

    with _seeded(4):
        ref_lin = nn.Linear(3, 4).to(D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one row has |y| < 1: its ball constraint is inactive
        losses, first = run(model, list(model.parameters()))
    ref_losses, ref_first = run(lambda x: ball(2 * ref_lin(x)), list(ref_lin.parameters()))
    for got, want in zip(first, ref_first):
        _close(got, want, atol=1e-7, rtol=1e-6)
    assert losses[-1] < 0.7 * losses[0]
    _close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-7, rtol=1e-6)


def test_hard_constraint_pinn_trains_and_first_gradient_matches_finite_differences():
    """A PINN whose coefficients come from HardConstraintMoE on heat_1d (2 experts): the
    first step's gradient w.r.t. all parameters (network and the residual's learnable nu)
    matches a central difference along a random direction; Adam reduces the error."""
    problem, pts, kind, experts = _heat_data()
    model = HardPINN(experts, solver=LevenbergMarquardt(tol=1e-13, maxiter=200))
    exact = problem.exact(pts)
    loss_fn = lambda: ((model(pts, kind, exact) - exact) ** 2).mean()
    params = list(model.parameters())
    assert any(p is model.hard.residual.log_nu for p in params)  # the layer's own parameter is trained too
    loss = loss_fn()
    loss.backward()
    g = [p.grad.clone() for p in params]
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=D) for i, p in enumerate(params)]
    eps = 1e-5
    values = []
    with torch.no_grad():
        for s in (eps, -2 * eps, eps):
            for p, vi in zip(params, v):
                p.add_(s * vi)
            if len(values) < 2:
                values.append(float(loss_fn()))
    fd = (values[0] - values[1]) / (2 * eps)
    directional = float(sum((gi * vi).sum() for gi, vi in zip(g, v)))
    assert directional == pytest.approx(fd, rel=1e-5, abs=1e-9)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert model.hard.last_info.converged.all()


@pytest.mark.parametrize("kind", CASES)
def test_gradient_accumulation_over_two_backward_calls_equals_one_backward(kind):
    """Two forward passes kept alive at once, then two backward calls (the accumulation
    pattern): the summed .grad equals one backward of the loss on the joint batch."""
    case = Case(kind)
    model = case.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_a = case.loss(model, case.batches[0], 0)
        loss_b = case.loss(model, case.batches[1], 1)  # the layer's state of the first call is overwritten
        loss_a.backward()
        loss_b.backward()
        accumulated = _grads(model)
        model.zero_grad()
        case.joint_loss(model).backward()
        joint = _grads(model)
    assert accumulated.keys() == joint.keys() and len(joint) >= 2
    for name in joint:
        _close(accumulated[name], joint[name], atol=1e-8, rtol=1e-7, msg=name)


@pytest.mark.parametrize("kind", CASES)
def test_retain_graph_then_second_backward_doubles_the_gradient(kind):
    case = Case(kind)
    model = case.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = case.joint_loss(model)
        loss.backward(retain_graph=True)
        once = _grads(model)
        loss.backward()
        twice = _grads(model)
    for name in once:
        _close(twice[name], 2 * once[name], atol=1e-12, rtol=1e-12, msg=name)


# =========================================================================== module protocol


def _floating_tensors(model):
    return {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t is not None and t.is_floating_point()}


@pytest.mark.parametrize("kind", CASES)
def test_to_float32_and_back_moves_the_layers_tensors_and_outputs_follow(kind):
    case = Case(kind)
    model = case.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out64 = case.output(model, case.batches[0]).detach()
        owned = _floating_tensors(model.layer if kind != "moe" else model.hard)
        assert model.to(torch.float32) is model
        for name, t in _floating_tensors(model).items():
            assert t.dtype == torch.float32, name
        for name, t in _floating_tensors(model.layer if kind != "moe" else model.hard).items():
            assert t.dtype == torch.float32, f"the layer's own tensor {name}"
        assert set(_floating_tensors(model.layer if kind != "moe" else model.hard)) == set(owned)
        if kind == "moe":
            assert model.hard.experts.dtype == torch.int64  # integer buffers keep their dtype
            pts, kind_, exact = case.fixed
            case.fixed = (pts.float(), kind_, exact.float())
            batch = case.batches[0].float()
        else:
            batch = case.batches[0].float()
        out32 = case.output(model, batch)
        assert out32.dtype == torch.float32
        loss = (out32**2).sum()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, name
        _close(out32.double(), out64, atol=2e-4, rtol=1e-3)
        model.zero_grad()
        model.double()
        if kind == "moe":
            case.fixed = (pts, kind_, exact)
        back = case.output(model, case.batches[0])
        assert back.dtype == D
        _close(back.detach(), out64, atol=2e-5, rtol=1e-4)  # parameters were rounded to float32 on the way
        assert model.to("cpu") is model and model.to(torch.device("cpu")) is model


@pytest.mark.parametrize("kind", CASES)
def test_state_dict_round_trip_gives_identical_outputs(kind):
    case = Case(kind, seed=0)
    fresh = Case(kind, seed=7).model  # different random initialisation
    trained = case.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = torch.optim.SGD(trained.parameters(), lr=0.01)
        case.joint_loss(trained).backward()
        opt.step()
        state = trained.state_dict()
        if kind == "argmin":
            assert {"layer.init", "layer.objective.log_w"} <= set(state)
        if kind == "moe":
            assert {"hard.experts", "hard.residual.log_nu"} <= set(state)
        fresh.load_state_dict(state)
        want = case.output(trained, case.batches[0])
        got = case.output(fresh, case.batches[0])
    _close(got, want, atol=1e-12, rtol=1e-12)


def test_moe_state_dict_carries_the_partition():
    x = torch.linspace(0, 1, 12, dtype=D)
    basis = torch.stack([torch.ones_like(x), x, x**2], 1)
    y = torch.where(x < 0.5, torch.ones_like(x), 2 * x)
    saved = HardConstraintMoE(lambda u, y: u - y, BoxPartition([0.0], [1.0], [2])(x[:, None]))  # halves
    loaded = HardConstraintMoE(lambda u, y: u - y, torch.arange(12) % 2)  # even / odd points, also K = 2
    loaded.load_state_dict(saved.state_dict())
    assert torch.equal(loaded.experts, saved.experts)
    _close(loaded(basis, y), saved(basis, y), atol=1e-9, rtol=1e-9)


def test_soft_constraint_follows_the_module_protocol():
    problem, pts, kind, _ = _heat_data()
    basis = evaluate_basis(lambda z: torch.tanh(z @ torch.ones(2, 3, dtype=D)), pts, FIELDS)
    soft = SoftConstraint(problem.residual, 3, dtype=D)
    with torch.no_grad():
        soft.omega.copy_(torch.tensor([[0.5, -1.0, 2.0]], dtype=D))
    other = SoftConstraint(problem.residual, 3, dtype=D)
    other.load_state_dict(soft.state_dict())
    _close(other.penalty(other(basis), basis, pts, kind), soft.penalty(soft(basis), basis, pts, kind), atol=0, rtol=0)
    soft.float()
    assert soft.omega.dtype == torch.float32
    with pytest.raises(ValueError, match="`basis`.*\\.to\\(\\)"):
        soft(basis)  # float64 basis, float32 layer: the error says what to do
    b32 = {k: v.float() for k, v in basis.items()}
    assert soft(b32).dtype == torch.float32
    assert soft.penalty(soft(b32), b32, pts.float(), kind).dtype == torch.float32


@pytest.mark.parametrize("kind", CASES)
def test_deepcopy_after_a_training_step_is_independent_and_identical(kind):
    case = Case(kind)
    model = case.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = case.joint_loss(model)
        loss.backward(retain_graph=True)  # a live graph and .grad: "keep the best model" mid-training
        clone = copy.deepcopy(model)
        _close(case.output(clone, case.batches[0]), case.output(model, case.batches[0]), atol=0, rtol=0)
        before = case.output(model, case.batches[0]).detach()
        with torch.no_grad():
            for p in clone.parameters():
                p.add_(0.1)
        for (name, p), q in zip(model.named_parameters(), clone.parameters()):
            assert not torch.equal(p, q), f"{name} is shared with the copy"
        _close(case.output(model, case.batches[0]), before, atol=0, rtol=0)
        loss.backward()  # the original's graph is untouched by the copy
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("kind", CASES)
def test_pickle_round_trip_before_any_forward_gives_identical_outputs(kind):
    """Every model here uses module-level objectives / residuals, so it pickles."""
    case = Case(kind)
    restored = pickle.loads(pickle.dumps(case.model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _close(case.output(restored, case.batches[0]), case.output(case.model, case.batches[0]), atol=0, rtol=0)


@pytest.mark.parametrize("kind", [pytest.param(k, marks=_needs(k)) for k in KINDS])
def test_pickle_round_trip_after_training_gives_identical_outputs(kind):
    """torch.save(model) after training: a forward and backward pass must not leave
    unpicklable state behind."""
    case = Case(kind)
    model = case.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case.joint_loss(model).backward()
        model.zero_grad()
        restored = pickle.loads(pickle.dumps(model))
        _close(case.output(restored, case.batches[0]), case.output(model, case.batches[0]), atol=0, rtol=0)


def test_unpicklable_user_callables_give_a_clear_error_naming_them():
    problem, _, _, experts = _heat_data()
    layers = [
        ArgminLayer(lambda z, y: ((z - y) ** 2).sum(), LBFGS(), init=torch.zeros(2, dtype=D)),
        HardConstraintMoE(problem.residual, experts),  # the problem's closed form is a local function
    ]
    for layer, culprit in zip(layers, ("lambda", "heat_1d")):
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError), match=culprit):
            pickle.dumps(layer)
        copy.deepcopy(layer)  # deepcopy shares functions: it works


@pytest.mark.parametrize("kind", KINDS[:-1] + ["moe", "hard"])
def test_repr_names_the_configuration(kind):
    if kind.startswith("convex") and cp is None:
        pytest.skip("cvxpy is not installed")
    _, _, _, experts = _heat_data()
    layer = {
        "qp": lambda: QPLayer(maxiter=37),
        "convex_qp": lambda: ProjectionNet("convex_qp").layer,
        "convex_conic": lambda: ProjectionNet("convex_conic").layer,
        "argmin": lambda: ArgminLayer(quartic_objective, LBFGS(), init=torch.zeros(2, dtype=D), input_ndims=[1]),
        "moe": lambda: HardConstraintMoE(HeatResidual(), experts, regularization=1e-6),
        "hard": lambda: HardConstraint(HeatResidual()),
    }[kind]()
    text = repr(layer)
    assert text.startswith(type(layer).__name__ + "(")
    expected = {
        "qp": ["maxiter=37", "tol=", "check="],
        "convex_qp": ["method='qp'", "parameters=", "variables="],
        "convex_conic": ["method='conic'", "parameters=", "variables="],
        "argmin": ["LBFGS", "input_ndims=(1,)"],
        "moe": ["num_experts=2", "LevenbergMarquardt", "regularization=1e-06", "HeatResidual"],
        "hard": ["num_experts=1", "LevenbergMarquardt"],
    }[kind]
    for piece in expected:
        assert piece in text, (piece, text)


def test_soft_constraint_repr_names_the_configuration():
    problem = heat_1d()
    text = repr(SoftConstraint(problem.residual, 5, weight=3.0, experts=torch.tensor([0, 1, 1]), dtype=D))
    assert "5" in text and "3.0" in text and "2" in text, text


@pytest.mark.parametrize("kind", CASES)
def test_eval_and_no_grad_infer_the_same_without_a_graph(kind):
    case = Case(kind)
    model = case.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = case.output(model, case.batches[0])
        assert train.requires_grad
        model.eval()
        evaluated = case.output(model, case.batches[0])
        _close(evaluated, train, atol=0, rtol=0)
        with torch.no_grad():
            out = case.output(model, case.batches[0])
    assert not out.requires_grad and out.grad_fn is None
    _close(out, train.detach(), atol=1e-12, rtol=1e-12)




@pytest.mark.parametrize("kind", [
    pytest.param(k, marks=_needs(k)) for k in KINDS
])
def test_inference_mode_infers_the_same_without_a_graph(kind):
    case = Case(kind)
    model = case.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            want = case.output(model, case.batches[0])
        with torch.inference_mode():
            got = case.output(model, case.batches[0])
    assert got.is_inference() and not got.requires_grad and got.grad_fn is None
    _close(got, want, atol=1e-12, rtol=1e-12)


def test_argmin_layer_default_solver_under_inference_mode_minimal():
    """Gradient-based solvers run with inference mode off inside (on copies of their
    inputs); the solution comes back as an inference tensor."""
    layer = ArgminLayer(quartic_objective, init=torch.zeros(3, dtype=D))  # default solver: LBFGS
    y = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    with torch.no_grad():
        want = layer(y)  # (0.6823, -1.0, 0.4239): z + z^3 = y
    with torch.inference_mode():
        got = layer(y)
    _close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", CASES)
def test_frozen_model_and_inputs_give_outputs_without_grad_and_input_grads_flow_alone(kind):
    case = Case(kind)
    model = case.model.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = case.output(model, case.batches[0])
        assert not out.requires_grad
        if kind == "moe":  # a differentiable datum of the layer: the boundary / initial targets
            pts, kind_, exact = case.fixed
            target = exact.clone().requires_grad_()
            out = model(pts, kind_, target)
            (g,) = torch.autograd.grad(out.sum(), target)
            assert g[kind_ == INTERIOR].abs().max() == 0 and g.abs().max() > 0  # only the boundary data act
        else:
            x = case.batches[0].clone().requires_grad_()
            out = case.output(model, x)
            (g,) = torch.autograd.grad(out.sum(), x)
            assert g.shape == x.shape and torch.isfinite(g).all()
    assert all(p.grad is None for p in model.parameters())


# =========================================================================== batching


@pytest.mark.parametrize("kind", [k for k in CASES if k.values[0] != "moe"])
def test_a_batch_of_one_equals_the_unbatched_call(kind):
    case = Case(kind)
    model = case.model
    x = case.batches[0][:1].clone().requires_grad_()
    x0 = case.batches[0][0].clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = 2 * model.lin(x)
        y0 = 2 * model.lin(x0)
        z, z0 = model.project(y), model.project(y0)
        assert z.shape == (1, 4) and z0.shape == (4,)
        _close(z[0], z0, atol=1e-10, rtol=1e-10)
        (g,) = torch.autograd.grad((z[0] * torch.arange(4, dtype=D)).sum(), x)
        (g0,) = torch.autograd.grad((z0 * torch.arange(4, dtype=D)).sum(), x0)
    _close(g[0], g0, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("kind", [k for k in CASES if k.values[0] != "moe"])
def test_a_batch_inside_a_model_equals_a_loop_over_its_rows(kind):
    """Outputs row by row, and the gradient of every parameter (the Linear layer's, and the
    ArgminLayer objective's own log_w shared by all rows) is the sum of the per-row ones."""
    case = Case(kind)
    model = case.model
    x = torch.cat(case.batches)
    w = torch.randn(x.shape[0], 4, dtype=D, generator=torch.Generator().manual_seed(9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = model(x)
        (z * w).sum().backward()
        batched = _grads(model)
        model.zero_grad()
        rows = []
        for i in range(x.shape[0]):
            zi = model(x[i])
            (zi * w[i]).sum().backward()
            rows.append(zi.detach())
        looped = _grads(model)
    _close(z.detach(), torch.stack(rows), atol=1e-10, rtol=1e-9)
    assert batched.keys() == looped.keys()
    for name in batched:
        _close(batched[name], looped[name], atol=1e-8, rtol=1e-7, msg=name)


@pytest.mark.parametrize("kind", [
    "qp",
    pytest.param("convex_qp", marks=needs_cvxpy),
    pytest.param("convex_conic", marks=needs_cvxpy),
    "argmin",
])
def test_an_empty_batch_gives_empty_outputs_or_a_clear_error(kind):
    """A data loader's last, empty batch: outputs with 0 rows (and a zero gradient), or an
    error of the layer's own that says what is wrong."""
    model = Case(kind).model
    x = torch.zeros(0, 3, dtype=D, requires_grad=True)
    try:
        z = model(x)
    except ValueError as err:
        assert "no elements" in str(err) or "empty" in str(err) or "batch" in str(err), err
        return
    assert z.shape == (0, 4)
    (g,) = torch.autograd.grad(z.sum(), x)
    assert g.shape == (0, 3)


def test_hard_constraint_without_points_is_refused_clearly_or_regularized_to_zero():
    basis, y = torch.zeros(0, 3, dtype=D), torch.zeros(0, dtype=D)
    with pytest.raises(ValueError, match="fewer residual rows"):
        HardConstraint(lambda u, y: u - y)(basis, y)
    omega = HardConstraint(lambda u, y: u - y, regularization=1e-3)(basis, y)
    assert omega.shape == (1, 3) and omega.abs().max() == 0


# =========================================================================== composition


def _fd_hessian(f, x, eps=1e-5):
    """Central differences of the autograd gradient of f at x (columns of the Hessian)."""
    def g(t):
        t = t.detach().clone().requires_grad_()
        return torch.autograd.grad(f(t), t)[0]

    cols = [(g(x + eps * e) - g(x - eps * e)) / (2 * eps) for e in torch.eye(x.numel(), dtype=x.dtype)]
    return torch.stack(cols).reshape(x.shape + x.shape)


def test_argmin_layer_hessian_matches_finite_differences():
    """Second derivatives through the implicit function theorem (custom_root's adjoint
    solve is differentiable): torch.autograd.functional.hessian, torch.func.hessian and
    create_graph double backward agree with central differences of the gradient."""
    layer = ArgminLayer(Quartic(), LBFGS(tol=1e-12), init=torch.zeros(3, dtype=D))
    f = lambda y: (layer(y) ** 3).sum() + layer(y)[0] * layer(y)[1]
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    H_fd = _fd_hessian(f, y0)
    assert H_fd.abs().max() > 1e-2 and (H_fd - torch.diag(torch.diag(H_fd))).abs().max() > 1e-3
    _close(torch.autograd.functional.hessian(f, y0), H_fd, atol=1e-6, rtol=1e-5)
    _close(hessian(f)(y0), H_fd, atol=1e-6, rtol=1e-5)
    y = y0.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(y), y, create_graph=True)
    (row,) = torch.autograd.grad(g[1], y)
    _close(row, H_fd[1], atol=1e-6, rtol=1e-5)
    # the learnable parameter of the objective gets a mixed second derivative too
    w = layer.objective.log_w
    (gw,) = torch.autograd.grad(f(y), w, create_graph=True)
    (gwy,) = torch.autograd.grad(gw, y)
    eps = 1e-5

    def dw_at(t):
        t = t.detach().clone()
        return torch.autograd.grad(f(t), w)[0]

    fd = torch.stack([(dw_at(y0 + eps * e) - dw_at(y0 - eps * e)) / (2 * eps) for e in torch.eye(3, dtype=D)])
    _close(gwy, fd, atol=1e-6, rtol=1e-5)


@needs_cvxpy
def test_conic_convex_layer_hessian_matches_the_ball_projection():
    x, y = cp.Variable(2), cp.Parameter(2)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [cp.norm(x, 2) <= 1]),
                        parameters=[y], variables=[x])
    assert layer.method == "conic"
    f = lambda t: (layer(t)[0] ** 3).sum()
    ref = lambda t: ((t / torch.linalg.vector_norm(t)) ** 3).sum()
    t0 = torch.tensor([2.0, 0.5], dtype=D)
    _close(torch.autograd.functional.hessian(f, t0), torch.autograd.functional.hessian(ref, t0), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind", ["qp", pytest.param("convex_qp", marks=needs_cvxpy)])
def test_qp_route_second_derivatives_are_right_or_refused_clearly(kind):
    """z = clamp(y, -1/2, 1/2) by a QP, f = sum z^3: the Hessian is diag(6 z) on the free
    coordinates (the active set is locally constant), which is not zero."""
    model = ProjectionNet(kind)
    f = lambda y: (model.project(y) ** 3).sum()
    y0 = torch.tensor([0.3, -0.2, 0.9, -1.4], dtype=D)
    want = torch.diag(6 * y0 * (y0.abs() < 0.5))
    refusal = ("twice", "second", "double", "not supported")
    try:
        H = torch.autograd.functional.hessian(f, y0)
    except (RuntimeError, NotImplementedError) as err:
        assert any(word in str(err) for word in refusal), err
    else:
        _close(H, want, atol=1e-7, rtol=1e-6)
    y = y0.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(y), y, create_graph=True)
    try:
        (row,) = torch.autograd.grad(g[0], y)
    except (RuntimeError, NotImplementedError) as err:
        assert any(word in str(err) for word in refusal), err
    else:
        _close(row, want[0], atol=1e-7, rtol=1e-6)


def test_hard_constraint_moe_second_derivatives_match_finite_differences_on_burgers():
    """Burgers (a nonlinear residual: the Hessian's second-order terms matter): the Hessian
    of a loss w.r.t. the basis network's output bias, through evaluate_basis and the
    batched implicit backward of 2 experts, matches central differences of the gradient."""
    problem = burgers_1d(nu=0.1)
    pts, kind = problem.collocation(8, 6)
    experts = BoxPartition(problem.lower, problem.upper, (2, 1))(pts)
    with _seeded(5):
        W1, b1 = torch.randn(2, 8, dtype=D), torch.randn(8, dtype=D)
        W2 = torch.randn(8, 5, dtype=D) / 3
    layer = HardConstraintMoE(problem.residual, experts, solver=LevenbergMarquardt(tol=1e-12, maxiter=200))
    exact = problem.exact(pts)

    def loss(b2):
        basis = evaluate_basis(lambda z: torch.tanh(z @ W1 + b1) @ W2 + b2, pts, FIELDS)
        u = layer.fields(layer(basis, pts, kind), basis["u"])
        return ((u - exact) ** 2).sum()

    b0 = 0.1 * torch.arange(5, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 5-function basis cannot solve Burgers exactly: least squares
        H_fd = _fd_hessian(loss, b0)
        H = torch.autograd.functional.hessian(loss, b0)
    assert H_fd.abs().max() > 1e-3
    _close(H, H_fd, atol=1e-5 * float(H_fd.abs().max()), rtol=1e-4)


def test_hard_constraint_moe_composes_with_torch_func_on_heat():
    """jacrev w.r.t. the boundary targets, vmap over several target sets, and torch.func.grad
    of a functional_call over the PINN's parameters dict (the meta-learning pattern), all
    against the unbatched autograd computation."""
    problem, pts, kind, experts = _heat_data()
    model = HardPINN(experts, solver=LevenbergMarquardt(tol=1e-13, maxiter=200))
    exact = problem.exact(pts)
    with torch.no_grad():
        basis = evaluate_basis(model.net, pts, FIELDS)
    layer = model.hard
    omega_of = lambda target: layer(basis, kind, target)
    J = jacrev(omega_of)(exact)
    assert J.shape == (2, 5, len(pts))
    assert J[:, :, kind == INTERIOR].abs().max() == 0  # interior rows do not read the target
    t = exact.clone().requires_grad_()
    w = torch.randn(2, 5, dtype=D, generator=torch.Generator().manual_seed(6))
    (row,) = torch.autograd.grad((omega_of(t) * w).sum(), t)
    _close(torch.einsum("kn,knp->p", w, J), row, atol=1e-9, rtol=1e-8)
    targets = torch.stack([exact, 0.5 * exact, exact + 0.1])
    batched = vmap(omega_of)(targets)
    for i in range(3):
        _close(batched[i], omega_of(targets[i]), atol=1e-10, rtol=1e-9)
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = lambda p: ((functional_call(model, p, (pts, kind, exact)) - exact) ** 2).sum()
    g = grad(loss)(params)
    model.zero_grad()
    loss(dict(model.named_parameters())).backward()
    for name, p in model.named_parameters():
        _close(g[name], p.grad, atol=1e-10, rtol=1e-8, msg=name)


def test_argmin_layer_functional_call_with_swapped_parameters():
    """torch.func.functional_call with other parameter values solves the problem those
    values define (the objective module's parameters are swapped, not the stored ones)."""
    layer = ArgminLayer(Quartic(), LBFGS(), init=torch.zeros(3, dtype=D))
    y = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    w = torch.tensor(math.log(3.0), dtype=D)
    z = functional_call(layer, {"objective.log_w": w}, (y,))
    _close(z + 3.0 * z**3, y, atol=1e-7, rtol=0)  # stationarity of the swapped objective
    gw = grad(lambda lw: functional_call(layer, {"objective.log_w": lw}, (y,)).sum())(w)
    # implicit derivative: z + w z^3 = y  =>  dz/dlog_w = -w z^3 / (1 + 3 w z^2)
    zd = z.detach()
    _close(gw, (-3.0 * zd**3 / (1 + 9.0 * zd**2)).sum(), atol=1e-7, rtol=1e-6)
    assert float(layer.objective.log_w.detach()) == 0.0  # the stored parameter is untouched


@needs_cvxpy
@pytest.mark.parametrize("kind", ["convex_qp", "convex_conic"])
def test_convex_layer_under_vmap_works_or_refuses_clearly(kind):
    layer = ProjectionNet(kind).layer
    ys = torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(8))
    try:
        out = vmap(lambda y: layer(y)[0])(ys)
    except NotImplementedError as err:
        assert "batch" in str(err), err
        return
    _close(out, layer(ys)[0], atol=1e-9, rtol=1e-8)


# =========================================================================== errors


def test_inputs_on_another_device_are_named():
    """A second device without a GPU: the meta device.  Mixed devices are refused before any
    work, naming the offending argument and both devices."""
    meta = torch.device("meta")
    Q, q = torch.eye(2, dtype=D), torch.zeros(2, dtype=D)
    with pytest.raises(TypeError, match="`h`.*meta"):
        QPLayer()(Q, q, G=torch.ones(1, 2, dtype=D), h=torch.ones(1, dtype=D, device=meta))
    problem, pts, kind, experts = _heat_data()
    basis = evaluate_basis(lambda z: torch.tanh(z @ torch.ones(2, 3, dtype=D)), pts, FIELDS)
    with pytest.raises(TypeError, match="`data\\[1\\]`.*meta"):
        HardConstraintMoE(HeatResidual(), experts)(basis, kind, problem.exact(pts).to(meta))
    if cp is not None:
        A, b, z = cp.Parameter((3, 2)), cp.Parameter(3), cp.Variable(2)
        layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(A @ z - b) + cp.sum_squares(z))),
                            parameters=[A, b], variables=[z])
        with pytest.raises(TypeError, match=f"`{b.name()}`.*meta"):
            layer(torch.ones(3, 2, dtype=D), torch.ones(3, dtype=D, device=meta))


def test_argmin_layer_inputs_on_another_device_are_named():
    layer = ArgminLayer(lambda z, x, w: 0.5 * ((z - x * w) ** 2).sum(), LBFGS(), init=torch.zeros(3, dtype=D))
    with pytest.raises((TypeError, ValueError), match="input 1|`w`|inputs"):
        layer(torch.ones(3, dtype=D), torch.ones(3, dtype=D, device="meta"))


def test_integer_inputs_are_refused_naming_the_argument():
    with pytest.raises(TypeError, match="`q`.*int64"):
        QPLayer()(torch.eye(3, dtype=D), torch.zeros(3, dtype=torch.int64))
    x = torch.linspace(0, 1, 6, dtype=D)
    with pytest.raises(ValueError, match="`basis`.*int64"):
        HardConstraint(lambda u, y: u - y)(torch.stack([torch.ones(6), x], 1).long(), x)
    if cp is not None:
        layer = ProjectionNet("convex_qp").layer
        with pytest.raises(TypeError, match="parameter `.*`.*floating-point.*int64"):
            layer(torch.zeros(4, dtype=torch.int64))
