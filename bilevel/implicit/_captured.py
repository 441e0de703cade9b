"""Detect tensors that require grad but reach an optimality condition through a
closure or a global instead of an argument.

Such tensors get no implicit gradient (the implicit function theorem only
differentiates with respect to the arguments), which several libraries let pass
silently.  The check is static and cheap: it inspects the closure cells, the
globals the code names, ``functools.partial`` arguments, bound ``nn.Module``
instances and the fields of a projection's set (such as ``Box(lower, upper)``),
a few levels deep, without calling anything.  A tensor that is also passed as an
argument is not reported.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Any, Callable, Iterator

import torch

from .._tree import tree_leaves
from ..status import BilevelError, CapturedTensorWarning
from .projections import ConvexSet

_MAX_DEPTH = 3


def _requires_grad(obj: Any) -> bool:
    if torch.is_tensor(obj):
        return obj.requires_grad
    if isinstance(obj, torch.nn.Module):
        return any(p.requires_grad for p in obj.parameters())
    return False


def _children(fn: Callable) -> Iterator[tuple[str, Any]]:
    """(name, object) pairs a callable can read without taking them as arguments."""
    for attr in ("objective", "fixed_point_map", "fn"):  # Condition and its sources
        if hasattr(fn, attr) and not inspect.isfunction(fn):
            yield attr, getattr(fn, attr)
    if isinstance(fn, functools.partial):
        yield "partial", fn.func
        for i, a in enumerate(fn.args):
            yield f"partial argument {i}", a
        yield from fn.keywords.items()
        return
    if inspect.ismethod(fn):
        yield "self", fn.__self__
        fn = fn.__func__
    if isinstance(fn, torch.nn.Module):
        yield "module", fn
        return
    if _is_set(fn):  # a projection's set, e.g. Box(lo, hi): its fields are constants of the condition
        for field in dataclasses.fields(fn):
            yield f"{type(fn).__name__}.{field.name}", getattr(fn, field.name, None)
        return
    if not inspect.isfunction(fn):
        return
    if fn.__closure__:
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
            try:
                yield name, cell.cell_contents
            except ValueError:  # empty cell
                continue
    for name in fn.__code__.co_names:
        if name in fn.__globals__:
            yield name, fn.__globals__[name]


def _substitutes_parameters(fn: Callable) -> bool:
    """Whether ``fn`` calls ``functional_call``, which replaces a module's parameters
    by the ones passed in: a module it captures is then only an architecture."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code is not None and "functional_call" in code.co_names + code.co_freevars


def _calls_functional_call(fn: Callable, depth: int = 0, seen: set | None = None) -> bool:
    """Whether ``fn`` or a function it reaches (closure, globals, partial arguments)
    calls ``functional_call``: then a module passed as an argument is only an
    architecture, its parameters being replaced by tensors that are arguments."""
    seen = set() if seen is None else seen
    if id(fn) in seen or depth > _MAX_DEPTH:
        return False
    seen.add(id(fn))
    if _substitutes_parameters(fn):
        return True
    return any(
        _calls_functional_call(obj, depth + 1, seen)
        for _, obj in _children(fn)
        if callable(obj) and not isinstance(obj, (type, torch.nn.Module)) and not inspect.isbuiltin(obj)
        and not str(getattr(obj, "__module__", "") or "").startswith("torch")
    )


def _is_set(obj: Any) -> bool:
    return isinstance(obj, ConvexSet) and dataclasses.is_dataclass(obj)


def find_captured(fn: Callable, depth: int = 0, seen: set | None = None, passed: frozenset = frozenset()) -> list[str]:
    """Names of tensors / modules requiring grad that ``fn`` captures (those whose ids
    are in ``passed``, also given as arguments, excepted)."""
    seen = set() if seen is None else seen
    if id(fn) in seen or depth > _MAX_DEPTH:
        return []
    seen.add(id(fn))
    found = []
    architecture_only = _substitutes_parameters(fn)
    for name, obj in _children(fn):
        if (isinstance(obj, torch.nn.Module) and architecture_only) or id(obj) in passed:
            continue
        if _requires_grad(obj):
            shape = f" of shape {tuple(obj.shape)}" if torch.is_tensor(obj) else " (nn.Module)"
            found.append(f"'{name}'{shape}")
        elif (callable(obj) or _is_set(obj)) and not isinstance(obj, type) and not inspect.isbuiltin(obj):
            if getattr(obj, "__module__", "") and str(obj.__module__).startswith("torch"):
                continue
            found.extend(find_captured(obj, depth + 1, seen, passed))
    return found


def check_captured(residual: Callable, args: tuple, *, strict: bool, stage: str) -> None:
    """Warn (or raise in strict mode) about captured tensors and modules requiring grad."""
    if not torch.is_grad_enabled():
        return
    found = find_captured(residual, passed=frozenset(id(t) for t in tree_leaves(args) if torch.is_tensor(t)))
    modules = [
        f"argument leaf {i} (nn.Module)"
        for i, leaf in enumerate(tree_leaves(args))
        if isinstance(leaf, torch.nn.Module) and _requires_grad(leaf)
    ]
    if modules and _calls_functional_call(residual):
        modules = []
    if not (found or modules):
        return
    message = (
        f"{stage}: the optimality condition reads {', '.join(found + modules)}, which require grad, "
        "from its closure, its globals or a module instead of its arguments; no implicit gradient "
        "flows to them. Pass them as arguments of the decorated solver and of the residual "
        "(for a module, pass dict(module.named_parameters()) and use torch.func.functional_call)."
    )
    if strict:
        raise BilevelError(message)
    warnings.warn(message, CapturedTensorWarning, stacklevel=3)


def _tracks_grad(t: torch.Tensor) -> bool:
    """Whether ``t`` is differentiated: it requires grad, or it is tracked by a
    :func:`torch.func.grad` / ``jvp`` level (possibly under ``vmap`` levels)."""
    functorch = torch._C._functorch
    while True:  # a grad level's wrapper reports requires_grad; vmap wrappers hide it
        if t.requires_grad:
            return True
        if not functorch.is_functorch_wrapped_tensor(t):
            return False
        t = functorch.get_unwrapped(t)


def check_keywords(kwargs: dict, *, strict: bool, stage: str) -> None:
    """Warn (or raise in strict mode) about differentiated tensors passed by keyword:
    keywords go to the solver only, so no implicit gradient reaches them."""
    names = [
        name for name, value in kwargs.items()
        if any(torch.is_tensor(t) and t.is_floating_point() and _tracks_grad(t) for t in tree_leaves(value))
    ]
    if not names:
        return
    message = (
        f"{stage}: keyword argument(s) {', '.join(f'`{n}`' for n in names)} require grad, but keyword "
        "arguments go to the solver only and get no implicit gradient. Pass differentiated tensors "
        "positionally (they are then arguments of the residual too); detach a warm start to silence this."
    )
    if strict:
        raise BilevelError(message)
    warnings.warn(message, CapturedTensorWarning, stacklevel=3)
