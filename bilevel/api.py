r"""``bilevel.solve``: one call for a nested problem.

.. code-block:: python

    result = bilevel.solve(outer, inner, x0, y0, method="implicit")
    result.x, result.y, result.history, result.converged, result.state

The driver owns the loop of an algorithm of :mod:`bilevel.algorithms`: it builds
the state, feeds mini-batches, applies the stopping rules (``max_steps``, ``tol``
on the hypergradient norm, ``max_time``), records the history, checks that the
iterates stay finite, shows progress, calls the callback, and resumes from a
checkpoint (``resume=``) so that an interrupted run ends where the uninterrupted
one ends.  Certificate warnings of the inner steps (inexact inner solutions,
unconverged linear solves) are collected and issued once at the end, with
their count and worst residual.

On accelerators the loop does not wait for the device after every step: the
steps report 0-d tensors, and the driver reads the records (and the finiteness
of the iterates) every 8 steps in one host read, then fills the history, the
progress bar and the errors exactly as a step-by-step read would.  With ``tol``
or a ``callback``, which need each step's values, it reads every step.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from tqdm.auto import tqdm

from ._autograd_context import differentiates
from ._interrupt import StopRequest
from ._tree import tree_leaves
from .algorithms import METHODS, Algorithm, State, StepInfo
from .algorithms._base import host_floats
from .implicit.linear_solve._base import _sync_every
from .problems import BilevelProblem, LevelBatches
from .status import BilevelWarning
from .typing import TensorTree

HISTORY_KEYS = ("step", "outer", "hypergradient_norm", "inner_residual", "linear_residual", "time")


@dataclass
class BilevelResult:
    r"""What :func:`solve` returns.

    Attributes:
        x, y: the final upper and lower variables.  ``y`` is the lower iterate of
            the last step, computed at the ``x`` that step started from (the
            step then moved ``x``): one step behind ``x``, which matters only
            before convergence.
        history: per step, lists under ``HISTORY_KEYS``: outer value, hypergradient
            norm, inner residual, linear-solve residual, seconds per step.  The
            outer value is :math:`F(x, y)` at the method's own lower iterate
            ``y``, not :math:`\Phi(x) = F(x, y^\star(x))`: the penalty method's
            ``y`` minimizes :math:`F + \lambda f`, so its value lies below
            :math:`\Phi` and can fall while :math:`\Phi` rises (solve the lower
            level at ``x`` to follow :math:`\Phi`).  One
            record per step run: where a single-loop method backs off to a saved
            state, the steps it goes back over keep their records (the time was
            spent) and the steps run again add new ones, so the lists are then
            longer than ``state.iteration``.
        converged: whether the ``tol`` stopping rule fired.
        state: the algorithm state; ``state.state_dict()`` is a checkpoint to
            pass as ``resume=``.
        message: why the run stopped.

    Example:
        >>> import torch, bilevel
        >>> inner = lambda x, y: 0.5 * ((y - x) ** 2).sum()          # y*(x) = x
        >>> outer = lambda x, y: 0.5 * ((y - 1.0) ** 2).sum()        # so x* = 1
        >>> r = bilevel.solve(outer, inner, torch.zeros(2), torch.zeros(2), outer_optimizer="sgd",
        ...                   lr=0.5, tol=1e-6, progress=False)
        >>> r.converged, r.message.startswith("hypergradient norm")
        (True, True)
        >>> torch.allclose(r.x, torch.ones(2), atol=1e-5)
        True
        >>> len(r.history["outer"]) == r.state.iteration               # one record per step run
        True

        ``r.state`` continues the run (here five more steps, in a new history):

        >>> more = bilevel.solve(outer, inner, torch.zeros(2), torch.zeros(2), outer_optimizer="sgd",
        ...                      lr=0.5, max_steps=r.state.iteration + 5, progress=False, resume=r.state)
        >>> more.history["step"] == list(range(r.state.iteration + 1, r.state.iteration + 6))
        True
    """

    x: TensorTree
    y: TensorTree
    history: dict
    converged: bool
    state: State
    message: str = ""


class _Batches:
    """Mini-batches from ``data``: re-iterable data cycles, a one-shot iterator
    that runs dry is an error.  The first batch is read ahead (to validate the
    objectives with it) and served first."""

    def __init__(self, data: Optional[Iterable], name: str = "`data`"):
        pair = _level_streams(data)
        if pair is not None:  # one stream per level, drawn together
            self.levels = (_Batches(pair[0], "the outer stream of `data`"),
                           _Batches(pair[1], "the inner stream of `data`"))
            data = pair
        self.data, self.name = data, name
        self.served = 0
        self.buffer: list = []
        if data is not None and pair is None:
            if not hasattr(data, "__iter__"):
                raise TypeError(f"{name} must be an iterable of mini-batches; got {type(data).__name__}.")
            self.reiterable = iter(data) is not data
            self.iterator = iter(data)

    def first(self) -> Any:
        if self.data is None:
            return None
        if not self.buffer:
            self.buffer.append(self._pull())
        return self.buffer[0]

    def skip(self, count: int) -> None:
        for _ in range(count):  # resume: the batches the checkpointed run consumed
            self.next()

    def next(self) -> Any:
        if self.data is None:
            return None
        batch = self.buffer.pop(0) if self.buffer else self._pull()
        self.served += 1
        return batch

    def _pull(self) -> Any:
        if hasattr(self, "levels"):
            return LevelBatches(self.levels[0].next(), self.levels[1].next())
        try:
            return next(self.iterator)
        except StopIteration:
            if not self.reiterable:
                raise ValueError(
                    f"{self.name} ran out after {self.served} mini-batches; pass a re-iterable (a list, a "
                    "DataLoader), which is cycled, or a longer iterator, or lower max_steps."
                ) from None
            self.iterator = iter(self.data)
            try:
                return next(self.iterator)
            except StopIteration:
                raise ValueError(f"{self.name} is empty: it yields no mini-batch.") from None


def _algorithm(method: Union[str, Algorithm], options: dict) -> Algorithm:
    if isinstance(method, Algorithm):
        if options:
            _check_options(type(method), options, type(method).__name__)
            return method.replace(**options)
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; known methods: {', '.join(sorted(METHODS))} "
            "(or pass an algorithm config object such as bilevel.algorithms.Implicit())."
        )
    cls = METHODS[method]
    _check_options(cls, options, repr(method))
    return cls(**options)


def _check_options(cls: type, options: dict, name: str) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}  # ClassVars (field_rules, ...) are no options
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"method {name} does not take option(s) {unknown}; its options are {sorted(fields)}.")


def _two_argument_callback(callback):
    """``callback(state, record)``; a callback that takes only the state is wrapped."""
    if callback is None:
        return None
    if not callable(callback):
        raise TypeError(f"`callback` must be callable callback(state, record); got {type(callback).__name__}.")
    try:
        inspect.signature(callback).bind(None, None)
    except TypeError:
        try:
            inspect.signature(callback).bind(None)
        except TypeError:
            raise TypeError("`callback` must take (state, record) or (state).") from None
        return lambda state, record: callback(state)
    except ValueError:  # no signature (a builtin): called as documented
        pass
    return callback


def _number(value: Any, strict: bool) -> bool:
    """Whether ``value`` is a finite real number, positive (``strict``) or non-negative."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > 0 if strict else value >= 0


