"""One status vocabulary and one family of warnings for the whole library.

Every iterative routine of :mod:`bilevel` (linear solves, inner solvers, bilevel
algorithms) reports its outcome per batch element with a :class:`Status` code,
and every message names the remedy.  Warnings derive from
:class:`BilevelWarning`, so ``warnings.simplefilter("error", BilevelWarning)``
turns every certificate failure into an exception.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """Outcome of an iterative routine, one code per batch element.

    An :class:`enum.IntEnum`, so a batch of outcomes is an integer tensor of
    these codes (e.g. ``info.status`` of a linear solve), and each member's
    :attr:`message` names the remedy.

    Example:
        >>> import torch
        >>> from bilevel.status import Status
        >>> codes = torch.tensor([0, 1])                 # a batch of two outcomes
        >>> [Status(int(c)).name for c in codes]
        ['SUCCESS', 'MAX_ITERATIONS']
        >>> Status.MAX_ITERATIONS.message.split(";")[1].strip()
        'raise `maxiter`, loosen `tol`, or precondition the system'
    """

    SUCCESS = 0
    """The tolerance was reached."""
    MAX_ITERATIONS = 1
    """The iteration budget ran out before the tolerance was reached (for a
    Neumann series: its terms did not shrink at all)."""
    BREAKDOWN = 2
    """The method broke down, from non-positive curvature in CG (the operator is not
    positive definite), a zero denominator in BiCGStab, or a singular matrix in a
    direct solve."""
    NONFINITE = 3
    """A NaN or an infinity appeared in the iterates."""
    DIVERGED = 4
    """The residual grew without bound (e.g. a Neumann series with a step
    ``alpha`` above ``2 / L``)."""
    INACCURATE = 5
    r"""A Krylov method met the tolerance on its own (recursively updated) residual,
    but the true residual :math:`\|b - A x\|` of the returned solution misses it
    by more than a factor 10, or a direct solve's residual exceeds
    :math:`10\sqrt{\mathrm{eps}}\,\|b\|`: rounding errors grown by an
    ill-conditioned (or numerically singular) operator."""

    @property
    def message(self) -> str:
        """What happened and how to fix it, in one sentence."""
        return _MESSAGES[self]


_MESSAGES = {
    Status.SUCCESS: "converged",
    Status.MAX_ITERATIONS: (
        "the iteration budget ran out before the tolerance was reached; raise "
        "`maxiter`, loosen `tol`, or precondition the system; a Neumann series that "
        "made no progress has alpha far below 1 / L: use alpha=None"
    ),
    Status.BREAKDOWN: (
        "the method broke down: the operator is singular or, for CG, not positive "
        "definite; add damping (H + eps*I), use a least-squares solve "
        "(NormalCG or Direct('lstsq')), or a single-loop method for non-convex "
        "inner problems"
    ),
    Status.NONFINITE: (
        "non-finite values appeared; check the inputs and the operator for "
        "NaN/inf and reduce step sizes"
    ),
    Status.DIVERGED: (
        "the iteration diverged; for Neumann use alpha < 2 / L (L the largest "
        "eigenvalue), or alpha=None to estimate it"
    ),
    Status.INACCURATE: (
        "the true residual b - A x of the returned solution misses the tolerance "
        "(for a Krylov method, although its own residual met it): the system is too "
        "ill-conditioned, or numerically singular, for this tolerance in this dtype; "
        "loosen `tol`, add damping, precondition, or solve in float64"
    ),
}


class BilevelWarning(UserWarning):
    """Base class of every warning issued by :mod:`bilevel`."""


class ConvergenceWarning(BilevelWarning):
    """An iterative solve stopped before reaching its tolerance."""


class OptimalityWarning(BilevelWarning):
    """The point where the implicit function theorem is applied is not a root of
    the optimality condition (the inner solver stopped early)."""


class CurvatureWarning(BilevelWarning):
    """The linear system of the implicit function theorem is singular or
    indefinite: the implicit gradient is not well defined there."""


class CapturedTensorWarning(BilevelWarning):
    """A tensor that requires grad reaches an optimality condition through a
    closure instead of an argument, so no implicit gradient flows to it."""


class StepSizeWarning(BilevelWarning):
    """A derived step size was too large: the iterates blew up, the method went
    back to its last checkpoint and continues with a smaller step."""


class BilevelError(RuntimeError):
    """Raised in strict mode where a warning would otherwise be issued."""


__all__ = [
    "Status",
    "BilevelWarning",
    "ConvergenceWarning",
    "OptimalityWarning",
    "CurvatureWarning",
    "StepSizeWarning",
    "CapturedTensorWarning",
    "BilevelError",
]
