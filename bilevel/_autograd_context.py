"""The autograd context the library's own differentiation runs in.

Everything here that differentiates objectives internally (the solvers,
hypergradients, the bilevel algorithms, the backward pass of
:func:`~bilevel.custom_root` roots) is wrapped by :func:`differentiates`, so that
three contexts a caller may be in do not break it:

* :func:`torch.inference_mode`: autograd records nothing, even inside
  :func:`torch.enable_grad`, and inference tensors cannot be saved for a backward
  pass.  The wrapped function then runs with inference mode off, on copies of its
  tensor arguments; the caller still only gets values.
* saved-tensor hooks around the call (``torch.autograd.graph.save_on_cpu()``,
  ``saved_tensors_hooks``): :mod:`torch.func`, which evaluates optimality
  conditions and curvature here, refuses to run under them.  They are lifted
  while the wrapped function runs and restored after; the tensors it saves for
  a backward pass (the graph of ``hypergrad(..., create_graph=True)``, a root's
  double backward) therefore bypass the caller's hooks: not offloaded to the CPU,
  nor freed by a non-reentrant checkpoint.
* what torch.func cannot do inside an objective, saved-tensor hooks the objective
  installs itself (``torch.utils.checkpoint(..., use_reentrant=False)``) and
  old-style :class:`torch.autograd.Function` s without ``setup_context`` (among
  them the one ``nn.Module`` full backward hooks install): torch's error, which
  names neither the cause nor the library, is re-raised with both.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import torch

from ._tree import tree_map


def clone_tensors(tree: Any) -> Any:
    """``tree`` with every tensor leaf cloned (out of inference mode: a normal tensor)."""
    return tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, tree)


def differentiates(fn: Callable, finish: Optional[Callable[[Any], Any]] = None) -> Callable:
    """``fn``, which differentiates internally, made to run in any caller's autograd
    context (module docstring).  Under inference mode it runs on copies of its tensor
    arguments (leaves of lists, tuples and dicts included), and ``finish`` maps its
    result once back in inference mode (e.g. :func:`clone_tensors`, to hand back
    inference tensors)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _saved_tensor_hooks_lifted(), _torch_func_limits_named(fn):
            if not torch.is_inference_mode_enabled():
                return fn(*args, **kwargs)
            with torch.inference_mode(False):
                out = fn(*clone_tensors(args), **clone_tensors(kwargs))
        return out if finish is None else finish(out)

    return wrapper


@contextlib.contextmanager
def _saved_tensor_hooks_lifted() -> Iterator[None]:
    """Pop the default saved-tensor hooks of this thread; push them back on exit."""
    autograd = torch._C._autograd
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    pop = getattr(autograd, "_pop_saved_tensors_default_hooks", None)
    push = getattr(autograd, "_push_saved_tensors_default_hooks", None)
    if top is None or pop is None or push is None or top(True) is None:
        yield
        return
    lifted = []
    while (hooks := top(True)) is not None:
        lifted.append(hooks)
        pop()
    try:
        yield
    finally:
        for pack, unpack in reversed(lifted):
            push(pack, unpack)


_LIMITS = (
    (
        "saved tensor hooks",
        "saved-tensor hooks installed inside an objective or residual, e.g. by "
        "torch.utils.checkpoint(..., use_reentrant=False): checkpoint outside the objective, or "
        "with use_reentrant=True",
    ),
    (
        "setup_context staticmethod",
        "a torch.autograd.Function without a setup_context staticmethod (the old forward(ctx, ...) "
        "style) in the objective or residual: write it with forward(...) and setup_context(ctx, "
        "inputs, output) (see 'Extending torch.func with autograd.Function'); nn.Module full "
        "backward hooks (register_full_backward_hook / register_full_backward_pre_hook) install "
        "such a Function: remove the hook while the library differentiates (forward hooks are fine)",
    ),
)


@contextlib.contextmanager
def _torch_func_limits_named(fn: Callable) -> Iterator[None]:
    try:
        yield
    except RuntimeError as err:
        message = str(err)
        for key, what in _LIMITS:
            if key in message and not message.startswith("bilevel:"):
                name = getattr(fn, "__qualname__", getattr(fn, "__name__", "this call"))
                raise RuntimeError(
                    f"bilevel: {name} differentiates with torch.func, which does not support {what}. "
                    f"(torch: {message.splitlines()[0]})"
                ) from err
        raise


def refuse_grads_batched_by_autograd(grads: Any, where: str) -> None:
    """Raise a clear :class:`NotImplementedError` when a backward pass receives
    cotangents batched by ``torch.autograd.grad(..., is_grads_batched=True)`` (what
    ``torch.autograd.functional.jacobian`` / ``hessian`` use with ``vectorize=True``):
    that older batching runs a backward pass without the rules of
    :func:`torch.func.vmap`, which the library's backward passes rely on."""
    check = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    if check is None:
        return
    if any(torch.is_tensor(g) and check(g) for g in grads):
        raise NotImplementedError(
            f"bilevel: {where} does not accept gradients batched by torch.autograd.grad("
            "is_grads_batched=True), as torch.autograd.functional.jacobian / hessian(vectorize=True) "
            "produce them: use vectorize=False, or torch.func.jacrev / torch.func.vmap over "
            "torch.func.vjp, which are supported and batched."
        )