def _resume(state: State, resume: Any, algorithm: Algorithm) -> None:
    """Load ``resume`` (a State, its ``state_dict()`` or a :class:`BilevelResult`) into
    ``state``, refusing a checkpoint of another method or of other variables."""
    if isinstance(resume, BilevelResult):
        resume = resume.state
    if isinstance(resume, State):
        resume = resume.state_dict()
    if not isinstance(resume, Mapping):
        raise TypeError(
            "`resume` must be a checkpoint: `result.state`, `result.state.state_dict()` (or that "
            f"dict after torch.save / torch.load), or the BilevelResult itself; got {type(resume).__name__}."
        )
    missing = sorted(set(state.extras) - set(resume.get("extras", {})) - set(algorithm.optional_extras))
    if missing:
        raise ValueError(
            f"`resume`: the checkpoint lacks the state {type(algorithm).__name__} keeps ({missing}); it was "
            "made by another method. Resume with the method that wrote it."
        )
    state.load_state_dict(resume)


def _level_streams(data: Any) -> Optional[tuple]:
    """``(outer_data, inner_data)`` where ``data`` gives one stream per level:
    ``{"outer": ..., "inner": ...}``, or a pair of data loaders (two iterables
    that are not themselves batches: no tensors, tuples, lists, dicts or strings)."""
    if isinstance(data, Mapping):
        if set(data) != {"outer", "inner"}:
            raise ValueError(
                f"`data` as a dict must have exactly the keys 'outer' and 'inner' (one stream of "
                f"mini-batches per level); got {sorted(map(str, data))}."
            )
        if data["outer"] is None or data["inner"] is None:
            raise ValueError("`data`: both streams, 'outer' and 'inner', must be given (iterables of mini-batches).")
        return data["outer"], data["inner"]
    batch_like = (torch.Tensor, tuple, list, Mapping, str, bytes)
    if isinstance(data, tuple) and len(data) == 2:
        streams = [hasattr(d, "__iter__") and not isinstance(d, batch_like) for d in data]
        if all(streams):
            return data
        if any(streams) and all(isinstance(d, (list, tuple)) or s for d, s in zip(data, streams)):
            kinds = " and a ".join(type(d).__name__ for d in data)
            raise ValueError(
                f"`data` is a pair of a {kinds}: one stream per level, or two mini-batches? Pass "
                "data={'outer': ..., 'inner': ...} for one stream per level, or a list of mini-batches."
            )
    return None


