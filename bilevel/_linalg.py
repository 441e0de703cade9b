"""LU-based dense solves on the CPU, guarded against a hang in torch 2.13.

With more than one intra-op thread, torch 2.13's CPU ``torch.linalg.lu_factor_ex``
(and ``solve`` / ``solve_ex`` / ``inv``, which factorize the same way) on a batch of two
or more matrices of order 151 or more prints "Intel oneMKL ERROR: Parameter 6 was
incorrect on entry to DLASWP" and never returns (torch 2.13.0+cpu, oneMKL 2024.2; a
single matrix, one thread, ``lu_solve``, Cholesky, ``lstsq``, ``eigh`` and ``svd`` are
fine).  The batched interior-point QP of a 50-variable simplex projection written in
CVXPY already builds KKT matrices of order 151.  These wrappers run such calls with
one intra-op thread (restored afterwards); every other call is torch's own.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from ._tree import is_transformed

_GUARDED_ORDER = 128
"""Matrices of at least this order are factorized with one thread when batched (the
hang starts at 151; the margin costs nothing measurable)."""


@contextlib.contextmanager
def _safe_threads(A: torch.Tensor) -> Iterator[None]:
    batched = A.dim() > 2 and math.prod(A.shape[:-2]) > 1
    risky = (A.device.type == "cpu" and A.shape[-1] >= _GUARDED_ORDER and (batched or is_transformed(A))
             and torch.get_num_threads() > 1)
    if not risky:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def lu_factor_ex(A: torch.Tensor):
    """:func:`torch.linalg.lu_factor_ex`, safe on batched CPU matrices (module docstring)."""
    with _safe_threads(A):
        return torch.linalg.lu_factor_ex(A)


def solve_ex(A: torch.Tensor, B: torch.Tensor):
    """:func:`torch.linalg.solve_ex`, safe on batched CPU matrices (module docstring)."""
    with _safe_threads(A):
        return torch.linalg.solve_ex(A, B)


def solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """:func:`torch.linalg.solve`, safe on batched CPU matrices (module docstring)."""
    with _safe_threads(A):
        return torch.linalg.solve(A, B)
