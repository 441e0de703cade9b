"""Pytree helpers: flatten a tensor tree to one vector per batch element and back.

The linear solvers and the implicit core work on flat tensors of shape
``(*batch, n)``: a single tensor leaf is only reshaped (a view, no copy);
several leaves are concatenated.  :func:`ravel` returns the inverse map too.
"""

from __future__ import annotations

import contextlib

import math
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from .typing import TensorTree

tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves


def describe(tree: Any) -> str:
    """A short human-readable description of a tree's structure and shapes."""
    leaves, spec = tree_flatten(tree)
    shapes = [tuple(x.shape) if torch.is_tensor(x) else type(x).__name__ for x in leaves]
    if len(leaves) == 1 and torch.is_tensor(tree):
        return f"tensor of shape {shapes[0]}"
    return f"tree {spec} with leaf shapes {shapes}"


def tensor_leaves(tree: TensorTree, name: str) -> tuple[list[torch.Tensor], Any]:
    """Flatten ``tree`` and check that every leaf is a tensor."""
    leaves, spec = tree_flatten(tree)
    if not leaves:
        raise ValueError(f"`{name}` is empty: expected a tensor or a tree of tensors.")
    for i, leaf in enumerate(leaves):
        if not torch.is_tensor(leaf):
            raise TypeError(
                f"`{name}` must be a tensor or a tree of tensors; leaf {i} is a "
                f"{type(leaf).__name__}."
            )
    return leaves, spec


def check_same_structure(a: TensorTree, b: TensorTree, name_a: str, name_b: str) -> None:
    """Raise a ``ValueError`` naming both trees if their structures or shapes differ."""
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    same = spec_a == spec_b and all(
        torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape
        for x, y in zip(leaves_a, leaves_b)
    )
    if not same:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same structure and shapes; "
            f"got {describe(a)} and {describe(b)}."
        )


class Raveler:
    """Maps a tensor tree with ``batch_dims`` leading batch dimensions to a flat
    tensor of shape ``(*batch, n)`` and back.

    Built from an example tree; :meth:`ravel` accepts any tree of the same
    structure and leaf shapes, :meth:`unravel` returns one.
    """

    def __init__(self, example: TensorTree, batch_dims: int = 0, name: str = "b"):
        leaves, self.spec = tensor_leaves(example, name)
        self.name = name
        for i, leaf in enumerate(leaves):
            if leaf.dim() < batch_dims:
                raise ValueError(
                    f"`{name}` leaf {i} has shape {tuple(leaf.shape)}, fewer than the "
                    f"{batch_dims} batch dimension(s) requested."
                )
        self.batch_shape = leaves[0].shape[:batch_dims]
        for i, leaf in enumerate(leaves):
            if leaf.shape[:batch_dims] != self.batch_shape:
                raise ValueError(
                    f"every leaf of `{name}` must share the batch shape "
                    f"{tuple(self.batch_shape)}; leaf {i} has shape {tuple(leaf.shape)}."
                )
        self.batch_dims = batch_dims
        self.shapes = [leaf.shape[batch_dims:] for leaf in leaves]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.dtype = leaves[0].dtype
        for d in self.dtypes[1:]:
            self.dtype = torch.promote_types(self.dtype, d)
        self.size = sum(self.sizes)
        self.bare = len(leaves) == 1 and torch.is_tensor(example)  # a plain tensor, no tree

    def ravel(self, tree: TensorTree) -> torch.Tensor:
        if self.bare and torch.is_tensor(tree):
            return tree.reshape(tree.shape[: tree.dim() - len(self.shapes[0])] + (-1,))
        leaves, spec = pytree.tree_flatten(tree)
        if len(leaves) == 1:
            leaf = leaves[0]
            return leaf.reshape(*leaf.shape[: leaf.dim() - len(self.shapes[0])], -1)
        if spec != self.spec:
            leaves = self._in_order(tree, spec)
        flat = [
            leaf.reshape(*leaf.shape[: leaf.dim() - len(shape)], -1).to(self.dtype)
            for leaf, shape in zip(leaves, self.shapes)
        ]
        return torch.cat(flat, dim=-1)

    def _in_order(self, tree: TensorTree, spec) -> list:
        """The leaves of ``tree`` in the order of the example's: a dict may list its
        keys in another order (equal dicts); any other difference is an error."""
        paths = dict(pytree.tree_flatten_with_path(tree)[0])
        expected = [path for path, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(
            [None] * len(self.shapes), self.spec), is_leaf=lambda x: x is None)[0]]
        if set(paths) != set(expected):
            raise ValueError(
                f"a tree returned for `{self.name}` has the structure {spec}, expected that of "
                f"`{self.name}`: {self.spec} (e.g. a matvec must return a tree shaped like its input)."
            )
        return [paths[path] for path in expected]

    def unravel(self, flat: torch.Tensor) -> TensorTree:
        batch = flat.shape[:-1]
        if self.bare:
            return flat.reshape(tuple(batch) + tuple(self.shapes[0]))
        if len(self.shapes) == 1:
            return tree_unflatten([flat.reshape(tuple(batch) + tuple(self.shapes[0]))], self.spec)
        parts = torch.split(flat, self.sizes, dim=-1)
        leaves = [
            p.reshape(tuple(batch) + tuple(shape)).to(dtype)
            for p, shape, dtype in zip(parts, self.shapes, self.dtypes)
        ]
        return tree_unflatten(leaves, self.spec)

    def flat_matvec(self, matvec: Callable[[TensorTree], TensorTree]) -> Callable:
        """Wrap a tree-to-tree ``matvec`` as a flat ``(*batch, n) -> (*batch, n)`` map."""

        def flat(v: torch.Tensor) -> torch.Tensor:
            return self.ravel(matvec(self.unravel(v)))

        return flat


