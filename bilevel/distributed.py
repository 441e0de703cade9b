r"""Data-parallel bilevel training on :mod:`torch.distributed`.

With :math:`N` processes (ranks), each holding a shard of the data, the
objective of a data-parallel run is the mean of the per-rank objectives,

.. math::

    f(x, y) = \frac{1}{N} \sum_{r=0}^{N-1} f_r(x, y),

where :math:`f_r` is the objective evaluated on rank :math:`r`'s mini-batch.
For mean losses over equal-sized shards, :math:`f` *is* the loss on the
concatenated batch.  Every derivative a bilevel method needs is linear in
:math:`f`, so it is the all-reduced mean of the per-rank ones:

.. math::

    \nabla f = \tfrac1N \textstyle\sum_r \nabla f_r, \qquad
    \nabla^2_{yy} f\, v = \tfrac1N \textstyle\sum_r \nabla^2_{yy} f_r\, v, \qquad
    \nabla^2_{xy} f\, v = \tfrac1N \textstyle\sum_r \nabla^2_{xy} f_r\, v.

:func:`data_parallel` wraps an objective so that its value *and all its
derivatives, of every order and in every mode* are these all-reduced means.
It does so with two adjoint linear maps built as :class:`torch.autograd.Function`
(with ``setup_context``, ``jvp`` and a ``vmap`` rule, so they compose with
``torch.autograd`` and with :func:`torch.func.grad`, ``jvp``, ``vjp``,
``vmap``, ``jacrev``, ``hessian``):

* *replicate* :math:`R`, applied to the arguments that hold the same value on
  every rank (the variables :math:`x`, :math:`y`, a model's weights): the
  identity forward; its adjoint sums the per-rank cotangents (one
  ``all_reduce``), so a gradient with respect to a replicated variable is the
  same on every rank;
* *reduce* :math:`S`, applied to the value: ``all_reduce`` (sum) forward and
  in forward mode; its adjoint is :math:`R` (the identity).

The wrapped objective is :math:`S(f_r(R(x), R(y), \text{batch}_r)) / N`.  Since
the algorithms of :mod:`bilevel` only ever call objectives and differentiate
them, every algorithm becomes data-parallel *unchanged*: the inner solver's
gradients, each Hessian-vector product of a CG iteration (one ``all_reduce``
of the size of :math:`y` per product), the cross term, the single-loop
updates, the HPO tuners' training steps.  All ranks then hold bit-identical
replicated quantities (an ``all_reduce`` returns the same bits on every rank,
and every rank runs the same deterministic code on them), so convergence tests
and line searches decide the same way everywhere and the ranks stay in
lock-step: no rank waits on an ``all_reduce`` the others skip.

What each rank must do (see the *Scale* guide of the documentation):

* start from the same :math:`x_0`, :math:`y_0` / model weights (same seed, or
  :func:`broadcast`) and draw the same random numbers (same seed);
* feed its own shard: the same number of mini-batches, of equal sizes
  (:func:`shard`, or a :class:`~torch.utils.data.distributed.DistributedSampler`);
* avoid layers whose forward mixes the samples of a batch (batch
  normalization in training mode uses the *local* batch statistics; use
  ``SyncBatchNorm``, ``LayerNorm`` or ``GroupNorm``).

Then the iterates equal, to floating-point rounding (the order of the sums
changes), those of one process on the concatenated batches.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from ._tree import tree_flatten, tree_unflatten
from .typing import TensorTree

ProcessGroup = Any  # torch.distributed.ProcessGroup, absent from builds without distributed support

_REDUCTIONS = ("mean", "sum")


# -- the two collectives, differentiable ------------------------------------------------------
def _all_reduce_sum(tensors: Sequence[torch.Tensor], group: Optional[ProcessGroup]) -> list[torch.Tensor]:
    """Sums over the ranks: one ``all_reduce`` per (dtype, device) of a flat buffer
    holding every tensor (fewer, larger messages than one per tensor)."""
    buckets: dict = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    out: list = [None] * len(tensors)
    for indices in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        start = 0
        for i in indices:
            n = tensors[i].numel()
            out[i] = flat[start:start + n].view(tensors[i].shape)
            start += n
    return out


class _Reduce(torch.autograd.Function):
    r""":math:`S`: per-rank tensors :math:`a_r` to their sum :math:`\sum_r a_r` on every rank.
    Forward mode: the sum of the tangents; reverse mode: the (replicated)
    cotangent to every rank, i.e. :class:`_Replicate`."""

    @staticmethod
    def forward(group, *tensors):
        return tuple(_all_reduce_sum(tensors, group))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx, *cotangents):
        return (None, *_Replicate.apply(ctx.group, *cotangents))

    @staticmethod
    def jvp(ctx, _group_tangent, *tangents):
        return _Reduce.apply(ctx.group, *tangents)

    @staticmethod
    def vmap(info, in_dims, group, *tensors):
        # an elementwise sum over ranks: the batch dimension is summed like any other,
        # and every rank has the same physical layout (the same code made it)
        return _Reduce.apply(group, *tensors), tuple(in_dims[1:])


class _Replicate(torch.autograd.Function):
    r""":math:`R`: a replicated tensor, used as a rank's local copy.  The identity
    forward and in forward mode; reverse mode sums the per-rank cotangents
    (:class:`_Reduce`), which is what makes gradients all-reduced."""

    @staticmethod
    def forward(group, *tensors):
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx, *cotangents):
        return (None, *_Reduce.apply(ctx.group, *cotangents))

    @staticmethod
    def jvp(ctx, _group_tangent, *tangents):
        return _Replicate.apply(ctx.group, *tangents)

    @staticmethod
    def vmap(info, in_dims, group, *tensors):
        return _Replicate.apply(group, *tensors), tuple(in_dims[1:])


def _map_floating(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to its floating-point tensors, looking into
    pytrees and into any dict, list or tuple subclass (e.g. a dict subclass of
    hyper-parameters that the pytree registry does not know)."""
    if torch.is_tensor(obj):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        new = copy.copy(obj)
        for key, value in obj.items():
            new[key] = _map_floating(value, fn)
        return new
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*[_map_floating(v, fn) for v in obj])
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_floating(v, fn) for v in obj)
    leaves, spec = tree_flatten(obj)
    if len(leaves) == 1 and leaves[0] is obj:
        return obj
    return tree_unflatten([_map_floating(v, fn) for v in leaves], spec)