@differentiates
def solve(
    outer: Union[Callable, BilevelProblem],
    inner: Optional[Callable] = None,
    x0: Optional[TensorTree] = None,
    y0: Optional[TensorTree] = None,
    *,
    method: Union[str, Algorithm] = "implicit",
    constraints: Optional[Callable] = None,
    inner_solver: Any = None,
    outer_optimizer: Any = None,
    lr: Optional[float] = None,
    max_steps: int = 1000,
    tol: Optional[float] = None,
    max_time: Optional[float] = None,
    data: Optional[Iterable] = None,
    callback: Optional[Callable[[State, dict], Optional[bool]]] = None,
    progress: bool = True,
    resume: Optional[Union[dict, State]] = None,
    **options: Any,
) -> BilevelResult:
    r"""Solve :math:`\min_x F(x, y^\star(x))`, :math:`y^\star(x) = \arg\min_y f(x, y)`.

    Args:
        outer: :math:`F`, ``outer(x, y[, batch])`` (upper variable first), or a
            :class:`~bilevel.problems.BilevelProblem` (then ``inner``, ``x0``, ``y0``
            and ``constraints`` come from it).
        inner: :math:`f`, ``inner(x, y[, batch])``.
        x0, y0: start points (tensors or tensor trees).
        method: ``"implicit"`` (default), ``"unrolled"``, ``"one_step"``, the
            single-loop methods ``"penalty"``, ``"meha"``, ``"bamm"``, ``"lvhba"``
            (inner constraints), the aggregation method ``"bda"``, the one-loop
            AID method ``"soba"``, or an algorithm config object of
            :mod:`bilevel.algorithms`.
        constraints: inner constraints ``g(x, y) <= 0`` (methods that handle them).
        inner_solver: the inner solver of methods that use one (e.g. a
            :mod:`bilevel.solvers` object for ``"implicit"``).
        outer_optimizer: ``torch.optim`` name, class, factory ``params -> optimizer``
            or instance (its class and settings are used on the library's copy of
            ``x``); default ``"adam"``.
        lr: outer learning rate (default ``1e-2``); an optimizer given as an
            instance or a factory keeps its own.
        max_steps: outer steps (default 1000).
        tol: stop when the hypergradient norm is at most ``tol`` (for the
            single-loop methods, whose estimate lags behind their auxiliary
            variables, on 10 consecutive steps).  The norm is that of the
            method's own direction: for the methods that solve a surrogate
            (``penalty``: :math:`O(1/\lambda)` off, ``bda`` and ``meha``: their
            aggregation and penalty terms, ``one_step``) it can fall below
            ``tol`` while :math:`\|\nabla\Phi(x)\|` is still far larger (on
            problem Q with ``tol=1e-4``: 5e-3 for ``penalty``, 1.5e-2 for
            ``bda``); check the result with :func:`~bilevel.hypergrad` at an
            exact inner solution where that matters.
        max_time: stop after this many seconds.
        data: an iterable of mini-batches passed as the third argument of the
            objectives; re-iterable data (lists, DataLoaders) is cycled.  One
            stream per level: ``data=(outer_loader, inner_loader)`` or
            ``data={"outer": ..., "inner": ...}`` draws a batch from each per
            step, the first for ``outer`` and the second for ``inner`` (each
            cycled on its own; see :class:`~bilevel.problems.LevelBatches`).
        callback: ``callback(state, record)`` after each step (or ``callback(state)``);
            returning ``True`` stops the run.
        progress: show a tqdm progress bar (default ``True``).
        resume: a checkpoint (``result.state`` or ``state.state_dict()``) to
            continue from; the run then ends where the uninterrupted one ends.
        **options: settings of the method's config (e.g. ``steps=50`` for
            ``"unrolled"``, ``solve=CG(maxiter=20)`` for ``"implicit"``).

    Returns:
        A :class:`BilevelResult`.  Ctrl-C (SIGINT, in the main thread) also ends the
        run, after the step in progress: ``solve`` then returns normally, with a
        :class:`~bilevel.status.BilevelWarning` and ``result.message`` saying so, and
        ``resume=result.state`` continues it exactly.  The code after ``solve`` then
        runs (a script that loops over runs goes on to the next one); a second Ctrl-C
        interrupts at once with ``KeyboardInterrupt``.  A ``solve`` nested in another
        run's step runs to its end.

    Raises:
        ValueError: an unknown method (the message lists the known ones), an
            objective that is not scalar or fails at the start point, data that
            runs dry.
        TypeError: a bad argument type or an option the method does not take.
        FloatingPointError: the iterates became NaN or infinite (naming the step).

    Example:
        >>> import torch, bilevel
        >>> inner = lambda x, y: 0.5 * ((y - x) ** 2).sum()          # y*(x) = x
        >>> outer = lambda x, y: 0.5 * ((y - 1.0) ** 2).sum()        # so x* = 1
        >>> result = bilevel.solve(outer, inner, torch.zeros(2), torch.zeros(2), lr=0.1,
        ...                        max_steps=300, progress=False)
        >>> torch.allclose(result.x, torch.ones(2), atol=1e-3)
        True
    """
    batches = _Batches(data)
    problem = _problem(outer, inner, x0, y0, constraints, batches)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"`max_steps` must be a non-negative int; got {max_steps!r}.")
    for name, value, least in (("lr", lr, "positive"), ("tol", tol, "non-negative"),
                               ("max_time", max_time, "non-negative")):
        if value is not None and not _number(value, strict=least == "positive"):
            raise ValueError(f"`{name}` must be a {least} number or None; got {value!r}.")
    callback = _two_argument_callback(callback)
    if inner_solver is not None:
        options["inner_solver"] = inner_solver
    if outer_optimizer is not None:
        options["outer_optimizer"] = outer_optimizer
    if lr is not None:
        options["lr"] = lr
    algorithm = _algorithm(method, options)
    if problem.constraints is not None and not getattr(algorithm, "handles_constraints", False):
        raise ValueError(
            f"method {type(algorithm).__name__} does not handle inner constraints; use a method for "
            "constrained lower levels ('lvhba') or drop `constraints`."
        )
    state = algorithm.init(problem)
    if resume is not None:
        _resume(state, resume, algorithm)
    # the batches the checkpointed run consumed: more than its steps where a back-off went back
    batches.skip(state.extras.get(_SERVED, state.iteration))
    history: dict = {key: [] for key in HISTORY_KEYS}
    caught: dict = defaultdict(list)
    converged, interrupted, message = False, False, f"reached max_steps={max_steps}"
    # Records are read from the device every `every` steps (one host read for all of them), or
    # every step where the stopping rule or the callback needs each step's values.
    every = 1 if tol is not None or callback is not None else _sync_every(tree_leaves(state.x)[0])
    # single-loop estimates lag behind their auxiliary variables: tol holds over a few steps
    patience, below = getattr(algorithm, "tol_patience", 1), 0
    pending: list = []
    drawn: deque = deque(maxlen=_REDRAW)  # (step, batch) of the recent steps, to serve again after a back-off
    start = time.perf_counter()
    bar = tqdm(total=max_steps, initial=min(state.iteration, max_steps), disable=not progress, desc="bilevel")
    with StopRequest("bilevel.solve") as stop:
        try:
            while state.iteration < max_steps:
                tick = time.perf_counter()
                batch = batches.next()
                drawn.append((state.iteration + 1, batch))
                info = state.info
                with warnings.catch_warnings(record=True) as records:
                    warnings.simplefilter("always", BilevelWarning)
                    try:
                        state = algorithm.step(problem, state, batch)
                    except Exception:
                        _flush(pending, history, bar)  # a non-finite earlier step raises its own error
                        raise
                _account_batches(batches, drawn, state, info)
                _sort_warnings(records, caught, state.iteration)
                _queue(pending, state, time.perf_counter() - tick)
                if len(pending) >= every or state.iteration >= max_steps:
                    info = state.info
                    state = _settle(algorithm, problem, state, batch, pending, caught)
                    _account_batches(batches, drawn, state, info)
                    record = _flush(pending, history, bar)
                    below = below + 1 if tol is not None and record["hypergradient_norm"] <= tol else 0
                    if below >= patience:
                        converged = True
                        message = f"hypergradient norm {record['hypergradient_norm']:.3g} <= tol={tol}" + (
                            f" on {patience} consecutive steps" if patience > 1 else "")
                        break
                    if callback is not None and callback(state, record):
                        message = "stopped by the callback"
                        break
                timed_out = max_time is not None and time.perf_counter() - start >= max_time
                if not (timed_out or (stop.requested and state.iteration < max_steps)):
                    continue
                info = state.info
                state = _settle(algorithm, problem, state, batch, pending, caught)  # may go back
                _account_batches(batches, drawn, state, info)
                _flush(pending, history, bar)
                interrupted = not timed_out
                message = (f"reached max_time={max_time} s" if timed_out else
                           f"stopped by Ctrl-C after step {state.iteration} of {max_steps}; "
                           "`resume=result.state` continues the run")
                break
        finally:
            bar.close()
            _warn_once(caught)  # also when a step raised: the warnings that led there
    if interrupted:  # the caller's script goes on: say so
        warnings.warn(f"solve: {message}.", BilevelWarning, stacklevel=2)
    return BilevelResult(x=state.x, y=state.y, history=history, converged=converged, state=state, message=message)


