r"""The smallest eigenvalue of a symmetric operator by the Lanczos method.

For a symmetric :math:`H` given by its products, ``m`` Lanczos steps from a unit
vector :math:`q_1` build an orthonormal basis :math:`Q_m` of the Krylov space
:math:`\mathcal K_m(H, q_1)` and the tridiagonal :math:`T_m = Q_m^\top H Q_m`:

.. math::

    \beta_{j+1} q_{j+1} = H q_j - \alpha_j q_j - \beta_j q_{j-1},
    \qquad \alpha_j = q_j^\top H q_j .

The smallest eigenvalue :math:`\theta` of :math:`T_m` (a Ritz value) is the
minimum of the Rayleigh quotient over :math:`\mathcal K_m`, so
:math:`\lambda_{\min}(H) \le \theta`, and it approaches :math:`\lambda_{\min}` far
faster than power iteration on a shifted operator (Chebyshev rather than
geometric convergence: on a spectrum spread evenly over :math:`[\mu, 100\mu]` in
200 dimensions, 20 steps overestimate :math:`\mu` 1.3 times where shifted power
iteration is 4.4 times off).  The Ritz vector :math:`Q_m s` of :math:`\theta` is
returned too: started from it, the next estimate at a nearby point continues where
this one stopped.

Reference: C. Lanczos, *An iteration method for the solution of the eigenvalue
problem of linear differential and integral operators*, J. Res. Nat. Bur.
Standards 45 (1950); G. H. Golub and C. F. Van Loan, *Matrix Computations*,
4th ed., ch. 10.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .._tree import seeded_normal_like

_RANDOM_SHARE = 0.1
"""Weight of a random direction mixed into a warm start, so that the Krylov space
keeps every eigen-direction (a start that is an eigenvector would stop at once)."""

BASIS_BYTES = 2**27
"""Largest Lanczos basis kept (128 MiB of float64 vectors: about 800 000 unknowns at
20 steps).  A larger problem runs the three-term recurrence in O(n) memory, without
full reorthogonalization and without a Ritz vector."""

_CLOSED = 10.0
"""A step ends the recurrence when its :math:`\beta` is below this many rounding units
of the recurrence (float64) times the largest :math:`|\alpha|, \beta` before it: only a
Krylov space closed to the last bits.  A space closed to the products' accuracy alone
runs on, over rounding noise that the float64 basis keeps orthogonal: its Ritz values
stay within that accuracy of the spectrum (a cut-off at the products' rounding unit
declared bfloat16 and float16 spaces closed after one step, with 1.0 for 0.5)."""


def lowest_eigenpair(
    matvec: Callable[[torch.Tensor], torch.Tensor], size: int, iterations: int, *,
    dtype: torch.dtype, device: torch.device, start: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[float, Optional[torch.Tensor]]:
    r"""The smallest eigenvalue of the symmetric ``matvec`` on vectors of ``size``
    entries, and its Ritz vector, from ``iterations`` Lanczos steps.

    The products are taken in ``dtype``; the recurrence and the basis are kept in
    float64, so that a float32 (or half) operator loses only the accuracy of its own
    products, :math:`O(\epsilon\,\|H\|)`, not the orthogonality of the basis (in
    float32 a basis run past a closed Krylov space drifts far from orthogonal, and
    its Ritz values with it).

    Args:
        matvec: ``v -> H v`` on flat vectors of ``dtype``.
        size: the dimension of ``v``.
        iterations: Lanczos steps (products with ``H``); at most ``size`` are taken.
        dtype, device: of the vectors ``matvec`` takes.
        start: a warm start (e.g. the Ritz vector of an earlier estimate); a random
            direction of weight 0.1 is mixed in.  ``None``: a random start.
        generator: a CPU generator for the random direction (reproducible estimates).

    Returns:
        ``(theta, u)``: the Ritz value, an upper bound on :math:`\lambda_{\min}(H)`
        up to the products' rounding, and the unit Ritz vector ``u`` (float64, on
        ``device``), or ``None`` where the basis would exceed :data:`BASIS_BYTES`.
        A kept basis is reorthogonalized in full (two matrix-vector products with it
        per step); a larger problem keeps the last two vectors only (three-term
        recurrence, reorthogonalized against them; lost orthogonality then repeats
        converged Ritz values but leaves them within rounding of the spectrum).  The
        only host read is of :math:`T_m` at the end; a Krylov space that closes early
        (an invariant subspace) ends the recurrence there.

    Raises:
        FloatingPointError: the products are not finite.
    """
    steps = max(1, min(int(iterations), int(size)))
    work = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
    tiny = torch.finfo(work).tiny
    drawn = seeded_normal_like([torch.empty(size, dtype=work, device=device)],
                               generator if generator is not None else torch.Generator())[0]
    if start is not None:
        start = start.reshape(-1).to(device=device, dtype=work)
        drawn = start / start.norm().clamp_min(tiny) + _RANDOM_SHARE * drawn / drawn.norm()
    q = drawn / drawn.norm().clamp_min(tiny)
    keep = (steps + 1) * size * torch.finfo(work).bits // 8 <= BASIS_BYTES
    basis = torch.zeros(steps + 1, size, dtype=work, device=device) if keep else None
    previous = torch.zeros_like(q)
    alphas, betas = [], []
    for j in range(steps):
        if keep:
            basis[j] = q
        w = matvec(q.to(dtype)).to(work)
        alpha = torch.dot(w, q)
        for _ in range(2):  # reorthogonalization, twice is enough (Kahan)
            if keep:
                w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
            else:
                w = w - torch.dot(w, q) * q - torch.dot(w, previous) * previous
        beta = w.norm()
        previous, q = q, w / beta.clamp_min(tiny)
        alphas.append(alpha)
        betas.append(beta)
    numbers = np.asarray(torch.stack(alphas + betas).tolist(), dtype=np.float64)  # the one host read
    if not np.isfinite(numbers).all():
        raise FloatingPointError("the products of the Lanczos iteration are not finite.")
    alpha, beta = numbers[:steps], numbers[steps:]
    # the scale each beta is judged against: the largest |alpha|, beta up to it (a later
    # step, run on the rounding noise of a closed space, must not move an earlier verdict)
    scale = np.maximum.accumulate(np.maximum(np.abs(alpha), np.concatenate([[0.0], beta[:-1]])))
    unit = _CLOSED * torch.finfo(work).eps
    closed = np.flatnonzero(beta[:-1] <= unit * scale[:-1])
    m = int(closed[0]) + 1 if len(closed) else steps  # the Krylov space closed after step m
    tridiagonal = np.diag(alpha[:m]) + np.diag(beta[: m - 1], 1) + np.diag(beta[: m - 1], -1)
    values, vectors = np.linalg.eigh(tridiagonal)
    if not keep:
        return float(values[0]), None
    weights = torch.as_tensor(vectors[:, 0], dtype=work).to(device=device, non_blocking=True)
    ritz = weights @ basis[:m]
    return float(values[0]), ritz / ritz.norm().clamp_min(tiny)


__all__ = ["lowest_eigenpair", "BASIS_BYTES"]
