"""Default tolerances that scale with the floating-point type."""

from __future__ import annotations

import torch


def default_tol(dtype: torch.dtype) -> float:
    """Relative tolerance for linear solves: ``sqrt(eps)`` of ``dtype``.

    About 1.5e-8 in float64 and 3.5e-4 in float32: reachable in each precision,
    so float32 does not warn on every call and float64 is not cut short.
    """
    return float(torch.finfo(dtype).eps) ** 0.5


def default_residual_tol(dtype: torch.dtype) -> float:
    """Tolerance on an optimality residual before it is flagged: ``eps ** 0.25``.

    About 1.2e-4 in float64 and 1.9e-2 in float32, measured against
    ``max(1, ||sol||)``.
    """
    return float(torch.finfo(dtype).eps) ** 0.25


def floating_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The floating dtype shared by ``tensors`` (default dtype if there is none)."""
    for t in tensors:
        if torch.is_tensor(t) and t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()
