r"""A bilevel problem bundled with its starting point and, where known, its answer.

.. math::

    \min_x F(x, y^\star(x)) \quad\text{s.t.}\quad
    y^\star(x) \in \arg\min_y \{ f(x, y) : g(x, y) \le 0 \},

with ``outer`` :math:`= F`, ``inner`` :math:`= f` and ``constraints``
:math:`= g`.  The problem is validated when it is built: a problem whose
objectives do not return finite scalars at ``(x0, y0)`` never reaches a solver.

Only :mod:`torch` is needed here (the layering rule of ``DESIGN.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import torch
from torch.utils import _pytree as pytree

from ..typing import TensorTree

__all__ = ["BilevelProblem", "LevelBatches", "Solution"]


class LevelBatches(NamedTuple):
    """One mini-batch per level, drawn together for one step: ``outer`` is passed
    to the upper objective, ``inner`` to the lower one (e.g. a validation batch
    and a training batch).

    :func:`bilevel.solve` builds them from ``data=(outer_data, inner_data)`` or
    ``data={"outer": ..., "inner": ...}``; a stream that yields them works too.

    Args:
        outer: the mini-batch of the upper objective.
        inner: the mini-batch of the lower objective.

    Example:
        >>> from bilevel.problems import LevelBatches
        >>> batch = LevelBatches(outer="validation rows", inner="training rows")
        >>> batch.inner
        'training rows'
    """

    outer: Any
    inner: Any


def level_batch(batch: Any, level: str) -> Any:
    """The part of ``batch`` meant for ``level`` (``"outer"`` or ``"inner"``): its
    field of a :class:`LevelBatches`, else the whole batch (shared by both)."""
    return getattr(batch, level) if isinstance(batch, LevelBatches) else batch


def _batch_optional(fn: Callable) -> Callable:
    """``fn`` itself where it takes a mini-batch (a third positional argument), else
    ``fn(x, y, *batch) = fn(x, y)``: with ``data``, a level that uses no data (e.g. an
    outer level of hyper-parameters alone) may still be written ``f(x, y)``."""
    if getattr(fn, "_takes_optional_batch", False):  # wrapped already (a copy of a problem)
        return fn
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: as it is
        return fn
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 2 or any(p.kind != p.POSITIONAL_ONLY and p.kind != p.POSITIONAL_OR_KEYWORD
                                   for p in parameters):  # *args, or a batch by keyword: as it is
        return fn

    @functools.wraps(fn)
    def without_batch(x, y, *batch):
        return fn(x, y)

    without_batch._takes_optional_batch = True
    return without_batch


@dataclass(frozen=True)
class Solution:
    r"""A known answer of a bilevel problem; any field may be unknown (``None``).

    Attributes:
        x: the optimal upper-level variable :math:`x^\star` (same tree as ``x0``).
        y: the matching lower-level variable :math:`y^\star` (same tree as ``y0``).
        value: the optimal outer value :math:`F(x^\star, y^\star)`.

    Example:
        >>> from bilevel.problems import quadratic
        >>> p = quadratic()                      # Q: every answer in closed form
        >>> s = p.solution
        >>> s.x.shape, s.y.shape
        (torch.Size([3]), torch.Size([5]))
        >>> abs(float(p.outer(s.x, s.y)) - s.value) < 1e-12
        True
    """

    x: Optional[TensorTree] = None
    y: Optional[TensorTree] = None
    value: Optional[float] = None

    def to(self, dtype: torch.dtype) -> "Solution":
        """The same solution with its floating tensors cast to ``dtype``."""
        return Solution(_cast(self.x, dtype), _cast(self.y, dtype), self.value)


def _describe(tree: Any) -> str:
    """``tensor of shape (3,) (torch.float64)`` or ``tree {['w']: (10, 64), ['b']: (10,)}``."""
    if torch.is_tensor(tree):
        return f"tensor of shape {tuple(tree.shape)} ({tree.dtype})"
    leaves, _ = pytree.tree_flatten_with_path(tree)
    parts = [
        f"{pytree.keystr(path) or '.'}: {tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}"
        for path, t in leaves
    ]
    return f"{type(tree).__name__} tree {{{', '.join(parts)}}}"


def _cast(tree: Any, dtype: torch.dtype) -> Any:
    return pytree.tree_map(
        lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t, tree
    )


def _tree_distance(a: TensorTree, b: TensorTree) -> float:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return math.sqrt(sum(float(((p - q.to(p)) ** 2).sum()) for p, q in zip(la, lb, strict=True)))


def _check_tree(tree: Any, name: str) -> torch.dtype:
    leaves, _ = pytree.tree_flatten(tree)
    if not leaves:
        raise ValueError(f"`{name}` is empty: expected a tensor or a tree (tuple/list/dict) of tensors.")
    dtypes = set()
    for i, leaf in enumerate(leaves):
        where = name if torch.is_tensor(tree) else f"{name} (leaf {i})"
        if not torch.is_tensor(leaf):
            raise TypeError(
                f"`{where}` must be a tensor; got {type(leaf).__name__}. Expected a tensor or a "
                "tree of floating-point tensors, e.g. torch.zeros(3)."
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"`{where}` must be a floating-point tensor; got dtype {leaf.dtype} with shape "
                f"{tuple(leaf.shape)}. Convert it, e.g. `{name}.to(torch.float64)`."
            )
        dtypes.add(leaf.dtype)
    if all(leaf.numel() == 0 for leaf in leaves):
        raise ValueError(f"`{name}` is empty (no element in {[tuple(t.shape) for t in leaves]}): nothing to optimize.")
    if len(dtypes) > 1:
        raise TypeError(f"`{name}` mixes dtypes {sorted(map(str, dtypes))}; use one floating dtype.")
    bad = [i for i, leaf in enumerate(leaves) if not bool(torch.isfinite(leaf).all())]  # once, at the start
    if bad:
        where = "" if torch.is_tensor(tree) else f" (leaves {bad})"
        raise FloatingPointError(f"the start is not finite: `{name}` contains NaN or inf{where}; the iterations "
                                 "need a finite start.")
    return dtypes.pop()


def _check_same_tree(a: Any, b: Any, name_a: str, name_b: str) -> None:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb or any(not torch.is_tensor(q) or p.shape != q.shape for p, q in zip(la, lb, strict=False)):
        raise ValueError(
            f"`{name_a}` must have the structure and shapes of `{name_b}`; got "
            f"{_describe(a)} and {_describe(b)}."
        )


@dataclass(eq=False)
class BilevelProblem:
    r"""A bilevel problem: objectives, start point, optional constraints and known answer.

    .. math::

        \min_x F(x, y^\star(x)), \qquad
        y^\star(x) \in \arg\min_y \{ f(x, y) : g(x, y) \le 0 \}.

    Args:
        outer: :math:`F`, ``outer(x, y) -> scalar tensor`` (upper variable
            first; an optional third argument is a mini-batch).
        inner: :math:`f`, ``inner(x, y) -> scalar tensor``, same convention.
        x0: start point of the upper variable, a floating tensor or tensor tree.
        y0: start point of the lower variable, a floating tensor or tensor tree.
        constraints: optional :math:`g`, ``constraints(x, y) -> tensor`` whose
            every entry must be ``<= 0`` (coupled inner constraints).
        solution: optional known answer, a :class:`Solution`, a ``dict`` with
            keys among ``x``, ``y``, ``value``, or a tensor (the optimal ``x``).
        name: a label for tables and messages.
        x_set, y_set: optional simple sets for ``x`` / ``y`` alone (projection
            objects of :mod:`bilevel.implicit`); stored, not interpreted here.
        data: optional extras.  Conventional keys used by
            :mod:`bilevel.problems`: ``"inner_solution"`` (``x -> y*(x)``),
            ``"hypergradient"`` (``x -> dF(x, y*(x))/dx``), ``"project"``
            (``(x, y) -> (x, y)`` onto the constraint set), ``"accuracy"``
            (``y -> float``), data splits.
        example_batch: a mini-batch to validate objectives that take one, as
            ``outer(x0, y0, example_batch)``; ``None`` validates ``outer(x0, y0)``.

    Raises:
        TypeError: ``outer`` / ``inner`` / ``constraints`` not callable, ``x0`` /
            ``y0`` not trees of floating tensors, a solution of the wrong type.
        ValueError: an objective that fails at ``(x0, y0)`` or does not return a
            scalar; a solution whose shapes differ from ``x0`` / ``y0``.
        FloatingPointError: an objective or constraint that is NaN or infinite
            at ``(x0, y0)``.

    Example:
        >>> import torch
        >>> p = BilevelProblem(lambda x, y: ((y - 1) ** 2).sum(), lambda x, y: ((y - x) ** 2).sum(),
        ...                    torch.zeros(2), torch.zeros(2), solution={"x": torch.ones(2), "value": 0.0})
        >>> p.evaluate(torch.ones(2), torch.ones(2))["outer"]
        0.0
        >>> p.distance_to_solution(torch.zeros(2), torch.zeros(2))["x"]
        1.4142135623730951
    """

    outer: Callable[..., torch.Tensor]
    inner: Callable[..., torch.Tensor]
    x0: TensorTree = field(repr=False)
    y0: TensorTree = field(repr=False)
    constraints: Optional[Callable[..., torch.Tensor]] = field(default=None, repr=False)
    solution: Optional[Union[Solution, Mapping[str, Any]]] = field(default=None, repr=False)
    name: str = ""
    x_set: Any = field(default=None, repr=False)
    y_set: Any = field(default=None, repr=False)
    data: Optional[dict] = field(default=None, repr=False)
    example_batch: Any = field(default=None, repr=False)
    # How the problem was built (a ``dtype -> BilevelProblem`` callable), for ``with_dtype``.
    _rebuild: Optional[Callable[[torch.dtype], "BilevelProblem"]] = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for fname in ("outer", "inner"):
            if not callable(getattr(self, fname)):
                raise TypeError(
                    f"`{fname}` must be callable as {fname}(x, y) -> scalar tensor; got "
                    f"{type(getattr(self, fname)).__name__}."
                )
        if self.constraints is not None and not callable(self.constraints):
            raise TypeError(
                "`constraints` must be None or callable as constraints(x, y) -> tensor (<= 0); got "
                f"{type(self.constraints).__name__}."
            )
        if not isinstance(self.name, str):
            raise TypeError(f"`name` must be a str; got {type(self.name).__name__}.")
        if self.example_batch is not None:  # mini-batches: a level that uses none takes (x, y)
            outer, inner = _batch_optional(self.outer), _batch_optional(self.inner)
            if outer is not self.outer and inner is not self.inner:
                raise ValueError(
                    "mini-batches were given (`data`), but neither `outer(x, y)` nor `inner(x, y)` takes "
                    "one: the level that uses the data takes it as a third argument, f(x, y, batch).")
            self.outer, self.inner = outer, inner
        # The two levels may differ in dtype (a float64 hyper-parameter over float32
        # weights is a supported use), not in device.
        _check_tree(self.x0, "x0")
        _check_tree(self.y0, "y0")
        devices = {leaf.device for leaf in pytree.tree_leaves((self.x0, self.y0))}
        if len(devices) > 1:
            raise ValueError(
                f"`x0` and `y0` lie on several devices {sorted(map(str, devices))}; move them to one, "
                "e.g. with `.to(device)`."
            )
        self.data = {} if self.data is None else self.data
        if not isinstance(self.data, dict):
            raise TypeError(f"`data` must be None or a dict; got {type(self.data).__name__}.")
        self.solution = self._checked_solution(self.solution)
        shapes = f"x0: {_describe(self.x0)}, y0: {_describe(self.y0)}"
        with torch.no_grad():
            for fname in ("outer", "inner"):
                value = self._call(fname, shapes)
                if value.ndim != 0:
                    raise ValueError(
                        f"`{fname}(x0, y0)` must return a scalar (0-dim) tensor; got shape "
                        f"{tuple(value.shape)} for {shapes}. Reduce it, e.g. with .sum() or .mean()."
                    )
                if not torch.isfinite(value):
                    raise FloatingPointError(
                        f"`{fname}(x0, y0)` is not finite ({float(value)}) for {shapes}; expected a "
                        "finite scalar at the start point."
                    )
            if self.constraints is not None:
                g = self._call("constraints", shapes)
                if not torch.isfinite(g).all():
                    raise FloatingPointError(
                        f"`constraints(x0, y0)` has non-finite entries (shape {tuple(g.shape)}) for "
                        f"{shapes}; expected finite values, each <= 0 where feasible."
                    )

    def _call(self, fname: str, shapes: str) -> torch.Tensor:
        fn = getattr(self, fname)
        # the constraints take no batch: g(x, y), as the methods call them
        batch = () if self.example_batch is None or fname == "constraints" else (
            level_batch(self.example_batch, fname),)
        try:
            value = fn(self.x0, self.y0, *batch)
        except Exception as err:  # name the function and the shapes it was given
            call = f"{fname}(x0, y0, batch)" if batch else f"{fname}(x0, y0)"
            raise ValueError(
                f"`{call}` raised {type(err).__name__}: {err} (called with {shapes}"
                f"{', batch: the first mini-batch' if batch else ''})."
            ) from err
        if not torch.is_tensor(value):
            raise TypeError(
                f"`{fname}(x0, y0)` must return a tensor; got {type(value).__name__} for {shapes}."
            )
        if not value.is_floating_point():
            raise TypeError(
                f"`{fname}(x0, y0)` must return a floating-point tensor; got dtype {value.dtype} "
                f"for {shapes}."
            )
        return value

    def _checked_solution(self, solution: Any) -> Optional[Solution]:
        if solution is None:
            return None
        if torch.is_tensor(solution):  # the optimal x alone
            solution = Solution(x=solution)
        if isinstance(solution, Mapping):
            unknown = set(solution) - {"x", "y", "value"}
            if unknown:
                raise ValueError(
                    f"`solution` keys must be among 'x', 'y', 'value'; got unknown {sorted(unknown)}."
                )
            solution = Solution(**solution)
        if not isinstance(solution, Solution):
            raise TypeError(
                "`solution` must be None, a tensor (the optimal x), a bilevel.problems.Solution or a "
                f"dict with keys 'x', 'y', 'value'; got {type(solution).__name__}."
            )
        if solution.x is not None:
            _check_same_tree(solution.x, self.x0, "solution.x", "x0")
        if solution.y is not None:
            _check_same_tree(solution.y, self.y0, "solution.y", "y0")
        if solution.value is not None:
            value = float(solution.value)
            if not math.isfinite(value):
                raise FloatingPointError(f"`solution.value` must be finite; got {value}.")
            solution = dataclasses.replace(solution, value=value)
        return solution

    # ----- properties -------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of ``x0`` (and ``y0``)."""
        return pytree.tree_leaves(self.x0)[0].dtype

    @property
    def device(self) -> torch.device:
        """The device of ``x0``."""
        return pytree.tree_leaves(self.x0)[0].device

    def __repr__(self) -> str:
        known = "none" if self.solution is None else ", ".join(
            k for k in ("x", "y", "value") if getattr(self.solution, k) is not None
        )
        return (
            f"BilevelProblem(name={self.name!r}, x: {_describe(self.x0)}, y: {_describe(self.y0)}, "
            f"constraints={'yes' if self.constraints is not None else 'no'}, known solution: {known}, "
            f"data keys: {sorted(self.data)})"
        )

    # ----- conversions --------------------------------------------------------
    def with_dtype(self, dtype: torch.dtype) -> "BilevelProblem":
        """The same problem in floating dtype ``dtype`` (e.g. ``torch.float32``).

        Problems built by :mod:`bilevel.problems` are rebuilt with their data in
        ``dtype``.  For a problem built by hand, ``x0``, ``y0`` and the solution
        are cast and the objectives kept as they are (they must then follow the
        dtype of their inputs); the result is validated again.

        Raises:
            TypeError: ``dtype`` is not a floating dtype.
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating torch.dtype; got {dtype!r}.")
        if dtype == self.dtype:
            return self
        if self._rebuild is not None:
            return self._rebuild(dtype)
        return BilevelProblem(
            self.outer, self.inner, _cast(self.x0, dtype), _cast(self.y0, dtype), self.constraints,
            None if self.solution is None else self.solution.to(dtype), self.name, self.x_set,
            self.y_set, dict(self.data),
        )

    # ----- evaluation -------------------------------------------------------
    def evaluate(self, x: TensorTree, y: TensorTree) -> dict:
        """Objective values at ``(x, y)`` as Python floats.

        Returns:
            ``{"outer": F(x, y), "inner": f(x, y)}``, plus
            ``"constraint_violation"`` (the largest positive part of
            ``constraints(x, y)``, 0 when feasible) when the problem has
            constraints, and ``"accuracy"`` when ``data`` has an accuracy helper.
        """
        with torch.no_grad():
            out = {"outer": float(self.outer(x, y)), "inner": float(self.inner(x, y))}
            if self.constraints is not None:
                g = self.constraints(x, y)
                out["constraint_violation"] = float(g.clamp_min(0).max()) if g.numel() else 0.0
            if callable(self.data.get("accuracy")):
                out["accuracy"] = float(self.data["accuracy"](y))
        return out

    def distance_to_solution(self, x: TensorTree, y: Optional[TensorTree] = None) -> dict:
        """Euclidean distances from ``(x, y)`` to the known solution.

        Returns:
            A dict with ``"x"`` (:math:`\\|x - x^\\star\\|`), ``"y"``
            (:math:`\\|y - y^\\star\\|`, when ``y`` is given) and ``"value"``
            (:math:`|F(x, y) - F^\\star|`, when ``y`` is given), each where the
            solution knows it.

        Raises:
            ValueError: the problem has no known solution.
        """
        if self.solution is None:
            raise ValueError(f"problem {self.name!r} has no known solution (`solution` is None).")
        out = {}
        if self.solution.x is not None:
            _check_same_tree(x, self.solution.x, "x", "solution.x")
            out["x"] = _tree_distance(x, self.solution.x)
        if y is not None and self.solution.y is not None:
            _check_same_tree(y, self.solution.y, "y", "solution.y")
            out["y"] = _tree_distance(y, self.solution.y)
        if y is not None and self.solution.value is not None:
            with torch.no_grad():
                out["value"] = abs(float(self.outer(x, y)) - self.solution.value)
        return out

    # ----- closed forms, where known -------------------------------------------
    def _closed_form(self, key: str, what: str) -> Callable:
        fn = self.data.get(key)
        if not callable(fn):
            raise NotImplementedError(
                f"problem {self.name!r} has no closed-form {what} (no callable data[{key!r}])."
            )
        return fn

    def inner_solution(self, x: TensorTree) -> TensorTree:
        """The exact inner solution :math:`y^\\star(x)`, where a closed form is known.

        Differentiable in ``x`` by ordinary autograd (an oracle for tests).

        Raises:
            NotImplementedError: no closed form (no ``data["inner_solution"]``).
        """
        return self._closed_form("inner_solution", "inner solution")(x)

    def hypergradient(self, x: TensorTree) -> TensorTree:
        """The exact hypergradient :math:`\\nabla \\Phi(x) = \\frac{d}{dx} F(x, y^\\star(x))`.

        Raises:
            NotImplementedError: no closed form (no ``data["hypergradient"]``).
        """
        return self._closed_form("hypergradient", "hypergradient")(x)


def _builder(problem: BilevelProblem, rebuild: Callable[[torch.dtype], BilevelProblem]) -> BilevelProblem:
    """Attach ``rebuild`` (``dtype -> problem``) so that ``with_dtype`` rebuilds the data."""
    problem._rebuild = rebuild
    return problem