def _replicate_tree(tree: Any, group: Optional[ProcessGroup]) -> Any:
    """``tree`` with its floating-point tensors passed through :class:`_Replicate`
    (one node for the whole tree, so a gradient of it costs one ``all_reduce``)."""
    found: list = []
    _map_floating(tree, lambda t: found.append(t) or t)
    if not found:
        return tree
    replicated = iter(_Replicate.apply(group, *found))
    return _map_floating(tree, lambda t: next(replicated))


class _WithModules(nn.Module):
    """``forward(args, kwargs) = fn(*args, **kwargs)`` with the ``nn.Module`` arguments
    registered as children, so that :func:`torch.func.functional_call` can hand them
    replicated weights."""

    def __init__(self, fn: Callable, modules: dict[int, nn.Module]):
        super().__init__()
        self.slots = nn.ModuleDict({str(i): m for i, m in modules.items()})
        object.__setattr__(self, "_fn", fn)

    def forward(self, args: list, kwargs: dict):
        args = list(args)
        for key, module in self.slots.items():
            args[int(key)] = module
        return self._fn(*args, **kwargs)


def _call_replicated(fn: Callable, args: tuple, kwargs: dict, local: frozenset, group) -> Any:
    args = list(args)
    modules = {}
    for i, a in enumerate(args):
        if i in local:
            continue
        if isinstance(a, nn.Module):
            modules[i] = a
        else:
            args[i] = _replicate_tree(a, group)
    if not modules:
        return fn(*args, **kwargs)
    holder = _WithModules(fn, modules)
    named = [(k, p) for k, p in holder.named_parameters() if p.is_floating_point()]
    weights = _Replicate.apply(group, *[p for _, p in named]) if named else ()
    return functional_call(holder, {k: w for (k, _), w in zip(named, weights)}, (args, kwargs), strict=False)