_SERVED = "batches_served"
"""Key of ``state.extras``: the mini-batches drawn so far, which a resumed run skips."""

_REDRAW = 16
"""How many recent batches are kept to be served again after a deferred back-off (the
checks of the single-loop methods wait at most 8 steps on accelerators)."""


def _account_batches(batches: _Batches, drawn: deque, state: State, before: Any) -> None:
    """Record in ``state`` the batches drawn so far (what a resumed run skips).  After a
    step or check that went back to a saved state because step ``s`` blew up, first
    serve the batches of the steps after ``s`` again, in order: they were drawn only
    because the check waited (on accelerators), and the run goes on with the batches
    it would have drawn on the CPU, where the check does not wait."""
    failed = state.info.rolled_back_at if state.info is not before else None
    if failed is not None:
        again = [batch for step, batch in drawn if step > failed]
        batches.buffer[:0] = again
        batches.served -= len(again)
        drawn.clear()
    state.extras[_SERVED] = batches.served


def _problem(outer, inner, x0, y0, constraints, stream) -> BilevelProblem:
    if isinstance(outer, BilevelProblem):
        if inner is not None or x0 is not None or y0 is not None:
            raise TypeError("solve(problem, ...): pass either a BilevelProblem or outer, inner, x0, y0, not both.")
        if constraints is not None:
            raise TypeError("solve(problem, ...): the constraints come from the problem.")
        return outer
    missing = [name for name, v in (("inner", inner), ("x0", x0), ("y0", y0)) if v is None]
    if missing:
        raise TypeError(f"solve(outer, inner, x0, y0): missing {', '.join(missing)}.")
    example = stream.first()
    return BilevelProblem(outer, inner, x0, y0, constraints=constraints, example_batch=example)


