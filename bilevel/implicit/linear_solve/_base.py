"""Shared infrastructure of the linear solvers: pytree and batch handling, info, status."""

from __future__ import annotations

import contextlib
import functools
import math
import re
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from ..._checks import check_fields as _check_fields
from ..._checks import nonneg_float as _nonneg_float
from ..._checks import positive_int_or_none as _positive_int_or_none
from ..._checks import tol_ok as _tol_ok
from ..._tolerance import default_tol
from ..._tree import (
    Raveler,
    all_finite,
    check_same_structure,
    describe,
    in_dual_level,
    inside_transform,
    is_transformed,
    tree_leaves,
)
from ...status import Status
from ...typing import Matvec, TensorTree

FlatMatvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LinearSolveInfo:
    r"""Per-batch-element outcome of a linear solve (all tensors of the batch shape).

    A pytree node (its four tensors are the leaves): ``torch.func.vmap`` over a
    solve returns the infos of the elements stacked.

    Attributes:
        iterations: number of iterations (matrix-vector products for Krylov
            methods) each element ran.
        residual_norm: ``||b - A x||`` at the returned ``x``; for a CG solve
            that ran out of budget or broke down, CG's recursive residual (equal
            in exact arithmetic, within rounding drift otherwise: a success is
            always confirmed with the true residual).
        b_norm: ``||b||``.
        status: :class:`~bilevel.status.Status` codes (``int64``).
        negative_curvature: where the solver can tell, whether ``A`` has an
            eigenvalue below :math:`-\sqrt{\mathrm{eps}}` times its norm (booleans):
            :class:`MINRES` from the inertia of its Lanczos matrix (below
            :math:`-\sqrt{\mathrm{eps}}\,\|T_k\|_F`), :class:`Auto` from the
            eigenvalues of a matrix whose Cholesky factorization broke down;
            ``None`` otherwise.  An indefinite ``A`` is no failure of the solve
            (``status`` is unchanged); :func:`~bilevel.hypergrad` reads it as a
            saddle point of the inner problem.

    Example:
        Two systems solved together (``batch_dims=1``); the second has
        :math:`b = 0` and is solved by :math:`x = 0` without an iteration:

        >>> import torch
        >>> from bilevel.implicit.linear_solve import CG
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
        >>> x, info = CG()(lambda v: v @ A, b, batch_dims=1)
        >>> info.converged, info.iterations
        (tensor([True, True]), tensor([2, 0]))
        >>> bool((info.relative_residual < 1e-12).all()), info.summary()
        (True, 'linear solve converged')
    """

    iterations: torch.Tensor
    residual_norm: torch.Tensor
    b_norm: torch.Tensor
    status: torch.Tensor
    negative_curvature: Optional[torch.Tensor] = None

    @property
    def converged(self) -> torch.Tensor:
        """Boolean tensor: which elements reached the tolerance."""
        return self.status == Status.SUCCESS

    @property
    def relative_residual(self) -> torch.Tensor:
        """``||b - A x|| / ||b||`` (0 where ``b = 0`` and the residual is 0)."""
        return self.residual_norm / self.b_norm.clamp_min(torch.finfo(self.b_norm.dtype).tiny)

    def summary(self) -> str:
        """One line naming the failed elements, their residuals and the remedy."""
        codes = self.status.reshape(-1).tolist()
        failed = [i for i, code in enumerate(codes) if code != Status.SUCCESS]
        if not failed:
            return "linear solve converged"
        rel = self.relative_residual.reshape(-1).tolist()
        worst = max(failed, key=lambda i: rel[i] if math.isfinite(rel[i]) else math.inf)
        where = "" if self.status.dim() == 0 else f" (batch elements {failed[:8]}{'...' if len(failed) > 8 else ''})"
        status = Status(codes[worst])
        return (
            f"linear solve failed{where}: {status.name}, relative residual "
            f"{rel[worst]:.3g} after {int(self.iterations.reshape(-1)[worst])} "
            f"iterations; {status.message}"
        )


# A pytree node, so that an info can leave torch.func.vmap (stacked per element)
# and pass through tree utilities like the tensors it holds.
torch.utils._pytree.register_pytree_node(
    LinearSolveInfo,
    lambda info: ([info.iterations, info.residual_norm, info.b_norm, info.status]
                  + ([] if info.negative_curvature is None else [info.negative_curvature]),
                  info.negative_curvature is not None),
    lambda leaves, _: LinearSolveInfo(*leaves),
    serialized_type_name="bilevel.implicit.linear_solve.LinearSolveInfo",
)