# -- public -----------------------------------------------------------------------------------
def _require_group(where: str, group: Optional[ProcessGroup]) -> None:
    if not dist.is_available():
        raise RuntimeError(f"{where}: this PyTorch build has no torch.distributed support.")
    if group is None and not dist.is_initialized():
        raise RuntimeError(
            f"{where}: no torch.distributed process group is initialized (argument `group` is None). "
            "Call torch.distributed.init_process_group(backend) first -- launch the script with "
            "`torchrun --nproc_per_node=N script.py`, which sets the rank and world size -- or pass "
            "`group=`. A single process needs no wrapper."
        )


def data_parallel(
    fn: Callable[..., torch.Tensor],
    *,
    group: Optional[ProcessGroup] = None,
    reduction: str = "mean",
    local_argnums: Union[int, Sequence[int]] = (),
) -> Callable[..., torch.Tensor]:
    r"""Make an objective data-parallel: its value and every derivative are
    all-reduced over the ranks of ``group``.

    On rank :math:`r` of :math:`N`, the returned function computes

    .. math::

        \bar f(a_1, \dots, a_k) = \frac{1}{N} \sum_{s=0}^{N-1} f_s(a_1, \dots, a_k)
        \quad(\text{``mean''}), \qquad \sum_{s} f_s(a_1, \dots, a_k) \quad(\text{``sum''}),

    with :math:`f_s` = ``fn`` evaluated on rank :math:`s` (on its own local
    arguments, e.g. its mini-batch).  Positional arguments are *replicated*
    (the same value on every rank, e.g. ``x``, ``y``, a model or its weights)
    unless listed in ``local_argnums``; keyword arguments are passed unchanged.

    What is all-reduced (a sum over ranks, in one flat buffer per dtype):

    * the value, once per evaluation (one scalar);
    * in reverse mode (``torch.autograd``, :func:`torch.func.grad` / ``vjp``),
      the gradient with respect to each replicated argument that is
      differentiated: one ``all_reduce`` per argument per backward pass -- so a
      Hessian-vector product of a CG iteration costs one ``all_reduce`` of
      ``y``'s size, and the cross term :math:`\nabla^2_{xy} f\, v` one of
      ``x``'s size;
    * in forward mode (:func:`torch.func.jvp`), the output tangent.

    Under :func:`torch.func.vmap` a batch of products is all-reduced in one
    message.  The wrapped function is the objective of the union of the
    shards, so :func:`bilevel.hypergrad`, :func:`bilevel.solve` (every method)
    and the :mod:`bilevel.hpo` tuners use it as they use any objective.

    Args:
        fn: the objective of one rank, ``fn(*args, **kwargs)`` returning a
            tensor (a scalar for the bilevel API), e.g. ``inner(x, y, batch)``
            with ``batch`` the rank's mini-batch; an ``nn.Module`` argument
            (as in the HPO losses ``train_loss(model, batch, hparams)``) has its
            floating-point parameters replicated.
        group: the process group (default: the default group, which must be
            initialized).
        reduction: ``"mean"`` (default; the mean of per-rank objectives that are
            means over equal-sized shards is the mean over the union) or
            ``"sum"`` (for objectives that are sums over samples).
        local_argnums: positions of rank-local arguments, passed to ``fn``
            as they are: a gradient with respect to one of them stays
            rank-local (not all-reduced).  Listing the mini-batch is optional,
            since a replicated argument costs nothing until it is
            differentiated; list an argument that differs per rank and is
            differentiated per rank.

    Returns:
        The data-parallel objective, with ``fn``'s signature.

    Raises:
        RuntimeError: ``group`` is ``None`` and no default process group is
            initialized (no silent single-process fallback: a script run
            without ``torchrun`` would otherwise train each shard on its own).
        TypeError: ``fn`` is not callable, or returns no tensor.
        ValueError: ``reduction`` or ``local_argnums`` is invalid.

    Example:
        Without a process group the wrapper refuses, naming the fix:

        >>> import bilevel
        >>> inner = lambda x, y, batch: ((batch @ y) ** 2).mean() + x * (y ** 2).sum()
        >>> bilevel.distributed.data_parallel(inner)
        Traceback (most recent call last):
            ...
        RuntimeError: data_parallel: no torch.distributed process group is initialized ...

        In a script launched with ``torchrun --nproc_per_node=2 train.py``:

        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo")                      # doctest: +SKIP
        >>> inner = bilevel.distributed.data_parallel(inner)     # doctest: +SKIP
        >>> outer = bilevel.distributed.data_parallel(outer)     # doctest: +SKIP
        >>> result = bilevel.solve(outer, inner, x0, y0, data=my_shard_batches)  # doctest: +SKIP
    """
    if not callable(fn):
        raise TypeError(f"data_parallel: `fn` must be callable; got {type(fn).__name__}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"data_parallel: `reduction` must be one of {_REDUCTIONS}; got {reduction!r}.")
    local_list = [local_argnums] if isinstance(local_argnums, int) else list(local_argnums)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in local_list):
        raise ValueError(
            f"data_parallel: `local_argnums` must be a non-negative int or a sequence of them; got {local_argnums!r}."
        )
    _require_group("data_parallel", group)
    local = frozenset(local_list)
    size = dist.get_world_size(group)

    def data_parallel_fn(*args: Any, **kwargs: Any) -> torch.Tensor:
        value = _call_replicated(fn, args, kwargs, local, group)
        if not torch.is_tensor(value):
            raise TypeError(f"data_parallel: `fn` must return a tensor; got {type(value).__name__}.")
        (total,) = _Reduce.apply(group, value)
        return total / size if reduction == "mean" else total

    data_parallel_fn.__wrapped__ = fn
    data_parallel_fn.__name__ = getattr(fn, "__name__", "data_parallel_fn")
    data_parallel_fn.__doc__ = getattr(fn, "__doc__", None)
    return data_parallel_fn