def _sort_warnings(records, caught: dict, step: int) -> None:
    for w in records:
        if issubclass(w.category, BilevelWarning):
            caught[w.category].append((step, str(w.message)))
        else:  # not ours: let it through unchanged
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _warn_once(caught: dict) -> None:
    for category, items in caught.items():
        steps = sorted({s for s, _ in items})
        first_step, first = items[0]
        warnings.warn(
            f"solve: {category.__name__} at {len(steps)} step(s) (first at step {first_step}); "
            f"the first: {first}",
            category,
            stacklevel=3,
        )


@dataclass
class _Pending:
    """A step's record before it is read from the device."""

    step: int
    info: StepInfo
    finite: list  # per leaf of (x, y): 0-d bool tensors
    seconds: float


def _queue(pending: list, state: State, seconds: float) -> None:
    """Keep the step's record (tensors); a step that went back to a saved state
    voids the records from the step that blew up on."""
    info = state.info
    if info.rolled_back_at is not None:
        pending[:] = [p for p in pending if p.step < info.rolled_back_at]
    finite = [torch.isfinite(t).all() for t in tree_leaves(state.x) + tree_leaves(state.y)]
    pending.append(_Pending(state.iteration, info, finite, seconds))


def _settle(algorithm: Algorithm, problem: BilevelProblem, state: State, batch: Any, pending: list,
            caught: dict) -> State:
    """Let the algorithm finish its deferred checks before the records are read."""
    info = state.info
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", BilevelWarning)
        state = algorithm.settle(problem, state, batch)
    _sort_warnings(records, caught, state.iteration)
    if state.info is not info:  # it went back to a saved state: that is the step's record
        _queue(pending, state, 0.0)
    return state


