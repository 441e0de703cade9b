r"""Bridge to :func:`scipy.optimize.minimize`, with gradients and Hessian products from torch."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch.func import vmap

from .._tolerance import default_tol
from ..implicit.linear_solve import LinearSolver
from .._checks import check_fields as _check_fields
from ..implicit.operators import hvp
from ..status import ConvergenceWarning, Status
from ..typing import Objective, TensorTree
from ._base import COMMON_RULES, FlatObjective, Solver, SolverInfo, make_info
from .gradient_descent import polish_by_descent

__all__ = ["ScipyMinimize", "ScipyInfo"]

_GRADIENT_METHODS = {
    "cg", "bfgs", "newton-cg", "l-bfgs-b", "tnc", "slsqp", "trust-constr",
    "dogleg", "trust-ncg", "trust-exact", "trust-krylov",
}
_HESSP_METHODS = {"newton-cg", "trust-ncg", "trust-krylov", "trust-constr"}
_HESS_METHODS = {"dogleg", "trust-exact"}
_NO_STOP_CALLBACK = {"tnc", "slsqp", "cobyla"}  # callbacks cannot stop these early
_KNOWN = sorted(_GRADIENT_METHODS | {"nelder-mead", "powell", "cobyla", "cobyqa"})


@dataclass(frozen=True)
class ScipyInfo(SolverInfo):
    """:class:`~bilevel.solvers.SolverInfo` plus SciPy's own outcome.

    Attributes:
        message: ``OptimizeResult.message``.
        scipy_status: ``OptimizeResult.status`` (method-specific; 99 when the
            gradient test of :class:`ScipyMinimize` stopped it).
        nfev: function evaluations.

    The fields of :class:`~bilevel.solvers.SolverInfo` keep their meaning: ``status``
    and ``converged`` follow the gradient test of :class:`ScipyMinimize`, whatever
    SciPy's own status says.

    Example:
        >>> import torch
        >>> from bilevel.solvers import ScipyInfo, ScipyMinimize, SolverInfo
        >>> f = lambda w, c: ((w - c) ** 2).sum() + (w ** 4).sum()
        >>> c = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> w, info = ScipyMinimize().run(f, torch.zeros(2, dtype=torch.float64), c)
        >>> isinstance(info, ScipyInfo), isinstance(info, SolverInfo)
        (True, True)
        >>> bool(info.converged), info.scipy_status        # 99: stopped by the gradient test
        (True, 99)
        >>> bool(info.residual_norm <= info.tolerance), info.nfev > 0, isinstance(info.message, str)
        (True, True, True)
    """

    message: str = ""
    scipy_status: int = 0
    nfev: int = 0


@dataclass(frozen=True)
class ScipyMinimize(Solver):
    r"""Minimize ``fun`` with :func:`scipy.optimize.minimize`, gradients from torch autograd.

    SciPy iterates on a flat float64 NumPy copy of ``init`` (its leaves
    concatenated); ``fun`` is evaluated in ``init``'s dtype and device (so tensors
    it captures keep working), and its value, gradient (``jac``, by autograd),
    Hessian-vector products (``hessp``, by :func:`~bilevel.implicit.operators.hvp`,
    for Newton-CG, trust-ncg, trust-krylov and trust-constr) or dense Hessian
    (``hess``, for dogleg and trust-exact) are handed back in float64.  The
    solution comes back in ``init``'s dtypes and device.

    Stopping: the gradient test of :mod:`bilevel.solvers`,
    :math:`\|\nabla f(x_k)\|_2 \le \mathrm{tol}\cdot\max(1, \|\nabla f(x_0)\|_2)`
    (``tol=None``: ``sqrt(eps)`` of ``init``'s dtype), checked in a callback
    after every iteration (a ``StopIteration``, SciPy status 99).  The method's own
    tests are set not to stop first: for L-BFGS-B ``gtol = threshold / sqrt(n)``
    (it tests the largest entry) and ``ftol = 0`` (its default relative
    decrease test ``ftol = 2.2e-9`` stops early on nearly separable or flat
    problems); ``gtol = threshold`` with ``norm = 2`` for BFGS and CG; ``xtol = 0``
    for Newton-CG, which has no gradient test.  ``options`` override these.
    ``status`` is SUCCESS iff the gradient test holds at the returned point,
    MAX_ITERATIONS if SciPy ran out of iterations, BREAKDOWN if it stopped for
    another reason.  A gradient method stopped short by its line search (value-based
    line searches cannot reach gradient norms below about
    :math:`\sqrt{\varepsilon L |f|}`, e.g. warm-started near the solution of an
    objective with a large value) is finished by at most 200 steps of
    :class:`~bilevel.solvers.GradientDescent`, whose secant test does not depend on the objective's
    value (the message says how many); SciPy's own status and message are kept
    in :class:`ScipyInfo` and in the warning.

    Args:
        method: a :func:`scipy.optimize.minimize` method name (case-insensitive;
            default ``"L-BFGS-B"``).  Unconstrained use only: no bounds or constraints.
        tol: relative gradient tolerance; ``None``: ``sqrt(eps)`` of the dtype.
        options: extra method options (a mapping), e.g. ``{"maxcor": 20}``.
        maxiter: iteration budget; ``None`` (default): SciPy's default for the method.
        implicit_solve: linear solver of the backward system (``None``: custom_root's default).

    Raises:
        ImportError: SciPy is not installed.
        ValueError: an unknown method (the error lists the known ones), a
            setting out of range, a non-scalar ``fun``.
        TypeError: ``fun`` not callable, ``init`` not a tree of floating tensors.
        FloatingPointError: a non-finite objective or gradient at an evaluation.

    Example:
        >>> import torch
        >>> from bilevel.solvers import ScipyMinimize
        >>> f = lambda w, c: ((w - c) ** 2).sum() + (w ** 4).sum()
        >>> c = torch.tensor([1.0, -1.0], requires_grad=True)       # float32 in, float32 out
        >>> w = ScipyMinimize()(f, torch.zeros(2), c)
        >>> dw = torch.autograd.grad(w[0], c)[0]                    # d w_0 / d c_0 = 1 / (1 + 6 w_0^2)
        >>> w.dtype, torch.allclose(dw, torch.tensor([1 / (1 + 6 * w[0].item() ** 2), 0.0]))
        (torch.float32, True)

    References:
        Virtanen, P. et al. `SciPy 1.0: fundamental algorithms for scientific
        computing in Python <https://doi.org/10.1038/s41592-019-0686-2>`_. Nature
        Methods, 2020.
        Byrd, R. H., Lu, P., Nocedal, J. and Zhu, C. `A limited memory algorithm for
        bound constrained optimization <https://doi.org/10.1137/0916069>`_. SIAM J.
        Sci. Comput., 1995 (L-BFGS-B).
    """

    method: str = "L-BFGS-B"
    tol: Optional[float] = None
    options: Optional[Mapping[str, Any]] = None
    maxiter: Optional[int] = None
    implicit_solve: Optional[LinearSolver] = None

    def __post_init__(self):
        rules = dict(COMMON_RULES)
        rules["maxiter"] = (lambda v: v is None or COMMON_RULES["maxiter"][0](v), "None or a positive int")
        _check_fields(
            self,
            **rules,
            method=(lambda v: isinstance(v, str) and v.lower() in _KNOWN,
                    f"one of the scipy.optimize.minimize methods {_KNOWN}"),
            options=(lambda v: v is None or isinstance(v, Mapping), "None or a mapping of method options"),
        )

    def __hash__(self) -> int:  # `options` may be a dict
        return hash((type(self), self.method, self.tol, self.maxiter))

    def _default_options(self, threshold: float, n: int) -> dict:
        method = self.method.lower()
        per_method = {
            "l-bfgs-b": dict(gtol=threshold / math.sqrt(n), ftol=0.0, maxfun=10**9),
            "bfgs": dict(gtol=threshold, norm=2),
            "cg": dict(gtol=threshold, norm=2),
            "newton-cg": dict(xtol=0.0),
            "trust-ncg": dict(gtol=threshold),
            "trust-krylov": dict(gtol=threshold),
            "trust-exact": dict(gtol=threshold),
            "dogleg": dict(gtol=threshold),
            "trust-constr": dict(gtol=threshold / math.sqrt(n), xtol=0.0),
            "tnc": dict(gtol=threshold / math.sqrt(n), ftol=0.0, xtol=0.0),
            "slsqp": dict(ftol=0.0),
        }
        options = per_method.get(method, {})
        if self.maxiter is not None:
            options["maxiter"] = self.maxiter
            if method == "tnc":
                options["maxfun"] = options.pop("maxiter")
        options.update(self.options or {})
        return options

    def run(self, fun: Objective, init: TensorTree, *args: Any) -> tuple[TensorTree, ScipyInfo]:
        try:
            import scipy.optimize
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("ScipyMinimize needs SciPy: pip install 'bilevel[scipy]'") from err
        obj = FlatObjective(fun, init, args, self.name)
        like = obj.x0
        method = self.method.lower()
        count = {"iterations": 0}
        cache = {}

        def to_torch(x_np):
            return torch.as_tensor(np.asarray(x_np, dtype=np.float64)).to(like.dtype).to(like.device)

        def evaluate(x_np):
            key = np.asarray(x_np, dtype=np.float64).tobytes()
            if cache.get("key") != key:
                value, g = obj.value_and_grad(to_torch(x_np))
                if not (math.isfinite(float(value)) and bool(torch.isfinite(g).all())):
                    raise FloatingPointError(
                        f"{self.name}: the objective or its gradient is not finite (NaN or inf) at "
                        f"iteration {count['iterations']} (evaluation {obj.evaluations}). Check `fun` "
                        "and its arguments for NaN/inf."
                    )
                cache.update(key=key, value=value, grad=g)
            return cache["value"], cache["grad"]

        def value_and_jac(x_np):
            value, g = evaluate(x_np)
            return float(value), g.detach().cpu().double().numpy()

        def flat_fun(x):
            return obj.fun(obj.tree(x), *obj.args)

        def hessp(x_np, p_np):
            with torch.no_grad():
                out = hvp(flat_fun, to_torch(x_np), to_torch(p_np))
            return out.detach().cpu().double().numpy()

        def hess(x_np):
            x = to_torch(x_np)
            eye = torch.eye(x.numel(), dtype=x.dtype, device=x.device)
            with torch.no_grad():
                return vmap(lambda e: hvp(flat_fun, x, e))(eye).detach().cpu().double().numpy()

        g0_norm = float(torch.linalg.vector_norm(evaluate(like.cpu().double().numpy())[1]))
        threshold = (default_tol(like.dtype) if self.tol is None else self.tol) * max(1.0, g0_norm)

        def callback(intermediate_result):
            count["iterations"] += 1
            _, g = evaluate(intermediate_result.x)
            if float(torch.linalg.vector_norm(g)) <= threshold:
                raise StopIteration

        kwargs = dict(method=self.method, options=self._default_options(threshold, like.numel()))
        if method in _GRADIENT_METHODS:
            kwargs.update(jac=True, fun=value_and_jac)
        else:
            kwargs.update(fun=lambda x: value_and_jac(x)[0])
        if method in _HESSP_METHODS:
            kwargs["hessp"] = hessp
        if method in _HESS_METHODS:
            kwargs["hess"] = hess
        if method not in _NO_STOP_CALLBACK:
            kwargs["callback"] = callback
        x0 = like.detach().cpu().double().numpy()
        if g0_norm <= threshold:
            result = scipy.optimize.OptimizeResult(x=x0, message="initial point is optimal", status=0, nit=0, nfev=1)
        else:
            result = scipy.optimize.minimize(x0=x0, **kwargs)
        value, g = evaluate(result.x)
        residual = float(torch.linalg.vector_norm(g))
        iterations = int(result.get("nit", count["iterations"]))
        if residual <= threshold:
            status = Status.SUCCESS
        elif int(result.get("status", 0)) == 1 or (self.maxiter is not None and iterations >= self.maxiter):
            status = Status.MAX_ITERATIONS  # SciPy's status 1: the iteration budget ran out
        else:
            status = Status.BREAKDOWN  # SciPy stopped for its own reason (e.g. a failed line search)
        solution, message = obj.tree(to_torch(result.x)), str(result.get("message", ""))
        budget = (200 if self.maxiter is None else self.maxiter - iterations)
        if status == Status.BREAKDOWN and method in _GRADIENT_METHODS and budget > 0:
            # SciPy's line searches test decreases of the objective's value, which stall
            # below its rounding (a warm start near the solution of a large objective);
            # gradient descent's secant test goes on from there.
            solution, polish = polish_by_descent(fun, solution, args, threshold / max(1.0, residual), budget)
            iterations += int(polish.iterations)
            value, residual, status = polish.value, float(polish.residual_norm), Status(int(polish.status))
            message += f"; then {int(polish.iterations)} gradient-descent steps"
        base = make_info(iterations, residual, value, status, threshold, like)
        info = ScipyInfo(
            **{f.name: getattr(base, f.name) for f in fields(SolverInfo)},
            message=message,
            scipy_status=int(result.get("status", 0)),
            nfev=int(result.get("nfev", obj.evaluations)),
        )
        if not bool(info.converged):
            warnings.warn(f"{info.summary(self.name)} SciPy: {info.message}", ConvergenceWarning, stacklevel=2)
        return solution, info