def split_leaves(tree: Any, keep: Callable[[Any], bool]) -> tuple[list, Callable[[Sequence], Any]]:
    """The leaves of ``tree`` for which ``keep`` holds, and a function putting new
    values in their places (the other leaves are held fixed)."""
    leaves, spec = tree_flatten(tree)
    positions = [i for i, x in enumerate(leaves) if keep(x)]

    def rebuild(new_leaves: Sequence) -> Any:
        full = list(leaves)
        for i, x in zip(positions, new_leaves):
            full[i] = x
        return tree_unflatten(full, spec)

    return [leaves[i] for i in positions], rebuild


def tree_vdot(a: TensorTree, b: TensorTree) -> torch.Tensor:
    """Sum over all leaves of the elementwise product (a 0-d tensor)."""
    terms = [(x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b))]
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


def tree_norm(tree: TensorTree) -> torch.Tensor:
    """Euclidean norm of all leaves together (a 0-d tensor)."""
    leaves = [x.reshape(-1) for x in tree_leaves(tree)]
    return torch.linalg.vector_norm(torch.cat(leaves) if len(leaves) > 1 else leaves[0])


def is_transformed(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform (vmap / grad levels),
    where its values cannot be read on the host."""
    if torch.compiler.is_compiling():  # values are symbolic while tracing
        return True
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


def inside_transform() -> bool:
    """Whether code runs inside a torch.func transform (vmap, grad, jvp levels),
    where plain ``torch.autograd`` calls are not allowed."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is not None and level() is not None


def in_dual_level() -> bool:
    """Whether code runs inside a :mod:`torch.autograd.forward_ad` dual level (forward
    mode by dual tensors), where tangents ride on the tensors themselves."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def seeded_normal_like(tensors: Sequence[torch.Tensor], gen: torch.Generator) -> list:
    """Standard normal draws shaped like ``tensors`` (in their dtypes and devices),
    from the CPU generator ``gen``, so that every device gets the same numbers.

    They are drawn in one call and moved in one copy; on CUDA the copy is from
    pinned memory and does not make the host wait (a copy from ordinary host
    memory does, once per tensor)."""
    if not tensors:
        return []
    sizes = [t.numel() for t in tensors]
    # the same plain draw inside a torch.func transform (vmap refuses random operations,
    # though these numbers are the same for every batch element)
    outside = getattr(torch._C, "_DisableFuncTorch", None)
    with outside() if outside is not None and inside_transform() else contextlib.nullcontext():
        draw = torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
    device = tensors[0].device
    if device.type == "cuda":
        draw = draw.pin_memory().to(device, non_blocking=True)
    return [piece.reshape(t.shape).to(t) for piece, t in zip(draw.split(sizes), tensors)]


def all_finite(leaves: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor of ``leaves`` is finite (one host synchronisation).

    Tensors inside a torch.func transform are not inspected (their values are
    checked where the transform unwraps them, e.g. in the adjoint solve).
    """
    if any(is_transformed(x) for x in leaves if torch.is_tensor(x)):
        return True
    flags = [torch.isfinite(x).all() for x in leaves if x.is_floating_point() or x.is_complex()]
    if not flags:
        return True
    return bool(torch.stack(flags).all()) if len(flags) > 1 else bool(flags[0])