def _flush(pending: list, history: dict, bar) -> Optional[dict]:
    """Read the pending records (one host read), append them to the history, and
    raise at the first step whose iterates or outer value are not finite."""
    if not pending:
        return None
    values = []
    for p in pending:
        values.extend(p.info.values())
        values.extend(p.finite)
    numbers = host_floats(values)
    records, at = [], 0
    for p in pending:
        p.info.set_floats(numbers[at:at + 4])
        finite = all(numbers[at + 4:at + 4 + len(p.finite)])
        at += 4 + len(p.finite)
        records.append((p, finite))
    pending.clear()
    record = None
    for p, finite in records:
        record = {"step": p.step, **dict(zip(HISTORY_KEYS[1:5], p.info.floats())), "time": p.seconds}
        for key, value in record.items():
            history[key].append(value)
        if not finite or not math.isfinite(record["outer"]):
            raise FloatingPointError(
                f"solve: step {p.step}: the iterates became non-finite (outer value "
                f"{record['outer']}, hypergradient norm {record['hypergradient_norm']}); lower the "
                "outer learning rate `lr` or check the objectives for NaN."
            )
        bar.update(1)
    bar.set_postfix(outer=f"{record['outer']:.4g}", grad=f"{record['hypergradient_norm']:.2g}")
    return record


__all__ = ["solve", "BilevelResult", "HISTORY_KEYS"]