@dataclass(frozen=True)
class LinearSolver:
    """Base class: pytree and batch handling around a flat ``(B, n)`` solve.

    Subclasses implement :meth:`_solve`, which receives ``matvec`` and ``b`` as
    flat tensors of shape ``(B, n)`` (``B`` independent systems), ``x0`` flat or
    ``None``, and ``flatten``, which turns any other tree-to-tree map (a
    preconditioner) into a flat one; it returns ``(x, iterations, status)``.  The
    base class recomputes the true residual ``||b - A x||`` (one more
    product) and builds the info.  A solve in which no element claims success
    may return ``(x, iterations, status, residual_norm)`` with its own residual
    estimate (e.g. CG's recursive residual, equal to the true one in exact
    arithmetic): a solve that ran out of budget is not confirmed, and the
    product is saved.  A least-squares solver may add a fifth element (after a
    residual estimate or ``None``): which elements' ``A`` is rank-deficient, so
    that the derivative includes the motion of its null space (``Direct("lstsq")``
    reads it off its SVD); a sixth (after ``None`` in those places) says which
    elements' ``A`` is known to be indefinite (``info.negative_curvature``;
    :class:`MINRES` reads it off its Lanczos matrix, :class:`Auto` off the
    spectrum of a matrix whose Cholesky factorization broke down).

    Example:
        A solver for diagonal operators (one product recovers the diagonal); the
        base class handles the tree ``b`` and reports the true residual:

        >>> import torch
        >>> from dataclasses import dataclass
        >>> from bilevel.implicit.linear_solve import LinearSolver
        >>> from bilevel.status import Status
        >>> @dataclass(frozen=True)
        ... class Diagonal(LinearSolver):
        ...     def _solve(self, matvec, b, x0, flatten):
        ...         x = b / matvec(torch.ones_like(b))
        ...         ones = torch.ones(b.shape[0], dtype=torch.int64)
        ...         return x, ones, torch.full_like(ones, Status.SUCCESS)
        >>> d = {"u": torch.tensor([2.0, 4.0]), "w": torch.tensor(8.0)}
        >>> b = {"u": torch.ones(2), "w": torch.tensor(2.0)}
        >>> x, info = Diagonal()(lambda v: {k: d[k] * v[k] for k in v}, b)
        >>> x
        {'u': tensor([0.5000, 0.2500]), 'w': tensor(0.2500)}
        >>> float(info.residual_norm), bool(info.converged)
        (0.0, True)
    """

    def __call__(
        self,
        matvec: Matvec,
        b: TensorTree,
        x0: Optional[TensorTree] = None,
        *,
        batch_dims: int = 0,
    ) -> tuple[TensorTree, LinearSolveInfo]:
        if not callable(matvec):
            raise TypeError(f"`matvec` must be callable (v -> A v); got {type(matvec).__name__}.")
        if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims < 0:
            raise ValueError(f"`batch_dims` must be a non-negative int; got {batch_dims!r}.")
        rav = Raveler(b, batch_dims, name="b")
        if not rav.dtype.is_floating_point and not rav.dtype.is_complex:
            raise TypeError(f"`b` must be floating point; got dtype {rav.dtype}.")
        if rav.dtype.is_complex and not all(d.is_complex for d in rav.dtypes):
            # the complex iterates would be cast to the real leaves' dtypes (imaginary parts dropped)
            raise TypeError(
                f"{type(self).__name__}: `b` mixes real and complex leaves (dtypes "
                f"{sorted({str(d) for d in rav.dtypes})}); a complex system needs complex unknowns "
                "throughout: cast the real leaves to the complex dtype."
            )
        xrav = rav if x0 is None else self._unknowns(x0, b, rav, batch_dims)
        rectangular = xrav is not rav  # A maps x0's space to b's: least squares only
        batch, m, n = rav.batch_shape, rav.size, xrav.size
        nbatch = math.prod(batch)
        dtype = torch.promote_types(rav.dtype, xrav.dtype) if rectangular else rav.dtype

        b_flat = rav.ravel(b).reshape(nbatch, m)
        if rectangular and b_flat.dtype != dtype:
            b_flat = b_flat.to(dtype)

        def flatten(tree_fn: Matvec, src: Raveler = xrav, dst: Raveler = xrav, operator: Optional[str] = None
                    ) -> FlatMatvec:
            """``tree_fn`` (``src``'s trees to ``dst``'s; by default maps of the unknowns' space,
            preconditioners) on flat ``(B, size)`` tensors; an ``operator`` (named: the matvec,
            its transpose) has its shape errors explained."""
            size_in, size_out = src.size, dst.size
            if src.bare and dst.bare and not batch:  # plain tensors: two reshapes per product
                shape = src.shapes[0]

                def flat_fn(v: torch.Tensor) -> torch.Tensor:
                    try:
                        out = tree_fn(v.reshape(shape))
                    except (RuntimeError, ValueError, IndexError) as err:
                        if operator:
                            _raise_shape_hint(err, operator, src, rectangular)
                        raise
                    if not torch.is_tensor(out):
                        out = _ravel_output(tree_fn, out, dst)
                    if out.numel() != size_out:
                        _wrong_output(tree_fn, out, src, dst, rectangular, operator)
                    out = out.reshape(1, size_out)
                    return out if out.dtype == dtype else out.to(dtype)

                if len(shape) == 1 and src is dst:  # a vector: single-system solvers may skip the reshapes
                    # (the user's own map, no wrapper: its shape errors are explained around the solve)
                    flat_fn.on_vectors = tree_fn
                return flat_fn

            def flat_fn(v: torch.Tensor) -> torch.Tensor:
                try:
                    out = tree_fn(src.unravel(v.reshape(tuple(batch) + (size_in,))))
                except (RuntimeError, ValueError, IndexError) as err:
                    if operator:
                        _raise_shape_hint(err, operator, src, rectangular)
                    raise
                if rectangular:
                    _check_output_structure(tree_fn, out, src, dst, operator)
                out = _ravel_output(tree_fn, out, dst)
                if out.numel() != nbatch * size_out:
                    _wrong_output(tree_fn, out, src, dst, rectangular, operator)
                out = out.reshape(nbatch, size_out)
                return out if out.dtype == dtype else out.to(dtype)

            return flat_fn

        flat_matvec = flatten(matvec, xrav, rav, "`matvec`")
        if getattr(matvec, "self_adjoint", False) and not rectangular:  # attributes, never self-references:
            flat_matvec.self_adjoint = True  # a cycle would keep autograd graphs alive
        elif getattr(matvec, "transpose", None) is not None:
            flat_matvec.transpose = flatten(matvec.transpose, rav, xrav, "`matvec.transpose`")
        if rectangular and (n == 0 or m == 0):  # x = 0 (or empty) is the minimum-norm least-squares solution
            return self._empty_rectangular(b, b_flat, xrav, batch)
        if n == 0:  # no unknowns: solved by the empty x
            none = torch.zeros(batch, dtype=torch.int64, device=b_flat.device)
            norm = torch.zeros(batch, dtype=_real_dtype(b_flat.dtype), device=b_flat.device)
            return rav.unravel(b_flat.reshape(tuple(batch) + (0,))), LinearSolveInfo(none, norm, norm, none)
        if inside_transform() and not all(_at_current_level(leaf) for leaf in tree_leaves(b)):
            b_flat = _batched_like_operator(flat_matvec, b_flat, n)
        b_norm = torch.linalg.vector_norm(b_flat.detach(), dim=-1)
        huge = _check_rhs(b, b_flat, b_norm)  # then ||b||^2 overflows: norms are taken as m ||v / m||
        norm = _scaled_norm if huge else _norm
        if huge:  # the plain norm above is kept otherwise: no second reduction on the hot path
            b_norm = norm(b_flat.detach())
        x0_flat = None
        if x0 is not None:  # b = 0 is solved by x = 0, whatever the warm start
            x0_flat = xrav.ravel(x0).reshape(nbatch, n).to(b_flat.dtype)
            # one system on the CPU: free to check (in a batch, or elsewhere, a NaN start is that
            # element's NONFINITE, and does not abort the others)
            if not batch and x0_flat.device.type == "cpu" and not is_transformed(x0_flat) and not bool(
                    torch.isfinite(x0_flat).all()):
                raise FloatingPointError("linear solve: the warm start `x0` contains NaN or inf.")
            x0_flat = torch.where((b_norm == 0).unsqueeze(-1), 0, x0_flat)
        # Recording gradients (a direct call on tensors that may require grad): the
        # iterations are not recorded; x gets the implicit gradient (._gradient).
        record = torch.is_grad_enabled() or in_dual_level()
        with torch.no_grad() if record else contextlib.nullcontext():
            try:
                x, iterations, status, *estimate = self._solve(flat_matvec, b_flat, x0_flat, flatten)
            except (RuntimeError, ValueError, IndexError) as err:
                # the products a solver takes on the user's map itself (``on_vectors``) are not
                # wrapped (no frame per product): a shape error of `matvec` is explained here
                if _raised_inside(err, matvec):
                    _raise_shape_hint(err, "`matvec`", xrav, rectangular)
                raise
        if record:
            from ._gradient import attach_gradient  # it builds on this module

            # (a least-squares solver's ``estimate[1]`` may tell whether A has a null space)
            x, residual = attach_gradient(self, flat_matvec, b_flat, x, flatten, transpose_operator, estimate)
            residual_norm = norm(residual)
        elif estimate and estimate[0] is not None:  # no element claims success: its own residual will do
            residual_norm = estimate[0]
        else:
            residual_norm = norm(b_flat - flat_matvec(x))
        status = _final_status(self, status, residual_norm, b_norm)
        negative = estimate[2] if len(estimate) > 2 else None  # (MINRES, Auto: see the class docstring)
        info = LinearSolveInfo(
            iterations=iterations.reshape(batch),
            residual_norm=residual_norm.reshape(batch),
            b_norm=b_norm.reshape(batch),
            status=status.reshape(batch),
            negative_curvature=None if negative is None else negative.reshape(batch),
        )
        x = x.reshape(tuple(batch) + (n,))
        return (_unravel_unknowns(xrav, x) if rectangular else xrav.unravel(x)), info

    def _accepts_rectangular(self) -> bool:
        """Whether the solver solves least-squares problems whose operator maps the
        unknowns (shaped like ``x0``) to a space of another shape (``b``'s): its
        :meth:`_solve` then receives ``x0`` of shape ``(B, n)`` with ``b`` of shape
        ``(B, m)``, and ``matvec`` maps ``(B, n)`` to ``(B, m)``."""
        return False

    def _unknowns(self, x0: TensorTree, b: TensorTree, rav: Raveler, batch_dims: int) -> Raveler:
        """The raveler of the unknowns: ``rav`` (``b``'s) where ``x0`` is shaped like
        ``b``; ``x0``'s own for a rectangular system (least-squares solvers only)."""
        try:
            check_same_structure(x0, b, "x0", "b")
            return rav
        except ValueError as err:
            if not self._accepts_rectangular():
                raise ValueError(
                    f"{err} {type(self).__name__} solves square systems, x shaped like `b`: for a "
                    "rectangular A (an unknown of another shape than `b`, given by `x0`), use "
                    "NormalCG or Direct(\"lstsq\"), which accept an `x0` of any shape."
                ) from None
        xrav = Raveler(x0, batch_dims, name="x0")
        if xrav.batch_shape != rav.batch_shape:
            raise ValueError(
                f"`x0` and `b` must share the batch shape {tuple(rav.batch_shape)} (their first "
                f"batch_dims={batch_dims} dimensions); got {describe(x0)} and {describe(b)}."
            )
        if xrav.dtype.is_complex != rav.dtype.is_complex or (
                xrav.dtype.is_complex and not all(d.is_complex for d in xrav.dtypes)):
            raise TypeError(
                f"{type(self).__name__}: `x0` (dtypes {sorted({str(d) for d in xrav.dtypes})}) and `b` "
                f"(dtypes {sorted({str(d) for d in rav.dtypes})}) must be both real or both complex."
            )
        if not xrav.dtype.is_floating_point and not xrav.dtype.is_complex:
            raise TypeError(f"`x0` must be floating point; got dtype {xrav.dtype}.")
        return xrav

    def _empty_rectangular(self, b: TensorTree, b_flat: torch.Tensor, xrav: Raveler, batch) -> tuple:
        """A system with no unknowns or no equations: ``x = 0`` (its minimum-norm
        least-squares solution, exact), residual ``||b||``."""
        b_norm = torch.linalg.vector_norm(b_flat.detach(), dim=-1)
        if b_flat.shape[-1]:
            _check_rhs(b, b_flat, b_norm)
        none = torch.zeros(b_flat.shape[0], dtype=torch.int64, device=b_flat.device)
        x = torch.zeros(b_flat.shape[0], xrav.size, dtype=b_flat.dtype, device=b_flat.device)
        info = LinearSolveInfo(none.reshape(batch), b_norm.reshape(batch), b_norm.reshape(batch), none.reshape(batch))
        return _unravel_unknowns(xrav, x.reshape(tuple(batch) + (xrav.size,))), info

    def _gradient_rule(self) -> tuple[str, "LinearSolver"]:
        """How a solution is differentiated (:mod:`._gradient`): ``("self", solver)``
        where the solver assumes a symmetric operator (the adjoint system is the
        system), ``("transpose", solver)`` for a general one, ``("normal", solver)``
        for a least-squares solver (the adjoint system is ``A^T A u = g``)."""
        return "transpose", self

    def _residual_tolerances(self, dtype: torch.dtype) -> Optional[tuple[float, float]]:
        """``(tol, atol)``: a solve claiming success whose true residual exceeds ten times
        ``max(tol ||b||, atol)`` is reported INACCURATE; ``None`` for no such check (a
        fixed number of terms).  By default the solver's own ``tol`` and ``atol`` fields."""
        if not hasattr(self, "tol"):
            return None
        return (self.tol if self.tol is not None else default_tol(dtype)), getattr(self, "atol", 0.0)

    def max_products(self, n: int) -> int:
        """The most operator products a solve of ``n`` unknowns may take (0 if
        unknown or not iterative); callers use it to decide whether to
        materialize a small operator."""
        return 0

    def _solve(
        self,
        matvec: FlatMatvec,
        b: torch.Tensor,
        x0: Optional[torch.Tensor],
        flatten: Callable[[Matvec], FlatMatvec],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _threshold(self, b: torch.Tensor, atol_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-element stopping threshold ``max(tol * ||b||, atol)``; for a system divided
        by ``atol_scale`` (per element), ``atol`` is divided by it too."""
        tol = getattr(self, "tol", None)
        tol = default_tol(b.dtype) if tol is None else tol
        atol = getattr(self, "atol", 0.0)
        relative = tol * torch.linalg.vector_norm(b, dim=-1)
        if atol_scale is None or not atol:
            return torch.clamp_min(relative, atol)
        if not torch.is_tensor(atol_scale):
            return torch.clamp_min(relative, atol / atol_scale)
        return torch.maximum(relative, atol / atol_scale)


def _unit_scale(b: torch.Tensor) -> Union[float, torch.Tensor]:
    """``(B, 1)`` powers of two near ``max_j |b_ij|`` (real dtype; the largest entry, whose
    square cannot underflow as the 2-norm's sum of squares does), 1 where it is 0 or not
    finite; a Python number for one system on the CPU, where reading it is free."""
    tiny = torch.finfo(b.dtype).tiny  # a power of two whose reciprocal is finite: subnormal b
    if b.shape[0] == 1 and b.device.type == "cpu" and not is_transformed(b):
        size = float(torch.linalg.vector_norm(b, ord=math.inf))
        return max(2.0 ** math.floor(math.log2(size)), tiny) if 0 < size < math.inf else 1.0
    size = b.abs().amax(dim=-1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(size))).clamp_min(tiny)
    return torch.where(torch.isfinite(scale) & (size > 0), scale, torch.ones_like(scale))


def _batched_like_operator(matvec: FlatMatvec, b: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
    """``b`` plus the zeros of a product: under ``torch.func.vmap`` over the operator
    alone (``b`` shared), the products are batched and ``b`` is not; batched like
    them, it leads the solvers onto their transform-safe paths (one product).
    ``n``: the number of unknowns where it differs from ``b``'s size (a rectangular
    operator)."""
    v = torch.zeros_like(b) if n is None or n == b.shape[-1] else b.new_zeros(b.shape[0], n)
    return b + torch.zeros_like(matvec(v))


def _at_current_level(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by the innermost active ``torch.func`` transform
    (e.g. batched by the vmap that is running, not only tracked by an outer grad)."""
    functorch = torch._C._functorch
    get_level, current = getattr(functorch, "maybe_get_level", None), getattr(functorch, "maybe_current_level", None)
    if get_level is None or current is None:
        return is_transformed(t)
    return get_level(t) == current()


def _operator_error(err: Exception) -> Exception:
    """``err``, marked as this module's diagnosis of the operator (shapes, structure):
    the wrappers that explain other failures (the VJP, vmap) let it through as it is."""
    err._bilevel_operator_error = True
    return err


def _operator_name(fn: Callable) -> str:
    name = getattr(fn, "__name__", "<lambda>")
    return "`matvec` (or the preconditioner)" if name == "<lambda>" else f"`{name}`"


def _ravel_output(fn: Callable, out: Any, rav: Raveler) -> torch.Tensor:
    """The flat tensor of what ``fn`` (the matvec) returned, or an error naming it."""
    try:
        return rav.ravel(out)
    except (TypeError, AttributeError, ValueError) as err:
        raise _operator_error(TypeError(
            f"linear solve: {_operator_name(fn)} returned {type(out).__name__}; it must return a tensor, "
            f"or a tree of tensors, shaped like `{rav.name}`."
        )) from err


def _shapes(rav: Raveler) -> list:
    return [tuple(rav.batch_shape) + tuple(s) for s in rav.shapes]


def _rectangular_hint(src: Raveler, dst: Raveler) -> str:
    return (
        f"with `x0` and `b` of different structures or shapes (a rectangular system), `matvec` maps a tree "
        f"shaped like `x0` (the unknown; leaf shapes {_shapes(src)}) to one shaped like `b` (leaf shapes "
        f"{_shapes(dst)})"
    )


_SQUARE_HINT = (
    "the unknown x is taken to be shaped like `b` (a square system) unless `x0` says otherwise: for a "
    "rectangular A, pass `x0` shaped like the unknown (e.g. x0=torch.zeros(n)) to NormalCG or "
    "Direct(\"lstsq\"), the solvers that accept rectangular systems."
)


def _wrong_output(fn: Callable, out: torch.Tensor, src: Raveler, dst: Raveler,
                  rectangular: bool = False, operator: Optional[str] = None) -> None:
    """Raise: ``fn`` (on trees shaped like ``src``) returned the wrong number of values
    for ``dst``'s trees; ``operator`` names the matvec or its transpose (``None``: a
    preconditioner)."""
    expected = dst.size * max(math.prod(dst.batch_shape), 1)
    if rectangular:
        unknowns, equations = (src, dst) if src.name == "x0" else (dst, src)  # matvec, or its transpose
        advice = _rectangular_hint(unknowns, equations)
        advice += ", and `matvec.transpose` maps back." if src is equations else "."
    else:
        advice = (f"it must map a tree shaped like `{dst.name}` (leaf shapes {_shapes(dst)}) to one of the "
                  "same shapes.")
        if operator:
            advice += " If A is rectangular, " + _SQUARE_HINT
    name = operator if operator and operator != "`matvec`" else _operator_name(fn)
    raise _operator_error(ValueError(
        f"linear solve: {name} returned {out.numel()} values where {expected} were expected: {advice}"
    ))


def _check_output_structure(fn: Callable, out: Any, src: Raveler, dst: Raveler, what: Optional[str] = None) -> None:
    """Raise unless ``out`` has the structure of ``dst``'s trees (a dict's keys in any
    order): for a rectangular system, where the output of ``matvec`` is not its input's
    structure, a tree of the wrong kind could otherwise pass a reshape."""
    if dst.bare:
        ok = torch.is_tensor(out)
    else:
        spec = torch.utils._pytree.tree_structure(out)
        ok = spec == dst.spec
        if not ok and spec.num_leaves == dst.spec.num_leaves:
            try:
                dst._in_order(out, spec)
                ok = True
            except ValueError:
                pass
    if not ok:
        unknowns, equations = (src, dst) if src.name == "x0" else (dst, src)  # matvec, or its transpose
        raise _operator_error(ValueError(
            f"linear solve: {what or _operator_name(fn)} returned {describe(out)} where a tree shaped like "
            f"`{dst.name}` was expected: {_rectangular_hint(unknowns, equations)}."
        ))


# torch's own shape-mismatch messages (matmul, mv, dot, broadcasting, view / reshape,
# cat / stack, expand, einsum, bmm): only these get the hint on the unknown's shape; an
# error that merely mentions a size (an index out of bounds, a user's own ValueError,
# vmap's "dynamic shape" refusal) passes through untouched
_SHAPE_MISMATCH = re.compile(
    r"shapes cannot be multiplied|size mismatch|must match the (?:existing )?size|"
    r"invalid for input of size|expected size|sizes of tensors must match|inconsistent tensor size|"
    r"to have the same number of elements|does not broadcast|expects each tensor to be equal size|"
    r"expected self\.size",
    re.IGNORECASE,
)


def _code_of(fn: Callable):
    """The Python code object that runs when ``fn`` is called (``None`` if there is none)."""
    for _ in range(8):  # partials of partials, bound methods, callable instances
        code = getattr(fn, "__code__", None)
        if code is not None:
            return code
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif not isinstance(fn, type) and hasattr(type(fn), "__call__") and not isinstance(
                fn, (types.BuiltinFunctionType, types.MethodWrapperType)):
            fn = type(fn).__call__
        else:
            return None
    return None


def _raised_inside(err: Exception, fn: Callable) -> bool:
    """Whether ``err`` was raised while ``fn`` ran (its code is on the traceback); True
    when ``fn`` has no Python code to look for (a builtin)."""
    code = _code_of(fn)
    if code is None:
        return True
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


def _raise_shape_hint(err: Exception, what: str, src: Raveler, rectangular: bool) -> None:
    """Re-raise ``err``, a shape error of the operator ``what`` (``matvec`` or its
    transpose) on a tree shaped like ``src``, with a hint on the unknown's shape (same
    exception type); other errors are left to the caller's bare ``raise``."""
    if type(err) not in (RuntimeError, ValueError, IndexError) or getattr(err, "_bilevel_operator_error", False):
        return
    message = str(err)
    if not _SHAPE_MISMATCH.search(message):
        return
    where = f"on a tree shaped like `{src.name}` (leaf shapes {_shapes(src)})"
    if rectangular:
        advice = ("with `x0` and `b` of different structures or shapes (a rectangular system), `matvec` "
                  "maps a tree shaped like `x0` (the unknown) to one shaped like `b`, and its `.transpose` "
                  "back.")
    else:
        advice = _SQUARE_HINT
    raise _operator_error(type(err)(
        f"linear solve: {what} raised {type(err).__name__} {where}: {message} -- {advice}")) from err


def _unravel_unknowns(xrav: Raveler, x: torch.Tensor) -> TensorTree:
    """The tree of the flat solution ``(*batch, n)`` of a rectangular system: shaped
    like ``x0``, with its leaves' dtypes."""
    tree = xrav.unravel(x)
    if xrav.bare:
        return tree if tree.dtype == xrav.dtypes[0] else tree.to(xrav.dtypes[0])
    leaves, spec = torch.utils._pytree.tree_flatten(tree)
    return torch.utils._pytree.tree_unflatten(
        [leaf if leaf.dtype == d else leaf.to(d) for leaf, d in zip(leaves, xrav.dtypes)], spec)


def _on_host(t: torch.Tensor) -> bool:
    """Whether ``t`` holds one element readable at no cost (a plain CPU tensor):
    then the checks below run on Python numbers instead of a chain of small ops."""
    return t.numel() == 1 and t.device.type == "cpu" and not is_transformed(t)


def _check_rhs(b: TensorTree, b_flat: torch.Tensor, b_norm: torch.Tensor) -> bool:
    """Raise on a non-finite right-hand side; ``b_norm`` (per element) is finite
    exactly when ``b`` is, unless its sum of squares overflows (float32 entries past
    ~1e19): then return True (the norms are to be scaled), unless even the scaled
    norm of ``b`` is beyond the dtype's range.  Under a ``torch.func`` transform,
    where nothing can be read, always True."""
    if _on_host(b_norm):
        if math.isfinite(float(b_norm)):
            return False
    elif is_transformed(b_norm):  # values unreadable: scaled norms, which cost a few ops
        return True
    elif bool(torch.isfinite(b_norm).all()):
        return False
    if not all_finite(tree_leaves(b)):
        raise FloatingPointError("linear solve: the right-hand side `b` contains NaN or inf.")
    if not bool(torch.isfinite(_scaled_norm(b_flat.detach())).all()):
        raise FloatingPointError(
            f"linear solve: the norm of the right-hand side `b` overflows in {b_norm.dtype}; rescale the system."
        )
    return True


def _scaled_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-row 2-norm of ``(B, n)`` ``v`` as ``m ||v / m||`` with ``m = max_j |v_ij|``: no
    overflow of the sum of squares while the norm itself is representable."""
    size = v.abs().amax(dim=-1)
    return size * torch.linalg.vector_norm(v / size.clamp_min(torch.finfo(size.dtype).tiny).unsqueeze(-1), dim=-1)


def _final_status(
    solver: LinearSolver, status: torch.Tensor, residual_norm: torch.Tensor, b_norm: torch.Tensor
) -> torch.Tensor:
    """Re-check the true residual: a solve is a success only if ``b - A x`` is small."""
    tolerances = solver._residual_tolerances(residual_norm.dtype)
    has_tol = tolerances is not None
    tol, atol = tolerances if has_tol else (0.0, 0.0)
    # The recursive residual of a Krylov method drifts from the true one by a few
    # ulps times the condition number: allow a factor 10 before calling it a failure.
    if _on_host(status) and _on_host(residual_norm) and _on_host(b_norm):
        code, residual = int(status), float(residual_norm)
        if not math.isfinite(residual):
            code = Status.NONFINITE
        elif has_tol and code == Status.SUCCESS and not residual <= 10 * max(tol * float(b_norm), atol):
            code = Status.INACCURATE
        return status if code == int(status) else torch.full_like(status, code)
    status = torch.where(torch.isfinite(residual_norm), status, int(Status.NONFINITE))
    if not has_tol:
        return status
    small = residual_norm <= 10 * torch.clamp_min(tol * b_norm, atol)
    return torch.where((status == Status.SUCCESS) & ~small, int(Status.INACCURATE), status)


def transpose_operator(
    matvec: FlatMatvec, b: torch.Tensor, domain: Optional[torch.Tensor] = None
) -> tuple[FlatMatvec, torch.Tensor]:
    """``v -> A^T v`` for the linear ``matvec``, checked by an adjoint test.

    ``b`` is a ``(B, m)`` tensor of the operator's output space; ``domain``, a
    ``(B, n)`` one of its input space where ``A`` is rectangular (default: ``b``;
    only shapes, dtype and device are used).

    For a complex ``b`` this is the adjoint ``v -> A^H v`` (conjugate transpose):
    the VJP of :func:`torch.func.vjp` already is (PyTorch's conjugate Wirtinger
    convention), and so must a ``.transpose`` attribute be; the test then probes
    with complex vectors, which tell ``A^H`` from ``A^T``.

    Also returns which elements passed the test: a failure raises, except under a
    ``torch.func`` transform (values unreadable), where it is reported per element.
    """
    if getattr(matvec, "self_adjoint", False):
        return matvec, torch.ones(b.shape[0], dtype=torch.bool, device=b.device)
    domain = b if domain is None else domain
    rmatvec = getattr(matvec, "transpose", None)
    if rmatvec is None:
        try:
            _, vjp_fn = torch.func.vjp(matvec, domain)
        except Exception as err:
            if getattr(err, "_bilevel_operator_error", False):  # the operator's shape error, explained
                raise
            raise RuntimeError(
                "linear solve: could not form A^T v as the VJP of `matvec` with "
                f"torch.func.vjp ({type(err).__name__}: {err}); write `matvec` with "
                "differentiable torch operations, or give it a `.transpose` attribute (v -> A^T v)."
            ) from err
        rmatvec = lambda v: vjp_fn(v)[0]  # noqa: E731
    u, w = _probe(domain, 1), _probe(b, 2)
    if b.is_complex():  # real probes cannot tell A^T from A^H (nor a conjugating map)
        u, w = u + 1j * _probe(domain, 3), w + 1j * _probe(b, 4)
    Au, Atw = matvec(u), rmatvec(w)
    lhs, rhs = (Au * w.conj()).sum(-1), (u * Atw.conj()).sum(-1)  # <A u, w> = <u, A^H w>
    scale = (_norm(Au) * _norm(w) + _norm(u) * _norm(Atw)).clamp_min(torch.finfo(b.dtype).tiny)
    # Loose enough for a matvec computing in a lower precision than b (float32
    # inside, TF32 matmuls); a non-linear or untraceable one is off by O(1).
    # NaN passes here: a non-finite system is reported by the solve's own status.
    adjoint = ~((lhs - rhs).abs() > max(1e3 * torch.finfo(b.dtype).eps, 1e-3) * scale)
    if not is_transformed(adjoint) and not bool(adjoint.all()):
        bad = (~adjoint).nonzero()[0, 0]
        raise RuntimeError(
            "linear solve: the transpose of `matvec` failed the adjoint test <A u, w> = <u, A^T w> "
            f"(got {lhs[bad].item():.6g} vs {rhs[bad].item():.6g}): `matvec` is "
            "not linear, or torch.func cannot trace it (e.g. it calls torch.autograd.grad). Give "
            "the matvec a `.transpose` attribute (for complex dtypes, the adjoint v -> A^H v)."
        )
    return rmatvec, adjoint


_KRYLOV_RULES = dict(
    maxiter=(_positive_int_or_none, "a positive int or None"),
    tol=(_tol_ok, "a float in (0, 1) or None"),
    atol=(_nonneg_float, "a non-negative float"),
)


def _mark(status: torch.Tensor, mask: torch.Tensor, code: Status) -> torch.Tensor:
    """Set ``status`` to ``code`` where ``mask`` holds."""
    return torch.where(mask, torch.full_like(status, code), status)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-batch-element dot product of two real ``(B, n)`` tensors."""
    return (a * b).sum(-1)


def _cdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-batch-element inner product ``<a, b> = a^H b`` of two complex ``(B, n)`` tensors."""
    return (a.conj() * b).sum(-1)


def _rdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Re <a, b>`` of two complex ``(B, n)`` tensors: the inner products that are
    real for a Hermitian operator (``p^H A p``, ``r^H M r``), rounding dropped."""
    return (a.conj() * b).sum(-1).real


def _inner(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The inner product ``<a, b> = a^H b`` for ``dtype``, picked once per solve:
    :func:`_dot` for real tensors (no conjugation in the loops), :func:`_cdot` else."""
    return _cdot if dtype.is_complex else _dot


def _real_inner(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``Re <a, b>`` for ``dtype``: :func:`_dot` for real tensors, :func:`_rdot` else."""
    return _rdot if dtype.is_complex else _dot


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of norms of ``dtype`` tensors (``complex64 -> float32``)."""
    return _REAL_OF_COMPLEX.get(dtype, dtype)


_REAL_OF_COMPLEX = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def _norm(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(a, dim=-1)


def _div(num: torch.Tensor, den: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``mask`` holds, 0 elsewhere (no NaN from masked-out zeros)."""
    return torch.where(mask, num / torch.where(mask, den, torch.ones_like(den)), 0)


def _probe(b: torch.Tensor, index: int = 0) -> torch.Tensor:
    """A fixed start vector shaped like ``b`` (the same row for every batch element).

    Entries ``frac((i + 1) * phi + index * sqrt(2)) - 1/2`` (a Weyl sequence): dense,
    of mixed signs and free of random draws, so batch elements holding the same
    system get the same answer and the solvers run under ``vmap``, where random
    operations are refused.
    """
    n = b.shape[-1]
    i = torch.arange(1, n + 1, dtype=torch.float64, device=b.device)
    row = torch.frac(i * _GOLDEN + index * math.sqrt(2.0)) - 0.5
    return row.to(b.dtype).expand(b.shape)


_GOLDEN = (math.sqrt(5.0) - 1) / 2


def _singular_tol(dtype: torch.dtype) -> float:
    """Relative size below which a Krylov pivot means a numerically singular
    operator: ``sqrt(eps)`` (1.5e-8 in float64, 3.5e-4 in float32), i.e. a
    condition number above ``1 / sqrt(eps)`` for the new direction.  (A looser
    ``eps ** (2/3)`` let through a pivot of 5e-11 past the least-squares point
    of a singular inconsistent system, sending ``x`` to 1e15.)"""
    return math.sqrt(float(torch.finfo(dtype).eps))


def _sync_every(x: torch.Tensor) -> int:
    """How often the convergence test synchronises with the host: every step on
    CPU (free), every 8 steps on accelerators (frozen elements lose nothing)."""
    return 1 if x.device.type == "cpu" else 8


def _look_every(x: torch.Tensor) -> int:
    """How often a Krylov loop asks the host whether any element still runs:
    :func:`_sync_every`, or 0 (never: the loop runs its whole budget, finished
    elements frozen by their masks) inside ``torch.func.vmap``, where the
    values cannot be read."""
    return 0 if is_transformed(x) else _sync_every(x)


def resolve_maxiter(maxiter: Optional[int], n: int) -> int:
    """The iteration budget of a Krylov solve: ``maxiter=None`` means ``10 n``, at most 1000.

    Args:
        maxiter: the budget a solver was given, a positive int or ``None``.
        n: number of unknowns of one system.

    Returns:
        ``maxiter`` itself when it is an int, else ``min(10 n, 1000)``.

    Example:
        >>> from bilevel.implicit.linear_solve import resolve_maxiter
        >>> resolve_maxiter(None, 20), resolve_maxiter(None, 500), resolve_maxiter(50, 500)
        (200, 1000, 50)
    """
    return maxiter if maxiter is not None else min(10 * n, 1000)


@dataclass(frozen=True)
class KrylovSolver(LinearSolver):
    r"""Base of the iterative solvers: an iteration budget and a tolerance.

    Subclasses implement ``_iterate(matvec, b, x0, threshold, maxiter, flatten)``
    on flat ``(B, n)`` tensors, with ``threshold`` the per-element stopping
    threshold ``max(tol * ||b||, atol)`` and ``maxiter`` resolved from ``None``
    (:func:`resolve_maxiter`); it returns ``(x, iterations, status)`` as
    :meth:`LinearSolver._solve` does.  A claimed success is re-checked against the
    true residual: a residual above 10 times the threshold is reported as
    :attr:`~bilevel.status.Status.INACCURATE`.

    Args:
        maxiter: iteration budget per element, a positive int; ``None`` means
            ``10 n`` capped at 1000.  Default 100.
        tol: relative tolerance on the residual norm, in (0, 1); ``None``
            (default) is ``sqrt(eps)`` of the dtype.
        atol: absolute tolerance on the residual norm, non-negative, default 0.

    Example:
        Richardson's iteration :math:`x \leftarrow x + (b - A x)`, which converges
        when the spectral radius of :math:`I - A` is below 1:

        >>> import dataclasses, torch
        >>> from bilevel.implicit.linear_solve import KrylovSolver
        >>> from bilevel.status import Status
        >>> @dataclasses.dataclass(frozen=True)
        ... class Richardson(KrylovSolver):
        ...     def _iterate(self, matvec, b, x0, threshold, maxiter, flatten):
        ...         x = torch.zeros_like(b) if x0 is None else x0
        ...         r, k = b - matvec(x), 0
        ...         while k < maxiter and bool((r.norm(dim=-1) > threshold).any()):
        ...             x = x + r
        ...             r, k = b - matvec(x), k + 1
        ...         iterations = torch.full(b.shape[:1], k)
        ...         missed = r.norm(dim=-1) > threshold
        ...         return x, iterations, torch.where(missed, Status.MAX_ITERATIONS, Status.SUCCESS)
        >>> A = torch.tensor([[1.0, 0.5], [0.0, 0.5]], dtype=torch.float64)
        >>> b = torch.ones(2, dtype=torch.float64)
        >>> x, info = Richardson(tol=1e-10)(lambda v: A @ v, b)
        >>> torch.allclose(A @ x, b), bool(info.converged)
        (True, True)
        >>> x, info = Richardson(maxiter=3)(lambda v: A @ v, b)  # stopped too early
        >>> Status(int(info.status)).name, int(info.iterations)
        ('MAX_ITERATIONS', 3)
    """

    maxiter: Optional[int] = 100
    tol: Optional[float] = None
    atol: float = field(default=0.0, kw_only=True)  # keyword-only: CG(maxiter, tol, M), GMRES(maxiter, tol, restart)

    def __post_init__(self):
        _check_fields(self, **_KRYLOV_RULES)

    def max_products(self, n: int) -> int:
        return resolve_maxiter(self.maxiter, n)

    def _solve(self, matvec, b, x0, flatten):
        maxiter = resolve_maxiter(self.maxiter, b.shape[-1])
        # Iterate on A (x / s) = b / s with s a power of two near max |b| per element:
        # the squared norms the iterations compare stay near 1, so a tiny (or huge) b
        # neither underflows to a zero residual nor overflows, and the scaling is exact.
        scale = _unit_scale(b)
        if isinstance(scale, float):  # one system on the host: a number, and no op where it is 1
            unit = (lambda t: t) if scale == 1.0 else (lambda t: t * (1.0 / scale))
            back, per_element = (lambda t: t) if scale == 1.0 else (lambda t: t * scale), scale
        else:
            unit, back, per_element = (lambda t: t / scale), (lambda t: t * scale), scale.squeeze(-1)
        b_unit = unit(b)
        threshold = self._threshold(b_unit, atol_scale=per_element)
        x, iterations, status, *estimate = self._iterate(
            matvec, b_unit, None if x0 is None else unit(x0), threshold, maxiter, flatten
        )
        if estimate and estimate[0] is not None:  # a residual estimate, in b's scale (flags are kept)
            estimate[0] = estimate[0] * per_element
        return (back(x), iterations, status, *estimate)

    def _iterate(self, matvec, b, x0, threshold, maxiter, flatten):
        raise NotImplementedError


def materialize(matvec: FlatMatvec, b: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """The ``(B, n, n)`` matrices of a flat batched ``matvec``, by one vmap over ``e_j``.

    Args:
        matvec: a linear map of ``(B, n)`` tensors, ``v -> (A_1 v_1, ..., A_B v_B)``;
            it must work under :func:`torch.func.vmap`.
        b: a ``(B, n)`` tensor giving the batch size, the size, the dtype and the
            device (its values are not used).
        chunk_size: basis vectors per vmapped call (``chunk_size`` of
            :func:`torch.func.vmap`), bounding the memory of the intermediates;
            ``None``: all ``n`` at once.

    Returns:
        The matrices :math:`A_i` stacked into a ``(B, n, n)`` tensor.

    Raises:
        RuntimeError: ``matvec`` cannot be vmapped (unless it also fails on ``b``
            alone: that error is raised as it is).

    Example:
        >>> import torch
        >>> from bilevel.implicit.linear_solve import materialize
        >>> A = torch.arange(8.0).reshape(2, 2, 2)             # two 2 x 2 matrices
        >>> matvec = lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)
        >>> torch.equal(materialize(matvec, torch.zeros(2, 2)), A)
        True
    """
    if not torch.is_tensor(b) or b.dim() != 2:
        raise ValueError(
            f"materialize: `b` must be a (B, n) tensor (B systems of n unknowns); got "
            f"{tuple(b.shape) if torch.is_tensor(b) else type(b).__name__}. For one system, pass b[None]."
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"materialize: `chunk_size` must be a positive int or None; got {chunk_size!r}.")
    nbatch, n = b.shape
    basis = torch.eye(n, dtype=b.dtype, device=b.device).unsqueeze(1).expand(n, nbatch, n)
    try:
        columns = torch.func.vmap(matvec, chunk_size=chunk_size)(basis)  # columns[j, i] = A_i e_j
    except Exception as err:
        matvec(b)  # a matvec that fails without vmap too: let its own error through
        raise RuntimeError(
            "`matvec` could not be batched with torch.func.vmap "
            f"({type(err).__name__}: {err}). A dense solve materialises A with one vmap over "
            "the identity basis; make `matvec` vmap-compatible (no .item(), NumPy or "
            "data-dependent Python control flow) or use an iterative solver (CG, GMRES)."
        ) from err
    return columns.permute(1, 2, 0)