def shard(tree: TensorTree, *, group: Optional[ProcessGroup] = None, dim: int = 0) -> TensorTree:
    r"""This rank's equal share of every tensor of ``tree`` along ``dim``.

    Rank :math:`r` of :math:`N` gets rows :math:`[r\,n/N, (r+1)\,n/N)` of each
    tensor with :math:`n` rows, so concatenating the shards in rank order gives
    back the tensor.  Non-tensor leaves are kept.

    Args:
        tree: a tensor or tree of tensors (e.g. a mini-batch ``(inputs, targets)``).
        group: the process group (default: the default group).
        dim: the dimension to split (default 0, the samples).

    Returns:
        ``tree`` with each tensor replaced by this rank's slice (a view).

    Raises:
        RuntimeError: no process group is initialized.
        ValueError: a tensor's size along ``dim`` is not divisible by the
            number of ranks (equal shards are what make the mean of the
            per-rank means the mean over the whole batch).

    Example:
        With 2 ranks, rank 0 would get rows 0-1 and rank 1 rows 2-3; a
        one-process group (for show) keeps everything:

        >>> import torch, torch.distributed as dist, bilevel
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> X, t = torch.arange(8.0).reshape(4, 2), torch.arange(4)
        >>> Xr, tr = bilevel.distributed.shard((X, t))
        >>> Xr.shape, tr.tolist()
        (torch.Size([4, 2]), [0, 1, 2, 3])
        >>> dist.destroy_process_group()
    """
    _require_group("shard", group)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    leaves, spec = tree_flatten(tree)
    out = []
    for i, t in enumerate(leaves):
        if not torch.is_tensor(t):
            out.append(t)
            continue
        n = t.shape[dim]
        if n % size:
            raise ValueError(
                f"shard: leaf {i} of `tree` has {n} entries along dim {dim}, not divisible by the {size} ranks; "
                f"drop {n % size} of them (or pad) so that every rank gets an equal share."
            )
        out.append(t.narrow(dim, rank * (n // size), n // size))
    return tree_unflatten(out, spec)


def broadcast(
    tree: Union[TensorTree, nn.Module], *, src: int = 0, group: Optional[ProcessGroup] = None
) -> Union[TensorTree, nn.Module]:
    """Rank ``src``'s values of ``tree`` on every rank (start points, model weights).

    Args:
        tree: a tensor tree (new tensors are returned, the inputs are not
            changed) or an ``nn.Module`` (its parameters and buffers are
            overwritten in place and the module is returned).
        src: the global rank whose values are sent (default 0).
        group: the process group (default: the default group).

    Returns:
        A tree of new tensors holding rank ``src``'s values (non-tensor leaves
        kept), or the module itself, updated in place.

    Raises:
        RuntimeError: no process group is initialized.

    Example:
        Every rank calls it with its own start point and gets rank 0's; shown
        with a one-process group:

        >>> import torch, torch.distributed as dist, bilevel
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> bilevel.distributed.broadcast({"y": torch.ones(2), "steps": 3})
        {'y': tensor([1., 1.]), 'steps': 3}
        >>> model = torch.nn.Linear(2, 1)
        >>> bilevel.distributed.broadcast(model) is model          # updated in place
        True
        >>> dist.destroy_process_group()
    """
    _require_group("broadcast", group)
    if isinstance(tree, nn.Module):
        with torch.no_grad():
            for t in list(tree.parameters()) + list(tree.buffers()):
                dist.broadcast(t.data, src=src, group=group)
        return tree
    leaves, spec = tree_flatten(tree)
    out = []
    for t in leaves:
        if torch.is_tensor(t):
            t = t.detach().clone().contiguous()
            dist.broadcast(t, src=src, group=group)
        out.append(t)
    return tree_unflatten(out, spec)


def is_replicated(tree: Union[TensorTree, nn.Module], *, group: Optional[ProcessGroup] = None) -> bool:
    """Whether every tensor of ``tree`` holds the same bits on every rank of ``group``.

    A check for data-parallel runs: the iterates ``result.x`` / ``result.y`` (or a
    tuned model) must be identical on all ranks.  Collective: every rank must
    call it, with trees of the same structure and shapes.  Returns the same
    answer on every rank.

    Args:
        tree: a tensor tree, or an ``nn.Module`` (its parameters and buffers).
        group: the process group (default: the default group).

    Returns:
        ``True`` if every tensor equals, bit for bit, its copy on the group's
        first rank, on every rank; ``False`` otherwise (on every rank).

    Raises:
        RuntimeError: no process group is initialized.

    Example:
        At the end of a data-parallel run (a one-process group, for show):

        >>> import torch, torch.distributed as dist, bilevel
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> bilevel.distributed.is_replicated((torch.ones(3), torch.zeros(2, 2)))
        True
        >>> dist.destroy_process_group()
    """
    _require_group("is_replicated", group)
    tensors = list(tree.parameters()) + list(tree.buffers()) if isinstance(tree, nn.Module) else [
        t for t in tree_flatten(tree)[0] if torch.is_tensor(t)
    ]
    first = dist.get_global_rank(group, 0) if group is not None else 0
    differs = False
    for t in tensors:
        reference = t.detach().clone().contiguous()
        dist.broadcast(reference, src=first, group=group)
        differs = differs or not torch.equal(reference, t.detach())
    device = tensors[0].device if tensors else torch.device("cpu")
    flag = torch.tensor([int(differs)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return not bool(flag.item())


__all__ = ["data_parallel", "shard", "broadcast", "is_replicated"]
